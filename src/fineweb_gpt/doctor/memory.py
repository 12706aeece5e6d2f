"""How much GPU memory a training step needs, and the micro-batch and accumulation that fit.

Peaks measured with benchmarks/max_micro_batch.py and benchmarks/train_throughput.py on an
H100 and an H200 (bf16 autocast, fused AdamW, block 1024, the allocator's peak) calibrate a model:
fp32 weights, gradients and AdamW's two moments (16 bytes a parameter), plus activations
that grow with the residual stream (tokens x layers x width) and, uncompiled, with the
(tokens x vocabulary) logits. Compiled training fuses the output head with the loss, so the
logits never exist whole: its activations are fitted on the compiled 124m and 40m peaks. A figure
is "measured" where that exact setup was measured and "modelled" otherwise, and it always
says whether it is for compiled or uncompiled training.

The model's switches: the state follows them exactly (the parameter count of flops.py, an
untied head included); the activations are those of a GPT-2 of the same shape plus what each
other switch was measured to add (SWITCH_EXTRA_GIB), scaled with what it grows with.
"""

from dataclasses import dataclass
from functools import cache

import numpy as np

from fineweb_gpt.doctor.record import Finding, RunRecord
from fineweb_gpt.doctor.speed import gpu_of
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import gpt2_shaped, human_count, parameter_count
from fineweb_gpt.model_config import PRESETS, GPTConfig
from fineweb_gpt.tokenizer import PADDED_VOCAB_SIZE

GIB = 2**30
MEASURED_BLOCK_SIZE = 1024
# Peak GiB by (compiled, n_layer, n_embd) and micro-batch, GPT-2 shape, vocabulary 50304, no bias.
MEASURED_PEAK_GIB = {
    (False, 12, 768): {2: 3.93, 4: 6.32, 6: 7.99, 8: 10.29},  # 124m; 10 ran out of memory within 11 GiB
    (False, 12, 384): {2: 2.36, 4: 4.42, 6: 6.48, 8: 8.51, 10: 10.71},  # 40m
    # Compiled, with the fused head and loss (H200, max_micro_batch.py --compile; 64: train_throughput.py).
    (True, 12, 768): {8: 6.56, 16: 10.72, 64: 30.4},  # 124m
    (True, 12, 384): {16: 7.60},  # 40m; 32 ran out of memory within 11 GiB
}
# Micro-batches seen running out of memory, by the GPU memory (GB) they did not fit on: 124m at 10
# within max_micro_batch.py's 11 GiB cap (a 12 GB card), and uncompiled at 64 on an H100 80 GB
# (conf/hw/h100.yaml), where the linear model, fitted on small micro-batches, says about 69 GiB.
MEASURED_OUT_OF_MEMORY = {(False, 12, 768): {10: 12.0, 64: 80.0}, (True, 12, 384): {32: 12.0}}
# What each switch added to the peak of one uncompiled 124m step (H200, bf16 autocast, fused AdamW,
# micro-batch 8, block 1024; docs/architecture.md), and what that grows with: the residual stream
# (tokens x layers x width), the logits (tokens x vocabulary) or the document mask (tokens x block).
# An untied head adds only its state, which the parameter count already holds.
SWITCH_EXTRA_GIB = {
    ("norm", "rmsnorm"): (-0.01, "residual"),
    ("positions", "rotary"): (0.42, "residual"),
    ("mlp", "swiglu"): (0.51, "residual"),
    ("mlp", "relu2"): (1.13, "residual"),
    ("qk_norm", True): (1.00, "residual"),
    ("logit_softcap", "a cap"): (0.76, "logits"),  # any cap (15 measured)
    ("doc_mask", True): (0.18, "mask"),
}
SWITCHES_MEASURED_ON = (GPTConfig(n_layer=12, n_head=12, n_embd=768), 8)  # 124m, block 1024, micro-batch 8
STATE_BYTES_PER_PARAM = 16  # fp32 weights and gradients, AdamW's two moments
CUDA_CONTEXT_GIB = 1.0  # headroom outside the allocator


