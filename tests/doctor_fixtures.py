"""Synthetic runs with known answers: run folders as fineweb_gpt.train writes them, and nanoGPT logs."""

import csv
import json
import math
from pathlib import Path

import numpy as np

from fineweb_gpt.optimization import learning_rate

TOKENS_PER_STEP = 524288
PARAMS_40M = 40_560_000
CHINCHILLA_STEPS_40M = math.ceil(20 * PARAMS_40M / TOKENS_PER_STEP)  # 1548 steps, 811.6M tokens
INITIAL_LOSS = math.log(50304)  # uniform over the vocabulary


def power_law(tokens: float, a: float = 3.0, b: float = 377.0, c: float = 0.3) -> float:
    """A healthy val curve: about 6 at 10M tokens, 3.8 at 800M."""
    return a + b * tokens**-c


def run_summary(**changes) -> dict:
    """A healthy 40m run on an RTX 4070: Chinchilla-sized, under one epoch of one file, dropout 0."""
    summary = {
        "model_name": "40m",
        "num_params": PARAMS_40M,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 384,
        "block_size": 1024,
        "vocab_size": 50304,
        "dropout": 0.0,
        "bias": False,
        "hw_name": "rtx4070",
        "device_name": "NVIDIA GeForce RTX 4070",
        "peak_flops": 58.3e12,
        "precision": "bf16-mixed",
        "micro_batch_size": 8,
        "grad_accum": 64,
        "world_size": 1,
        "tokens_per_step": TOKENS_PER_STEP,
        "max_steps": CHINCHILLA_STEPS_40M,
        "chinchilla_tokens": 20 * PARAMS_40M,
        "unique_train_tokens": 1_200_000_000,
        "unique_train_tokens_estimated": True,
        "lr": 6e-4,
        "min_lr": 6e-5,
        "warmup_steps": 100,
        "weight_decay": 0.1,
        "data_files": ["/data/fineweb/000_00000.parquet"],
        "flops_per_token": 6 * PARAMS_40M + 12 * 12 * 1024 * 384,
    }
    summary.update(changes)
    summary["planned_tokens"] = summary["max_steps"] * summary["tokens_per_step"]
    summary["planned_epochs"] = summary["planned_tokens"] / summary["unique_train_tokens"]
    return summary


def metric_rows(
    summary: dict,
    val_loss=power_law,
    train_loss=None,
    train_gap: float = 0.0,
    eval_every: int = 100,
    mfu: float = 0.45,
    constant_lr: bool = False,
    noise: float = 0.003,
    seed: int = 0,
) -> list[dict]:
    """CSVLogger rows of a run: one per optimizer step, one per evaluation (step 0, every
    eval_every steps and the last). Train loss is train_loss(tokens), by default val_loss(tokens) + train_gap,
    plus noise."""
    train_loss = train_loss or (lambda tokens: val_loss(tokens) + train_gap)
    rng = np.random.default_rng(seed)
    per_step, max_steps = summary["tokens_per_step"], summary["max_steps"]
    step_time_ms = 1000 * per_step * summary["flops_per_token"] / (mfu * summary["peak_flops"])
    rows = [{"step": 0, "val/loss": INITIAL_LOSS, "data/tokens_seen": 0, "data/epoch": 0.0}]
    for step in range(1, max_steps + 1):
        tokens = step * per_step
        scheduled = learning_rate(step, summary["lr"], summary["min_lr"], summary["warmup_steps"], max_steps)
        lr = summary["lr"] if constant_lr else scheduled
        rows.append(
            {
                "step": step,
                "train/loss": train_loss(tokens) + rng.normal(0, 3 * noise),
                "train/lr": lr,
                "train/grad_norm": 0.5,
                "data/tokens_seen": tokens,
                "perf/tokens_per_sec": per_step / step_time_ms * 1000,
                "perf/step_time_ms": step_time_ms * (1 + rng.normal(0, 0.01)),
                "perf/mfu": mfu * (1 + rng.normal(0, 0.01)),
                "data/epoch": tokens / summary["unique_train_tokens"],
                "data/tokens_per_param": tokens / summary["num_params"],
            }
        )
        if step % eval_every == 0 or step == max_steps:
            rows.append(
                {
                    "step": step,
                    "val/loss": val_loss(tokens) + rng.normal(0, noise),
                    "val/ppl": math.exp(val_loss(tokens)),
                    "val/time_ms": 900.0,
                    "data/tokens_seen": tokens,
                    "data/epoch": tokens / summary["unique_train_tokens"],
                }
            )
    return rows


