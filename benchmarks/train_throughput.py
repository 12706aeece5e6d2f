"""Training throughput of the project's Lightning path against a bare PyTorch loop.

Both train the same model on the same batches with the same recipe: bf16 autocast on GPUs
that have it, gradient accumulation, clipping at 1.0, AdamW (fused on CUDA) with warmup and
cosine decay, the loss read once per optimizer step. The Lightning side is the real one:
GPTLightningModule with its loss guard, StepMetrics' per-step metrics, a CSV logger. The two
alternate, round after round, in one process, and each is timed over the steps after its
warmup, so the ratio compares like with like.

    python benchmarks/train_throughput.py                                  # CPU: the tiny model
    python benchmarks/train_throughput.py --model 124m --micro-batch 64 --accumulation 8 \
        --compile --compile-tuning --hw h100
"""

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from fineweb_gpt.config_files import config_dir, load_option
from fineweb_gpt.console import quiet_console
from fineweb_gpt.flops import gpu_for_device, gpu_table, model_flops_per_token, model_flops_utilization
from fineweb_gpt.lit_module import GPTLightningModule
from fineweb_gpt.model import GPT, GPTConfig, compile_gpt
from fineweb_gpt.monitor.step_metrics import StepMetrics
from fineweb_gpt.optimization import learning_rate
from fineweb_gpt.plan import run_plan

