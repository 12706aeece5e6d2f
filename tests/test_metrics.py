import csv
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fineweb_gpt.flops import (
    chinchilla_tokens,
    flops_per_token,
    gpu_for_device,
    model_flops_utilization,
    size_in_name,
    size_mismatch,
)
from fineweb_gpt.model import GPT, GPTConfig
from fineweb_gpt.monitor.step_metrics import StepMetrics
from fineweb_gpt.training import train
from helpers import CONF_DIR, SMALL, recorded_batches, run_cli

PER_STEP = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "data/tokens_seen",
    "perf/tokens_per_sec",
    "perf/step_time_ms",
    "perf/mfu",
    "data/epoch",
    "data/tokens_per_param",
}
PER_EVAL = {"val/loss", "val/ppl", "val/time_ms"}


def read_metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, key) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_flops_per_token_and_mfu_match_a_hand_calculation():
    n = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)).num_params()
    # By hand: 6N for the weights, 12 * layers * heads * head size * context for attention.
    by_hand = 6 * n + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(n, n_layer=12, n_head=12, n_embd=768, block_size=1024) == by_hand
    assert by_hand == pytest.approx(854.7e6, rel=1e-3)
    # 50k tokens/s on an RTX 4070 (58.3 TFLOPS) is 854.7e6 * 5e4 / 58.3e12 = 73.3% MFU...
    assert model_flops_utilization(by_hand, 50_000, 58.3e12) == pytest.approx(0.733, abs=0.001)
    # ...and nanoGPT's A100 denominator would call the same run 13.7%.
    assert model_flops_utilization(by_hand, 50_000, 312e12) == pytest.approx(0.137, abs=0.001)
    # tokens/s counted over 2 GPUs halves each GPU's share.
    assert model_flops_utilization(by_hand, 100_000, 58.3e12, world_size=2) == pytest.approx(0.733, abs=0.001)
    assert chinchilla_tokens(n) == 20 * n


@pytest.mark.parametrize(
    "device, profile, peak",
    [
        ("NVIDIA GeForce RTX 4070", "rtx4070", 58.3e12),
        ("NVIDIA GeForce RTX 4070 Ti", None, None),
        ("NVIDIA GeForce RTX 4070 Laptop GPU", None, None),
        ("NVIDIA GeForce RTX 4090", "rtx4090", 165.2e12),
        ("NVIDIA GeForce RTX 3090", "rtx3090", 71e12),
        ("NVIDIA A100-SXM4-40GB", "a100", 312e12),
        ("NVIDIA H100 80GB HBM3", "h100", 989e12),
        ("NVIDIA H100 PCIe", "h100_pcie", 756e12),
        ("NVIDIA H200", "h200", 989e12),
        ("Tesla T4", None, None),
    ],
)
def test_each_gpu_is_found_by_its_device_name_with_its_dense_bf16_peak(device, profile, peak):
    gpu = gpu_for_device(device)
    assert (gpu.name, gpu.peak_flops) == (profile, peak) if profile else gpu is None
    if profile:  # the hw= profile trains in bf16 on CUDA, the precision its peak is for
        hw = OmegaConf.load(CONF_DIR / "hw" / f"{profile}.yaml")
        assert hw.precision == "bf16-mixed" and hw.requires_cuda


def test_name_and_size_mismatch():
    assert size_in_name("124m") == 124e6 and size_in_name("gpt2-1.5B") == 1.5e9 and size_in_name("tiny") is None
    at_384 = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=384)).num_params()
    warning = size_mismatch("124m", at_384)
    assert "promises about 124M parameters but has 40.56M" in warning
    for preset in ("40m", "124m", "tiny"):
        model = OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml")
        assert size_mismatch(preset, GPT(GPTConfig(**model)).num_params()) is None


