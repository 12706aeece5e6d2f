"""python -m fineweb_gpt.sample ckpt=PATH prompt="...": continue a prompt with a trained model.

    python -m fineweb_gpt.sample ckpt=outputs/2026-11-22/10-00-00/checkpoints/last.ckpt prompt="The meaning of"

Options are key=value, like the training command line's:
  ckpt            the checkpoint (required)
  prompt          text to continue (default: empty, a new document)
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

from fineweb_gpt.errors import ConfigError, exit_with
from fineweb_gpt.model import GPT, GPTConfig
from fineweb_gpt.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, GPT2_RANKS_SHA256, gpt2_tokenizer

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


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[GPT, dict]:
    """The GPT saved in a fineweb_gpt checkpoint, in eval mode, and the checkpoint itself,
    after checking that it is whole, names the bundled tokenizer and holds finite weights."""
    path = Path(path)
    try:
        is_file, is_folder = path.is_file(), path.is_dir()
    except OSError as err:  # a name too long for the filesystem, a folder we may not enter, ...
        raise ConfigError(f"ckpt={path} cannot be read ({err.strerror}); give a .ckpt from training") from err
    if not is_file:
        what = "is a folder" if is_folder else "does not exist"
        raise ConfigError(f"ckpt={path} {what}; give a checkpoint such as <run folder>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails inside the unpickler in many ways (IndexError, EOFError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"ckpt={path} is not a readable checkpoint ({reason}); give a .ckpt from training") from err
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint.get("hyper_parameters", {}):
        raise ConfigError(f"ckpt={path} holds no model config; give a checkpoint written by fineweb_gpt.train")
    if "tokenizer" not in checkpoint:
        raise ConfigError(f"ckpt={path} does not name its tokenizer; use a checkpoint saved by fineweb_gpt.train")
    tokenizer_hash = checkpoint["tokenizer"].get("ranks_sha256")
    if tokenizer_hash != GPT2_RANKS_SHA256:
        raise ConfigError(
            f"ckpt={path} was trained with tokenizer ranks sha256 {tokenizer_hash}, not the bundled GPT-2 ranks "
            f"{GPT2_RANKS_SHA256}, so its token ids would decode to the wrong text; sample it with the code that "
            "trained it"
        )
    model = GPT(GPTConfig(**checkpoint["hyper_parameters"]["model_config"]))
    # The LightningModule holds the GPT as `model`, so its weights are saved under "model.".
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"ckpt={path} holds weights that do not fit its own model config ({str(err).splitlines()[0]}); "
            "give a checkpoint written by fineweb_gpt.train"
        ) from err
    damaged = next((name for name, w in weights.items() if not torch.isfinite(w).all()), None)
    if damaged:
        raise ConfigError(f"ckpt={path} holds non-finite weights (nan or inf in {damaged}); use an earlier checkpoint")
    return model.to(device).eval(), checkpoint


def load_model(path: str | Path, device: str = "cpu") -> GPT:
    """The GPT saved in a fineweb_gpt checkpoint, in eval mode, after checking it (see load_checkpoint)."""
    return load_checkpoint(path, device)[0]


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
    except ConfigError as err:
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