def state_bytes(model: GPTConfig) -> float:
    """Weights, gradients and AdamW's moments of every trained parameter, position embeddings too."""
    return STATE_BYTES_PER_PARAM * parameter_count(model, position_embedding=True)


def measured_shape(model: GPTConfig) -> bool:
    """Whether the model is one the peaks were measured on: a GPT-2, vocabulary 50304, block 1024, no bias."""
    shape = (model.block_size, model.vocab_size, model.bias) == (MEASURED_BLOCK_SIZE, PADDED_VOCAB_SIZE, False)
    return shape and all(getattr(model, key) == value for key, value in PRESETS["gpt2"].items())


@cache
def uncompiled_activation_bytes() -> np.ndarray:
    """Bytes per (token x layer x width) and per (token x logit), least squares on the uncompiled peaks."""
    features, activation_memory = [], []
    for (compiled, n_layer, n_embd), peaks in MEASURED_PEAK_GIB.items():
        if compiled:
            continue
        state = state_bytes(gpt2_shaped(n_layer, n_embd))
        for micro_batch, gib in peaks.items():
            tokens = micro_batch * MEASURED_BLOCK_SIZE
            features.append([tokens * n_layer * n_embd, tokens * PADDED_VOCAB_SIZE])
            activation_memory.append(gib * GIB - state)
    return np.linalg.lstsq(np.array(features, dtype=float), np.array(activation_memory), rcond=None)[0]


@cache
def compiled_activation_bytes() -> np.ndarray:
    """Bytes per (token x layer x width), per token and fixed, least squares on the compiled peaks.
    The per-token term is the fused head-loss's chunk of logits, whatever the model's width."""
    features, activation_memory = [], []
    for (compiled, n_layer, n_embd), peaks in MEASURED_PEAK_GIB.items():
        if not compiled:
            continue
        state = state_bytes(gpt2_shaped(n_layer, n_embd))
        for micro_batch, gib in peaks.items():
            tokens = micro_batch * MEASURED_BLOCK_SIZE
            features.append([tokens * n_layer * n_embd, tokens, 1.0])
            activation_memory.append(gib * GIB - state)
    return np.linalg.lstsq(np.array(features, dtype=float), np.array(activation_memory), rcond=None)[0]


def activation_sizes(model: GPTConfig, micro_batch: int) -> dict[str, int]:
    """What a step's activations grow with, by name."""
    tokens = micro_batch * model.block_size
    return {
        "residual": tokens * model.n_layer * model.n_embd,
        "logits": tokens * model.vocab_size,
        "mask": tokens * model.block_size,
    }


def switch_extra_bytes(model: GPTConfig, micro_batch: int, compiled: bool) -> float:
    """What the model's switches add to the activations of the GPT-2 of its shape. Compiled, the
    fused head-loss never holds the capped logits, and FlexAttention's block mask replaces the
    boolean one; the rest were measured uncompiled only, so a compiled figure errs high."""
    measured = activation_sizes(*SWITCHES_MEASURED_ON)
    sizes = activation_sizes(model, micro_batch)
    extra = 0.0
    for (key, value), (gib, grows_with) in SWITCH_EXTRA_GIB.items():
        applies = getattr(model, key) is not False if value == "a cap" else getattr(model, key) == value
        if applies and not (compiled and grows_with in ("logits", "mask")):
            extra += gib * GIB * sizes[grows_with] / measured[grows_with]
    return extra


