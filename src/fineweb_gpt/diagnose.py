"""Diagnose a training run from its measurements, the way an expert reads its curves.

A run is a plain record: a summary (run_summary.json's keys) and rows of metrics, one dict
per logged optimizer step or evaluation holding only the columns that row has. It comes
from a fineweb_gpt run folder or from a nanoGPT console log (parse_nanogpt_log). Every check
is a pure function of the record that returns a Finding or None, so the doctor command line
and training (health.RunHealth, driven by callbacks.RunMonitor) run the same checks.
"""

import ast
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import numpy as np

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import (
    CHINCHILLA_TOKENS_PER_PARAM,
    GPU,
    PADDED_VOCAB_SIZE,
    gpu_for_device,
    gpu_table,
    human_count,
    human_ratio,
    param_count,
    size_in_name,
)

GIB = 2**30


# Thresholds: where a measurement becomes worth a user's attention.
SIZE_TOLERANCE = 0.20  # stated vs real parameter count
UNDERTRAINED = 0.5  # of the Chinchilla-optimal token count
OVERFIT_RISE = 0.02  # nats of val loss above its lowest point
PLATEAU_DROP = 0.01  # nats of improvement that still count as flat
PLATEAU_SHARE = 0.25  # of the tokens seen, flat for at least this long
LR_STILL_HIGH = 0.5  # of the peak learning rate
MIN_LR_SHARE = 0.1  # min_lr as a share of the peak that decays far enough
MFU_LOW = 0.30
OUTLIER_FACTOR = 3.0  # step times this far above the median include evaluation or compilation
FIT_FROM = 0.1  # the power-law fit skips the first 10% of tokens, where warmup shapes the curve
MIN_FIT_POINTS = 6
MIN_BACKTEST_POINTS = 4
WORTH_CONTINUING = 0.02  # nats of val loss that doubling the tokens must buy


class Point(NamedTuple):
    tokens: float
    value: float
    step: int


@dataclass
class RunRecord:
    """What the checks read: a summary dict (run_summary.json's keys, plus "source":
    "fineweb_gpt" or "nanogpt") and metric rows in training order."""

    summary: dict
    rows: list[dict] = field(default_factory=list)

    def get(self, key: str, default=None):
        value = self.summary.get(key)
        return default if value is None else value

    @property
    def source(self) -> str:
        return self.get("source", "fineweb_gpt")

    def tokens(self, row: dict) -> float | None:
        if "data/tokens_seen" in row:
            return row["data/tokens_seen"]
        if "step" in row and self.get("tokens_per_step"):
            return row["step"] * self.summary["tokens_per_step"]
        return None

    def points(self, column: str) -> list[Point]:
        """(tokens seen, value, step) of every row that has the column, in training order."""
        return [
            Point(tokens, row[column], int(row.get("step", 0)))
            for row in self.rows
            if column in row and (tokens := self.tokens(row)) is not None
        ]

    @property
    def tokens_seen(self) -> float:
        return max((t for row in self.rows if (t := self.tokens(row)) is not None), default=0.0)

    @property
    def planned_tokens(self) -> float | None:
        if self.get("planned_tokens"):
            return self.summary["planned_tokens"]
        if self.get("max_steps", 0) > 0 and self.get("tokens_per_step"):
            return self.summary["max_steps"] * self.summary["tokens_per_step"]
        return None

    @property
    def num_params(self) -> float | None:
        if self.get("num_params"):
            return self.summary["num_params"]
        if all(self.get(key) for key in ("n_layer", "n_embd")):
            return param_count(self.get("n_layer"), self.get("n_embd"), self.get("vocab_size", PADDED_VOCAB_SIZE))
        return None

    @property
    def epochs(self) -> float | None:
        unique = self.get("unique_train_tokens")
        return self.tokens_seen / unique if unique else None

    def setting(self, name: str, value=None) -> str:
        """The setting as this run's own command line spells it, so a fix can be pasted."""
        return SETTING_SPELLINGS[self.source][name].format(value)


# How each source spells a setting on its command line.
SETTING_SPELLINGS = {
    "fineweb_gpt": {
        "n_embd": "model.n_embd={}",
        "dropout": "model.dropout={}",
        "min_lr": "optim.min_lr={:.2g}",
        "max_steps": "trainer.max_steps={}",
        "micro_batch": "hw.micro_batch_size={}",
        "compile": "hw.compile=true",
        "more_data": "data=multi_shard data.paths='[...]'",
    },
    "nanogpt": {
        "n_embd": "--n_embd={}",
        "dropout": "--dropout={}",
        "min_lr": "--min_lr={:.2g}",
        "max_steps": "--max_iters={}",
        "decay_steps": "--lr_decay_iters={}",
        "micro_batch": "--batch_size={}",
        "compile": "--compile=True",
        "more_data": "prepare more documents into train.bin",
    },
}


