"""The loss curve read as an expert reads it: divergence, overfitting, plateaus, the learning
rate on a plateau, and dropout.

A plateau is judged by fits, not fixed shares: val loss is fitted against log tokens over the
recent evaluations and over the stretch just before them, and the curve counts as flat when
the recent fall is a small fraction of the earlier one, by more than the noise between
evaluations allows. A healthy curve keeps falling by a steady amount per doubling of the
tokens, so it passes; a short but clear flattening at the end of a long run does not. The
last stretch of a schedule that decays to (nearly) zero flattens by design, so evaluations
where the learning rate is under LR_WORKING of its peak are left out.
"""

import math
from dataclasses import dataclass

import numpy as np

from fineweb_gpt.doctor.record import Finding, Point, RunRecord

SKIP_EARLY = 0.1  # of the tokens: warmup and the first steep drop shape the curve, not the run's health
MIN_CURVE_EVALS = 8  # evaluations needed to judge the curve's shape
MIN_FLAT_EVALS = 4
MIN_FLAT_WIDTH = math.log(1.1)  # the flat stretch spans at least 10% more tokens
FLAT_SHARE = 0.3  # the recent fall rate, as a share of the earlier one, below which it is flat
SIGNIFICANCE = 3.0  # standard errors
MIN_EXPECTED_DROP = 0.02  # nats the earlier rate would have brought over the stretch
LR_WORKING = 0.05  # of the peak: below it the schedule is ending, and the curve flattens by design
LR_DECAY_LEFT = 0.1  # share of the decay (peak -> final) still to come that counts as "still high"
MIN_LR_SHARE = 0.1  # a final learning rate of about a tenth of the peak decays far enough
OVERFIT_RISE = 0.02  # nats of val loss above its lowest point


def noise_level(values: np.ndarray) -> float:
    """The noise between neighbouring evaluations, robust to the curve's bends: from the median
    absolute second difference (white noise of std s gives second differences of std s*sqrt(6))."""
    if len(values) < 3:
        return 1e-4
    second = np.diff(values, 2)
    return max(1e-4, 1.4826 * float(np.median(np.abs(second))) / math.sqrt(6))


def fall_rate(x: np.ndarray, y: np.ndarray, noise: float) -> tuple[float, float]:
    """(nats val loss falls per e-fold of tokens, its standard error), by least squares."""
    centered = x - x.mean()
    spread = float((centered**2).sum())
    if spread <= 0:
        return 0.0, math.inf
    return -float(centered @ (y - y.mean())) / spread, noise / math.sqrt(spread)


# --- the learning rate --------------------------------------------------------------------


class LearningRates:
    """The logged (or reconstructed) learning rate, looked up at any point of the run."""

    def __init__(self, points: list[Point]):
        ordered = sorted(points, key=lambda p: p.x)
        self.x = np.array([p.x for p in ordered])
        self.values = np.array([p.value for p in ordered])

    def __bool__(self) -> bool:
        return len(self.x) > 0

    def at(self, x: float) -> float:
        """The value logged nearest x."""
        i = int(np.clip(np.searchsorted(self.x, x), 1, len(self.x) - 1)) if len(self.x) > 1 else 0
        return float(self.values[i - 1 if len(self.x) > 1 and x - self.x[i - 1] < self.x[i] - x else i])


def learning_rates(run: RunRecord) -> LearningRates:
    return LearningRates([p for p in run.points("train/lr") if p.value >= 0])


def schedule(run: RunRecord, lrs: LearningRates) -> tuple[float, float | None]:
    """(peak, final) of the learning-rate schedule; final is None where the log does not say."""
    peak = max(float(lrs.values.max()) if lrs else 0.0, run.get("lr", 0.0))
    final = run.get("min_lr")
    return peak, (min(final, peak) if final is not None else None)


# --- flattening -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Flattening:
    start: Point  # the first evaluation of the flat stretch
    last: Point  # the last evaluation where the learning rate still worked
    recent_fall: float  # nats per e-fold of tokens over the flat stretch
    earlier_fall: float  # over the stretch of equal log-width just before it
    noise: float
    lr_known: bool


def curve_points(run: RunRecord) -> tuple[list[Point], bool]:
    """Val points after the first SKIP_EARLY of the tokens, where the schedule is still working,
    and whether the learning rate is known."""
    points = [p for p in run.points("val/loss") if p.x > 0]
    points = [p for p in points if p.x >= SKIP_EARLY * points[-1].x]
    lrs = learning_rates(run)
    if not lrs or not points:
        return points, False
    peak, _ = schedule(run, lrs)
    working = [i for i, p in enumerate(points) if lrs.at(p.x) >= LR_WORKING * peak]
    return (points[: working[-1] + 1] if working else []), True