def modelled_memory_gib(model: GPTConfig, micro_batch: int, compiled=False) -> float:
    """Predicted peak GPU memory of a bf16 training step at this micro-batch of model.block_size tokens."""
    sizes = activation_sizes(model, micro_batch)
    switches = switch_extra_bytes(model, micro_batch, compiled)
    if compiled:
        features = np.array([sizes["residual"], micro_batch * model.block_size, 1.0])
        return float(state_bytes(model) + features @ compiled_activation_bytes() + switches) / GIB
    features = np.array([sizes["residual"], sizes["logits"]], dtype=float)
    return float(state_bytes(model) + features @ uncompiled_activation_bytes() + switches) / GIB


@dataclass(frozen=True)
class MemoryEstimate:
    gib: float
    measured: bool
    compiled: bool

    def describe(self) -> str:
        how = "measured" if self.measured else "modelled"
        return f"{self.gib:.1f} GiB ({how}, {'compiled' if self.compiled else 'uncompiled'})"


def training_memory(model: GPTConfig, micro_batch: int, compiled=False) -> MemoryEstimate:
    """The measured peak where this exact setup was measured, the model's otherwise."""
    if measured_shape(model):
        measured = MEASURED_PEAK_GIB.get((bool(compiled), model.n_layer, model.n_embd), {}).get(micro_batch)
        if measured is not None:
            return MemoryEstimate(measured, True, bool(compiled))
    return MemoryEstimate(modelled_memory_gib(model, micro_batch, compiled), False, bool(compiled))


def out_of_memory_from(model: GPTConfig, compiled: bool, memory_gb: float) -> int | None:
    """The smallest micro-batch measured not to fit on a GPU this size or larger, for this setup."""
    if not measured_shape(model):
        return None
    seen = MEASURED_OUT_OF_MEMORY.get((bool(compiled), model.n_layer, model.n_embd), {})
    return min((m for m, gpu_gb in seen.items() if memory_gb <= gpu_gb), default=None)


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    memory: MemoryEstimate  # for micro_batch
    memory_gb: float
    tokens_per_step: int
    largest_fitting: int  # the largest micro-batch that fits, whether or not it divides the step
    trained_at: int = 0  # a micro-batch the run was seen training at on this GPU

    def describe(self) -> str:
        budget = self.memory_gb - CUDA_CONTEXT_GIB
        text = f"micro-batch {self.micro_batch} x gradient accumulation {self.grad_accum} for {self.tokens_per_step:,} "
        if self.memory.gib <= budget:
            text += (
                f"tokens per step: about {self.memory.describe()} of the {budget:g} GiB a {self.memory_gb:g} GB GPU "
                f"leaves after {CUDA_CONTEXT_GIB:g} GiB for the CUDA context"
            )
        else:
            text += (
                f"tokens per step: the run trained at micro-batch {self.trained_at} on this {self.memory_gb:g} GB GPU, "
                f"so it fits, though the model puts micro-batch {self.micro_batch} at {self.memory.describe()}, "
                f"above the {budget:g} GiB left after the CUDA context: the model is too cautious here"
            )
        if self.largest_fitting > self.micro_batch:
            text += f"; by the model micro-batch {self.largest_fitting} fits too, but it does not divide the step"
        return text


