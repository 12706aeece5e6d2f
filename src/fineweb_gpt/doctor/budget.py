"""What the run was asked to learn from: the model's size, the tokens, the epochs.

Headlines say what was trained; the plan stands beside it with where it came from, and a
plan the log never stated (a trainer's default) is shown but not judged.
"""

import math
from dataclasses import replace

import numpy as np

from fineweb_gpt.doctor.record import Finding, RunRecord
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import CHINCHILLA_TOKENS_PER_PARAM, human_count, human_ratio, parameter_count, size_in_name
from fineweb_gpt.model_config import GPTConfig
from fineweb_gpt.run.run_files import quoted

SIZE_TOLERANCE = 0.20  # stated vs real parameter count
UNDERTRAINED = 0.5  # of the Chinchilla-optimal token count
# Below this, a model with GPT-2's 50,304-token vocabulary is mostly its embedding table:
# proposing one "sized for the budget" would be advice nobody can use.
SMALLEST_USEFUL_PARAMS = 5e6
NEARLY_NEW_EPOCHS = 4  # Muennighoff et al. 2023: up to ~4 epochs, repeated tokens are worth nearly as much as new


def width_for_size(target: float, model: GPTConfig) -> GPTConfig:
    """The model with the n_embd (a multiple of n_head that the switches allow) whose parameter
    count is nearest the target; everything else unchanged."""
    # Past this width either the embedding (V*d) or the blocks (12*L*d^2) alone exceed twice the target.
    limit = min(2 * target / model.vocab_size, math.sqrt(2 * target / (12 * model.n_layer))) + model.n_head
    widths = []
    for width in range(model.n_head, int(limit) + 1, model.n_head):
        try:
            widths.append(replace(model, n_embd=width))
        except ConfigError:  # rotary positions need an even head size
            continue
    if not widths:
        return model
    # The count grows with the width: bisect for the first at or above the target, then take the nearer neighbour.
    low, high = 0, len(widths) - 1
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if parameter_count(widths[middle]) < target else (low, middle)
    return min(widths[max(0, low - 1) : low + 1], key=lambda m: abs(parameter_count(m) - target))


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
        f"{quoted(name)} says {human_count(size)} parameters but the model has {human_count(actual)} "
        f"({', '.join(f'{k}={v}' for k, v in shape.items() if v is not None)}): {actual / size:.2f}x the stated size"
    )
    title = "Model size does not match its name"
    model = run.model_config()
    if not (model and shape["n_head"] and run.source in ("fineweb_gpt", "nanogpt", "csv")):
        return Finding("model_size", True, title, evidence)
    sized = width_for_size(size, model)
    fix = (
        f"{run.setting('n_embd', sized.n_embd)} gives {human_count(parameter_count(sized))} "
        f"with n_layer={shape['n_layer']} and n_head={shape['n_head']} unchanged"
    )
    return Finding("model_size", True, title, evidence, fix)


def measured_tokens_per_sec(run: RunRecord) -> float | None:
    rates = [row["perf/tokens_per_sec"] for row in run.rows if 0 < row.get("perf/tokens_per_sec", 0) < math.inf]
    return float(np.median(rates)) if rates else None


def duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"


