"""Published runs to place a run beside: "at N tokens, the reference was at X, this run is at Y".

Only a reference of the same size is compared (within 20% of its parameter count); a model
of another size gets no comparison, since its loss at equal tokens says nothing about how
well it trained. docs/doctor.md cites each curve's source.
"""

import math
from dataclasses import dataclass

import numpy as np

from fineweb_gpt.doctor.record import Finding, RunRecord
from fineweb_gpt.flops import human_count

SAME_SIZE = 0.20  # of the reference's parameter count
ON_PAR = 0.05  # nats of val loss
FAR_BEHIND = 0.2


@dataclass(frozen=True)
class ReferenceCurve:
    name: str
    num_params: float  # by nanoGPT's count
    tokens_per_step: int
    evaluations: tuple[tuple[int, float], ...]  # (step, val loss)
    about: str  # the data, the validation set and the schedule, in a sentence

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, val loss) of the evaluations after step 0."""
        return (
            np.array([step * self.tokens_per_step for step, _ in self.evaluations], dtype=float),
            np.array([loss for _, loss in self.evaluations]),
        )

    def at(self, tokens: float) -> float | None:
        """The reference's val loss at this many tokens, linear in log tokens between its
        evaluations; None outside them."""
        x, y = self.curve()
        if not x[0] <= tokens <= x[-1]:
            return None
        return float(np.interp(math.log(tokens), np.log(x), y))


# GPT-2 124M (d12, with biases) trained by llm.c on the FineWeb 10B-token sample: 19,560 steps of
# 524,288 tokens (10.26B), lr 6e-4 with 700 warmup steps and cosine decay to zero; val loss on
# the first 10M tokens of fineweb_val_000000.bin. Read from its main.log (docs/doctor.md).
LLMC_GPT2_124M = ReferenceCurve(
    name="GPT-2 124M trained by llm.c on FineWeb",
    # parameter_count(gpt2_shaped(12, 768, 50304, bias=True)), as a number so that the doctor starts
    # without torch (which counting builds the model with); tests/test_diagnose.py checks it.
    num_params=123_689_472,
    tokens_per_step=524_288,
    evaluations=(
        (250, 6.1710),
        (1000, 4.3170),
        (1250, 4.1296),
        (2000, 3.8585),
        (2250, 3.8237),
        (4000, 3.6176),
        (4250, 3.6005),
        (8000, 3.4431),
        (8250, 3.4376),
        (12000, 3.3509),
        (12250, 3.3462),
        (16000, 3.2882),
        (16250, 3.2863),
        (19500, 3.2722),
        (19560, 3.2722),
    ),
    about=(
        "10.26B tokens of FineWeb at 524,288 per step, cosine decay to zero at its end, val loss on FineWeb's "
        "own validation tokens"
    ),
)
REFERENCES = (LLMC_GPT2_124M,)


def reference_for(run: RunRecord) -> ReferenceCurve | None:
    params = run.num_params
    return next((r for r in REFERENCES if params and abs(params - r.num_params) <= SAME_SIZE * r.num_params), None)


def verdict(gap: float) -> str:
    if gap <= -ON_PAR:
        return "ahead of it"
    if gap < ON_PAR:
        return "on par"
    return "well behind it" if gap >= FAR_BEHIND else "behind it"


def check_reference(run: RunRecord) -> Finding | None:
    params = run.num_params
    if not params:
        return None  # the settings finding asks for the model size
    reference = reference_for(run)
    if reference is None:
        known = ", ".join(f"{r.name} ({human_count(r.num_params)})" for r in REFERENCES)
        evidence = (
            f"this model has {human_count(params)} parameters; the reference curves are {known}. The loss of a "
            "model of another size at equal tokens says nothing about how well this one trained, so there is no "
            "comparison"
        )
        return Finding("reference", False, "No reference run of this size", evidence)
    points = [p for p in run.points("val/loss") if p.tokens]
    if not points:
        return None
    last = points[-1]
    ref_tokens, _ = reference.curve()
    if last.tokens < ref_tokens[0]:
        evidence = (
            f"this run's last evaluation is at {human_count(last.tokens)} tokens, before the reference's first "
            f"after step 0 ({human_count(ref_tokens[0])})"
        )
        return Finding("reference", False, f"Against {reference.name}: too early to compare", evidence)
    # Judged at equal tokens: the last evaluation the reference's range covers.
    compared = [p for p in points if ref_tokens[0] <= p.tokens <= ref_tokens[-1]]
    if not compared:
        evidence = (
            f"none of this run's evaluations falls within the reference's {human_count(ref_tokens[0])} to "
            f"{human_count(ref_tokens[-1])} tokens, so there is no point of equal tokens to compare"
        )
        return Finding("reference", False, f"Against {reference.name}: no evaluation at equal tokens", evidence)
    shown = {id(p): p for p in (compared[len(compared) // 2], compared[-1])}
    lines = [
        f"at {human_count(p.tokens)} tokens, the reference was at {reference.at(p.tokens):.3f}, this run is at "
        f"{p.value:.3f} ({p.value - reference.at(p.tokens):+.3f})"
        for p in shown.values()
    ]
    gap = compared[-1].value - reference.at(compared[-1].tokens)
    if last.tokens > ref_tokens[-1]:
        _, ref_losses = reference.curve()
        lines.append(
            f"the reference ended at {human_count(ref_tokens[-1])} tokens at {ref_losses[-1]:.3f}; this run went on "
            f"to {last.value:.3f} at {human_count(last.tokens)}"
        )
    evidence = "; ".join(lines) + f". The reference: {reference.about}"
    dataset = str(run.get("dataset", ""))
    if dataset and "fineweb" not in dataset.lower():
        evidence += f"; this run's data ({dataset}) is not FineWeb, so its losses are on another scale"
    else:
        evidence += "; another validation set moves the loss by a few hundredths"
    title = f"Against {reference.name}: {verdict(gap)} at {human_count(compared[-1].tokens)} tokens"
    return Finding("reference", False, title, evidence)


# HellaSwag acc_norm of published models of GPT-2 124M's size, scored as build-nanogpt scores it
# (evals/hellaswag.py): the sources are in docs/doctor.md.
HELLASWAG_POINTS = (
    ("OpenAI's GPT-2 124M", 0.2955),  # build-nanogpt's hellaswag.py on the released weights
    ("GPT-3 Small (125M)", 0.337),  # the GPT-3 paper's zero-shot HellaSwag for its 125M model
)
CHANCE = 0.25  # four endings


def check_hellaswag(run: RunRecord) -> Finding | None:
    """The run's last HellaSwag acc_norm, beside the published points when the model is GPT-2 124M's size."""
    points = run.points("eval/hellaswag_acc_norm")
    if not points:
        return None
    last = points[-1]
    where = run.where(last)
    if reference_for(run) is None:
        evidence = (
            f"acc_norm {last.value:.4f} at {where} (chance is {CHANCE}); the published points are for 124M-parameter "
            "models, so this model of another size is not compared with them"
        )
        return Finding("hellaswag", False, f"HellaSwag: {last.value:.4f}", evidence)
    beside = "; ".join(f"{name} {value:.4f} ({last.value - value:+.4f})" for name, value in HELLASWAG_POINTS)
    above = [name for name, value in HELLASWAG_POINTS if last.value >= value]
    standing = f"at or above {above[-1]}" if above else f"below {HELLASWAG_POINTS[0][0]}"
    evidence = (
        f"acc_norm {last.value:.4f} at {where}, scored as build-nanogpt scores it (chance {CHANCE}); beside it: "
        f"{beside}"
    )
    return Finding("hellaswag", False, f"HellaSwag {last.value:.4f}: {standing}", evidence)
