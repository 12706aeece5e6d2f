"""Reading what a run leaves in its folder, and writing the run's own records into it.

The doctor and the sweep table read run folders through here, so they agree on what a
folder holds. Run folders are shared and downloaded, so nothing in one is trusted: every
text quoted from it goes through `quoted` (one line, no markdown), and every file written
goes through safe_files (never through a link, never outside the folder, whole or not at all).
"""

import csv
import json
import logging
import math
import os
import re
from pathlib import Path

from lightning_utilities.core.rank_zero import rank_zero_only  # the one Lightning sets the rank on
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.errors import ConfigError, UserError, one_line
from fineweb_gpt.model_config import MODEL_KEYS
from fineweb_gpt.run.names import (
    HYDRA_CONFIG,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_SETTINGS,
    LAST_CHECKPOINT,
    METRICS_FILE,
    RESULT_FILE,
    SUMMARY_FILE,
)
from fineweb_gpt.safe_files import regular_file, write_atomically

log = logging.getLogger("fineweb_gpt")

# Metrics are grouped by prefix (train/, val/, perf/, data/, health/); folders written
# before that hold these names, read under the new ones. A W&B history export names the
# step as Lightning's WandbLogger logs it.
OLD_METRIC_NAMES = {
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_seen": "data/tokens_seen",
    "epoch": "data/epoch",
    "tokens_per_param": "data/tokens_per_param",
    "tokens_per_sec": "perf/tokens_per_sec",
    "step_time_ms": "perf/step_time_ms",
    "mfu": "perf/mfu",
    "trainer/global_step": "step",
}


def read_metrics(path: Path) -> list[dict]:
    """CSVLogger rows as {column: float}, keeping only the cells that hold a number, under
    today's metric names. NaN and infinite losses are kept (a diverged run logs them); a
    step that is not a finite number is not a step, and is dropped.

    A run resumed from a checkpoint logs again the steps trained after that checkpoint; an
    older file may hold both copies. Where the step count goes back, the earlier rows from
    that step on are dropped (a row without a step goes with the row before it), so each step
    is read once: the resumed run's. Linear in the rows: the rows kept are always in step
    order, so the dropped ones are always the last ones.
    """
    with open(regular_file(path, "give the run's csv/metrics.csv"), newline="", errors="replace") as file:
        return metric_rows(csv.DictReader(file))


def metric_rows(raw_rows) -> list[dict]:
    """read_metrics for rows already read as {column: text}."""
    rows: list[dict] = []
    steps: list[float] = []  # the step each kept row goes with
    last_step = -1.0
    for raw in raw_rows:
        row = {}
        for column, cell in raw.items():
            if not isinstance(column, str) or not isinstance(cell, str):
                continue  # a ragged row: cells without a header, or a header without a cell
            try:
                row[OLD_METRIC_NAMES.get(column, column)] = float(cell)
            except ValueError:
                continue  # empty: this row does not log that column
        if not math.isfinite(row.get("step", 0.0)):
            del row["step"]
        if not row:
            continue
        step = row.get("step", last_step)
        while steps and steps[-1] >= step and step < last_step:
            rows.pop()
            steps.pop()
        last_step = step
        rows.append(row)
        steps.append(step)
    return rows


MAX_RECORD_BYTES = 16 * 2**20  # run_summary.json, result.json and .hydra/overrides.yaml are a few KB
MAX_JSON_DEPTH = 64
LONGEST_INTEGER = 30  # digits; a longer one is read as a float (an infinite one is no number to use)


def read_record_text(path: Path, fix: str) -> str:
    """A small text file of a run folder, whole: a regular file of at most MAX_RECORD_BYTES."""
    path = regular_file(path, fix)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_RECORD_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror}); {fix}") from err
    if len(data) > MAX_RECORD_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_RECORD_BYTES // 2**20} MiB, too large for its kind; {fix}")
    return data.decode(errors="replace")


