"""Find the largest micro-batch that trains within a GPU memory budget.

Each candidate runs a few real training steps (bf16 autocast forward, backward, fused AdamW
step) in a fresh process whose PyTorch allocator is capped with
torch.cuda.set_per_process_memory_fraction, so a big GPU can stand in for a smaller card.
It needs a CUDA GPU: on other machines it says so in one line and exits with status 2.

    python benchmarks/max_micro_batch.py --model 124m --memory-gb 11
"""

import argparse
import json
import subprocess
import sys

import torch

from fineweb_gpt.config_files import load_option
from fineweb_gpt.errors import ConfigError, exit_with, one_line


def trial(model: str, micro_batch: int, memory_gb: float, compile_model: bool) -> dict:
    """Train 3 steps at this micro-batch under the memory cap; report peak memory or OOM."""
    from fineweb_gpt.model import GPT, GPTConfig, compile_gpt

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gb * 2**30 / total))
    torch.backends.cuda.matmul.allow_tf32 = True
    model_config = load_option("model", model)
    gpt = GPT(GPTConfig(**model_config)).cuda()
    step_model = compile_gpt(gpt) if compile_model else gpt
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-4, fused=True)
    block = model_config["block_size"]
    try:
        for _ in range(3):
            tokens = torch.randint(0, 50257, (micro_batch, block + 1), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = step_model(tokens[:, :-1], tokens[:, 1:], fused_loss=compile_model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return {"fits": True, "peak_gib": torch.cuda.max_memory_reserved() / 2**30}
    except torch.OutOfMemoryError:
        return {"fits": False, "peak_gib": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="124m", help="a model preset name (conf/model/<name>.yaml)")
    parser.add_argument("--memory-gb", type=float, default=11.0, help="allocator cap in GiB")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--candidates", default="2,4,6,8,10,12,14,16,20,24,28,32,40,48,64")
    parser.add_argument("--trial", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.trial is not None:
        print(json.dumps(trial(args.model, args.trial, args.memory_gb, args.compile)))
        return
    if not torch.cuda.is_available():
        exit_with(ConfigError("max_micro_batch.py measures GPU memory and this machine has no CUDA GPU; run it on one"))

    best = None
    for micro_batch in (int(c) for c in args.candidates.split(",")):
        command = [sys.executable, __file__, "--model", args.model, "--memory-gb", str(args.memory_gb)]
        command += ["--trial", str(micro_batch)] + (["--compile"] if args.compile else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            exit_with(RuntimeError(f"the trial at micro_batch={micro_batch} failed: {one_line(done.stderr)}"), 1)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        peak = f"{result['peak_gib']:.2f} GiB" if result["fits"] else "out of memory"
        print(f"model={args.model} compile={args.compile} micro_batch={micro_batch}: {peak}", flush=True)
        if not result["fits"]:
            break
        best = micro_batch
    if best is None:
        too_big = f"no micro-batch of {args.candidates} fits model={args.model} in {args.memory_gb} GiB"
        exit_with(RuntimeError(f"{too_big}; try smaller --candidates or a larger --memory-gb"), 1)
    print(f"largest micro-batch for model={args.model} within {args.memory_gb} GiB (compile={args.compile}): {best}")


if __name__ == "__main__":
    main()
