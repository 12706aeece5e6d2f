"""How long HellaSwag's 10,042 validation examples take to score, with a model of random weights.

    python benchmarks/hellaswag_speed.py                           # model=124m on the CPU, 200 examples
    python benchmarks/hellaswag_speed.py --device cuda --examples 10042 --batch-size 16

Without --file it needs no network: synthetic examples shaped like HellaSwag's (evals/hellaswag.py,
synthetic_examples). It prints examples per second and the projected time for all 10,042; on a
GPU the model runs under bf16 autocast, as fineweb-gpt-eval and training score it.
"""

import argparse
import time

import torch

from fineweb_gpt.config_files import load_option
from fineweb_gpt.evals.hellaswag import VALIDATION_EXAMPLES, read_examples, score_examples, synthetic_examples
from fineweb_gpt.evaluate import inference_context
from fineweb_gpt.model import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--examples", type=int, default=200, help="examples to time (default 200)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples (4 rows each) per forward pass")
    parser.add_argument("--model", default="124m", help="a model preset: tiny, 40m, 124m (default)")
    parser.add_argument("--arch", default="gpt2", choices=("gpt2", "modern"))
    parser.add_argument("--file", help="HellaSwag's hellaswag_val.jsonl instead of synthetic examples")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    model = GPT(GPTConfig(**{**load_option("model", args.model), "arch": args.arch})).to(args.device).eval()
    examples = read_examples(args.file, args.examples) if args.file else synthetic_examples(args.examples)
    warmup = examples[: 2 * args.batch_size]  # kernels chosen and memory allocated before timing
    score_examples(model, warmup, args.batch_size, args.device, inference_context(args.device))
    if args.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    scores = score_examples(model, examples, args.batch_size, args.device, inference_context(args.device))
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    rate = scores.examples / seconds
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model={args.model} arch={args.arch} on {device}, batch {args.batch_size} examples (x4 endings)")
    print(f"{scores.examples} examples in {seconds:.1f} s: {rate:.1f} examples/s")
    projected = VALIDATION_EXAMPLES / rate
    print(f"projected for all {VALIDATION_EXAMPLES:,}: {projected:.0f} s ({projected / 60:.1f} min)")


if __name__ == "__main__":
    main()
