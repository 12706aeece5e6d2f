"""fineweb-gpt-sample ckpt=PATH prompt="...": continue a prompt with a trained model
(python -m fineweb_gpt.sample takes the same options).

    fineweb-gpt-sample ckpt=outputs/2026-11-22/10-00-00/checkpoints/last.ckpt prompt="The meaning of"
    fineweb-gpt-sample ckpt=outputs/latest/checkpoints/last.ckpt prompt=FILE:prompt.txt

Options are key=value, like the training command line's:
  ckpt            the checkpoint (required)
  prompt          text to continue, or FILE:path for a file's text (default: empty, a new document)
  num_samples     1 to 100 (default 3)
  max_new_tokens  1 to 100,000 tokens per sample (default 200)
  temperature     0.001 to 100 (default 0.8)
  top_k           keep the k likeliest tokens, 1 or more; 1 is greedy, null no cut-off (default 200)
  seed            0 to 2**64 - 1; the same seed gives the same samples (default 1337)
  device          auto, cpu or cuda (default auto)
The checkpoint alone is enough: the model config and the tokenizer's identity travel in it.
"""

import math
import sys
from pathlib import Path

import tiktoken
import torch

from fineweb_gpt.errors import ConfigError, UserError, exit_with
from fineweb_gpt.model import GPT
from fineweb_gpt.run.checkpoint_files import load_gpt
from fineweb_gpt.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, gpt2_tokenizer

DEFAULTS = {
    "ckpt": None,
    "prompt": "",
    "num_samples": 3,
    "max_new_tokens": 200,
    "temperature": 0.8,
    "top_k": 200,
    "seed": 1337,
    "device": "auto",
}
# Bounds that keep one command finite: past block_size every new token costs a full forward
# pass over the context, so 100,000 tokens is already hours for 124m on a CPU; the samples
# are printed to be read, and each keeps its own KV cache (75 MB for 124m in fp32).
MAX_NUM_SAMPLES = 100
MAX_NEW_TOKENS = 100_000
# Below 0.001 the logits divided by it can overflow to inf (and softmax to NaN); above 100
# every token is about equally likely.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 100.0
MAX_SEED = 2**64 - 1  # torch.Generator's range
PROMPT_FILE = "FILE:"  # prompt=FILE:path reads the prompt from a file


def whole_number(key: str, value, low: int, high: int, advice: str) -> int:
    """value as an int in [low, high]; '2e3' is 2000. Anything else is refused, naming key and advice."""
    refusal = ConfigError(f"{key}={value!r} must be a whole number from {low:,} to {high:,}; {advice}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise refusal from None
        if not as_float.is_integer():  # nan and inf are not
            raise refusal from None
        number = int(as_float)
    if not low <= number <= high:
        raise refusal
    return number


def parse_options(args: list[str]) -> dict:
    """key=value arguments over DEFAULTS, each checked by type and range: the one place the
    sampler's options are validated, before anything is loaded."""
    options = dict(DEFAULTS)
    for arg in args:
        key, has_value, value = arg.partition("=")
        if not has_value or key not in DEFAULTS:
            raise ConfigError(f"{arg!r} is not an option; use key=value with key one of {', '.join(DEFAULTS)}")
        options[key] = value
    if not options["ckpt"]:
        raise ConfigError("ckpt is required: ckpt=outputs/<date>/<time>/checkpoints/last.ckpt")
    options["prompt"] = prompt_text(options["prompt"])
    options["num_samples"] = whole_number(
        "num_samples", options["num_samples"], 1, MAX_NUM_SAMPLES, "for more, run again with another seed"
    )
    options["max_new_tokens"] = whole_number(
        "max_new_tokens", options["max_new_tokens"], 1, MAX_NEW_TOKENS, "e.g. max_new_tokens=200"
    )
    if str(options["top_k"]).strip().lower() in ("null", "none"):
        options["top_k"] = None
    else:
        options["top_k"] = whole_number(
            "top_k", options["top_k"], 1, sys.maxsize, "top_k=1 is greedy, top_k=null keeps every token"
        )
    options["seed"] = whole_number("seed", options["seed"], 0, MAX_SEED, "e.g. seed=1337")
    try:
        temperature = float(options["temperature"])
    except (TypeError, ValueError):
        temperature = math.nan
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:  # nan fails this too
        raise ConfigError(
            f"temperature={options['temperature']!r} must be a number from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}, "
            "e.g. temperature=0.8; for greedy decoding use top_k=1"
        )
    options["temperature"] = temperature
    if options["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={options['device']!r} is not one of auto, cpu, cuda")
    if options["device"] == "auto":
        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif options["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no CUDA GPU; use device=cpu")
    return options


def prompt_text(prompt: str) -> str:
    """The prompt, or with prompt=FILE:path the file's text (as nanoGPT's start=FILE:...)."""
    if not prompt.startswith(PROMPT_FILE):
        return prompt
    path = Path(prompt.removeprefix(PROMPT_FILE)).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt={prompt}: {path} does not exist; give a text file: prompt=FILE:prompt.txt") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"prompt={prompt}: {path} cannot be read ({reason}); give a UTF-8 text file") from None


def load_model(path: str | Path, device: str = "cpu") -> GPT:
    """The GPT saved in a fineweb_gpt checkpoint, in eval mode, after checking it (see load_gpt)."""
    return load_gpt(path, device)[0]


def generate_samples(
    model: GPT,
    tokenizer: tiktoken.Encoding,
    prompt: str,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[str]:
    """num_samples continuations of the prompt (prompt included), the same for the same seed."""
    device = next(model.parameters()).device
    # An empty prompt starts a fresh document, as training saw every document begin.
    prompt_ids = tokenizer.encode(prompt, allowed_special={END_OF_TEXT}) or [END_OF_TEXT_ID]
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature, top_k, use_cache=use_cache, generator=generator)
    return [tokenizer.decode(row.tolist()) for row in out]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return 0
    try:
        options = parse_options(args)
        model = load_model(options["ckpt"], options["device"])
    except UserError as err:
        exit_with(err)
    samples = generate_samples(
        model,
        gpt2_tokenizer(),
        options["prompt"],
        options["num_samples"],
        options["max_new_tokens"],
        options["temperature"],
        options["top_k"],
        options["seed"],
    )
    for sample in samples:
        print(sample)
        print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())