def find_flattening(run: RunRecord) -> Flattening | None:
    points, lr_known = curve_points(run)
    if len(points) < MIN_CURVE_EVALS:
        return None
    x = np.log([p.x for p in points])
    y = np.array([p.value for p in points])
    noise = noise_level(y)

    def rates(i: int) -> tuple[float, float, bool] | None:
        """(recent fall, earlier fall, flat?) for the stretch from evaluation i to the end."""
        width = x[-1] - x[i]
        before = np.flatnonzero((x >= x[i] - width) & (x <= x[i]))
        if len(before) < 3 or x[i] - x[before[0]] < 0.5 * width:
            return None
        recent, recent_error = fall_rate(x[i:], y[i:], noise)
        earlier, earlier_error = fall_rate(x[before], y[before], noise)
        flat = (
            earlier >= SIGNIFICANCE * earlier_error
            and earlier * width >= MIN_EXPECTED_DROP
            and recent <= FLAT_SHARE * earlier
            and earlier - recent >= SIGNIFICANCE * math.hypot(recent_error, earlier_error)
        )
        return recent, earlier, flat

    for i in range(1, len(points) - MIN_FLAT_EVALS + 1):
        if x[-1] - x[i] < MIN_FLAT_WIDTH:
            break
        found = rates(i)
        if found is None or not found[2]:
            continue
        # The stretch starts where the curve stops standing above it.
        while len(points) - i > MIN_FLAT_EVALS and y[i] - y[i + 1 :].mean() > max(SIGNIFICANCE * noise, 0.002):
            i += 1
        recent, earlier, _ = rates(i) or found
        return Flattening(points[i], points[-1], recent, earlier, noise, lr_known)
    return None


def per_doubling(fall: float) -> str:
    """A fall rate per e-fold of tokens, said per doubling."""
    change = fall * math.log(2)
    if abs(change) < 5e-5:
        return "did not move"
    return f"fell {change:.4f}" if change > 0 else f"rose {-change:.4f}"


def rise_since_lowest(run: RunRecord) -> tuple[Point, Point] | None:
    """(the lowest evaluation, the last one) when val loss has risen since its lowest point."""
    points = run.points("val/loss")
    if len(points) < 3:
        return None
    best = min(points, key=lambda p: p.value)
    noise = noise_level(np.array([p.value for p in points]))
    return (best, points[-1]) if points[-1].value - best.value > max(OVERFIT_RISE, SIGNIFICANCE * noise) else None


def mean_train_loss_before(run: RunRecord, x: float, last: int = 20) -> float | None:
    """Mean of the last few training losses logged up to `x` (one batch's loss is noisy)."""
    losses = [p.value for p in run.points("train/loss") if p.x <= x][-last:]
    return sum(losses) / len(losses) if losses else None


# --- the checks -------------------------------------------------------------------------------


def check_divergence(run: RunRecord) -> Finding | None:
    """A loss that became NaN or infinite: everything after it is meaningless."""
    found = [(row, column) for column in ("train/loss", "val/loss") if (row := run.first_not_finite(column))]
    if not found:
        return None
    row, column = min(found, key=lambda item: item[0].get("step", 0))
    step = row.get("step", "?")
    kind = "NaN" if math.isnan(row[column]) else "infinite"
    before = [p for p in run.points(column) if p.step < (step if isinstance(step, int | float) else 0)]
    evidence = f"{column} is {kind} at step {step}"
    if before:
        evidence += f"; the last finite value was {before[-1].value:.4f} at step {before[-1].step}"
    fix = "resume from a checkpoint saved before that step with a lower learning rate"
    if run.get("lr"):
        fix += f" ({run.setting('lr', run.summary['lr'] / 2)}) or a longer warmup"
    return Finding("divergence", True, f"Loss became {kind} at step {step}", evidence, fix)


def check_overfitting(run: RunRecord) -> Finding | None:
    """Val loss rising from its lowest point while training goes on."""
    found = rise_since_lowest(run)
    if found is None:
        return None
    best, last = found
    evidence = (
        f"val loss was lowest at {run.where(best)}: {best.value:.4f}; at step {last.step} it is {last.value:.4f}, "
        f"{last.value - best.value:+.4f} higher"
    )
    train = mean_train_loss_before(run, last.x)
    if train is not None:
        evidence += f"; train loss is now {train:.4f}"
    fix = f"keep the checkpoint nearest step {best.step} (training on makes it worse); to go further, more unique data"
    if run.epochs and run.epochs > 1:
        fix += f" (this run has seen its data {run.epochs:.1f} times)"
    return Finding("overfitting", True, f"Overfitting since step {best.step:,}", evidence, fix)