def test_every_metric_per_optimizer_step_with_accumulation(make_config, tmp_path):
    record = tmp_path / "batches"
    cfg = make_config(
        *SMALL,
        "trainer.max_steps=6",
        "val_every_steps=3",
        "hw.peak_flops=1e12",
        "+callbacks.recorder._target_=helpers.BatchRecorder",
        f"+callbacks.recorder.path={record}",
    )
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    assert PER_STEP | PER_EVAL | {"step"} <= set(rows[0])

    steps = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4, 5, 6]  # one row per optimizer step, not per micro-batch
    micro = recorded_batches(record)
    assert len(micro) == 12  # accumulation: 256 tokens / (4 x 32) = 2 micro-batches per step
    for step, row in enumerate(steps, start=1):
        this_step = micro[2 * (step - 1) : 2 * step]
        losses = [loss for *_, loss in this_step]
        assert float(row["train/loss"]) == pytest.approx(sum(losses) / 2, rel=1e-5)  # both micro-batches
        assert abs(losses[0] - losses[1]) > 1e-4  # so the last one alone would not pass
        consumed = sum(tokens for _, _, tokens, _ in micro[: 2 * step])
        assert int(row["data/tokens_seen"]) == consumed == 256 * step
        assert float(row["data/tokens_per_param"]) == pytest.approx(
            consumed / json.loads((Path(cfg.run_dir) / "run_summary.json").read_text())["num_params"]
        )
        assert float(row["perf/tokens_per_sec"]) == pytest.approx(
            256 / (float(row["perf/step_time_ms"]) / 1000), rel=1e-6
        )
        assert float(row["perf/mfu"]) > 0 and float(row["train/grad_norm"]) > 0 and float(row["data/epoch"]) > 0

    evals = [r for r in rows if r["val/loss"]]
    assert [int(r["step"]) for r in evals] == [0, 3, 6]
    for r in evals:
        assert float(r["val/ppl"]) == pytest.approx(2.718281828 ** float(r["val/loss"]), rel=1e-6)
    # The learning rate each step used: warmup of 1 step, then cosine down to min_lr at step 6.
    lrs = column(steps, "train/lr")
    assert lrs[0] == pytest.approx(cfg.optim.lr) and lrs == sorted(lrs, reverse=True)


def test_progress_bar_values_are_handed_to_lightning_on_the_host():
    # Lightning reads every progress-bar value back after each micro-batch; one it holds on
    # the GPU (what it makes of a plain number) costs a wait for the GPU every micro-batch.
    logged = {}

    class Module:
        def log(self, key, value, **kwargs):
            logged[key] = value

    StepMetrics.show_in_progress_bar(
        Module(), {"train/loss": 3.25, "perf/tokens_per_sec": 5e5, "perf/mfu": 0.4, "train/lr": 1e-3}
    )
    assert set(logged) == {"loss", "tok/s", "mfu"}
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in logged.values())
    assert [float(logged[k]) for k in ("loss", "tok/s", "mfu")] == [3.25, 5e5, pytest.approx(0.4)]


def test_summary_is_written_and_printed(make_config, caplog):
    cfg = make_config(*SMALL, "trainer.max_steps=2")
    with caplog.at_level(logging.INFO, logger="fineweb_gpt"):
        train(cfg)
    summary = json.loads((Path(cfg.run_dir) / "run_summary.json").read_text())
    assert summary["tokens_per_step"] == 256 and summary["grad_accum"] == 2 and summary["micro_batch_size"] == 4
    assert summary["planned_tokens"] == 512
    assert summary["chinchilla_tokens"] == 20 * summary["num_params"]
    assert summary["planned_epochs"] == pytest.approx(512 / summary["unique_train_tokens"])
    text = caplog.text
    assert "Run summary" in text and "256 tokens per optimizer step = micro-batch 4 x block 32 x accumulation 2" in text
    assert "Chinchilla-optimal" in text


def test_name_size_warning_fires_in_a_run(make_config, caplog):
    overrides = [o for o in SMALL if not o.startswith("model.")] + ["model.block_size=32", "trainer.max_steps=2"]
    with caplog.at_level(logging.WARNING, logger="fineweb_gpt"):
        train(make_config("model=124m", "model.n_embd=384", *overrides))
    assert "model '124m' promises about 124M parameters but has 40.56M" in caplog.text