def read_json(path: Path) -> dict:
    """A JSON object from a run folder; anything else (not a regular file, too large, nested too
    deep, not JSON) is a one-line ConfigError. Integers too long to be numbers a run writes are
    read as floats, so no reader meets a 5,000-digit integer."""
    fix = "restore it or delete it"
    text = read_record_text(path, fix)
    try:
        value = json.loads(text, parse_int=bounded_integer)
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a run's record; {fix}") from None
    except ValueError as err:
        raise ConfigError(f"{path} cannot be read as JSON ({err}); {fix}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds {type(value).__name__}, not a JSON object; {fix}")
    if nesting_depth(value) > MAX_JSON_DEPTH:
        raise ConfigError(f"{path} is nested more than {MAX_JSON_DEPTH} deep, not a run's record; {fix}")
    return value


def bounded_integer(digits: str) -> int | float:
    return int(digits) if len(digits) <= LONGEST_INTEGER else float(digits)


def nesting_depth(value) -> int:
    """How deeply lists and objects nest in a JSON value, counted without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_record_yaml(path: Path, fix: str):
    """A YAML file of a run folder's record (.hydra/*.yaml) as plain data, bounded like read_json:
    a regular file, at most MAX_RECORD_BYTES, no aliases (Hydra writes none, and a file of nested
    aliases expands without end), nested at most MAX_JSON_DEPTH deep; else a one-line ConfigError."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("it uses YAML aliases, which a run's record never holds")
            return super().compose_node(parent, index)

    text = read_record_text(path, fix)
    try:
        value = yaml.load(text, Loader=NoAliases)
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a run's record; {fix}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} cannot be read as YAML ({one_line_text(err)}); {fix}") from err
    if nesting_depth(value) > MAX_JSON_DEPTH:
        raise ConfigError(f"{path} is nested more than {MAX_JSON_DEPTH} deep, not a run's record; {fix}")
    return value


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a Hydra run was started with (.hydra/overrides.yaml): a list of
    texts; a file that is not one reads as none."""
    try:
        overrides = read_record_yaml(Path(run_dir) / HYDRA_OVERRIDES, "") or []
    except ConfigError:
        return []
    if not isinstance(overrides, list):
        return []
    return [str(o) for o in overrides if isinstance(o, str | int | float | bool)]


def read_summary(run_dir: Path) -> dict:
    """The run's summary (run_summary.json's keys). Older folders without run_summary.json give
    what their .hydra/config.yaml holds; `compile` comes from hw.compile when the summary lacks it."""
    run_dir = Path(run_dir)
    config = read_hydra_config(run_dir)
    if (run_dir / SUMMARY_FILE).is_file():
        summary = read_json(run_dir / SUMMARY_FILE)
    elif config is not None:
        summary = summary_from_hydra_config(run_dir, config)
    else:
        raise ConfigError(f"{run_dir} has neither {SUMMARY_FILE} nor {HYDRA_CONFIG}; give the whole run folder")
    if summary.get("compile") is None and config is not None:
        summary["compile"] = (config.get("hw") or {}).get("compile")
    return summary


def read_hydra_config(run_dir: Path) -> dict | None:
    """.hydra/config.yaml as plain data (interpolations stay text), or None without one."""
    path = Path(run_dir) / HYDRA_CONFIG
    if not os.path.lexists(path):
        return None
    config = read_record_yaml(path, "restore it or delete it")
    return config if isinstance(config, dict) else None


def summary_from_hydra_config(run_dir: Path, config: dict) -> dict:
    """The summary keys a run folder's Hydra config can give, for runs without run_summary.json."""
    model, optim, hw = (config.get(key) or {} for key in ("model", "optim", "hw"))
    max_steps = (config.get("trainer") or {}).get("max_steps")
    summary = {
        **{key: model.get(key) for key in MODEL_KEYS if key in model},
        **{key: optim.get(key) for key in ("lr", "min_lr", "warmup_steps", "weight_decay")},
        "micro_batch_size": hw.get("micro_batch_size"),
        "peak_flops": hw.get("peak_flops"),
        "tokens_per_step": config.get("total_batch_tokens"),
        "max_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
    }
    try:  # a damaged hydra.yaml only costs the model's name
        settings = read_record_yaml(Path(run_dir) / HYDRA_SETTINGS, "")
        summary["model_name"] = settings["hydra"]["runtime"]["choices"]["model"]
    except (ConfigError, KeyError, TypeError):
        pass
    return summary


