"""python -m fineweb_gpt.sample ckpt=PATH prompt="...": continue a prompt with a trained model.

    python -m fineweb_gpt.sample ckpt=outputs/2026-11-22/10-00-00/checkpoints/last.ckpt prompt="The meaning of"

Options are key=value, like the training command line's: ckpt, prompt, num_samples,
max_new_tokens, temperature, top_k (null: no cut-off), seed, device (auto, cpu, cuda).
The checkpoint alone is enough: the model config and the tokenizer's identity travel in it.
"""

import sys
from pathlib import Path

import tiktoken
import torch

from fineweb_gpt.errors import ConfigError
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
INTEGER_OPTIONS = ("num_samples", "max_new_tokens", "top_k", "seed")


def parse_options(args: list[str]) -> dict:
    """key=value arguments over DEFAULTS, converted and checked."""
    options = dict(DEFAULTS)
    for arg in args:
        key, has_value, value = arg.partition("=")
        if not has_value or key not in DEFAULTS:
            raise ConfigError(f"{arg!r} is not an option; use key=value with key one of {', '.join(DEFAULTS)}")
        options[key] = value
    if options["ckpt"] is None:
        raise ConfigError("ckpt is required: ckpt=outputs/<date>/<time>/checkpoints/last.ckpt")
    if str(options["top_k"]).lower() in ("null", "none"):
        options["top_k"] = None
    for key in INTEGER_OPTIONS:
        if options[key] is not None:
            try:
                options[key] = int(options[key])
            except ValueError:
                raise ConfigError(f"{key}={options[key]!r} must be a whole number") from None
    try:
        options["temperature"] = float(options["temperature"])
    except ValueError:
        raise ConfigError(f"temperature={options['temperature']!r} must be a number such as 0.8") from None
    if options["temperature"] <= 0:
        raise ConfigError(f"temperature={options['temperature']} must be above 0; for greedy decoding use top_k=1")
    for key in ("num_samples", "max_new_tokens", "top_k"):
        if options[key] is not None and options[key] < 1:
            raise ConfigError(f"{key}={options[key]} must be at least 1")
    if options["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={options['device']} is not one of auto, cpu, cuda")
    if options["device"] == "auto":
        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif options["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no CUDA GPU; use device=cpu")
    return options


def load_model(path: str | Path, device: str = "cpu") -> GPT:
    """The GPT saved in a fineweb_gpt checkpoint, in eval mode, after checking its tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt={path} does not exist; give a checkpoint such as <run folder>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
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
    model.load_state_dict(weights)
    return model.to(device).eval()


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
        print(f"error: {err}", file=sys.stderr)
        return 2
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