def check_plateau(run: RunRecord) -> Finding | None:
    """Val loss flat over the recent evaluations while it fell before (rising is overfitting's)."""
    flat = find_flattening(run)
    if flat is None or rise_since_lowest(run):
        return None
    start, last = flat.start, flat.last
    unit = run.progress_unit
    evidence = (
        f"val loss moved {last.value - start.value:+.4f} from {run.where(start)} to {run.where(last)} "
        f"({start.value:.4f} -> {last.value:.4f}): per doubling of the {unit} it {per_doubling(flat.recent_fall)}, "
        f"where just before it {per_doubling(flat.earlier_fall)} (noise between evaluations about {flat.noise:.4f})"
    )
    if last.step < run.last_step:
        evidence += (
            f"; after step {last.step:,} the learning rate is under {LR_WORKING:.0%} of its peak, where any curve "
            "flattens, so the stretch is judged up to there"
        )
    if not flat.lr_known:
        evidence += (
            "; the log does not show the learning rate, so this may be the end of a schedule that decays to zero, "
            "where the curve flattens by design"
        )
        return Finding("plateau", False, f"Flattening since step {start.step:,}", evidence)
    causes = []
    if run.epochs and run.epochs > 1:
        causes.append(f"the data repeats ({run.epochs:.1f} epochs): train on more unique data (see Repeated data)")
    elif run.knows_tokens and not run.get("unique_train_tokens"):
        causes.append(
            "how many unique tokens does the training data hold? Repeated data would explain it (pass --train-tokens N)"
        )
    learning_rate = check_lr_at_plateau(run)
    if learning_rate is not None and learning_rate.problem:
        causes.append("the learning rate is still high: decay it further (see Learning rate)")
    elif learning_rate is not None:
        causes.append("the learning-rate decay still to come should lower it")
    if not causes:
        causes.append("the model learns little more from this data at this size: a larger model, or accept this loss")
    return Finding("plateau", True, f"Plateau since step {start.step:,}", evidence, "; ".join(causes))


def check_lr_at_plateau(run: RunRecord) -> Finding | None:
    """The curve flattened while the learning rate was still high, judged against where the
    schedule is going (its final learning rate and the step its decay ends), not a fixed share."""
    flat = find_flattening(run)
    lrs = learning_rates(run)
    if flat is None or not flat.lr_known or not lrs:
        return None
    peak, final = schedule(run, lrs)
    lr_start, lr_end = lrs.at(flat.start.x), lrs.at(flat.last.x)
    if not peak:
        return None
    goal = final if final is not None else 0.0
    going = f"{goal:.2e}" if final is not None else "an end the log does not state"
    evidence = (
        f"val loss flattened at step {flat.start.step:,} with the learning rate at {lr_start:.2e} "
        f"({lr_start / peak:.0%} of its peak {peak:.2e}), and at step {flat.last.step:,} it is {lr_end:.2e} "
        f"({lr_end / peak:.0%})"
    )
    title = "Learning rate still high on the plateau"
    if goal >= 0.9 * peak:
        evidence += f": the schedule never decays (its final learning rate is {goal:.2e})"
        fix = f"{run.setting('min_lr', MIN_LR_SHARE * peak)}: a decay to about a tenth of the peak brings the last drop"
        return Finding("learning_rate", True, title, evidence, fix)
    left = (lr_end - goal) / (peak - goal)
    max_steps, last_step = run.get("max_steps"), run.last_step
    decay_end = run.get("decay_steps") or max_steps
    if left >= LR_DECAY_LEFT:
        evidence += (
            f": {left:.0%} of the decay to {going} is still to come. A high learning rate keeps the weights "
            "bouncing above the minimum; the decay to a low one is what brings the last drop in loss"
        )
        if decay_end and max_steps and decay_end > max_steps:
            fix = (
                f"{run.setting('decay_steps', max_steps)}, so the decay ends with the run (it ends at step "
                f"{decay_end:,}, after the last step {max_steps:,})"
            )
            return Finding("learning_rate", True, title, evidence, fix)
        if max_steps and last_step < max_steps:
            evidence += (
                f"; the run is at step {last_step:,} of {max_steps:,}: if it is still training, the decay still to "
                "come should bring the loss down; if it stopped, resuming it finishes the decay"
            )
            return Finding("learning_rate", False, "Learning rate: the decay is still to come", evidence)
        fix = "decay the learning rate to about a tenth of its peak by the end of the run"
        if not decay_end:
            fix += " (the log does not say where this schedule ends: give --max-steps N)"
        return Finding("learning_rate", True, title, evidence, fix)
    if final is not None and final > MIN_LR_SHARE * peak * 1.01:
        evidence += f": the schedule ends at {final:.2e}, {final / peak:.0%} of the peak"
        fix = f"{run.setting('min_lr', MIN_LR_SHARE * peak)} (now {final:.2e})"
        return Finding("learning_rate", True, title, evidence, fix)
    return None


def check_dropout(run: RunRecord) -> Finding | None:
    """Val loss below train loss with dropout on: dropout costs capacity and prevents nothing."""
    dropout = run.get("dropout", 0.0)
    val = run.points("val/loss")
    if dropout <= 0 or not val:
        return None
    last = val[-1]
    train = mean_train_loss_before(run, last.x)
    if train is None or last.value >= train:
        return None
    evidence = (
        f"dropout={dropout} and at step {last.step} val loss {last.value:.4f} is below train loss {train:.4f} "
        "(mean of the last logged steps): the model is not overfitting, and dropout only slows its learning"
    )
    fix = f"{run.setting('dropout', 0.0)}: with val loss below train loss there is no overfitting to prevent"
    return Finding("dropout", True, "Dropout is costing capacity", evidence, fix)