def final_checkpoint(run_dir: Path) -> str:
    """Where the run's last checkpoint is: the file checkpoints/last.ckpt names, relative to the
    run folder, or "none". The link is read, never followed outside the folder."""
    link = Path(run_dir) / LAST_CHECKPOINT
    if not os.path.lexists(link):
        return "none"
    if not link.is_symlink():
        return str(LAST_CHECKPOINT)
    target = (link.parent / os.readlink(link)).resolve()
    try:
        inside = target.relative_to(Path(run_dir).resolve())
    except ValueError:
        return f"none (last.ckpt points outside the run folder, at {os.readlink(link)})"
    return str(inside) if target.is_file() else f"none ({inside} is missing)"


# --- quoting what a run folder says ----------------------------------------------------------

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line_text(value, limit: int = 160) -> str:
    """A value from a run folder as one printable line of at most `limit` characters."""
    text = CONTROL_CHARACTERS.sub(" ", str(value)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value, limit: int = 160) -> str:
    """A value from a run folder, safe inside a markdown report or table and a log line: one
    line, in a code span (markdown and HTML inside it stay text), pipes escaped for tables."""
    text = one_line_text(value, limit).replace("`", "'").replace("|", "\\|")
    return f"`{text}`" if text else "``"


# --- writing into a run folder --------------------------------------------------------------


def write_result(run_dir: str, status: str, **details) -> None:
    """result.json in the run folder: how the run ended, for the sweep table."""
    if rank_zero_only.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(run_dir) / RESULT_FILE, json.dumps({"status": status, **details}) + "\n")


def record_result(run_dir: str, status: str, **details) -> None:
    """write_result, where the run is already ending for another reason (a stop, an error): a
    result that cannot be written (a full disk, a planted link) is said in one line, and the
    reason the run ends stays the one it reports."""
    try:
        write_result(run_dir, status, **details)
    except (UserError, OSError) as err:
        log.warning("%s was not written: %s", Path(run_dir) / RESULT_FILE, one_line(err))


def final_val_loss_of(run_dir: str, step: int) -> tuple[float | None, bool]:
    """A finished run's final val loss, and whether its result.json already says so: from
    result.json when it records the run as completed, else from its metrics at `step`."""
    run_dir = Path(run_dir)
    try:
        result = read_json(run_dir / RESULT_FILE) if os.path.lexists(run_dir / RESULT_FILE) else {}
    except ConfigError:
        result = {}
    value = result.get("final_val_loss")
    if result.get("status") == "completed" and type(value) in (int, float) and math.isfinite(value):
        return float(value), True
    try:
        rows = read_metrics(run_dir / METRICS_FILE)
    except (ConfigError, OSError, UnicodeDecodeError, csv.Error):
        rows = []
    losses = [row["val/loss"] for row in rows if "val/loss" in row and row.get("step") == step]
    return (losses[-1] if losses else None), False


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """.hydra/config.yaml, hydra.yaml and overrides.yaml, as Hydra writes them, once the run is
    accepted (unless hydra.output_subdir is set, and Hydra wrote them itself)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    folder = run_dir / HYDRA_DIR
    if folder.is_symlink():
        raise ConfigError(f"{folder} is a link (to {os.readlink(folder)}); delete it, the run records its config there")
    folder.mkdir(exist_ok=True)
    write_atomically(run_dir / HYDRA_CONFIG, OmegaConf.to_yaml(cfg))
    write_atomically(run_dir / HYDRA_SETTINGS, OmegaConf.to_yaml(HydraConfig.instance().cfg))
    write_atomically(run_dir / HYDRA_OVERRIDES, OmegaConf.to_yaml(HydraConfig.get().overrides.task))
