"""What continuing buys: val loss = a + b * tokens^(-c) fitted to the run, extrapolated to 2x
and 4x its tokens, with an interval from the noise and from a backtest on its own first half."""

import math
from dataclasses import dataclass

import numpy as np

from fineweb_gpt.doctor.curve import SKIP_EARLY, find_flattening, rise_since_lowest
from fineweb_gpt.doctor.record import Finding, RunRecord
from fineweb_gpt.flops import human_count

MIN_FIT_POINTS = 6
MIN_BACKTEST_POINTS = 4
WORTH_CONTINUING = 0.02  # nats of val loss that doubling the tokens must buy
EXPONENTS = np.geomspace(0.01, 3.0, 800)


@dataclass(frozen=True)
class PowerLaw:
    """L(t) = a + b * t^(-c): loss against tokens seen."""

    a: float
    b: float
    c: float

    def __call__(self, tokens):
        return self.a + self.b * np.power(tokens, -self.c)


def fit_power_law(tokens, losses) -> PowerLaw | None:
    """Least squares for a and b at each exponent c of a grid, keeping the best c; None when
    no falling curve fits. Tokens are scaled by the largest so t^(-c) stays near 1."""
    t, y = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    if len(t) < 3 or not (np.all(np.isfinite(t)) and np.all(np.isfinite(y)) and np.all(t > 0)):
        return None
    scale = t.max()
    with np.errstate(all="ignore"):
        x = (t / scale)[None, :] ** -EXPONENTS[:, None]
        x_centered = x - x.mean(axis=1, keepdims=True)
        slope = (x_centered @ (y - y.mean())) / (x_centered**2).sum(axis=1)
        intercept = y.mean() - slope * x.mean(axis=1)
        squared_error = ((y - intercept[:, None] - slope[:, None] * x) ** 2).sum(axis=1)
        squared_error[~(slope > 0)] = np.inf  # more tokens must lower the loss
        best = int(np.argmin(squared_error))
        if not np.isfinite(squared_error[best]):
            return None
        c = float(EXPONENTS[best])
        fit = PowerLaw(float(intercept[best]), float(slope[best] * scale**c), c)
    return fit if math.isfinite(fit.a) and math.isfinite(fit.b) else None


@dataclass(frozen=True)
class Forecast:
    fit: PowerLaw
    residual_rms: float
    backtest_error: float | None  # what extrapolating 2x cost on this curve's own first half
    predictions: dict[float, tuple[float, float, float]]  # tokens -> (val loss, low, high) of a 90% interval


def forecast_loss(tokens, losses, at: list[float], resamples: int = 200, seed: int = 0) -> Forecast | None:
    """Fit the curve and predict the loss at `at` tokens, with a 90% interval.

    The interval is the spread of refits on residual-bootstrap resamples (noise in the
    points), widened by a backtest: the curve fitted to the first half of the tokens,
    extrapolated 2x to the last point, misses the full fit by some amount, and that miss
    is added for each doubling beyond the data (error of the form, not the noise).
    """
    fit = fit_power_law(tokens, losses)
    if fit is None:
        return None
    t, y = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    last = t.max()
    fitted = fit(t)
    residuals = y - fitted
    rng = np.random.default_rng(seed)
    refits = [fit_power_law(t, fitted + rng.choice(residuals, size=len(t))) for _ in range(resamples)]
    refits = [refit for refit in refits if refit is not None]
    first_half = t <= last / 2
    early = fit_power_law(t[first_half], y[first_half]) if first_half.sum() >= MIN_BACKTEST_POINTS else None
    backtest_error = abs(float(early(last) - fit(last))) if early is not None else None
    predictions = {}
    for target in at:
        low, high = np.percentile([refit(target) for refit in refits], [5, 95]) if refits else (fit(target),) * 2
        widen = (backtest_error or 0.0) * math.log2(target / last)
        predictions[target] = (float(fit(target)), float(low - widen), float(high + widen))
    return Forecast(fit, float(np.sqrt(np.mean(residuals**2))), backtest_error, predictions)


def check_forecast(run: RunRecord) -> Finding | None:
    """What continuing buys: the fitted val curve at 2x and 4x the tokens (or steps)."""
    points = [p for p in run.points("val/loss") if p.x > 0]
    if not points or rise_since_lowest(run) or find_flattening(run):
        return None  # a rising or flat curve: the overfitting or plateau finding says what continuing does
    last = points[-1]
    unit = run.progress_unit
    fitted = [p for p in points if p.x >= SKIP_EARLY * last.x]
    title = "What continuing buys"
    if len(fitted) < MIN_FIT_POINTS:
        evidence = (
            f"{len(fitted)} evaluations after the first {SKIP_EARLY:.0%} of the {unit}; fitting "
            f"L(t) = a + b*t^(-c) needs at least {MIN_FIT_POINTS}: too few points to forecast"
        )
        return Finding("forecast", False, title, evidence, "evaluate more often to get a forecast")
    forecast = forecast_loss([p.x for p in fitted], [p.value for p in fitted], [2 * last.x, 4 * last.x])
    if forecast is None:
        return Finding("forecast", False, title, f"val loss does not fall with more {unit}: nothing to extrapolate")
    fit, now = forecast.fit, float(forecast.fit(last.x))
    lines = [
        f"{target / last.x:.0f}x ({human_count(target)} {unit}): {loss:.3f} "
        f"(90% interval {low:.3f} to {high:.3f}), {now - loss:.3f} below the fitted {now:.3f} now"
        for target, (loss, low, high) in forecast.predictions.items()
    ]
    if forecast.backtest_error is None:
        backtest = f"too few points in the first half of the {unit} for a backtest, so the interval is only the noise"
    else:
        backtest = (
            f"fitted to the first half of the {unit}, the curve misses the full fit at the end by "
            f"{forecast.backtest_error:.3f}, an error added to the interval for each doubling"
        )
    evidence = (
        f"L(t) = {fit.a:.3f} + {fit.b:.4g}*t^(-{fit.c:.3f}) fits {len(fitted)} evaluations "
        f"(rms residual {forecast.residual_rms:.4f}); " + "; ".join(lines) + f"; {backtest}. "
        "A longer run would also stretch the learning-rate schedule, which the fit does not see"
    )
    _, _, worst_case = forecast.predictions[2 * last.x]
    if now - worst_case >= WORTH_CONTINUING:
        fix = f"continuing is worth it: doubling the {unit} lowers val loss by at least {now - worst_case:.3f}"
    else:
        fix = f"continuing buys little (maybe under {WORTH_CONTINUING} at 2x): a larger model or better data gains more"
    unique = run.get("unique_train_tokens")
    if unique and last.tokens is not None and 2 * last.tokens > unique:
        fix += f"; 2x the tokens is {2 * last.tokens / unique:.2f} epochs of this data, so add data first"
    return Finding("forecast", False, title, evidence, fix)
