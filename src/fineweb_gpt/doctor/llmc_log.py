"""llm.c's logs as a run record: its main.log, and its console output.

main.log (`-o DIR`) holds `s:<step> trl:<loss> lr:<lr> norm:<norm>` per step (older builds
write only the loss) and `s:<step> tel:<val loss>` per evaluation, and no settings: the
tokens per step and the model size must come from the command line. The console output
(`train_gpt2cu ... | tee log`) prints a settings table first (`| total batch size | 524288 |`),
then `step N/T | loss ... | norm ... | lr ... | ... ms | ...% bf16 MFU | ... tok/s` and
`val loss ...` lines.
"""

import re

from fineweb_gpt.doctor.record import RunRecord
from fineweb_gpt.errors import ConfigError

MAIN_LOG_LINE = re.compile(r"^s:(\d{1,12}) (trl|tel|eval):(\S+)(.*)$")
FIELD = re.compile(r"(\w+):(\S+)")
CONSOLE_STEP_LINE = re.compile(r"^step\s+(\d{1,12})/(\d{1,12})\s*\|\s*(?:train )?loss\s+(\S+)(.*)$")
CONSOLE_VAL_LINE = re.compile(r"^val loss (\S+)")
CONSOLE_PARTS = {
    "train/lr": re.compile(r"\|\s*lr\s+(\S+)"),
    "train/grad_norm": re.compile(r"\|\s*norm\s+(\S+)"),
    "perf/step_time_ms": re.compile(r"\|\s*(\S+)\s*ms\b"),
    "perf/mfu": re.compile(r"\|\s*(\S+)%\s*\w*\s*MFU"),
    "perf/tokens_per_sec": re.compile(r"\|\s*(\S+)\s*tok/s"),
}
TABLE_ROW = re.compile(r"^\|\s*([^|]{1,60}?)\s*\|\s*([^|]{0,200}?)\s*\|$")
# The settings table's rows (train_gpt2.cu) that the checks use.
TABLE_KEYS = {
    "total batch size": "tokens_per_step",
    "micro batch size b": "micro_batch_size",
    "sequence length t": "block_size",
    "learning rate (lr)": "lr",
    "warmup iterations": "warmup_steps",
    "final lr fraction": "final_lr_fraction",
    "max_steps": "max_steps",
    "num_layers l": "n_layer",
    "num_heads nh": "n_head",
    "channels c": "n_embd",
    "padded_vocab_size vp": "vocab_size",
    "num_parameters": "num_params",
    "train_num_batches": "train_num_batches",
    "peak tflops": "peak_tflops",
    "device": "device_name",
    "precision": "precision",
}


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_llmc_log(lines: list[str], name: str) -> RunRecord:
    rows: list[dict] = []
    table: dict = {}
    planned_steps = None
    for line in lines:
        if match := MAIN_LOG_LINE.match(line):
            step, kind, value, rest = match.groups()
            loss = number(value)
            if kind == "tel" and loss is not None:
                rows.append({"step": int(step), "val/loss": loss})
            elif kind == "trl" and loss is not None:
                # The loss of step s's batch, logged before its update: our step counts updates done.
                row = {"step": int(step) + 1, "train/loss": loss}
                fields = dict(FIELD.findall(rest))
                for key, column in (("lr", "train/lr"), ("norm", "train/grad_norm")):
                    if key in fields and (parsed := number(fields[key])) is not None:
                        row[column] = parsed
                rows.append(row)
        elif match := CONSOLE_STEP_LINE.match(line):
            step, total, value, rest = match.groups()
            planned_steps = int(total)
            if (loss := number(value.split("(")[0])) is None:
                continue
            row = {"step": int(step), "train/loss": loss}
            for column, pattern in CONSOLE_PARTS.items():
                if (found := pattern.search(rest)) and (parsed := number(found.group(1))) is not None:
                    row[column] = parsed / 100 if column == "perf/mfu" else parsed
            rows.append(row)
        elif match := CONSOLE_VAL_LINE.match(line):
            if (loss := number(match.group(1))) is not None:
                last = max((r["step"] for r in rows if "train/loss" in r), default=0)
                rows.append({"step": last, "val/loss": loss})
        elif (match := TABLE_ROW.match(line)) and match.group(1).lower() in TABLE_KEYS:
            table[TABLE_KEYS[match.group(1).lower()]] = match.group(2)
    if not any("train/loss" in row or "val/loss" in row for row in rows):
        raise ConfigError(f"{name} has no llm.c 's:N trl:' / 's:N tel:' or 'step N/T | loss' lines; give llm.c's log")
    summary = {"source": "llmc", "model_name": "llm.c"}
    for key in ("tokens_per_step", "micro_batch_size", "block_size", "warmup_steps", "n_layer", "n_head", "n_embd"):
        summary[key] = _integer(table.get(key))
    summary["vocab_size"] = _integer(table.get("vocab_size"))
    summary["num_params"] = _integer(table.get("num_params"))
    summary["lr"] = number(table["lr"]) if "lr" in table else None
    fraction = number(table["final_lr_fraction"]) if "final_lr_fraction" in table else None
    if summary["lr"] is not None and fraction is not None:
        summary["min_lr"] = summary["lr"] * fraction
    max_steps = _integer(table.get("max_steps"))
    planned_steps = planned_steps or _integer(table.get("train_num_batches"))
    summary["max_steps"] = max_steps if max_steps and max_steps > 0 else planned_steps
    summary["decay_steps"] = summary["max_steps"]  # llm.c's schedules end with the run
    if summary["max_steps"]:
        summary["plan_source"] = f"{summary['max_steps']} steps in the log"
    peak = number(table["peak_tflops"]) if "peak_tflops" in table else None
    if peak:
        summary["mfu_peak_flops"] = peak * 1e12  # llm.c measures MFU against its own table's peak
    for key in ("device_name", "precision"):
        if table.get(key):
            summary[key] = table[key]
    if summary["tokens_per_step"] and summary["micro_batch_size"] and summary["block_size"]:
        micro_tokens = summary["micro_batch_size"] * summary["block_size"]
        summary["grad_accum"] = max(1, summary["tokens_per_step"] // micro_tokens)
    return RunRecord({k: v for k, v in summary.items() if v is not None}, rows)


def _integer(text) -> int | None:
    value = number(str(text)) if text is not None else None
    return int(value) if value is not None and value == value and abs(value) < 1e15 else None
