"""Reading what a run leaves in its folder, and writing into it safely.

The doctor and the sweep table read run folders through here, so they agree on what a
folder holds. Run folders are shared and downloaded, so nothing in one is trusted: every
text quoted from it goes through `quoted` (one line, no markdown), and every report or
table goes through `write_inside`, which never writes through a link or outside the folder.
"""

import csv
import json
import math
import os
import re
import tempfile
from pathlib import Path

from lightning_utilities.core.rank_zero import rank_zero_only  # the one Lightning sets the rank on

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.model import MODEL_KEYS

METRICS_FILE = Path("csv") / "metrics.csv"
SUMMARY_FILE = "run_summary.json"
RESULT_FILE = "result.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"

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
    hydra_file = Path(run_dir) / ".hydra" / "hydra.yaml"
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


# --- writing into a folder -------------------------------------------------------------------


def check_target(folder: Path, name: str) -> Path:
    """The path `name` in `folder` if a report may be written there; a one-line ConfigError if
    it is a link, not a plain file name, or resolves outside the folder."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"{name!r} is not a file name; reports are written as plain files in a folder")
    folder = Path(folder)
    target = folder / name
    if target.is_symlink():
        raise ConfigError(
            f"{target} is a link (to {os.readlink(target)}); a report is never written through a link: "
            "delete the link, or give --out another path"
        )
    if os.path.lexists(target) and not target.is_file():
        raise ConfigError(f"{target} exists and is not a file; give --out another path")
    if target.resolve().parent != folder.resolve():
        raise ConfigError(f"{target} resolves outside {folder.resolve()}; give --out another path")
    return target


def write_inside(folder: Path, name: str, content: str | bytes) -> Path:
    """Write `name` into `folder` atomically, never through a link and never outside it.

    The content goes to a new temporary file in the folder, then os.replace puts it in place:
    a rename replaces whatever is at the name instead of writing through it (a link planted
    after the check is replaced, not followed), and a reader never sees half a report. A name
    that is already a link is refused in one line (a planted REPORT.md -> ~/.bashrc stays untouched).
    """
    target = check_target(folder, name)
    real_folder = Path(folder).resolve()
    data = content.encode() if isinstance(content, str) else content
    descriptor, temporary = tempfile.mkstemp(dir=real_folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, real_folder / name)
    except BaseException:
        if os.path.lexists(temporary):
            os.remove(temporary)
        raise
    return target


def write_result(run_dir: str, status: str, **details) -> None:
    """result.json in the run folder: how the run ended, for the sweep table."""
    if rank_zero_only.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_inside(Path(run_dir), RESULT_FILE, json.dumps({"status": status, **details}) + "\n")