@dataclass(frozen=True)
class Finding:
    check: str  # the check that found it; the health callback warns once per check
    problem: bool  # False: context worth knowing, nothing to fix
    title: str
    evidence: str  # the numbers behind it
    fix: str = ""  # the concrete change


# --- model size ---------------------------------------------------------------------------


def width_for_size(target: float, n_layer: int, n_head: int, vocab_size: int, bias: bool) -> int:
    """The n_embd (a multiple of n_head) whose parameter count is nearest the target."""
    # Past this width either the embedding (V*d) or the blocks (12*L*d^2) alone exceed twice the target.
    limit = min(2 * target / vocab_size, math.sqrt(2 * target / (12 * n_layer))) + n_head
    widths = range(n_head, int(limit) + 1, n_head)
    return min(widths, key=lambda d: abs(param_count(n_layer, d, vocab_size, bias) - target))


def check_model_size(run: RunRecord) -> Finding | None:
    """The name says one size and the parameter count another (a '124M' config at n_embd=384)."""
    names = [run.get("model_name"), *run.get("run_names", [])]
    stated = next(((name, size) for name in names if name and (size := size_in_name(str(name)))), None)
    actual = run.num_params
    if stated is None or not actual:
        return None
    name, size = stated
    if abs(actual - size) <= SIZE_TOLERANCE * size:
        return None
    shape = {key: run.get(key) for key in ("n_layer", "n_head", "n_embd", "vocab_size", "bias")}
    evidence = (
        f"'{name}' says {human_count(size)} parameters but the model has {human_count(actual)} "
        f"({', '.join(f'{k}={v}' for k, v in shape.items() if v is not None)}): {actual / size:.2f}x the stated size"
    )
    if not all(shape[key] for key in ("n_layer", "n_head")):
        return Finding("model_size", True, "Model size does not match its name", evidence)
    vocab, bias = run.get("vocab_size", PADDED_VOCAB_SIZE), run.get("bias", False)
    width = width_for_size(size, shape["n_layer"], shape["n_head"], vocab, bias)
    fix = (
        f"{run.setting('n_embd', width)} gives {human_count(param_count(shape['n_layer'], width, vocab, bias))} "
        f"with n_layer={shape['n_layer']} and n_head={shape['n_head']} unchanged"
    )
    return Finding("model_size", True, "Model size does not match its name", evidence, fix)


# --- tokens and epochs --------------------------------------------------------------------


def check_token_budget(run: RunRecord) -> Finding | None:
    """Tokens seen against the Chinchilla-optimal 20 per parameter."""
    params, seen = run.num_params, run.tokens_seen
    if not params or not seen:
        return None
    optimal = CHINCHILLA_TOKENS_PER_PARAM * params
    planned = run.planned_tokens
    evidence = (
        f"{human_count(seen)} tokens seen = {seen / params:.3g} per parameter, {human_ratio(seen / optimal)}x the "
        f"Chinchilla-optimal {human_count(optimal)} ({CHINCHILLA_TOKENS_PER_PARAM} per parameter "
        f"for {human_count(params)})"
    )
    if planned and planned > seen:
        evidence += f"; the plan is {human_count(planned)} tokens ({human_ratio(planned / optimal)}x)"
    total = max(planned or 0, seen)
    if total >= UNDERTRAINED * optimal:
        if total >= 1.5 * optimal:
            evidence += ": more tokens than compute-optimal still lower the loss, at a falling rate"
        return Finding("token_budget", False, f"Tokens: {human_ratio(total / optimal)}x Chinchilla-optimal", evidence)
    fix = f"train about {human_count(optimal)} tokens"
    if run.get("tokens_per_step"):
        steps = math.ceil(optimal / run.summary["tokens_per_step"])
        fix += f" ({run.setting('max_steps', steps)} at {run.summary['tokens_per_step']:,} tokens per step)"
    fix += f", or, for this budget, a model of about {human_count(total / CHINCHILLA_TOKENS_PER_PARAM)} parameters"
    title = f"Undertrained: {human_ratio(total / optimal)}x the Chinchilla-optimal tokens"
    return Finding("token_budget", True, title, evidence, fix)


