"""The loggers a run writes to: the CSV record (always, never emptied, each step once after a
resume), TensorBoard, Weights & Biases (config once, plotted against tokens seen)."""

import csv
import json
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from fineweb_gpt.loggers import AppendingCSVLogger, WandbLogger, build_loggers
from fineweb_gpt.run.names import METRICS_FILE
from fineweb_gpt.run.run_files import read_metrics
from fineweb_gpt.training import train
from helpers import SMALL, cli_env

ROWS = 200
# Writes ROWS rows, keeps a copy of the file, then logs a row with a new column while no file
# may grow: a full disk (the write fails) or a kill (SIGXFSZ, the file-size limit's signal).
WRITE_THEN_FAIL = f"""
import resource, shutil, signal, sys
from pathlib import Path
writer, folder, failure = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if writer == "ours":
    from fineweb_gpt.loggers import AppendingCSVLogger
    logger = AppendingCSVLogger(folder)
else:
    from lightning.pytorch.loggers import CSVLogger
    logger = CSVLogger(folder, name="csv", version="", flush_logs_every_n_steps=1)
for step in range({ROWS}):
    logger.log_metrics({{"train/loss": 10 - step / 100, "data/tokens_seen": 256 * step}}, step=step)
logger.save()
shutil.copy(folder / "csv" / "metrics.csv", folder / "before.csv")
# Python ignores SIGXFSZ, so that a write past the limit fails (EFBIG), as on a full disk.
if failure == "kill":
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
logger.log_metrics({{"train/loss": 8.0, "data/tokens_seen": 256 * {ROWS}, "health/epochs": 1.0}}, step={ROWS})
logger.save()
"""


def write_then_fail(tmp_path: Path, writer: str, failure: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRITE_THEN_FAIL, writer, str(tmp_path), failure],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.library_behaviour  # ours: test_a_new_column_never_empties_the_metrics_file
def test_lightnings_csv_writer_empties_the_file_when_a_column_appears_and_the_disk_is_full(tmp_path):
    # Why the project has its own writer: Lightning's rewrites metrics.csv in place. (Should this
    # fail one day, Lightning writes safely and AppendingCSVLogger's rewrite may go.)
    result = write_then_fail(tmp_path, "lightning", "kill")
    assert result.returncode == -signal.SIGXFSZ
    assert len((tmp_path / "before.csv").read_text().splitlines()) == 1 + ROWS
    assert (tmp_path / "csv" / "metrics.csv").stat().st_size == 0


@pytest.mark.parametrize("failure", ["kill", "full disk"])
def test_a_new_column_never_empties_the_metrics_file(tmp_path, failure):
    result = write_then_fail(tmp_path, "ours", failure)
    if failure == "kill":
        assert result.returncode == -signal.SIGXFSZ
    else:
        assert result.returncode == 1 and "File too large" in result.stderr
    metrics = tmp_path / "csv" / "metrics.csv"
    assert metrics.read_bytes() == (tmp_path / "before.csv").read_bytes()  # every row, as it was
    # The run resumes from its last step and the new column arrives, with no temporary file left.
    logger = AppendingCSVLogger(tmp_path, resume_step=ROWS - 1)
    logger.log_metrics({"train/loss": 8.0, "data/tokens_seen": 256 * ROWS, "health/epochs": 1.0}, step=ROWS)
    rows = read_metrics(metrics)
    assert [row["step"] for row in rows] == list(range(ROWS + 1))
    assert rows[ROWS]["health/epochs"] == 1.0 and rows[7]["train/loss"] == pytest.approx(10 - 7 / 100)
    assert [path.name for path in metrics.parent.iterdir()] == ["metrics.csv"]


def test_a_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    logger = AppendingCSVLogger(tmp_path)
    for step in range(3):
        logger.log_metrics({"train/loss": 5.0 - step}, step=step)
    metrics = tmp_path / "csv" / "metrics.csv"
    with open(metrics, "a") as file:
        file.write("3,2.12")  # the kill came part way through this row: "2.1234", no line end
    resumed = AppendingCSVLogger(tmp_path, resume_step=3)
    resumed.log_metrics({"train/loss": 1.5}, step=4)
    assert [(row["step"], row["train/loss"]) for row in read_metrics(metrics)] == [(0, 5), (1, 4), (2, 3), (4, 1.5)]


def logged_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / METRICS_FILE, newline="") as file:
        return list(csv.DictReader(file))


def test_a_resumed_run_leaves_each_step_in_the_csv_once(make_config):
    overrides = [*SMALL, "trainer.max_steps=6", "val_every_steps=2"]
    cfg = make_config(*overrides)
    train(cfg)
    run_dir = Path(cfg.run_dir)
    first = logged_rows(run_dir)
    # A kill after step 6 was logged, before its checkpoint was saved: step 4's is the newest.
    for name in ("step000006.ckpt", "last.ckpt"):
        (run_dir / "checkpoints" / name).unlink()
    train(make_config(*overrides, "resume=auto"))

    rows = logged_rows(run_dir)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [0, 2, 4, 6]
    # The rows up to the checkpoint's save, as the first run wrote them; step 4's evaluation came
    # after that save, so the resumed run runs it again (the same val loss), then goes on.
    saved = next(i for i, r in enumerate(first) if r["step"] == "4" and r["train/loss"]) + 1
    assert rows[:saved] == first[:saved]
    assert [r["val/loss"] for r in rows[saved:] if r["step"] == "4"] == [
        r["val/loss"] for r in first if r["step"] == "4" and r["val/loss"]
    ]
    assert len(read_metrics(run_dir / METRICS_FILE)) == len(rows)  # nothing left for readers to drop


