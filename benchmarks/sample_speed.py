"""Sampling speed with and without the KV cache, in the same run, on the same model and prompt.

Without the cache every new token recomputes the whole context (nanoGPT's generate); with
it each step runs one token through the model. Weights are random: speed does not depend on them.

    python benchmarks/sample_speed.py --model tiny
    python benchmarks/sample_speed.py --model 124m --prompt-tokens 64 --new-tokens 128
"""

import argparse
import time

import torch

from fineweb_gpt.config_files import load_option
from fineweb_gpt.model import GPT, GPTConfig


def seconds(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    start = time.perf_counter()
    model.generate(prompt, new_tokens, top_k=1, use_cache=use_cache)
    if prompt.is_cuda:
        torch.cuda.synchronize()  # the GPU runs behind the Python loop
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a model preset name (conf/model/<name>.yaml)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1, help="samples generated together")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPTConfig(**load_option("model", args.model))
    if args.prompt_tokens + args.new_tokens > config.block_size:
        parser.error(f"prompt + new tokens exceed block_size={config.block_size}: past it both paths recompute")
    model = GPT(config).to(args.device).eval()
    prompt = torch.randint(0, 50257, (args.batch, args.prompt_tokens), device=args.device)
    model.generate(prompt, 4)  # warm-up: allocator, kernels

    # Alternate the two, and keep each one's best time: load from other work on the machine
    # then slows both alike and does not decide the ratio.
    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.repeats):
        for use_cache in best:
            best[use_cache] = min(best[use_cache], seconds(model, prompt, args.new_tokens, use_cache))
    cached, recomputed = (args.batch * args.new_tokens / best[use_cache] for use_cache in (True, False))
    print(
        f"model={args.model} ({model.num_params() / 1e6:.2f}M) device={args.device} threads={torch.get_num_threads()} "
        f"batch={args.batch} prompt={args.prompt_tokens} new={args.new_tokens}"
    )
    print(f"without KV cache: {recomputed:8.1f} tokens/s")
    print(f"with KV cache:    {cached:8.1f} tokens/s")
    print(f"speed-up:         {cached / recomputed:8.2f}x")


if __name__ == "__main__":
    main()