def largest_divisor_at_most(n: int, limit: int) -> int:
    divisors = {d for i in range(1, int(n**0.5) + 1) if n % i == 0 for d in (i, n // i)}
    return max(d for d in divisors if d <= limit)


def plan_batch(
    model: GPTConfig,
    memory_gb: float,
    tokens_per_step: int,
    world_size: int = 1,
    compiled: bool = False,
    known_to_fit: int = 0,
) -> BatchPlan:
    """The largest micro-batch of model.block_size windows that fits in memory and divides the
    tokens per step. A micro-batch measured running out of memory on a GPU this size is never
    proposed; one a run was seen training at on this GPU (known_to_fit) fits, whatever the model says."""
    block_size = model.block_size
    sequences, remainder = divmod(tokens_per_step, block_size * world_size)
    if remainder or sequences == 0:
        raise ConfigError(
            f"tokens per step {tokens_per_step} is not a multiple of block_size x GPUs = {block_size * world_size}; "
            "choose one that is (524288 = 512 x 1024)"
        )
    budget = memory_gb - CUDA_CONTEXT_GIB

    def memory(micro_batch: int) -> MemoryEstimate:
        return training_memory(model, micro_batch, compiled)

    known_to_fit = min(known_to_fit, sequences)
    if memory(1).gib > budget and not known_to_fit:
        raise ConfigError(
            f"a {human_count(parameter_count(model))}-parameter model needs about "
            f"{memory(1).describe()} at micro-batch 1, more than the {budget:g} GiB a {memory_gb:g} GB GPU leaves; "
            "use a smaller model, compile it, or use a bigger GPU"
        )
    # Memory grows with the micro-batch: bisect for the largest that fits.
    out_of_memory = out_of_memory_from(model, compiled, memory_gb)
    too_big = sequences + 1 if out_of_memory is None else min(sequences + 1, max(out_of_memory, known_to_fit + 1))
    largest = max(1, known_to_fit)
    while too_big - largest > 1:
        middle = (largest + too_big) // 2
        largest, too_big = (middle, too_big) if memory(middle).gib <= budget else (largest, middle)
    micro_batch = largest_divisor_at_most(sequences, largest)
    return BatchPlan(
        micro_batch, sequences // micro_batch, memory(micro_batch), memory_gb, tokens_per_step, largest, known_to_fit
    )


def check_batch_plan(run: RunRecord) -> Finding | None:
    """The micro-batch and accumulation that fit the run's GPU at its tokens per step."""
    if run.source not in ("fineweb_gpt", "nanogpt", "csv"):
        return None  # the model is of a PyTorch GPT-2 training step; llm.c's own kernels use memory differently
    gpu = gpu_of(run)
    memory_gb = run.get("gpu_memory_gb") or (gpu.memory_gb if gpu else None)
    model, tokens_per_step, compiled = run.model_config(), run.get("tokens_per_step"), run.get("compile")
    if not memory_gb or not (model and run.get("block_size") and tokens_per_step):
        return None
    # nanoGPT's compiled step still holds the whole logits: the uncompiled figures are its closer model.
    modelled_compiled = bool(compiled) and run.source != "nanogpt"
    current = run.get("micro_batch_size")
    trained = bool(current) and any("train/loss" in row for row in run.rows)
    try:
        plan = plan_batch(
            model, memory_gb, tokens_per_step, run.get("world_size", 1), modelled_compiled, current if trained else 0
        )
    except ConfigError as err:
        return Finding("batch_plan", False, "Batch plan", str(err))
    evidence = plan.describe()
    if compiled is None:
        evidence += " (the run's files do not say whether it compiled, so the figures are for uncompiled training)"
    elif compiled and not modelled_compiled:
        evidence += " (nanoGPT compiled, but its step still holds the whole logits, as an uncompiled one does)"
    if current and current != plan.micro_batch:
        need = training_memory(model, current, modelled_compiled)
        out_of_memory = out_of_memory_from(model, modelled_compiled, memory_gb)
        evidence += f"; this run {'trained at' if trained else 'uses'} micro-batch {current}"
        if trained:
            evidence += ", so it fits"
        elif out_of_memory and current >= out_of_memory:
            evidence += f", and micro-batch {out_of_memory} was measured running out of memory on a GPU this size"
        else:
            evidence += f", which needs about {need.describe()}"
    fix = ""
    if current and current < plan.micro_batch:
        fix = f"{run.setting('micro_batch', plan.micro_batch)}: fewer, larger micro-batches keep the GPU busier"
        if run.source == "nanogpt":
            fix += f" with --gradient_accumulation_steps={plan.grad_accum * run.get('world_size', 1)}"
    title = f"Batch plan for {memory_gb:g} GB ({'compiled' if modelled_compiled else 'uncompiled'} figures)"
    return Finding("batch_plan", False, title, evidence, fix)
