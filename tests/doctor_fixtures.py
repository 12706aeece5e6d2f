"""Synthetic runs with known answers, written by the tests: run folders as fineweb_gpt.train
writes them, and logs as nanoGPT, llm.c and modded-nanogpt print them."""

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


NANOGPT_CONFIG_FILE = {
    # config/train_gpt2.py of nanoGPT, as its log prints it
    "gpt2_owt": [
        "wandb_log = True",
        "wandb_project = 'owt'",
        "wandb_run_name='gpt2-124M'",
        "batch_size = 12",
        "block_size = 1024",
        "gradient_accumulation_steps = 5 * 8",
        "max_iters = 600000",
        "lr_decay_iters = 600000",
        "eval_interval = 1000",
        "eval_iters = 200",
        "log_interval = 10",
        "weight_decay = 1e-1",
    ],
    # a user's "125M" config for one FineWeb parquet file, left at n_embd=384, on a 12 GB card
    "fineweb_125m": [
        "wandb_run_name = 'gpt2-125M'",
        "out_dir = 'out-125m'",
        "dataset = 'fineweb'",
        "batch_size = 16",
        "block_size = 1024",
        "gradient_accumulation_steps = 32",
        "n_layer = 12",
        "n_head = 12",
        "n_embd = 384",
        "dropout = 0.0",
        "learning_rate = 6e-4",
        "max_iters = 14500",
        "lr_decay_iters = 20000 # planned for a longer run",
        "min_lr = 6e-5",
        "warmup_iters = 700",
        "eval_interval = 250",
        "compile = True",
    ],
}


def nanogpt_console(
    config: str,
    val_loss,
    last_iter: int,
    tokens_per_iter: int,
    num_params_m: float,
    eval_interval: int,
    log_every: int = 10,
    mfu_percent: float = 11.07,
    drop: tuple[str, ...] = (),
    noise: float = 0.0,
    seed: int = 0,
) -> str:
    """nanoGPT's console output for `python train.py config/<config>.py`, up to `last_iter`:
    the config file's lines (less those starting with a name in `drop`), the parameter count,
    then an `iter` line every `log_every` iterations and a `step` line every eval_interval.
    Val loss is val_loss(tokens) plus seeded Gaussian noise; train loss sits 0.04 above it."""
    rng = np.random.default_rng(seed)
    settings = [line for line in NANOGPT_CONFIG_FILE[config] if not line.startswith(drop)]
    lines = [f"Overriding config with config/{config}.py:", *settings, ""]
    lines += [
        f"tokens per iteration will be: {tokens_per_iter:,}",
        "Initializing a new model from scratch",
        "defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)",
        f"number of parameters: {num_params_m:.2f}M",
        "using fused AdamW: True",
        "compiling the model... (takes a ~minute)",
    ]
    for step in range(0, last_iter + 1, min(log_every, eval_interval)):
        tokens = max(step, 1) * tokens_per_iter
        if step % eval_interval == 0:
            val = val_loss(tokens) + rng.normal(0, noise)
            lines.append(f"step {step}: train loss {val + 0.04:.4f}, val loss {val:.4f}")
            lines.append("saving checkpoint to out")
        if step % log_every == 0:
            time_ms, mfu = (41234.56, -100.0) if step == 0 else (4270.0, mfu_percent)
            lines.append(f"iter {step}: loss {val_loss(tokens) + 0.06:.4f}, time {time_ms:.2f}ms, mfu {mfu:.2f}%")
    return "\n".join(lines) + "\n"


def knee_curve(knee_tokens: float, a: float = 3.0, b: float = 700.0, c: float = 0.3, drift: float = 0.004):
    """Val loss falling as a + b*t^(-c) until knee_tokens, then flat: it moves `drift` over
    the rest of the run (the late plateau an expert spots)."""

    def val_loss(tokens: float) -> float:
        if tokens <= knee_tokens:
            return min(INITIAL_LOSS, a + b * tokens**-c)
        return a + b * knee_tokens**-c - drift * min(1.0, (tokens - knee_tokens) / knee_tokens)

    return val_loss


def owt_curve(tokens: float) -> float:
    """A long, steadily falling curve like nanoGPT's GPT-2 124M OpenWebText reproduction:
    about 2.91 at 400k iterations and 2.85 at 600k (491,520 tokens each)."""
    return min(INITIAL_LOSS, 2.425 + 1170.0 * tokens**-0.3)


