"""build-nanogpt's log.txt as a run record.

Its train_gpt2.py appends one line per event to log/log.txt: `N train L` every step, `N val L`
and `N hella A` (HellaSwag acc_norm, scored as evals/hellaswag.py scores it) at each evaluation.
The settings are not in the log: they are its script's (GPT-2 124M, 524,288 tokens per step,
19,073 steps, warmup 715, lr 6e-4 to 6e-5), and the record says they were assumed.
"""

import re

from fineweb_gpt.doctor.record import RunRecord
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import gpt2_shaped, parameter_count

LOG_LINE = re.compile(r"^(\d{1,12}) (train|val|hella) (\S+)$")
COLUMNS = {"train": "train/loss", "val": "val/loss", "hella": "eval/hellaswag_acc_norm"}
# train_gpt2.py's settings: GPT-2 124M with biases, the padded vocabulary, its schedule.
DEFAULTS = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304, "bias": True}
TOKENS_PER_STEP = 524_288
MAX_STEPS, WARMUP_STEPS, LR = 19_073, 715, 6e-4


def parse_buildnanogpt_log(lines: list[str], name: str) -> RunRecord:
    rows = []
    for line in lines:
        match = LOG_LINE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        rows.append({"step": int(match.group(1)), COLUMNS[match.group(2)]: value})
    if not any("train/loss" in row or "val/loss" in row for row in rows):
        raise ConfigError(f"{name} has no build-nanogpt 'N train L' or 'N val L' lines; give its log/log.txt")
    summary = {
        "source": "buildnanogpt",
        "model_name": "build-nanogpt GPT-2 124M",
        **DEFAULTS,
        "num_params": parameter_count(gpt2_shaped(12, 768, 50304, bias=True)),
        "tokens_per_step": TOKENS_PER_STEP,
        "max_steps": MAX_STEPS,
        "decay_steps": MAX_STEPS,
        "plan_source": f"train_gpt2.py's default max_steps={MAX_STEPS}, not in the log",
        "warmup_steps": WARMUP_STEPS,
        "lr": LR,
        "min_lr": LR * 0.1,
        "dataset": "fineweb-edu",
    }
    return RunRecord(summary, rows)