def test_step_time_excludes_a_slow_validation(make_config):
    cfg = make_config(
        *SMALL,
        "data.val_tokens=128",
        "trainer.max_steps=4",
        "val_every_steps=2",
        "+callbacks.slow._target_=helpers.SlowValidation",
        "+callbacks.slow.seconds=2.5",
    )
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    val_ms = column(rows, "val/time_ms")
    step_ms = column(rows, "perf/step_time_ms")
    assert len(val_ms) == 3 and min(val_ms) > 2500  # one slow batch per evaluation...
    assert len(step_ms) == 4 and max(step_ms) < min(val_ms) / 2  # ...and no step absorbed one


@pytest.mark.slow
def test_two_ranks_keep_the_global_batch_count_tokens_exactly_and_never_wait_mid_step(tmp_path):
    record, waits = tmp_path / "batches", tmp_path / "waits"
    result = run_cli(
        *[arg for arg in SMALL if not arg.startswith("total_batch_tokens=")],
        "total_batch_tokens=512",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "val_every_steps=2",
        "+callbacks.recorder._target_=helpers.BatchRecorder",
        f"+callbacks.recorder.path={record}",
        "+callbacks.waits._target_=helpers.MidStepCollectives",
        f"+callbacks.waits.path={waits}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    # One process would take 4 micro-batches of 4 x 32 per step; two take 2 each: still 512 tokens.
    assert (summary["world_size"], summary["grad_accum"], summary["tokens_per_step"]) == (2, 2, 512)
    micro = recorded_batches(record)
    assert len(micro) == 16  # 2 ranks x 4 steps x 2 micro-batches
    rows = read_metrics(tmp_path / "run")
    seen = column(rows, "data/tokens_seen")
    assert seen[-1] == sum(tokens for *_, tokens, _ in micro) == 4 * 512
    assert len({digest for _, digest, _, _ in micro}) == 16  # each rank trains on different data
    output = result.stdout + result.stderr
    assert output.count("Run summary") == 1  # rank 0 only: its summary, progress lines, no warnings
    assert re.findall(r"\] - step (\d)/4 \(", output) == ["1", "2", "3", "4"]
    warned = [line.split("] - ", 1)[1] for line in output.splitlines() if "][WARNING] - " in line]
    assert len(warned) == len(set(warned))  # no warning twice, from a second rank
    # Between a step's micro-batches no rank talks to the other (Lightning's SIGTERM flag and its
    # time-based checkpoint check would, each micro-batch): the ranks' GPUs never wait mid-step.
    assert [int((tmp_path / f"waits.rank{rank}").read_text()) for rank in (0, 1)] == [0, 0]


def test_health_problems_are_warned_once_in_the_log_and_the_logger(make_config, tmp_path, caplog):
    import pyarrow.parquet as pq

    from fineweb_gpt.data import bundled_sample_path

    few_docs = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(bundled_sample_path()).slice(0, 8), few_docs)
    cfg = make_config(
        *SMALL,
        "data=single_parquet",
        f"data.path={few_docs}",
        "data.val_fraction=0.3",
        "trainer.max_steps=60",
        "val_every_steps=20",
    )
    with caplog.at_level(logging.WARNING, logger="fineweb_gpt"):
        train(cfg)
    summary = json.loads((Path(cfg.run_dir) / "run_summary.json").read_text())
    assert summary["planned_epochs"] > 1
    repeated = [r for r in caplog.records if r.getMessage().startswith("Run health: Repeated data")]
    assert len(repeated) == 1  # warned once, not at every evaluation
    flagged = [r for r in read_metrics(cfg.run_dir) if r.get("health/epochs")]
    assert len(flagged) == 1 and int(flagged[0]["step"]) == 0
    assert flagged[0]["data/tokens_seen"] == "0"  # on the tokens axis too, as every row
