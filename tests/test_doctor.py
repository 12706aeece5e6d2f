import os
import subprocess
import sys

import pytest

from doctor_fixtures import metric_rows, nanogpt_log, run_summary, write_run_folder
from fineweb_gpt.diagnose import RunRecord, check_mfu, config_value, parse_nanogpt_log, split_step_times
from fineweb_gpt.doctor import main

NANOGPT_TOKENS_PER_ITER = 12 * 1024 * 40
NANOGPT_RUN_TOKENS = 2000 * NANOGPT_TOKENS_PER_ITER


def flat_after_half(tokens: float) -> float:
    return 4.0 + 2.0 * max(0.0, 1 - tokens / (0.5 * NANOGPT_RUN_TOKENS))


@pytest.fixture
def nanogpt_run(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(nanogpt_log(flat_after_half))
    return path


def test_nanogpt_log_config_overrides_and_parameter_count_are_parsed(nanogpt_run):
    run = parse_nanogpt_log(nanogpt_run.read_text(), str(nanogpt_run))
    s = run.summary
    assert s["num_params"] == pytest.approx(40.56e6)
    assert (s["n_layer"], s["n_head"], s["n_embd"], s["dropout"], s["bias"]) == (12, 12, 384, 0.1, False)
    assert s["grad_accum"] == 40  # "5 * 8" in the config file
    assert s["tokens_per_step"] == NANOGPT_TOKENS_PER_ITER
    assert s["max_steps"] == 2000  # "Overriding: max_iters = 2000" beats the file's 5000
    assert (s["lr"], s["min_lr"], s["decay_steps"], s["warmup_steps"]) == (6e-4, 6e-5, 5000, 100)
    assert s["model_name"] == "gpt2-124M" and "out-124m" in s["run_names"]
    assert s["unique_train_tokens"] is None  # 'fineweb' is not one of nanoGPT's prepared datasets

    iterations = [row for row in run.rows if "train/loss" in row]
    evaluations = [row for row in run.rows if "val/loss" in row]
    assert len(iterations) == 201 and len(evaluations) == 9
    assert [row["step"] for row in iterations if row["includes_eval"]] == list(range(0, 2001, 250))
    assert run.tokens_seen == NANOGPT_RUN_TOKENS


def test_iterations_with_evaluation_or_compilation_are_outliers_not_slowness(nanogpt_run):
    run = parse_nanogpt_log(nanogpt_run.read_text(), str(nanogpt_run))
    typical, outliers = split_step_times(run)
    assert sorted(row["step"] for row in outliers) == list(range(0, 2001, 250))
    assert {row["perf/step_time_ms"] for row in typical} == {4268.0, 4270.0, 4272.0}
    run.summary["peak_flops"] = 58.3e12
    assert "median MFU 59.2% of" in check_mfu(run).evidence


@pytest.mark.parametrize(
    "text, value",
    [("5 * 8", 40), ("6e-4", 6e-4), ("'out-124m'", "out-124m"), ("out-124m", "out-124m"), ("True", True)],
)
def test_config_values_are_read_like_nanogpts_configurator(text, value):
    assert config_value(text) == value


def test_doctor_on_a_nanogpt_log_converts_mfu_and_finds_the_problems(nanogpt_run, capsys):
    assert main(["--nanogpt-log", str(nanogpt_run), "--gpu", "rtx4070", "--train-tokens", "4000000000"]) == 0
    report = (nanogpt_run.parent / "REPORT.md").read_text()
    assert report in capsys.readouterr().out
    assert "### Model size does not match its name" in report and "--n_embd=768 gives 123.59M" in report
    assert "--dropout=0.0" in report
    assert "--lr_decay_iters=2000" in report  # the cosine was set to end at 5000, after the run
    assert "MFU 59%: good" in report and "(the log says 11.07%" in report
    assert "Repeated data" not in report  # 0.25 epochs
    assert (nanogpt_run.parent / "REPORT.png").read_bytes().startswith(b"\x89PNG")


def test_the_same_log_on_the_wrong_gpu_shows_impossible_mfu(nanogpt_run, tmp_path):
    nanogpt_run.write_text(nanogpt_log(flat_after_half, mfu_percent=30.0))
    assert main(["--nanogpt-log", str(nanogpt_run), "--gpu", "rtx4070", "--out", str(tmp_path / "r.md")]) == 0
    assert "### MFU above 100%: wrong GPU" in (tmp_path / "r.md").read_text()


def test_doctor_on_a_run_folder_writes_report_and_plot(tmp_path, capsys):
    summary = run_summary(model_name="124m", dropout=0.1)
    run_dir = write_run_folder(tmp_path / "run", summary, metric_rows(summary, train_gap=0.05))
    out = tmp_path / "reports" / "run.md"
    assert main([str(run_dir), "--out", str(out), "--log-x"]) == 0
    printed = capsys.readouterr().out
    report = out.read_text()
    assert report in printed and f"Report: {out}" in printed
    assert "## Problems (2)" in report
    assert "model.n_embd=768" in report and "model.dropout=0.0" in report
    assert "![train and val loss against tokens, learning rate on the right axis](run.png)" in report
    assert (tmp_path / "reports" / "run.png").read_bytes().startswith(b"\x89PNG")


def test_run_folder_without_a_summary_falls_back_to_the_hydra_config(tmp_path):
    summary = run_summary()
    run_dir = write_run_folder(tmp_path / "run", summary, metric_rows(summary))
    (run_dir / "run_summary.json").unlink()
    assert main([str(run_dir)]) == 0
    report = (run_dir / "REPORT.md").read_text()
    assert "40.56M parameters" in report and "1.00x" in report  # counted from the config's shape


def test_plan_command_prints_the_micro_batch_and_accumulation(capsys):
    assert main(["--plan", "--model", "124m", "--gpu-memory-gb", "12", "--tokens-per-step", "524288"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 8 x gradient accumulation 64" in out
    assert "hw.micro_batch_size=8" in out and "--gradient_accumulation_steps=64" in out


def error_line(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    return captured.err


def test_missing_run_folder_is_one_line(tmp_path, capsys):
    assert f"run folder {tmp_path / 'nope'} does not exist" in error_line(capsys, str(tmp_path / "nope"))


def test_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert f"{tmp_path} has no csv/metrics.csv" in error_line(capsys, str(tmp_path))


def test_unreadable_or_foreign_log_is_one_line(tmp_path, capsys):
    assert "cannot be read" in error_line(capsys, "--nanogpt-log", str(tmp_path / "missing.log"))
    other = tmp_path / "other.log"
    other.write_text("epoch 1/10 - accuracy 0.93\n")
    assert f"{other} has no nanoGPT 'iter N: loss" in error_line(capsys, "--nanogpt-log", str(other))


def test_plan_without_memory_is_one_line(capsys):
    assert "--plan needs the GPU's memory" in error_line(capsys, "--plan", "--model", "40m")


def test_command_line_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fineweb_gpt.doctor", str(tmp_path / "nope")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: run folder {tmp_path / 'nope'} does not exist")
    assert result.stderr.count("\n") == 1


def test_run_record_reads_tokens_from_steps_when_the_column_is_missing():
    run = RunRecord({"tokens_per_step": 1000}, [{"step": 3, "val/loss": 5.0}])
    assert run.points("val/loss")[0].tokens == 3000