@pytest.mark.parametrize(
    "choice, expected",
    [
        ("logger=wandb", [AppendingCSVLogger, WandbLogger]),
        ("logger=tensorboard", [AppendingCSVLogger, TensorBoardLogger]),
        ("logger=[csv,tensorboard,wandb]", [AppendingCSVLogger, TensorBoardLogger, WandbLogger]),
        ("~logger", [AppendingCSVLogger]),
    ],
)
def test_the_csv_record_is_written_whatever_the_loggers(make_config, choice, expected):
    cfg = make_config(choice)
    assert [type(logger) for logger in build_loggers(cfg.get("logger"), cfg.run_dir, None)] == expected


def test_tensorboard_holds_the_prefixed_metrics_the_csv_holds(make_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(*SMALL, "trainer.max_steps=4", "val_every_steps=2", "logger=tensorboard")
    train(cfg)
    run_dir = Path(cfg.run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = read_metrics(run_dir / METRICS_FILE)  # written too, though logger= names only TensorBoard
    for key in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "perf/tokens_per_sec", "data/tokens_seen"):
        in_csv = {int(row["step"]): row[key] for row in rows if key in row}
        in_tensorboard = {event.step: event.value for event in events.Scalars(key)}
        assert in_tensorboard.keys() == in_csv.keys() and len(in_csv) >= 3, key
        assert list(in_tensorboard.values()) == pytest.approx(list(in_csv.values()), rel=1e-6), key
    summary = json.loads((run_dir / "run_summary.json").read_text())
    import yaml

    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["run"]["num_params"] == summary["num_params"] and hparams["config"]["model"]["n_embd"] == 32


# --- Weights & Biases, read back from its offline run file ---------------------------------


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file: a 7-byte W&B header, then LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: checksum, length, type) holding protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        if kind == 0 or position + 7 + length > len(data):  # the end, or a record still being written
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_run_file(run_dir: Path) -> Path:
    [wandb_run] = run_dir.glob("wandb/offline-run-*")
    run_file = next(wandb_run.glob("run-*.wandb"))
    for _ in range(60):  # W&B's service process may still be writing on a busy machine
        if any(record.HasField("exit") for record in wandb_records(run_file)):
            break
        time.sleep(0.5)
    return run_file


def test_wandb_gets_the_config_once_plots_against_tokens_and_a_resume_continues_its_run(make_config, tmp_path):
    def run(max_steps, ckpt_path=None):
        cfg = make_config(
            *SMALL,
            f"trainer.max_steps={max_steps}",
            "val_every_steps=2",
            "logger=wandb",
            f"ckpt_path={ckpt_path}" if ckpt_path else "ckpt_path=null",
        )
        cfg.run_dir = str(tmp_path / f"run{max_steps}")
        train(cfg)
        return Path(cfg.run_dir)

    first = run(4)
    run_file = finished_run_file(first)
    records = wandb_records(run_file)
    csv_rows = read_metrics(first / METRICS_FILE)  # the CSV record, though logger= names only W&B
    summary = json.loads((first / "run_summary.json").read_text())

    sent = Counter(item.key for r in records if r.HasField("config") for item in r.config.update)
    sent.pop("_wandb", None)  # W&B's own bookkeeping
    assert sent == {"config": 1, "run": 1}
    config = {item.key: json.loads(item.value_json) for r in records for item in r.config.update}
    assert config["run"]["num_params"] == summary["num_params"] and config["config"]["model"]["n_layer"] == 1

    axes = {r.metric.name: r.metric.step_metric for r in records if r.HasField("metric") and r.metric.name}
    logged = {key for row in csv_rows for key in row} - {"step", "data/tokens_seen"}
    assert {key: axes.get(key) for key in logged} == dict.fromkeys(logged, "data/tokens_seen")
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.history.item
    ]
    assert len(history) == len(csv_rows)
    assert all("data/tokens_seen" in row for row in history)  # so every row has its place on the axis
    val_losses = [row["val/loss"] for row in csv_rows if "val/loss" in row]
    assert [row["val/loss"] for row in history if "val/loss" in row] == val_losses

    run_id = run_file.parent.name.rsplit("-", 1)[-1]
    checkpoint = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["wandb_run_id"] == run_id
    resumed = run(6, ckpt_path=first / "checkpoints" / "last.ckpt")
    [resumed_run] = resumed.glob("wandb/offline-run-*")
    assert resumed_run.name.endswith(run_id)
