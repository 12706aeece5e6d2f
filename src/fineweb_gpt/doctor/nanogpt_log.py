"""nanoGPT's console output as a run record.

nanoGPT's train.py prints its config file (`Overriding config with config/x.py:` and the
file's lines), each command-line override (`Overriding: max_iters = 2000`), the tokens per
iteration, the parameter count, then `iter N: loss ..., time ...ms, mfu ...%` per logged
iteration and `step N: train loss ..., val loss ...` per evaluation. Settings it never
prints are nanoGPT's defaults, and the record says which were assumed.
"""

import ast
import math
import operator
import re

from fineweb_gpt.doctor.record import RunRecord
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import PADDED_VOCAB_SIZE

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
    "compile": True,
}
# Training tokens of the datasets nanoGPT's data/*/prepare.py build, as those scripts report them.
NANOGPT_TRAIN_TOKENS = {"openwebtext": 9_035_582_198, "shakespeare": 301_966, "shakespeare_char": 1_003_854}

STEP = r"(\d{1,12})"
VALUE = r"([^\s,]+)"
ITER_LINE = re.compile(rf"\biter {STEP}: loss {VALUE}, time ([^\sm]+)ms, mfu ([^\s%]+)%")
EVAL_LINE = re.compile(rf"\bstep {STEP}: train loss {VALUE}, val loss {VALUE}")
PARAMS_LINE = re.compile(r"number of parameters: ([\d.]{1,20})M")
TOKENS_PER_ITER_LINE = re.compile(r"tokens per iteration will be: ([\d,]{1,30})")
VOCAB_LINE = re.compile(r"found vocab_size = (\d{1,12})")
CONFIG_FILE_LINE = re.compile(r"^Overriding config with (\S+?):?$")
SETTING_LINE = re.compile(r"^(?:Overriding: )?([A-Za-z_]\w*)\s*=\s*(.+)$")
SETTING_KEYS = set(NANOGPT_DEFAULTS) | {"dtype", "device", "eval_interval", "log_interval", "weight_decay"}

# The configurator's values: literals and plain arithmetic on numbers ('5 * 8'), nothing else.
ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
MAX_EXPRESSION_CHARACTERS = 200  # a config value longer than this is kept as text, never evaluated
MAX_MAGNITUDE = 1e18