def check_token_budget(run: RunRecord) -> Finding | None:
    """Tokens trained (and planned) against the Chinchilla-optimal 20 per parameter."""
    params = run.num_params
    if not params or not run.knows_tokens:
        return None  # the settings finding says what to give
    trained, planned = run.tokens_seen, run.planned_tokens
    optimal = CHINCHILLA_TOKENS_PER_PARAM * params
    judged_plan = planned if planned and not run.plan_is_assumed else 0.0
    judged = max(trained, judged_plan)
    if not judged:
        return None
    evidence = (
        f"{human_count(trained)} tokens trained = {trained / params:.3g} per parameter, "
        f"{human_ratio(trained / optimal)}x the Chinchilla-optimal {human_count(optimal)} "
        f"({CHINCHILLA_TOKENS_PER_PARAM} per parameter for {human_count(params)})"
    )
    plan_beside = ""
    if planned and planned > 1.01 * trained:
        evidence += f"; the plan is {human_count(planned)} tokens ({human_ratio(planned / optimal)}x){run.plan_note()}"
        plan_beside = f" (plan: {human_ratio(planned / optimal)}x{run.plan_note(', ')})"
    if judged >= UNDERTRAINED * optimal:
        if judged >= 1.5 * optimal:
            evidence += ": more tokens than compute-optimal still lower the loss, at a falling rate"
        title = f"Tokens: {human_ratio(trained / optimal)}x Chinchilla-optimal trained{plan_beside}"
        return Finding("token_budget", False, title, evidence)

    fix = f"to train this model properly: about {human_count(optimal)} tokens"
    if run.get("tokens_per_step"):
        steps = math.ceil(optimal / run.summary["tokens_per_step"])
        fix += f" ({run.setting('max_steps', steps)} at {run.summary['tokens_per_step']:,} tokens per step)"
    if rate := measured_tokens_per_sec(run):
        fix += f", about {duration(optimal / rate)} at this run's {rate:,.0f} tokens/s"
    budget_model = judged / CHINCHILLA_TOKENS_PER_PARAM
    model = run.model_config()
    if budget_model >= SMALLEST_USEFUL_PARAMS and model and run.get("n_head"):
        sized = width_for_size(budget_model, model)
        fix += (
            f"; or keep this budget with a model of about {human_count(budget_model)} parameters "
            f"({run.setting('n_embd', sized.n_embd)} gives {human_count(parameter_count(sized))})"
        )
    elif budget_model < SMALLEST_USEFUL_PARAMS:
        fix += (
            f"; at {human_ratio(judged / optimal)}x this run is a smoke test: its loss says little about what the "
            f"model can learn (a model sized for this budget would have {human_count(budget_model)} parameters, "
            "too few to learn anything with GPT-2's vocabulary)"
        )
    title = f"Undertrained: {human_ratio(trained / optimal)}x the Chinchilla-optimal tokens{plan_beside}"
    if not trained:
        title = f"Undertrained: the plan is {human_ratio(judged / optimal)}x the Chinchilla-optimal tokens"
    return Finding("token_budget", True, title, evidence, fix)


def check_epochs(run: RunRecord) -> Finding | None:
    """Tokens trained (and planned) against the unique tokens in the training data."""
    if not run.knows_tokens:
        return None
    trained, planned, unique = run.tokens_seen, run.planned_tokens, run.get("unique_train_tokens")
    if not trained and not planned:
        return None  # nothing trained and no plan: nothing to judge yet
    if not unique:
        return Finding(
            "epochs",
            False,
            "Epochs: unknown",
            "the number of unique training tokens is not known, so repeated data cannot be ruled out",
            "pass --train-tokens N (the tokens in the training data) to check it",
        )
    epochs = trained / unique
    planned_epochs = planned / unique if planned else 0.0
    judged = max(epochs, 0.0 if run.plan_is_assumed else planned_epochs)
    about = "about " if run.get("unique_train_tokens_estimated") else ""
    evidence = (
        f"{human_count(trained)} tokens trained over {about}{human_count(unique)} unique training tokens "
        f"= {human_ratio(epochs)} epochs"
    )
    plan_beside = ""
    if planned_epochs > 1.01 * epochs:
        evidence += f"; the plan is {planned_epochs:.2f} epochs{run.plan_note()}"
        plan_beside = f" (plan: {planned_epochs:.2f}{run.plan_note(', ')})"
    if judged <= 1:
        title = f"Epochs: {human_ratio(epochs)} trained{plan_beside}"
        return Finding("epochs", False, title, evidence + ": every token is new to the model")

    files = run.get("data_files", [])
    if len(files) == 1:
        evidence += (
            f", all from one parquet file ({quoted(files[0])}): the model sees the same documents again and again, "
            "the likely cause of a plateau (train loss keeps falling while val loss stalls or rises)"
        )
    else:
        evidence += ": repeated documents teach less each time, so val loss stops improving"
    worth = "nearly as much as" if judged <= NEARLY_NEW_EPOCHS else "much less than"
    evidence += (
        f"; at {judged:.1f} epochs a repeated token is worth {worth} a new one (up to about {NEARLY_NEW_EPOCHS} "
        "epochs they are nearly equal: Muennighoff et al. 2023)"
    )
    needed = max(trained, 0.0 if run.plan_is_assumed else planned or 0.0)
    fix = f"train on at least {human_count(needed)} unique tokens: {run.setting('more_data')}"
    if files:
        fix += f" with about {math.ceil(needed / (unique / len(files)))} files like these"
    if run.get("tokens_per_step"):
        one_epoch = max(1, int(unique // run.summary["tokens_per_step"]))
        fix += f"; or stop after one epoch: {run.setting('max_steps', one_epoch)}"
    if epochs > 1:
        title = f"Repeated data: {epochs:.1f} epochs"
    else:
        title = f"Repeated data planned: {planned_epochs:.1f} epochs ({epochs:.2f} trained so far)"
    return Finding("epochs", True, title, evidence, fix)