def check_epochs(run: RunRecord) -> Finding | None:
    """Tokens seen against the unique tokens in the training data; repeats stall the loss."""
    unique, epochs = run.get("unique_train_tokens"), run.epochs
    if not run.tokens_seen and not run.planned_tokens:
        return None  # nothing trained and no plan: nothing to judge yet
    if epochs is None:
        return Finding(
            "epochs",
            False,
            "Epochs: unknown",
            "the number of unique training tokens is not known, so repeated data cannot be ruled out",
            "pass --train-tokens N (the tokens in the training data) to check it",
        )
    about = "about " if run.get("unique_train_tokens_estimated") else ""
    evidence = (
        f"{human_count(run.tokens_seen)} tokens seen over {about}{human_count(unique)} unique training tokens "
        f"= {epochs:.2f} epochs"
    )
    planned_epochs = (run.planned_tokens or 0) / unique
    if planned_epochs > epochs:
        evidence += f"; the plan is {planned_epochs:.2f} epochs"
    if max(epochs, planned_epochs) <= 1:
        return Finding("epochs", False, f"Epochs: {epochs:.2f}", evidence + ": every token is new to the model")

    files = run.get("data_files", [])
    if len(files) == 1:
        evidence += (
            f", all from one parquet file ({files[0]}): the model sees the same documents again and again, the "
            "likely cause of a plateau (train loss keeps falling while val loss stalls or rises)"
        )
    else:
        evidence += ": repeated documents teach less each time, so val loss stops improving"
    needed = max(run.tokens_seen, run.planned_tokens or 0)
    fix = f"train on at least {human_count(needed)} unique tokens: {run.setting('more_data')}"
    if files:
        fix += f" with about {math.ceil(needed / (unique / len(files)))} files like these"
    if run.get("tokens_per_step"):
        one_epoch = max(1, int(unique // run.summary["tokens_per_step"]))
        fix += f"; or stop after one epoch: {run.setting('max_steps', one_epoch)}"
    return Finding("epochs", True, f"Repeated data: {max(epochs, planned_epochs):.1f} epochs", evidence, fix)


# --- the loss curve -----------------------------------------------------------------------


def mean_train_loss_before(run: RunRecord, tokens: float, last: int = 20) -> float | None:
    """Mean of the last few training losses logged up to `tokens` (one batch's loss is noisy)."""
    losses = [p.value for p in run.points("train/loss") if p.tokens <= tokens][-last:]
    return sum(losses) / len(losses) if losses else None


def rise_since_lowest(run: RunRecord) -> tuple[Point, Point] | None:
    """(the lowest evaluation, the last one) when val loss has risen since its lowest point."""
    points = run.points("val/loss")
    if len(points) < 3:
        return None
    best = min(points, key=lambda p: p.value)
    return (best, points[-1]) if points[-1].value - best.value > OVERFIT_RISE else None


def check_overfitting(run: RunRecord) -> Finding | None:
    """Val loss rising from its lowest point while training goes on."""
    found = rise_since_lowest(run)
    if found is None:
        return None
    best, last = found
    evidence = (
        f"val loss was lowest at step {best.step} ({human_count(best.tokens)} tokens): {best.value:.4f}; at step "
        f"{last.step} it is {last.value:.4f}, {last.value - best.value:+.4f} higher"
    )
    train = mean_train_loss_before(run, last.tokens)
    if train is not None:
        evidence += f"; train loss is now {train:.4f}"
    fix = f"keep the checkpoint nearest step {best.step} (training on makes it worse); to go further, more unique data"
    if run.epochs and run.epochs > 1:
        fix += f" (this run has seen its data {run.epochs:.1f} times)"
    return Finding("overfitting", True, f"Overfitting since step {best.step}", evidence, fix)


def flat_since(run: RunRecord) -> tuple[Point, Point] | None:
    """(where val loss flattened, the last evaluation) when it has been flat, within
    PLATEAU_DROP, for at least PLATEAU_SHARE of the tokens seen."""
    points = [p for p in run.points("val/loss") if p.tokens > 0]
    if len(points) < 4:
        return None
    lowest_after = [min(p.value for p in points[i:]) for i in range(len(points))]
    start = next(p for p, low in zip(points, lowest_after) if p.value - low < PLATEAU_DROP)
    last = points[-1]
    return (start, last) if last.tokens - start.tokens >= PLATEAU_SHARE * last.tokens else None


def lr_at(run: RunRecord, tokens: float) -> float | None:
    points = run.points("train/lr")
    return min(points, key=lambda p: abs(p.tokens - tokens)).value if points else None


def peak_lr(run: RunRecord) -> float | None:
    return run.get("lr") or max((p.value for p in run.points("train/lr")), default=None)


def check_plateau(run: RunRecord) -> Finding | None:
    """Val loss flat over the last part of the run (rising is the overfitting check's)."""
    found = flat_since(run)
    if found is None or rise_since_lowest(run):
        return None
    start, last = found
    evidence = (
        f"val loss moved {last.value - start.value:+.4f} since step {start.step} ({human_count(start.tokens)} tokens): "
        f"{start.value:.4f} -> {last.value:.4f} over the last {1 - start.tokens / last.tokens:.0%} of the tokens"
    )
    learning_rate = check_lr_at_plateau(run)
    if run.epochs and run.epochs > 1:
        fix = f"the data repeats ({run.epochs:.1f} epochs): train on more unique data (see Repeated data)"
    elif learning_rate is not None and learning_rate.problem:
        fix = "the learning rate stayed high: decay it further (see Learning rate)"
    elif learning_rate is not None:
        fix = "none needed yet: the learning-rate decay still to come should lower it"
    else:
        fix = "the model learns little more from this data at this size: a larger model, or accept this loss"
    return Finding("plateau", True, f"Plateau since step {start.step}", evidence, fix)


def check_dropout(run: RunRecord) -> Finding | None:
    """Val loss below train loss with dropout on: dropout costs capacity and prevents nothing."""
    dropout = run.get("dropout", 0.0)
    val = run.points("val/loss")
    if dropout <= 0 or not val:
        return None
    last = val[-1]
    train = mean_train_loss_before(run, last.tokens)
    if train is None or last.value >= train:
        return None
    evidence = (
        f"dropout={dropout} and at step {last.step} val loss {last.value:.4f} is below train loss {train:.4f} "
        "(mean of the last logged steps): the model is not overfitting, and dropout only slows its learning"
    )
    fix = f"{run.setting('dropout', 0.0)}: with val loss below train loss there is no overfitting to prevent"
    return Finding("dropout", True, "Dropout is costing capacity", evidence, fix)


def check_lr_at_plateau(run: RunRecord) -> Finding | None:
    """The curve flattened while the learning rate was still high (where the schedule is known)."""
    found, peak = flat_since(run), peak_lr(run)
    if found is None or not peak:
        return None
    start, last = found
    lr = lr_at(run, start.tokens)
    if lr is None or lr < LR_STILL_HIGH * peak:
        return None
    evidence = (
        f"val loss flattened at step {start.step} with the learning rate at {lr:.2e}, {lr / peak:.0%} of its peak "
        f"{peak:.2e}: a high learning rate keeps the weights bouncing above the minimum, and the decay to a low one "
        "is what brings the last drop in loss"
    )
    fixes = []
    decay_steps, max_steps, min_lr = run.get("decay_steps"), run.get("max_steps"), run.get("min_lr")
    if decay_steps and max_steps and decay_steps > max_steps:
        fixes.append(
            f"{run.setting('decay_steps', max_steps)}, so the decay ends with the run (it ends at step {decay_steps}, "
            f"after the last step {max_steps})"
        )
    if min_lr is not None and min_lr > MIN_LR_SHARE * peak * 1.01:
        lower = run.setting("min_lr", MIN_LR_SHARE * peak)
        fixes.append(f"{lower} (now {min_lr:.2e}, {min_lr / peak:.0%} of the peak)")
    if fixes:
        return Finding("learning_rate", True, "Learning rate still high on the plateau", evidence, "; ".join(fixes))
    if max_steps and last.step < max_steps:
        evidence += f"; the schedule decays to {min_lr:.2e} by step {max_steps}, which should bring it down"
        return Finding("learning_rate", False, "Learning rate: the decay is still to come", evidence)
    return None


# --- speed --------------------------------------------------------------------------------


def gpu_of(run: RunRecord) -> tuple[str, GPU] | None:
    """The run's GPU from hw_name, or from the device name ('NVIDIA GeForce RTX 4070')."""
    if run.get("hw_name") in gpu_table():
        return run.summary["hw_name"], gpu_table()[run.summary["hw_name"]]
    gpu = gpu_for_device(str(run.get("device_name", "")))
    return (gpu.name, gpu) if gpu else None


def split_step_times(run: RunRecord) -> tuple[list[dict], list[dict]]:
    """(typical, outlier) rows among those with a step time. Outliers include an evaluation
    (nanoGPT's iteration after a 'step N:' line) or compilation: not slowness."""
    timed = [row for row in run.rows if "perf/step_time_ms" in row]
    if not timed:
        return [], []
    median = float(np.median([row["perf/step_time_ms"] for row in timed]))
    is_outlier = [bool(row.get("includes_eval")) or row["perf/step_time_ms"] > OUTLIER_FACTOR * median for row in timed]
    return (
        [row for row, outlier in zip(timed, is_outlier) if not outlier],
        [row for row, outlier in zip(timed, is_outlier) if outlier],
    )


def mfu_on_gpu(mfu: float, measured_against: float, gpu_peak_flops: float) -> float:
    """Re-express an MFU measured against one peak (nanoGPT: an A100's) against the real GPU's."""
    return mfu * measured_against / gpu_peak_flops


def check_mfu(run: RunRecord) -> Finding | None:
    """MFU against the right GPU's peak, with evaluation and compile steps left out."""
    typical, outliers = split_step_times(run)
    rows = typical if typical else run.rows
    gpu = gpu_of(run)
    peak = run.get("peak_flops") or (gpu[1].peak_flops if gpu else None)
    measured = [row["perf/mfu"] for row in rows if row.get("perf/mfu", -1) >= 0]  # nanoGPT prints -100% until it knows
    reference = run.get("mfu_peak_flops") or run.get("peak_flops")
    if not measured and peak and run.get("flops_per_token"):  # a run that did not know its GPU's peak
        flops_per_token = run.summary["flops_per_token"]
        measured = [row["perf/tokens_per_sec"] * flops_per_token / peak for row in rows if "perf/tokens_per_sec" in row]
        reference = peak
    if not measured or reference is None:
        return None
    median = float(np.median(measured))
    timing = ""
    if typical:
        timing = (
            f"; median step {np.median([r['perf/step_time_ms'] for r in typical]):.0f} ms over {len(typical)} steps"
        )
        if outliers:
            slowest = max(r["perf/step_time_ms"] for r in outliers)
            timing += (
                f", leaving out {len(outliers)} that include evaluation or compilation (up to {slowest:.0f} ms, "
                "not slowness)"
            )
    if peak is None:
        return Finding(
            "mfu",
            False,
            "MFU: GPU unknown",
            f"median MFU {median:.2%} against an A100's {reference / 1e12:.0f} TFLOPS (nanoGPT's fixed reference)"
            + timing,
            f"pass --gpu (one of {', '.join(gpu_table())}) to judge it against your GPU's peak",
        )
    real = mfu_on_gpu(median, reference, peak)
    gpu_name = run.get("hw_name") or (gpu[0] if gpu else "this GPU")
    evidence = f"median MFU {real:.1%} of {gpu_name}'s {peak / 1e12:.1f} TFLOPS"
    if reference != peak:
        against = "an A100's" if run.source == "nanogpt" else "the run's configured"
        evidence += f" (the log says {median:.2%}, measured against {against} {reference / 1e12:.0f} TFLOPS)"
    evidence += timing
    if real > 1:
        fix = f"MFU cannot exceed 100%: the run was not on {gpu_name}; pass the right --gpu"
        return Finding("mfu", True, "MFU above 100%: wrong GPU", evidence, fix)
    if real < MFU_LOW:
        fix = f"compile the model ({run.setting('compile')}) and use the largest micro-batch that fits (see Batch plan)"
        if "bf16" not in str(run.get("precision", "bf16")):
            fix += f"; train in bf16 (this run used {run.get('precision')})"
        return Finding("mfu", True, f"Low MFU: {real:.0%}", evidence, fix)
    if real >= 0.5:
        return Finding("mfu", False, f"MFU {real:.0%}: good", evidence + ": the GPU is kept busy")
    fix = f"compiling ({run.setting('compile')}) and the largest micro-batch that fits (see Batch plan) may add some"
    return Finding("mfu", False, f"MFU {real:.0%}: fair", evidence, fix)


# --- forecast -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLaw:
    """L(t) = a + b * t^(-c): loss against tokens seen."""

    a: float
    b: float
    c: float

    def __call__(self, tokens):
        return self.a + self.b * np.power(tokens, -self.c)


EXPONENTS = np.geomspace(0.01, 3.0, 800)


def fit_power_law(tokens, losses) -> PowerLaw | None:
    """Least squares for a and b at each exponent c of a grid, keeping the best c; None when
    no falling curve fits. Tokens are scaled by the largest so t^(-c) stays near 1."""
    t, y = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    scale = t.max()
    x = (t / scale)[None, :] ** -EXPONENTS[:, None]
    x_centered = x - x.mean(axis=1, keepdims=True)
    slope = (x_centered @ (y - y.mean())) / (x_centered**2).sum(axis=1)
    intercept = y.mean() - slope * x.mean(axis=1)
    squared_error = ((y - intercept[:, None] - slope[:, None] * x) ** 2).sum(axis=1)
    squared_error[slope <= 0] = np.inf  # more tokens must lower the loss
    best = int(np.argmin(squared_error))
    if not np.isfinite(squared_error[best]):
        return None
    c = float(EXPONENTS[best])
    return PowerLaw(float(intercept[best]), float(slope[best] * scale**c), c)


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
    first_half = t <= last / 2
    early = fit_power_law(t[first_half], y[first_half]) if first_half.sum() >= MIN_BACKTEST_POINTS else None
    backtest_error = abs(float(early(last) - fit(last))) if early is not None else None
    predictions = {}
    for target in at:
        low, high = np.percentile([refit(target) for refit in refits if refit is not None], [5, 95])
        widen = (backtest_error or 0.0) * math.log2(target / last)
        predictions[target] = (float(fit(target)), float(low - widen), float(high + widen))
    return Forecast(fit, float(np.sqrt(np.mean(residuals**2))), backtest_error, predictions)


def check_forecast(run: RunRecord) -> Finding | None:
    """What continuing buys: the fitted val curve at 2x and 4x the tokens."""
    points = [p for p in run.points("val/loss") if p.tokens > 0]
    if not points or rise_since_lowest(run) or flat_since(run):
        return None  # a rising or flat curve: the overfitting or plateau finding says what continuing does
    last = points[-1]
    fitted = [p for p in points if p.tokens >= FIT_FROM * last.tokens]
    title = "What continuing buys"
    if len(fitted) < MIN_FIT_POINTS:
        evidence = (
            f"{len(fitted)} evaluations after the first {FIT_FROM:.0%} of the tokens; fitting "
            f"L(t) = a + b*t^(-c) needs at least {MIN_FIT_POINTS}: too few points to forecast"
        )
        return Finding("forecast", False, title, evidence, "evaluate more often to get a forecast")
    forecast = forecast_loss([p.tokens for p in fitted], [p.value for p in fitted], [2 * last.tokens, 4 * last.tokens])
    if forecast is None:
        return Finding("forecast", False, title, "val loss does not fall with more tokens: nothing to extrapolate")
    fit, now = forecast.fit, float(forecast.fit(last.tokens))
    lines = [
        f"{target / last.tokens:.0f}x ({human_count(target)} tokens): {loss:.3f} "
        f"(90% interval {low:.3f} to {high:.3f}), {now - loss:.3f} below the fitted {now:.3f} now"
        for target, (loss, low, high) in forecast.predictions.items()
    ]
    if forecast.backtest_error is None:
        backtest = "too few points in the first half of the tokens for a backtest, so the interval is only the noise"
    else:
        backtest = (
            f"fitted to the first half of the tokens, the curve misses the full fit at the end by "
            f"{forecast.backtest_error:.3f}, "
            "an error added to the interval for each doubling"
        )
    evidence = (
        f"L(t) = {fit.a:.3f} + {fit.b:.4g}*t^(-{fit.c:.3f}) fits {len(fitted)} evaluations "
        f"(rms residual {forecast.residual_rms:.4f}); " + "; ".join(lines) + f"; {backtest}. "
        "A longer run would also stretch the learning-rate schedule, which the fit does not see"
    )
    _, _, worst_case = forecast.predictions[2 * last.tokens]
    if now - worst_case >= WORTH_CONTINUING:
        fix = f"continuing is worth it: doubling the tokens lowers val loss by at least {now - worst_case:.3f}"
    else:
        fix = f"continuing buys little (maybe under {WORTH_CONTINUING} at 2x): a larger model or better data gains more"
    unique = run.get("unique_train_tokens")
    if unique and 2 * last.tokens > unique:
        fix += f"; 2x the tokens is {2 * last.tokens / unique:.2f} epochs of this data, so add data first"
    return Finding("forecast", False, title, evidence, fix)


# --- batch plan ---------------------------------------------------------------------------

# Peak allocator memory (GiB) of training steps in bf16 autocast with fused AdamW, no
# compile, block 1024, from benchmarks/max_micro_batch.py: {(n_layer, n_embd): {micro-batch: GiB}}.
MEASURED_PEAK_GIB = {
    (12, 768): {2: 3.93, 4: 6.32, 6: 7.99, 8: 10.29},  # 124m; 10 ran out of memory within 11 GiB
    (12, 384): {2: 2.36, 4: 4.42, 6: 6.48, 8: 8.51, 10: 10.71},  # 40m
}
MEASURED_BLOCK_SIZE = 1024
STATE_BYTES_PER_PARAM = 16  # fp32 weights and gradients, AdamW's two moments
CUDA_CONTEXT_GIB = 1.0  # headroom outside the allocator


def activation_features(n_layer: int, n_embd: int, vocab_size: int, tokens: int) -> np.ndarray:
    """What activation memory grows with: the residual stream through the layers, and the logits."""
    return np.array([tokens * n_layer * n_embd, tokens * vocab_size], dtype=float)


def training_params(n_layer: int, n_embd: int, block_size: int, vocab_size: int, bias: bool = False) -> int:
    return param_count(n_layer, n_embd, vocab_size, bias) + block_size * n_embd  # position embeddings train too


@cache
def activation_bytes() -> np.ndarray:
    """Bytes per (token x layer x width) and per (token x logit), least squares on MEASURED_PEAK_GIB."""
    features, activation_memory = [], []
    for (n_layer, n_embd), peaks in MEASURED_PEAK_GIB.items():
        state = STATE_BYTES_PER_PARAM * training_params(n_layer, n_embd, MEASURED_BLOCK_SIZE, PADDED_VOCAB_SIZE)
        for micro_batch, gib in peaks.items():
            tokens = micro_batch * MEASURED_BLOCK_SIZE
            features.append(activation_features(n_layer, n_embd, PADDED_VOCAB_SIZE, tokens))
            activation_memory.append(gib * GIB - state)
    return np.linalg.lstsq(np.array(features), np.array(activation_memory), rcond=None)[0]


def training_memory_gib(
    n_layer: int, n_embd: int, block_size: int, vocab_size: int, micro_batch: int, bias: bool = False
) -> float:
    """Predicted peak GPU memory of a bf16 training step."""
    state = STATE_BYTES_PER_PARAM * training_params(n_layer, n_embd, block_size, vocab_size, bias)
    activations = activation_features(n_layer, n_embd, vocab_size, micro_batch * block_size) @ activation_bytes()
    return float(state + activations) / GIB


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    peak_gib: float  # predicted for micro_batch
    memory_gb: float
    tokens_per_step: int
    largest_fitting: int  # the largest micro-batch that fits, whether or not it divides the step

    def describe(self) -> str:
        text = (
            f"micro-batch {self.micro_batch} x gradient accumulation {self.grad_accum} for {self.tokens_per_step:,} "
            f"tokens per step: about {self.peak_gib:.1f} GiB of the {self.memory_gb - CUDA_CONTEXT_GIB:g} GiB a "
            f"{self.memory_gb:g} GB GPU leaves after {CUDA_CONTEXT_GIB:g} GiB for the CUDA context (bf16, no compile)"
        )
        if self.largest_fitting > self.micro_batch:
            text += f"; micro-batch {self.largest_fitting} fits too but does not divide the step"
        return text


def plan_batch(
    n_layer: int,
    n_embd: int,
    block_size: int,
    memory_gb: float,
    tokens_per_step: int,
    vocab_size: int = PADDED_VOCAB_SIZE,
    world_size: int = 1,
    bias: bool = False,
) -> BatchPlan:
    """The largest micro-batch that fits in memory and divides the tokens per step."""
    sequences, remainder = divmod(tokens_per_step, block_size * world_size)
    if remainder or sequences == 0:
        raise ConfigError(
            f"tokens per step {tokens_per_step} is not a multiple of block_size x GPUs = {block_size * world_size}; "
            "choose one that is (524288 = 512 x 1024)"
        )
    budget = memory_gb - CUDA_CONTEXT_GIB

    def memory(micro_batch: int) -> float:
        return training_memory_gib(n_layer, n_embd, block_size, vocab_size, micro_batch, bias)

    if memory(1) > budget:
        raise ConfigError(
            f"a {human_count(param_count(n_layer, n_embd, vocab_size, bias))}-parameter model needs about "
            f"{memory(1):.1f} GiB at micro-batch 1, more than the {budget:g} GiB a {memory_gb:g} GB GPU leaves; "
            "use a smaller model or a bigger GPU"
        )
    largest = 1
    while largest < sequences and memory(largest + 1) <= budget:
        largest += 1
    micro_batch = max(m for m in range(1, largest + 1) if sequences % m == 0)
    return BatchPlan(micro_batch, sequences // micro_batch, memory(micro_batch), memory_gb, tokens_per_step, largest)


def check_batch_plan(run: RunRecord) -> Finding | None:
    """The micro-batch and accumulation that fit the run's GPU at its tokens per step."""
    gpu = gpu_of(run)
    memory_gb = run.get("gpu_memory_gb") or (gpu[1].memory_gb if gpu else None)
    shape = [run.get(key) for key in ("n_layer", "n_embd", "block_size", "tokens_per_step")]
    if not memory_gb or not all(shape):
        return None
    n_layer, n_embd, block_size, tokens_per_step = shape
    vocab_size, bias = run.get("vocab_size", PADDED_VOCAB_SIZE), run.get("bias", False)
    try:
        plan = plan_batch(
            n_layer, n_embd, block_size, memory_gb, tokens_per_step, vocab_size, run.get("world_size", 1), bias
        )
    except ConfigError as err:
        return Finding("batch_plan", False, "Batch plan", str(err))
    evidence = plan.describe()
    current = run.get("micro_batch_size")
    fix = ""
    if current and current != plan.micro_batch:
        need = training_memory_gib(n_layer, n_embd, block_size, vocab_size, current, bias)
        evidence += f"; this run's micro-batch {current} needs about {need:.1f} GiB"
    if current and current < plan.micro_batch:
        fix = f"{run.setting('micro_batch', plan.micro_batch)}: fewer, larger micro-batches keep the GPU busier"
        if run.source == "nanogpt":
            fix += f" with --gradient_accumulation_steps={plan.grad_accum * run.get('world_size', 1)}"
    return Finding("batch_plan", False, f"Batch plan for {memory_gb:g} GB", evidence, fix)


CHECKS: tuple[Callable[[RunRecord], Finding | None], ...] = (
    check_model_size,
    check_token_budget,
    check_epochs,
    check_overfitting,
    check_plateau,
    check_lr_at_plateau,
    check_dropout,
    check_mfu,
    check_forecast,
    check_batch_plan,
)


def diagnose(run: RunRecord) -> list[Finding]:
    """Every check's finding, problems first."""
    findings = [finding for check in CHECKS if (finding := check(run)) is not None]
    return sorted(findings, key=lambda f: not f.problem)


# --- nanoGPT console logs -----------------------------------------------------------------

# nanoGPT's train.py defaults: its log shows only the config file and the overrides.
NANOGPT_DEFAULTS = {
    "out_dir": "out",
    "wandb_run_name": "gpt2",
    "dataset": "openwebtext",
    "gradient_accumulation_steps": 40,
    "batch_size": 12,
    "block_size": 1024,
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "dropout": 0.0,
    "bias": False,
    "learning_rate": 6e-4,
    "max_iters": 600000,
    "decay_lr": True,
    "warmup_iters": 2000,
    "lr_decay_iters": 600000,
    "min_lr": 6e-5,
}
# Training tokens of the datasets nanoGPT's data/*/prepare.py build, as those scripts report them.
NANOGPT_TRAIN_TOKENS = {"openwebtext": 9_035_582_198, "shakespeare": 301_966, "shakespeare_char": 1_003_854}

ITER_LINE = re.compile(r"\biter (\d+): loss (\S+), time ([\d.]+)ms, mfu (-?[\d.]+)%")
EVAL_LINE = re.compile(r"\bstep (\d+): train loss (\S+), val loss (\S+)")
PARAMS_LINE = re.compile(r"number of parameters: ([\d.]+)M")
TOKENS_PER_ITER_LINE = re.compile(r"tokens per iteration will be: ([\d,]+)")
VOCAB_LINE = re.compile(r"found vocab_size = (\d+)")
CONFIG_FILE_LINE = re.compile(r"^Overriding config with (\S+?):?$")
SETTING_LINE = re.compile(r"^(?:Overriding: )?([A-Za-z_]\w*)\s*=\s*(.+)$")
SETTING_KEYS = set(NANOGPT_DEFAULTS) | {"compile", "dtype", "device", "eval_interval", "log_interval", "weight_decay"}

ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def config_value(text: str):
    """A value as nanoGPT's configurator reads it: a literal or plain arithmetic ('5 * 8'),
    and otherwise the text itself ('Overriding: out_dir = out-124m' prints strings unquoted)."""

    def evaluate(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -evaluate(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            return ARITHMETIC[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise ValueError("not a literal")

    try:
        return evaluate(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError):
        return text.split("#")[0].strip().strip("'\"")


def nanogpt_lr(step: int, config: dict) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters."""
    lr, min_lr, warmup, decay = (config[k] for k in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters"))
    if not config["decay_lr"]:
        return lr
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, decay - warmup))) * (lr - min_lr)


def parse_nanogpt_log(text: str, name: str) -> RunRecord:
    """A RunRecord from nanoGPT's console output: its config (file contents and 'Overriding:'
    lines, later ones winning, nanoGPT's defaults for the rest), parameter count, and the
    'iter N:' and 'step N:' lines. The iteration after an evaluation is marked: its time includes it."""
    config, config_files, rows = dict(NANOGPT_DEFAULTS), [], []
    num_params = tokens_per_iter = vocab_size = None
    after_eval = False
    for line in text.splitlines():
        line = line.strip()
        if match := ITER_LINE.search(line):
            step, loss, time_ms, mfu = match.groups()
            row = {"step": int(step), "train/loss": float(loss), "perf/step_time_ms": float(time_ms)}
            row["perf/mfu"] = float(mfu) / 100
            row["includes_eval"] = after_eval
            rows.append(row)
            after_eval = False
        elif match := EVAL_LINE.search(line):
            rows.append({"step": int(match.group(1)), "val/loss": float(match.group(3))})
            after_eval = True
        elif match := PARAMS_LINE.search(line):
            num_params = float(match.group(1)) * 1e6
        elif match := TOKENS_PER_ITER_LINE.search(line):
            tokens_per_iter = int(match.group(1).replace(",", ""))
        elif match := VOCAB_LINE.search(line):
            vocab_size = int(match.group(1))
        elif match := CONFIG_FILE_LINE.match(line):
            config_files.append(match.group(1))
        elif (match := SETTING_LINE.match(line)) and match.group(1) in SETTING_KEYS:
            config[match.group(1)] = config_value(match.group(2))
    if not rows:
        raise ConfigError(
            f"{name} has no nanoGPT 'iter N: loss ...' or 'step N: train loss ...' lines; "
            "give the console output of nanoGPT's train.py"
        )
    if tokens_per_iter is None:
        tokens_per_iter = config["gradient_accumulation_steps"] * config["batch_size"] * config["block_size"]
    for row in rows:
        row["data/tokens_seen"] = row["step"] * tokens_per_iter
        row["train/lr"] = nanogpt_lr(row["step"], config)
    summary = {
        "source": "nanogpt",
        "model_name": str(config["wandb_run_name"]),
        "run_names": [str(config["out_dir"]), *config_files],
        "num_params": num_params,
        "vocab_size": vocab_size or PADDED_VOCAB_SIZE,  # nanoGPT pads GPT-2's vocabulary the same way
        **{key: config[key] for key in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")},
        "micro_batch_size": config["batch_size"],
        "grad_accum": config["gradient_accumulation_steps"],
        "tokens_per_step": tokens_per_iter,
        "max_steps": config["max_iters"],
        "lr": config["learning_rate"],
        "min_lr": config["min_lr"] if config["decay_lr"] else config["learning_rate"],
        "warmup_steps": config["warmup_iters"],
        "decay_steps": config["lr_decay_iters"],
        "dataset": config["dataset"],
        "unique_train_tokens": NANOGPT_TRAIN_TOKENS.get(config["dataset"]),
        "mfu_peak_flops": gpu_table()["a100"].peak_flops,  # nanoGPT's estimate_mfu assumes an A100
        "peak_flops": None,
    }
    return RunRecord(summary, rows)
