"""The report's plot: train and val loss against tokens (or steps), the learning rate on a
second axis, and the reference run of the same size as a dashed, labelled line."""

import io

from fineweb_gpt.doctor.record import RunRecord
from fineweb_gpt.doctor.reference import reference_for


def plot_losses(run: RunRecord, log_x: bool, title: str = "") -> bytes:
    """The plot as PNG bytes (written by the caller, through the safe writer)."""
    buffer = io.BytesIO()
    loss_figure(run, log_x, title).savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def loss_figure(run: RunRecord, log_x: bool, title: str = ""):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    figure = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if title:  # which run and model: the PNG alone (shared, or beside another) says it
        axes.set_title(title.replace("$", r"\$"), fontsize=10)  # a $ in a name is no mathtext
    # A log axis cannot show the evaluation before training, at 0.
    # Values far outside any loss's range (a crafted or broken log) would break the axes.
    train, val, lr = (
        [p for p in run.points(c) if (p.x > 0 or not log_x) and abs(p.value) < 1e6 and abs(p.x) < 1e18]
        for c in ("train/loss", "val/loss", "train/lr")
    )
    lines = axes.plot([p.x for p in train], [p.value for p in train], lw=1, alpha=0.6, label="train loss")
    lines += axes.plot([p.x for p in val], [p.value for p in val], "o-", ms=3, label="val loss")
    reference = reference_for(run) if run.knows_tokens else None
    if reference is not None:
        tokens, losses = reference.curve()
        end = max([p.x for p in train + val] + [1.0])
        keep = tokens <= 1.5 * end
        lines += axes.plot(tokens[keep], losses[keep], "--", color="black", lw=1, label=f"reference: {reference.name}")
    axes.set_xlabel(f"{run.progress_unit} seen")
    axes.set_ylabel("loss (nats per token)")
    axes.xaxis.set_major_formatter(EngFormatter())
    if log_x:
        axes.set_xscale("log")
    else:
        # On a linear axis the first steps' drop from ~10.8 would flatten the rest of the curve.
        span = max([p.x for p in train + val], default=0.0)
        later = [p.value for p in train + val if p.x >= 0.1 * span]
        if later and max(later) - min(later) < 1e6:
            low, high = min(later), max(later)
            axes.set_ylim(low - 0.1 * (high - low) - 0.01, high + 0.5 * (high - low) + 0.01)
    if lr:
        lr_axes = axes.twinx()
        lines += lr_axes.plot([p.x for p in lr], [p.value for p in lr], ":", color="gray", label="learning rate")
        lr_axes.set_ylabel("learning rate")
    axes.legend(lines, [line.get_label() for line in lines], loc="upper right")
    axes.grid(alpha=0.3)
    return figure