LR, MIN_LR, WARMUP = 6e-4, 6e-5, 2


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time of the optimizer steps after the first `warmup` ones."""

    def __init__(self, warmup: int):
        self.warmup, self.started, self.seconds = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.started is None and trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        synchronize(pl_module.device)
        self.seconds = time.perf_counter() - self.started


def project_plan(args, model_config: dict, num_params: int, precision: str) -> dict:
    """The run plan the training command would make for this model and batch (RunMonitor's input)."""
    overrides = [
        f"model={args.model}",
        f"hw.micro_batch_size={args.micro_batch}",
        f"total_batch_tokens={args.micro_batch * args.accumulation * model_config['block_size']}",
        f"trainer.max_steps={args.steps}",
        f"trainer.precision={precision}",
        f"optim.lr={LR}",
        f"optim.min_lr={MIN_LR}",
        f"optim.warmup_steps={WARMUP}",
        f"val_every_steps={10**9}",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    choices = {"model": args.model, "hw": args.hw or "benchmark"}
    return run_plan(cfg, GPTConfig(**model_config), num_params, choices, world_size=1, grad_accum=args.accumulation)


def lightning_round(args, model_config, windows, device, precision) -> float:
    torch.manual_seed(0)
    optim = {**load_option("optim", "adamw"), "lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "weight_decay": 0.1}
    module = GPTLightningModule(
        model_config=model_config, optim=optim, compile_model=args.compile, compile_tuning=args.compile_tuning
    )
    plan = project_plan(args, model_config, module.model.num_params(), precision)
    timer = StepTimer(args.warmup)
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            precision=precision,
            max_steps=args.steps,
            accumulate_grad_batches=args.accumulation,
            gradient_clip_val=1.0,
            limit_val_batches=0,
            log_every_n_steps=1,  # as a run logs (conf/trainer/default.yaml)
            callbacks=[StepMetrics(plan), timer],
            logger=L.pytorch.loggers.CSVLogger(logs),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(windows, batch_size=args.micro_batch, pin_memory=device.type == "cuda"))
    return timer.seconds


def bare_round(args, model_config, windows, device, precision) -> float:
    """nanoGPT's training loop on the same model and batches."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**model_config)).to(device)
    model = compile_gpt(gpt, args.compile_tuning) if args.compile else gpt
    params = [p for p in gpt.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, LR, MIN_LR, WARMUP, args.steps) / LR
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    batches = iter(DataLoader(windows, batch_size=args.micro_batch, pin_memory=device.type == "cuda"))
    started = None
    for step in range(args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        for _ in range(args.accumulation):
            batch = next(batches).to(device, non_blocking=True)
            with autocast:
                _, loss = model(batch[:, :-1], batch[:, 1:], fused_loss=args.compile)
            (loss / args.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # read once per step, as a logging loop does
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    quiet_console()  # the training command's console: no Lightning notices between rounds
    logging.getLogger("fineweb_gpt").setLevel(logging.WARNING)  # no run summary in every round
    # The module has a validation step that the timed rounds leave out on purpose.
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model preset (default: 124m on CUDA, tiny on the CPU)")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--accumulation", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per round, warmup included")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps at the start of a round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-tuning", action="store_true", help="with --compile: hw.compile_tuning=true")
    parser.add_argument("--hw", default=None, help="hw profile whose peak FLOPS MFU is measured against")
    parser.add_argument("--profile", action="store_true", help="after the rounds: where each path's time goes")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    args.model = args.model or ("124m" if on_gpu else "tiny")
    args.micro_batch = args.micro_batch or (16 if on_gpu else 4)
    args.accumulation = args.accumulation or (4 if on_gpu else 2)
    args.steps = args.steps or (25 if on_gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)
    if on_gpu:
        torch.set_float32_matmul_precision("high")
    precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    model_config = load_option("model", args.model)
    block = model_config["block_size"]
    total = args.micro_batch * args.accumulation * args.steps
    windows = torch.randint(0, 50257, (total, block + 1), generator=torch.Generator().manual_seed(0))

    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = (
        gpu_table()[args.hw].peak_flops
        if args.hw
        else (getattr(gpu_for_device(name), "peak_flops", None) if on_gpu else None)
    )
    probe = GPT(GPTConfig(**model_config))
    per_token = model_flops_per_token(probe.config, block)
    tokens = (args.steps - args.warmup) * args.micro_batch * args.accumulation * block
    print(
        f"device {name}; model={args.model} ({probe.num_params() / 1e6:.2f}M parameters), block {block}, "
        f"micro-batch {args.micro_batch} x accumulation {args.accumulation}, {precision}, "
        f"compile {'on' if args.compile else 'off'}{' (tuned)' if args.compile and args.compile_tuning else ''}; "
        f"{args.steps - args.warmup} timed steps per round",
        flush=True,
    )

    speeds = {"lightning": [], "bare loop": []}
    memory = {"lightning": 0.0, "bare loop": 0.0}
    for round_number in range(1, args.rounds + 1):
        for label, run in (("lightning", lightning_round), ("bare loop", bare_round)):
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            seconds = run(args, model_config, windows, device, precision)
            speeds[label].append(tokens / seconds)
            if on_gpu:
                memory[label] = max(memory[label], torch.cuda.max_memory_allocated() / 2**30)
        print(
            f"round {round_number}: lightning {speeds['lightning'][-1]:,.0f} tokens/s, "
            f"bare loop {speeds['bare loop'][-1]:,.0f} tokens/s",
            flush=True,
        )

    # Medians: one round disturbed by the machine (common on a shared CPU) moves neither figure,
    # and the ratio pairs each round's two runs, which ran back to back.
    for label, values in speeds.items():
        typical = statistics.median(values)
        mfu = f", MFU {model_flops_utilization(per_token, typical, peak):.1%}" if peak else ""
        mem = f", peak memory {memory[label]:.1f} GiB" if on_gpu else ""
        print(f"{label:10s} {typical:,.0f} tokens/s (median of {len(values)}){mfu}{mem}")
    ratio = statistics.median(ours / bare for ours, bare in zip(speeds["lightning"], speeds["bare loop"]))
    target = 0.98 if args.compile else 0.97
    verdict = "met" if ratio >= target else "MISSED"
    print(f"lightning / bare loop = {ratio:.3f} (median over rounds; target >= {target}: {verdict})")
    if peak:
        mfu = model_flops_utilization(per_token, statistics.median(speeds["lightning"]), peak)
        formula = f"nanoGPT's formula, {per_token / 1e6:.1f}M FLOPs per token"
        print(f"MFU against {peak / 1e12:.1f} TFLOPS ({formula}): {mfu:.1%}")
    if args.profile and on_gpu:
        for label, run in (("lightning", lightning_round), ("bare loop", bare_round)):
            where_the_time_goes(label, lambda run=run: run(args, model_config, windows, device, precision))


def where_the_time_goes(label: str, run_round) -> None:
    """One more round under torch.profiler: how busy the GPU was, and the kernels that took longest."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        run_round()
    wall = time.perf_counter() - started
    events = profiler.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e6
    print(f"profile {label}: {wall:.1f} s wall (compile, warmup and profiler included), GPU busy {gpu:.1f} s")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
