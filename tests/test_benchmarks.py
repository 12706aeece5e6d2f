"""The benchmark scripts, run as a user runs them, where this machine can."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark measures for real")
def test_max_micro_batch_says_in_one_line_that_it_needs_a_gpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "max_micro_batch.py"), "--model", "tiny"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "error: max_micro_batch.py measures GPU memory and this machine has no CUDA GPU; run it on one\n"
    )


def test_hellaswag_speed_times_synthetic_examples_offline(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "hellaswag_speed.py"),
            "--model",
            "tiny",
            "--examples",
            "6",
            "--batch-size",
            "3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    threads = torch.get_num_threads()
    assert lines[0] == f"model=tiny arch=gpt2 on cpu, {threads} threads, batch 3 examples (x4 endings)"
    assert lines[1].startswith("6 examples in ") and lines[2].startswith("projected for all 10,042: ")
    rate, projected = float(lines[1].split(": ")[1].split()[0]), float(lines[2].split(": ")[1].split()[0])
    assert rate > 0 and projected == pytest.approx(10042 / rate, rel=0.06)  # the rate is printed rounded


def test_train_throughput_prints_its_own_lines_only(tmp_path):
    # Lightning's notices ("GPU available", a tip, "`Trainer.fit` stopped") left out, as in training.
    small = ["--steps", "3", "--warmup", "2", "--rounds", "1", "--micro-batch", "1", "--accumulation", "1"]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_throughput.py"), *small],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device ") and lines[1].startswith("round 1: lightning ")
    assert lines[2].startswith("lightning ") and lines[3].startswith("bare loop ")
    assert lines[4].startswith("lightning / bare loop = ") and len(lines) == 5
