"""The training command line as people type it, run from a folder of their own: the latest run
by a stable name, refused commands that leave nothing behind, a smoke test that starts, and
trainer settings that are honoured."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import SMALL, run_cli

QUICK = [*SMALL, "trainer.max_steps=2", "val_every_steps=2"]


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p for p in cwd.glob("outputs/[0-9]*/*") if p.is_dir())  # outputs/<date>/<time>


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes (links as their target)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(folder))] = os.readlink(path).encode()
        elif path.is_file():
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


def assert_refused_in_one_line(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert "Traceback" not in result.stderr


def test_latest_names_the_newest_run_that_trained_and_refused_commands_leave_nothing(tmp_path):
    # Refused in a fresh folder: no outputs/ at all afterwards.
    refused = run_cli(*QUICK, "optim.lr=0", cwd=tmp_path)
    assert_refused_in_one_line(refused, "optim.lr=0 must be a number above 0")
    assert not (tmp_path / "outputs").exists()

    trained = run_cli(*QUICK, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    [run] = run_folders(tmp_path)
    # The summary names the data source and its file, what each evaluation scores and the time.
    summary = json.loads((run / "run_summary.json").read_text())
    said = trained.stdout + trained.stderr
    assert f"  data             sample: {summary['data_files'][0]}, ~" in said
    assert summary["data_files"][0].endswith("fineweb_sample10BT_800.parquet")
    # data.val_tokens=256 (set, so kept) is 8 windows of block 32; 2 evaluations: step 0 and the last.
    assert summary["val_tokens_scored"] == 256 and summary["evaluations"] == 2
    assert "  evaluation       256 validation tokens x 2 evaluations (step 0, every 2, the last): about " in said
    assert summary["estimated_step_seconds"] > 0 and summary["estimated_evaluation_seconds"] > 0
    assert re.search(r"  time             about [\d.]+ s per step, [\d.]+ s for the run \(its FLOPs at 70% of", said)
    latest = tmp_path / "outputs" / "latest"
    assert os.readlink(latest) == str(run.relative_to(tmp_path / "outputs"))  # relative, inside outputs/
    assert (latest / "checkpoints" / "last.ckpt").is_file() and (latest / "csv" / "metrics.csv").is_file()
    before = snapshot(run)

    # Refused after a run: its folder is gone, the earlier run and the link are as they were.
    refused = run_cli(*QUICK, "trainer.devices=0", cwd=tmp_path)
    assert_refused_in_one_line(
        refused,
        "trainer.devices=0 must be a number of devices (at least 1), -1 or auto (all of them), or device "
        "ids such as [0,1]",
    )
    assert run_folders(tmp_path) == [run] and latest.resolve() == run

    # Refused while resuming the earlier run: nothing of that run is removed or rewritten.
    resumed = run_cli(*QUICK, "resume=auto", f"hydra.run.dir={run}", "trainer.max_steps=abc", cwd=tmp_path)
    assert_refused_in_one_line(resumed, "trainer.max_steps=abc must be a whole number at least 1, or -1")
    after = snapshot(run)
    # Hydra itself rewrites .hydra/ and appends to the log before the command is checked.
    kept = sorted(k for k in before if not k.startswith(".hydra") and k != "train.log")
    assert [after.get(k) for k in kept] == [before[k] for k in kept] and "checkpoints/last.ckpt" in kept
    assert after["train.log"].startswith(before["train.log"])
    assert json.loads(after["result.json"])["status"] == "completed"

    # The doctor takes the link as the README writes it, and reports into the run folder.
    doctor = subprocess.run(
        [sys.executable, "-m", "fineweb_gpt.doctor", "outputs/latest"], cwd=tmp_path, capture_output=True, text=True
    )
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    assert (run / "REPORT.md").is_file() and latest.is_symlink()


def test_a_run_folder_that_is_a_file_and_an_unresolvable_setting_are_one_line_and_leave_nothing(tmp_path):
    # Tracebacks before; the unresolvable interpolation left its run folder (issue 28, item 11).
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    run_dir = taken / "run"
    refused = run_cli(*QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_refused_in_one_line(refused, f"hydra.run.dir={run_dir}: {taken} is a file, not a folder; give another one")
    assert taken.read_text() == "mine\n"
    refused = run_cli(*QUICK, "data.text_column=${oc.env:NOPE}", cwd=tmp_path)
    assert_refused_in_one_line(refused, "data.text_column cannot be resolved: Environment variable 'NOPE' not found")
    assert not (tmp_path / "outputs").exists()


def test_a_smoke_test_of_40m_trains_with_one_warning_line(tmp_path):
    # `model=40m trainer.max_steps=1` as typed, with a batch and validation small enough for a CPU.
    smaller = ["hw.micro_batch_size=1", "total_batch_tokens=1024", "data.val_tokens=2048"]
    honoured = ["trainer.num_sanity_val_steps=0", "callbacks.model_checkpoint=null"]
    result = run_cli("model=40m", "trainer.max_steps=1", *smaller, *honoured, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "optim.warmup_steps" in line]
    assert len(warnings) == 1 and "[WARNING]" in warnings[0]
    assert warnings[0].endswith(
        "optim.warmup_steps=200 does not fit in the run's 1 step(s): warming up over 0 instead (a tenth of the "
        "run); set optim.warmup_steps below 1 to choose"
    )
    [run] = run_folders(tmp_path)
    summary = json.loads((run / "run_summary.json").read_text())
    # 40.56M by nanoGPT's count: 50304 x 384 embedding + 12 x (12 x 384² + 2 x 384) + 384 final gain.
    assert (summary["model_name"], summary["num_params"], summary["warmup_steps"]) == ("40m", 40_560_000, 0)
    with open(run / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows if r["val/loss"]] == ["1"]  # no evaluation before training, as asked
    assert [r["step"] for r in rows if r["train/loss"]] == ["1"]
    assert not (run / "checkpoints").exists() and "Checkpoint:" not in output  # callbacks.model_checkpoint=null


def test_trainer_settings_from_the_command_line_are_honoured(tmp_path):
    settings = [
        "trainer.precision=bf16-mixed",
        "trainer.enable_progress_bar=false",
        "trainer.enable_checkpointing=false",
    ]
    record = tmp_path / "precision.txt"
    spy = ["+callbacks.precision._target_=helpers.RecordPrecision", f"+callbacks.precision.path={record}"]
    result = run_cli(*QUICK, *settings, *spy, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    [run] = run_folders(tmp_path)
    assert json.loads((run / "run_summary.json").read_text())["precision"] == "bf16-mixed"
    assert record.read_text() == "MixedPrecision bf16-mixed"  # what Lightning itself trains in
    assert "Training steps" not in output and "it/s" not in output  # no progress bar
    assert not (run / "checkpoints").exists()
    with open(run / "csv" / "metrics.csv", newline="") as file:
        val_steps = [r["step"] for r in csv.DictReader(file) if r["val/loss"]]
    assert val_steps == ["0", "2"]  # the step-0 evaluation of a fresh run, and the last step