def cosine_lr(step: int, peak: float, warmup: int, total: int, final_fraction: float = 0.0) -> float:
    """llm.c's schedule: linear warmup, cosine decay to final_fraction x peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def annealing_curve(peak: float, warmup: int, total: int, tokens_per_step: int, a=2.627, b=535.0, c=0.3, k=0.12):
    """Val loss by step of a healthy run with a cosine-to-zero schedule: a power law in the area
    under the learning rate (the distance the weights travel), plus k x lr/peak for the noise a
    high learning rate keeps the weights bouncing in. It falls steadily while the learning rate
    decays and flattens at the very end, where the schedule stops moving the weights. The
    defaults pass near llm.c's GPT-2 124M on FineWeb (3.86 at step 2000, 3.44 at 8000, 3.28 at the end)."""
    rates = np.array([cosine_lr(s, peak, warmup, total) / peak for s in range(total + 1)])
    area = np.cumsum(rates)

    def val_loss(step: int) -> float:
        return min(INITIAL_LOSS, a + b * (max(area[step], 1.0) * tokens_per_step) ** -c + k * rates[step])

    return val_loss


def llmc_main_log(val_loss, total: int, eval_every: int, peak_lr=6e-4, warmup=700, with_lr=True) -> str:
    """llm.c's main.log: 's:N tel:X' every eval_every steps and at the end, 's:N trl:X lr:Y norm:Z'
    for every step (older builds write no lr or norm)."""
    lines = []
    for step in range(total + 1):
        if step % eval_every == 0 or step == total:
            lines.append(f"s:{step} tel:{val_loss(step):.4f}")
        if step < total:
            extra = f" lr:{cosine_lr(step, peak_lr, warmup, total):.6f} norm:0.30" if with_lr else ""
            lines.append(f"s:{step} trl:{val_loss(step) + 0.01:.4f}{extra}")
    return "\n".join(lines) + "\n"


def llmc_console_log(val_loss, total: int, eval_every: int, tokens_per_step: int = 524288) -> str:
    """llm.c's console output: its settings table, then 'step N/T | loss ...' and 'val loss ...'."""
    table = [
        ("micro batch size B", "64"),
        ("sequence length T", "1024"),
        ("total batch size", str(tokens_per_step)),
        ("learning rate (LR)", "6.000000e-04"),
        ("warmup iterations", "700"),
        ("final LR fraction", "0.000000e+00"),
        ("max_steps", "-1"),
        ("device", "NVIDIA H100 80GB HBM3"),
        ("peak TFlops", "989.4"),
        ("precision", "BF16"),
        ("num_layers L", "12"),
        ("num_heads NH", "12"),
        ("channels C", "768"),
        ("num_parameters", "124475904"),
        ("train_num_batches", str(total)),
    ]
    lines = [f"| {key:<21} | {value:<50} |" for key, value in table]
    for step in range(total + 1):
        if step % eval_every == 0 or step == total:
            lines.append(f"val loss {val_loss(step):f}")
        if step < total:
            lr = cosine_lr(step, 6e-4, 700, total)
            lines.append(
                f"step {step + 1:4d}/{total} | loss {val_loss(step) + 0.01:.6f} (+0.00z)| norm 0.3000 (+0.00z)| "
                f"lr {lr:.2e} | 140.00 ms | 42.0% bf16 MFU | 3744914 tok/s"
            )
    return "\n".join(lines) + "\n"


def modded_log(val_loss, total: int, eval_every: int) -> str:
    """modded-nanogpt's log: the script's own source first, then its step lines."""
    source = [
        "import os",
        "batch_size = 8*64*1024",
        'print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms")',
        "=" * 100,
    ]
    lines = list(source)
    for step in range(total + 1):
        if step % eval_every == 0 or step == total:
            lines.append(f"step:{step}/{total} val_loss:{val_loss(step):.4f} train_time:{step * 90}ms step_avg:90.00ms")
        if step < total:
            lines.append(f"step:{step + 1}/{total} train_time:{(step + 1) * 90}ms step_avg:90.00ms")
    return "\n".join(lines) + "\n"