def config_value(text: str):
    """A value as nanoGPT's configurator reads it: a literal or arithmetic on numbers, and
    otherwise the text itself ('Overriding: out_dir = out-124m' prints strings unquoted).

    Only numbers are combined, and none beyond 1e18, so a crafted line such as
    `batch_size = "x" * 99999999999` stays text instead of asking for 100 GB."""

    def number(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            value = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = number(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
        elif isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            value = ARITHMETIC[type(node.op)](number(node.left), number(node.right))
        else:
            raise ValueError("not a number")
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise ValueError("out of range")
        return value

    text = text.strip()
    if len(text) <= MAX_EXPRESSION_CHARACTERS:
        try:
            node = ast.parse(text, mode="eval").body
            if isinstance(node, ast.Constant) and isinstance(node.value, str | bool):
                return node.value
            return number(node)
        except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
            pass
    return text.split("#")[0].strip().strip("'\"")[:MAX_EXPRESSION_CHARACTERS]


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


def number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def valid_config(config: dict) -> dict:
    """The settings the schedule and the batch need, or None where a value is not a usable number."""
    positive = ("gradient_accumulation_steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd")
    checked = dict(config)
    for key in positive + ("learning_rate", "min_lr", "max_iters", "warmup_iters", "lr_decay_iters", "dropout"):
        value = config.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > 0 if key in positive else value >= 0)
        checked[key] = value if ok else None
    return checked


def parse_nanogpt_log(lines: list[str], name: str) -> RunRecord:
    """A RunRecord from nanoGPT's console output. The iteration after an evaluation is marked:
    its time includes the evaluation."""
    config, explicit, config_files, rows = dict(NANOGPT_DEFAULTS), set(), [], []
    num_params = tokens_per_iter = vocab_size = None
    after_eval = saw_compiling = False
    for line in lines:
        if match := ITER_LINE.search(line):
            step, loss, time_ms, mfu = match.groups()
            row = {"step": int(step), "train/loss": number_or_none(loss), "includes_eval": after_eval}
            if (time_value := number_or_none(time_ms)) is not None:
                row["perf/step_time_ms"] = time_value
            if (mfu_value := number_or_none(mfu)) is not None:
                row["perf/mfu"] = mfu_value / 100
            rows.append({key: value for key, value in row.items() if value is not None})
            after_eval = False
        elif match := EVAL_LINE.search(line):
            if (val := number_or_none(match.group(3))) is not None:
                rows.append({"step": int(match.group(1)), "val/loss": val})
            after_eval = True
        elif match := PARAMS_LINE.search(line):
            num_params = number_or_none(match.group(1))
            num_params = num_params * 1e6 if num_params is not None else None
        elif match := TOKENS_PER_ITER_LINE.search(line):
            tokens_per_iter = int(match.group(1).replace(",", "") or 0) or None
        elif match := VOCAB_LINE.search(line):
            vocab_size = int(match.group(1))
        elif line.startswith("compiling the model"):
            saw_compiling = True
        elif match := CONFIG_FILE_LINE.match(line):
            config_files.append(match.group(1))
        elif (match := SETTING_LINE.match(line)) and match.group(1) in SETTING_KEYS:
            config[match.group(1)] = config_value(match.group(2))
            explicit.add(match.group(1))
    if not any("train/loss" in row or "val/loss" in row for row in rows):
        raise ConfigError(
            f"{name} has no nanoGPT 'iter N: loss ...' or 'step N: train loss ...' lines; "
            "give the console output of nanoGPT's train.py"
        )
    checked = valid_config(config)
    if tokens_per_iter is None and all(checked[k] for k in ("gradient_accumulation_steps", "batch_size", "block_size")):
        tokens_per_iter = checked["gradient_accumulation_steps"] * checked["batch_size"] * checked["block_size"]
    schedule_known = all(
        checked[k] is not None for k in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters")
    ) and isinstance(config.get("decay_lr"), bool)
    for row in rows:
        if tokens_per_iter:
            row["data/tokens_seen"] = row["step"] * tokens_per_iter
        if schedule_known:
            row["train/lr"] = nanogpt_lr(row["step"], checked)
    max_iters = checked["max_iters"]
    plan_source = f"max_iters={max_iters} in the log"
    if "max_iters" not in explicit:
        plan_source = "nanoGPT's default max_iters=600000, not in the log"
    compiled = config.get("compile") if isinstance(config.get("compile"), bool) else None
    summary = {
        "source": "nanogpt",
        "model_name": str(config["wandb_run_name"]),
        "run_names": [str(config["out_dir"]), *config_files],
        "num_params": num_params,
        "vocab_size": vocab_size or PADDED_VOCAB_SIZE,  # nanoGPT pads GPT-2's vocabulary the same way
        "n_layer": checked["n_layer"],
        "n_head": checked["n_head"],
        "n_embd": checked["n_embd"],
        "block_size": checked["block_size"],
        "dropout": checked["dropout"],
        "bias": config["bias"] if isinstance(config["bias"], bool) else None,
        "micro_batch_size": checked["batch_size"],
        "grad_accum": checked["gradient_accumulation_steps"],
        "tokens_per_step": tokens_per_iter,
        "max_steps": max_iters,
        "plan_source": plan_source,
        "lr": checked["learning_rate"],
        "min_lr": checked["min_lr"] if config["decay_lr"] is not False else checked["learning_rate"],
        "warmup_steps": checked["warmup_iters"],
        "decay_steps": checked["lr_decay_iters"] if config["decay_lr"] is not False else None,
        "dataset": str(config["dataset"]),
        "unique_train_tokens": NANOGPT_TRAIN_TOKENS.get(str(config["dataset"])),
        "compile": True if saw_compiling else compiled,
        "mfu_reference": "a100",  # nanoGPT's estimate_mfu divides by an A100's peak whatever the GPU
    }
    return RunRecord(summary, rows)
