"""Reading what a run leaves in its folder, and writing the run's own records into it.

The doctor and the sweep table read run folders through here, so they agree on what a
folder holds. Run folders are shared and downloaded, so nothing in one is trusted: every
text quoted from it goes through `quoted` (one line, no markdown), and every file written
goes through safe_files (never through a link, never outside the folder, whole or not at all).
"""

import csv
import json
import math
import os
import re
from pathlib import Path

from lightning_utilities.core.rank_zero import rank_zero_only  # the one Lightning sets the rank on
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.run.names import (
    HYDRA_CONFIG,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_SETTINGS,
    LAST_CHECKPOINT,
    RESULT_FILE,
    SUMMARY_FILE,
)
from fineweb_gpt.safe_files import write_atomically

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
    that step on are dropped, so each step is read once: the resumed run's.
    """
    rows: list[dict] = []
    last_step = -1.0
    with open(path, newline="", errors="replace") as file:
        for raw in csv.DictReader(file):
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
            if step < last_step:
                rows = [r for r in rows if r.get("step", -1) < step]
            last_step = step
            rows.append(row)
    return rows


def read_json(path: Path) -> dict:
    """A JSON object from a run folder; anything else is a one-line ConfigError."""
    try:
        value = json.loads(Path(path).read_text(errors="replace"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} cannot be read as JSON ({err}); restore it or delete it") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds {type(value).__name__}, not a JSON object; restore it or delete it")
    return value


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a Hydra run was started with (.hydra/overrides.yaml)."""
    import yaml

    try:
        overrides = yaml.safe_load((Path(run_dir) / HYDRA_OVERRIDES).read_text(errors="replace")) or []
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


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
    from omegaconf import OmegaConf

    path = Path(run_dir) / HYDRA_CONFIG
    if not path.is_file():
        return None
    try:
        config = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # YAML and OmegaConf raise many kinds for a damaged file
        raise ConfigError(f"{path} holds a config that cannot be read ({one_line_text(err)})") from err
    return config if isinstance(config, dict) else None


def summary_from_hydra_config(run_dir: Path, config: dict) -> dict:
    """The summary keys a run folder's Hydra config can give, for runs without run_summary.json."""
    from omegaconf import OmegaConf

    from fineweb_gpt.model import MODEL_KEYS  # torch: not for the doctor's and the sweep table's start

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
    hydra_file = Path(run_dir) / HYDRA_SETTINGS
    if hydra_file.is_file():
        try:
            summary["model_name"] = OmegaConf.load(hydra_file).hydra.runtime.choices.get("model")
        except Exception:  # a damaged hydra.yaml only costs the model's name
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
