"""modded-nanogpt's logs as a run record.

Its train_gpt.py writes the script's own source first, then `step:<n>/<total> val_loss:<x>
train_time:<ms>ms step_avg:<ms>ms` per evaluation and, per step, the same without the val
loss (older versions add `train_loss:<x>`). The batch and the model live in the script, not
in the log lines: the tokens per step and the model size come from the command line.
"""

import re

from fineweb_gpt.doctor.record import RunRecord
from fineweb_gpt.errors import ConfigError

STEP_LINE = re.compile(r"^step:(\d{1,12})/(\d{1,12})\s+(.*)$")
FIELD = re.compile(r"(\w+):(\S+)")


def number(text: str) -> float | None:
    try:
        return float(text.removesuffix("ms"))
    except ValueError:
        return None


def parse_modded_log(lines: list[str], name: str) -> RunRecord:
    rows: list[dict] = []
    planned = None
    for line in lines:
        match = STEP_LINE.match(line)
        if not match:
            continue
        step, total, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        planned = total
        fields = {key: number(value) for key, value in FIELD.findall(rest)}
        if fields.get("val_loss") is not None:
            rows.append({"step": step, "val/loss": fields["val_loss"]})
        elif fields.get("train_loss") is not None or fields.get("step_avg") is not None:
            row = {"step": step}
            if fields.get("train_loss") is not None:
                row["train/loss"] = fields["train_loss"]
            if fields.get("step_avg") is not None and step > 10:  # the first steps include compilation
                row["perf/step_time_ms"] = fields["step_avg"]
            rows.append(row)
    if not any("train/loss" in row or "val/loss" in row for row in rows):
        raise ConfigError(f"{name} has no modded-nanogpt 'step:N/T val_loss:...' lines; give its log file")
    summary = {"source": "modded", "model_name": "modded-nanogpt", "max_steps": planned, "decay_steps": planned}
    if planned:
        summary["plan_source"] = f"{planned} steps in the log"
    return RunRecord(summary, rows)
