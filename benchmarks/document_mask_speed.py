"""What model.doc_mask=true costs in training speed: the same model, with and without the mask,
on the same windows of the bundled FineWeb sample (real document boundaries), alternating
round after round in one process; prints tokens/s and the ratio masked / unmasked.

Without the mask attention is plain causal (the flash kernels' fast path). With it: FlexAttention
with a block mask when compiled on CUDA, otherwise scaled_dot_product_attention with an explicit
boolean mask (on the CPU, and on CUDA uncompiled).

    python benchmarks/document_mask_speed.py                                   # CPU: the tiny model
    python benchmarks/document_mask_speed.py --device cuda --compile --model 124m --micro-batch 16
"""

import argparse
import statistics
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from fineweb_gpt.config_files import load_option
from fineweb_gpt.data import bundled_sample_path
from fineweb_gpt.data.tokens import tokenize_documents
from fineweb_gpt.model import GPT, GPTConfig, compile_gpt
from fineweb_gpt.tokenizer import END_OF_TEXT_ID


def sample_windows(block_size: int, count: int) -> torch.Tensor:
    """The first `count` packed windows of block_size + 1 tokens of the bundled sample (repeated if short)."""
    texts = [t for t in pq.read_table(bundled_sample_path(), columns=["text"]).column(0).to_pylist() if t]
    tokens = tokenize_documents(texts)
    windows = tokens[: len(tokens) // (block_size + 1) * (block_size + 1)].reshape(-1, block_size + 1)
    return torch.from_numpy(np.resize(windows, (count, block_size + 1)).astype(np.int64))


def timed_round(args, config: GPTConfig, windows: torch.Tensor, device: torch.device) -> float:
    """Tokens per second of the steps after the warmup: forward, backward, AdamW."""
    torch.manual_seed(0)
    gpt = GPT(config).to(device)
    model = compile_gpt(gpt) if args.compile else gpt
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = None
    for step in range(args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        batch = windows[step * args.micro_batch : (step + 1) * args.micro_batch].to(device, non_blocking=True)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:], fused_loss=args.compile)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    synchronize(device)
    tokens = (args.steps - args.warmup) * args.micro_batch * (windows.size(1) - 1)
    return tokens / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a model preset: tiny, 40m, 124m")
    parser.add_argument("--arch", default="gpt2", help="model.arch: its other switches as the preset has them")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compile", action="store_true", help="torch.compile, as hw.compile=true trains")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="steps per round, warmup included")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    settings = {**load_option("model", args.model), "arch": args.arch}
    configs = {mask: GPTConfig(**{**settings, "doc_mask": mask}) for mask in (False, True)}
    block = configs[False].block_size
    windows = sample_windows(block, args.steps * args.micro_batch)
    documents = (windows[:, :-1] == END_OF_TEXT_ID).sum(dim=1).float().mean().item() + 1
    print(
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; model={args.model} "
        f"arch={args.arch}, block {block}, micro-batch {args.micro_batch}, compile {'on' if args.compile else 'off'}, "
        f"torch {torch.__version__}; {documents:.1f} documents per window on average; "
        f"{args.steps - args.warmup} timed steps per round",
        flush=True,
    )
    ratios = []
    for round_index in range(1, args.rounds + 1):
        speeds = {mask: timed_round(args, configs[mask], windows, device) for mask in (False, True)}
        ratios.append(speeds[True] / speeds[False])
        print(
            f"round {round_index}: doc_mask=false {speeds[False]:,.0f} tokens/s, doc_mask=true "
            f"{speeds[True]:,.0f} tokens/s, masked / unmasked = {ratios[-1]:.3f}",
            flush=True,
        )
    print(f"masked / unmasked = {statistics.median(ratios):.3f} (median of {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