def write_run_folder(run_dir: Path, summary: dict, rows: list[dict]) -> Path:
    """The files the doctor reads: run_summary.json, csv/metrics.csv (empty cells where a row
    does not log a column) and the Hydra config."""
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
    columns = sorted({column for row in rows for column in row})
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"model:\n  n_layer: {summary['n_layer']}\n  n_head: {summary['n_head']}\n  n_embd: {summary['n_embd']}\n"
        f"total_batch_tokens: {summary['tokens_per_step']}\n"
    )
    return run_dir


def nanogpt_log(val_loss, max_iters: int = 2000, eval_interval: int = 250, mfu_percent: float = 11.07) -> str:
    """Console output of nanoGPT's train.py for a '124M' config left at n_embd=384, with
    dropout, a cosine decay longer than the run, evaluations and a first compiled step."""
    tokens_per_iter = 12 * 1024 * 40
    lines = [
        "Overriding config with config/train_gpt2_124m.py:",
        "# GPT-2 (124M) on one FineWeb shard, on one RTX 4070",
        "# 12 batch size * 1024 block size * 40 gradaccum = 491,520 tokens per iteration",
        "",
        "wandb_log = False",
        "wandb_project = 'fineweb'",
        "wandb_run_name='gpt2-124M'",
        "out_dir = 'out-124m'",
        "dataset = 'fineweb'",
        "",
        "batch_size = 12",
        "block_size = 1024",
        "gradient_accumulation_steps = 5 * 8",
        "",
        "n_layer = 12",
        "n_head = 12",
        "n_embd = 384",
        "dropout = 0.1 # a little regularisation",
        "",
        "learning_rate = 6e-4",
        "max_iters = 5000",
        "lr_decay_iters = 5000",
        "min_lr = 6e-5",
        "warmup_iters = 100",
        "",
        f"eval_interval = {eval_interval}",
        "eval_iters = 200",
        "log_interval = 10",
        "",
        f"Overriding: max_iters = {max_iters}",
        "Overriding: compile = True",
        f"tokens per iteration will be: {tokens_per_iter:,}",
        "Initializing a new model from scratch",
        "defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)",
        "number of parameters: 40.56M",
        "num decayed parameter tensors: 50, with 40,943,616 parameters",
        "num non-decayed parameter tensors: 25, with 9,600 parameters",
        "using fused AdamW: True",
        "compiling the model... (takes a ~minute)",
    ]
    jitter = (-2.0, 0.0, 2.0)  # symmetric, so medians are exactly the nominal values
    for step in range(0, max_iters + 1, 10):
        tokens = max(step, 1) * tokens_per_iter
        if step % eval_interval == 0:
            val = val_loss(tokens)
            lines.append(f"step {step}: train loss {val + 0.04:.4f}, val loss {val:.4f}")
            if step > 0:
                lines.append("saving checkpoint to out-124m")
        k = (step // 10) % 3
        if step == 0:
            time_ms, mfu = 41234.56, -100.0  # compilation; nanoGPT prints -100% until it has measured
        elif step % eval_interval == 0:
            time_ms, mfu = 4270.0 + 26000.0, mfu_percent - 1.0  # this iteration's time includes the evaluation
        else:
            time_ms, mfu = 4270.0 + jitter[k], mfu_percent + jitter[k] / 100
        # train loss (training mode, with dropout) sits above the eval-mode val loss
        lines.append(f"iter {step}: loss {val_loss(tokens) + 0.08:.4f}, time {time_ms:.2f}ms, mfu {mfu:.2f}%")
    return "\n".join(lines) + "\n"
