"""Which architecture switches lower the val loss at equal tokens: each switch of a preset
changed, one at a time, against the preset itself, over several seeds, on the bundled FineWeb
sample; prints a markdown table of val-loss differences with their seed-to-seed spread.

Every variant trains the same small model shape on the same windows in the same order (per
seed), with the project's own optimizer groups and warmup-cosine schedule (optimization.py),
gradient clipping at 1.0 and fp32; the val loss is the mean over fixed windows of held-out
documents (holdout.py's split). A seed fixes the initial weights and the window order, so a
difference is taken between runs of the same seed (paired), and its spread is across seeds.

    python benchmarks/architecture_ablation.py                      # the table in docs/speed.md
    python benchmarks/architecture_ablation.py --steps 20 --seeds 1 --variants speedrun,gpt2   # a quick look
"""

import argparse
import math
import statistics
import time

import numpy as np
import torch

from fineweb_gpt.config_files import load_option
from fineweb_gpt.data import bundled_sample_path, is_validation_document, read_documents
from fineweb_gpt.data.tokens import tokenize_documents
from fineweb_gpt.model import GPT, PRESETS, GPTConfig
from fineweb_gpt.optimization import build_optimizer, warmup_cosine

# Every value each switch can take (a soft-cap: off or the speedrun's 15).
VALUES = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "relu2"),
    "positions": ("learned", "rotary"),
    "qk_norm": (False, True),
    "tied_head": (True, False),
    "zero_init_proj": (False, True),
    "logit_softcap": (False, 15.0),
    "doc_mask": (False, True),
}


def variants(baseline: str) -> dict[str, dict]:
    """name -> model settings: the baseline preset, each of its switches changed alone (to every
    other value), and the other presets whole."""
    chosen = {baseline: {"arch": baseline}}
    for key, values in VALUES.items():
        for value in values:
            if PRESETS[baseline][key] != value:
                chosen[f"{key}={str(value).lower()}"] = {"arch": baseline, key: value}
    chosen |= {name: {"arch": name} for name in PRESETS if name != baseline}
    return chosen


def split_sample(block_size: int, val_windows: int) -> tuple[np.ndarray, torch.Tensor]:
    """(training tokens, validation windows) of the bundled sample, held out as training holds out."""
    keys, texts = read_documents([bundled_sample_path()], "text")
    val_fraction = load_option("data", "sample")["val_fraction"]
    held_out = [is_validation_document(key, val_fraction) for key in keys]
    train = tokenize_documents([t for t, out in zip(texts, held_out) if not out])
    val = tokenize_documents([t for t, out in zip(texts, held_out) if out])[: val_windows * (block_size + 1)]
    return train, torch.from_numpy(val.reshape(val_windows, block_size + 1).astype(np.int64))


def train_and_score(settings: dict, shape: dict, args, train: np.ndarray, val: torch.Tensor, seed: int) -> float:
    """The val loss after args.steps optimizer steps of args.batch windows."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**shape, **settings)).to(args.device)
    window = shape["block_size"] + 1
    windows = torch.from_numpy(train[: len(train) // window * window].reshape(-1, window).astype(np.int64))
    windows, val = windows.to(args.device), val.to(args.device)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    optim = {**load_option("optim", args.optimizer), "lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": 10}
    optimizer = build_optimizer(model, optim)
    schedule = warmup_cosine(optimizer, optim["lr"], optim["min_lr"], optim["warmup_steps"], args.steps)
    model.train()
    for step in range(args.steps):
        picked = order[(step * args.batch + torch.arange(args.batch)) % len(windows)].to(args.device)
        batch = windows[picked]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        losses = [model(chunk[:, :-1], chunk[:, 1:])[1].item() for chunk in val.split(args.batch)]
    return statistics.fmean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="speedrun", choices=sorted(PRESETS), help="the preset turned back")
    parser.add_argument("--variants", default=None, help="comma-separated names to run (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"))
    parser.add_argument("--val-windows", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: fp32 matmuls in TF32")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")

    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    runs = variants(args.baseline)
    if args.variants:
        runs = {name: runs[name] for name in args.variants.split(",")}
    train, val = split_sample(args.block_size, args.val_windows)
    tokens = args.steps * args.batch * args.block_size
    print(
        f"{len(runs)} variants x {args.seeds} seeds; n_layer={args.n_layer} n_head={args.n_head} "
        f"n_embd={args.n_embd} block {args.block_size}, vocabulary 50304; {args.steps} steps of {args.batch} "
        f"windows = {tokens:,} tokens each ({tokens / len(train):.2f} epochs of {len(train):,} training tokens); "
        f"optim={args.optimizer} lr {args.lr:g}; val: {val.numel() - len(val):,} held-out tokens; "
        f"torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} CPU threads'}",
        flush=True,
    )
    losses: dict[str, list[float]] = {}
    started = time.perf_counter()
    for seed in range(args.seeds):
        for name, settings in runs.items():
            losses.setdefault(name, []).append(train_and_score(settings, shape, args, train, val, seed))
            print(f"seed {seed} {name}: val loss {losses[name][-1]:.4f}", flush=True)
    print(f"\n{(time.perf_counter() - started) / 60:.1f} minutes\n")
    base = losses.get(args.baseline)
    print("| variant | val loss (mean of seeds) | difference from the baseline | spread of the difference |")
    print("|---|---|---|---|")
    for name, values in sorted(losses.items(), key=lambda item: statistics.fmean(item[1])):
        mean = statistics.fmean(values)
        if base is None or name == args.baseline:
            spread = statistics.stdev(values) if len(values) > 1 else math.nan
            print(f"| {name} | {mean:.4f} | (baseline; seed-to-seed sd {spread:.4f}) | |")
            continue
        differences = [v - b for v, b in zip(values, base)]
        spread = statistics.stdev(differences) if len(differences) > 1 else math.nan
        print(f"| {name} | {mean:.4f} | {statistics.fmean(differences):+.4f} | sd {spread:.4f} |")


if __name__ == "__main__":
    main()
