"""Parameter counts, FLOPs per token, GPU peak FLOPs and MFU: the numbers users compare.

FLOPs per token follow nanoGPT (after the PaLM paper, appendix B): 6N for the weights'
forward and backward multiply-adds plus 12 * L * H * Q * T for attention, where N is the
parameters a token is multiplied by (position embeddings and an untied embedding table are
only looked up), L is layers, H heads, Q head size and T the context length. Whatever the
switches: element-wise work (norms, activations, rotary, the soft-cap) is not counted, as
nanoGPT does not count GELU, and attention is counted whole even where doc_mask skips
blocks, so MFU stays comparable between runs with and without it.
"""

import re
from dataclasses import dataclass, replace
from functools import cache

from fineweb_gpt.config_files import config_dir
from fineweb_gpt.errors import ConfigError, one_line
from fineweb_gpt.model_config import GPTConfig
from fineweb_gpt.tokenizer import PADDED_VOCAB_SIZE

CHINCHILLA_TOKENS_PER_PARAM = 20


@dataclass(frozen=True)
class GPU:
    """A GPU of the hw= profiles (conf/hw/*.yaml): the one table of peaks and memory."""

    name: str  # the profile: hw=<name>
    peak_flops: float  # dense bf16 tensor FLOPS (FP32 accumulate on GeForce cards)
    memory_gb: float
    device_pattern: str  # matches torch.cuda.get_device_name() of this GPU


@cache
def gpu_table() -> dict[str, GPU]:
    """Every GPU profile by name, read from the config folder at first use.

    nanoGPT divides by an A100's 312e12 whatever the GPU, and Lightning's own table lacks
    the RTX 4070 and lists GeForce cards at their FP32 rate, so the profiles hold the peaks.
    """
    from omegaconf import OmegaConf

    table = {}
    for path in sorted((config_dir() / "hw").glob("*.yaml")):
        hw = OmegaConf.load(path)
        if hw.get("requires_cuda") and hw.get("peak_flops") and hw.get("memory_gb"):
            table[path.stem] = GPU(path.stem, float(hw.peak_flops), float(hw.memory_gb), hw.device_pattern)
    return table


def gpu_for_device(device_name: str) -> GPU | None:
    """The profile of a CUDA device name ('NVIDIA GeForce RTX 4070'), or None for a GPU no profile knows."""
    return next((gpu for gpu in gpu_table().values() if re.search(gpu.device_pattern, device_name)), None)


def parameter_count(config: GPTConfig, position_embedding: bool = False) -> int:
    """The parameters of the GPT that `config` describes, by nanoGPT's count (a tied embedding once,
    position embeddings only if asked): the one count that the plan, the doctor and the memory
    model use, whatever the switches. Counted on copies built without memory (the meta device)
    one and two layers deep: every layer holds the same, so any size costs nothing."""
    return _parameter_count(tuple(config.to_dict().items()), position_embedding)


@cache
def _parameter_count(settings: tuple, position_embedding: bool) -> int:
    import torch  # here, not at the top: the doctor and the sweep table start without torch

    from fineweb_gpt.model import GPT

    config = GPTConfig(**dict(settings))
    try:
        with torch.device("meta"):
            one, two = (GPT(replace(config, n_layer=n)).num_params(not position_embedding) for n in (1, 2))
    except (RuntimeError, TypeError, ValueError, OverflowError) as err:  # sizes no tensor can have
        raise ConfigError(
            f"the model is too large to build ({one_line(err)}); lower model.n_embd or model.vocab_size"
        ) from None
    return one + (config.n_layer - 1) * (two - one)


def gpt2_shaped(n_layer: int, n_embd: int, vocab_size: int = PADDED_VOCAB_SIZE, bias: bool = False) -> GPTConfig:
    """A GPT-2 (model.arch=gpt2) of this shape: what a log that gives only the shape describes
    (nanoGPT's, llm.c's). The head count changes no parameter count."""
    return GPTConfig(n_layer=n_layer, n_head=1, n_embd=n_embd, vocab_size=vocab_size, bias=bias)


def multiplied_params(config: GPTConfig) -> int:
    """The parameters each token is multiplied by: nanoGPT's count, less an untied embedding
    table, which is only looked up (a tied one is the head's matrix, so it counts)."""
    untied_embedding = 0 if config.tied_head else config.vocab_size * config.n_embd
    return parameter_count(config) - untied_embedding


def model_flops_per_token(config: GPTConfig, block_size: int) -> int:
    """FLOPs per trained token of the GPT `config` describes, at context block_size."""
    return flops_per_token(multiplied_params(config), config.n_layer, config.n_head, config.n_embd, block_size)


def human_count(n: float) -> str:
    """123.59M, 4.92B, 491.52K: how parameter and token counts are written."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def human_ratio(x: float) -> str:
    """Two decimals, or two significant digits for small ratios (0.0011, not 0.00)."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def flops_per_token(num_params: int, n_layer: int, n_head: int, n_embd: int, block_size: int) -> int:
    head_size = n_embd // n_head
    return 6 * num_params + 12 * n_layer * n_head * head_size * block_size


def model_flops_utilization(
    flops_per_token: float, tokens_per_sec: float, peak_flops: float, world_size: int = 1
) -> float:
    """Fraction of the GPUs' peak that the training tokens account for (tokens_per_sec: all GPUs)."""
    return flops_per_token * tokens_per_sec / (peak_flops * world_size)


def chinchilla_tokens(num_params: int) -> int:
    """Compute-optimal training tokens for this many parameters (Hoffmann et al., 2022)."""
    return CHINCHILLA_TOKENS_PER_PARAM * num_params


def size_in_name(name: str) -> float | None:
    """The parameter count a name promises: '124m' -> 124e6, 'gpt2-1.5B' -> 1.5e9, 'tiny' -> None."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*([kmb])(?![a-z])", name.lower())
    if not match:
        return None
    return float(match.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[match.group(2)]


def size_mismatch(name: str, num_params: int, tolerance: float = 0.2) -> str | None:
    """A warning when the name's size and the real count differ by more than `tolerance`."""
    promised = size_in_name(name)
    if promised is None or abs(num_params - promised) <= tolerance * promised:
        return None
    return (
        f"model '{name}' promises about {promised / 1e6:.0f}M parameters but has {num_params / 1e6:.2f}M "
        f"({num_params / promised:.2f}x): check model.n_layer / model.n_embd, or name it for its size"
    )
