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
