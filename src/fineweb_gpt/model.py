"""The GPT-2 language model, readable top to bottom, as a plain nn.Module.

arch="gpt2": pre-LayerNorm transformer blocks, a 4x GELU MLP, learned position embeddings,
the token embedding tied to the output head, and attention through PyTorch's
scaled_dot_product_attention (flash or memory-efficient kernels where available).
arch="modern": the same skeleton with what later models found learns more per token:
rotary position embeddings instead of learned ones, RMSNorm, a SwiGLU MLP sized to the GELU
MLP's parameter count, RMSNorm on queries and keys (QK-norm), and no biases. The two differ
only in the components chosen once, by parts_for(config), just before Block.
Compiled training fuses the output head with the loss (fused_head_loss.py). Generation
keeps each layer's keys and values in a KVCache, so a new token does not recompute the
whole prefix.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import repeat

import torch
from torch import nn
from torch.nn import functional as F

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.fused_head_loss import LOSS_CHUNK_ROWS, HeadCrossEntropy
from fineweb_gpt.tokenizer import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE

Norm = Callable[[int], nn.Module]  # width -> a normalisation layer (LayerNorm or RMSNorm)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2 had them, they only cost speed
    arch: str = "gpt2"  # or "modern"

    def __post_init__(self):
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            nearest = max(self.n_head, round(self.n_embd / self.n_head) * self.n_head)
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"use a multiple of n_head such as model.n_embd={nearest}, or change model.n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} must be in [0, 1); use 0.0 for pretraining")
        if self.arch not in ("gpt2", "modern"):
            raise ConfigError(f"model.arch={self.arch!r} is not known; use model.arch=gpt2 or model.arch=modern")
        if self.arch == "modern" and self.bias:
            raise ConfigError("model.arch=modern has no biases; set model.bias=false")
        if self.arch == "modern" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"model.arch=modern rotates pairs of dimensions, so the head size n_embd / n_head = "
                f"{self.n_embd // self.n_head} must be even; change model.n_embd or model.n_head"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def swiglu_hidden(self) -> int:
        """SwiGLU's width: its three matrices then hold about the 8·d² of GELU's two (exactly for
        d = 384 and 768), rounded to a multiple of 64 for the matmul kernels."""
        return max(64, 64 * round(8 * self.n_embd / 3 / 64))

    def to_dict(self) -> dict:
        return asdict(self)


# The model's settings, the one list that resume, the doctor and the export read. All but dropout
# fix what the weights mean: a checkpoint resumes, loads or exports only under its own values.
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig))
ARCHITECTURE_KEYS = tuple(key for key in MODEL_KEYS if key != "dropout")


class KVCache:
    """One attention layer's keys and values for the positions generated so far.

    The buffers hold block_size positions and are allocated at the first call, in the dtype
    and on the device of the keys they receive (so autocast works too).
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.length = 0  # positions cached so far
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (batch, n_head, seq, head_size) keys and values; return those of every cached position."""
        if self.keys is None:
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        start, self.length = self.length, self.length + k.size(2)
        self.keys[:, :, start : self.length] = k
        self.values[:, :, start : self.length] = v
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class Rotary(nn.Module):
    """Rotary position embedding: each pair of a query's (or key's) dimensions is turned by an
    angle that grows with the position, so attention scores depend on relative distance."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        frequencies = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: (batch, n_head, seq, head_size) at positions start, start + 1, ..."""
        cos = self.cos[start : start + x.size(-2)].to(x.dtype)
        sin = self.sin[start : start + x.size(-2)].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, rotary: Rotary | None = None, qk_norm: Norm | None = None):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = rotary  # shared by every block; None for learned position embeddings
        self.qk_norm = qk_norm is not None  # keeps attention logits from growing without bound
        if self.qk_norm:
            self.q_norm, self.k_norm = qk_norm(config.head_size), qk_norm(config.head_size)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, width = x.shape
        # (batch, seq, 3 * width) -> three (batch, n_head, seq, head_size) tensors
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            start = cache.length if cache is not None else 0
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            past = cache.length
            k, v = cache.extend(k, v)
            # The new queries come after `past` cached positions: each sees all of those and
            # the new positions up to its own (is_causal would align the mask to the first key).
            visible = torch.ones(seq, past + seq, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        y = y.transpose(1, 2).reshape(batch, seq, width)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP: down(gelu(up(x))), four times as wide inside."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class SwiGLU(nn.Module):
    """The gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.swiglu_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.swiglu_hidden, bias=False)
        self.down = nn.Linear(config.swiglu_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


@dataclass(frozen=True)
class Parts:
    """The components in which the architectures differ; everything else is shared."""

    norm: Norm  # width -> normalisation layer, before attention, before the MLP and at the end
    mlp: type[nn.Module]
    rotary: bool  # positions: rotary inside attention, or else learned embeddings added to the tokens
    qk_norm: bool  # normalise queries and keys (with `norm`) before attention


def parts_for(config: GPTConfig) -> Parts:
    """The one place where model.arch chooses components."""
    if config.arch == "modern":
        return Parts(norm=nn.RMSNorm, mlp=SwiGLU, rotary=True, qk_norm=True)
    return Parts(norm=partial(nn.LayerNorm, bias=config.bias), mlp=MLP, rotary=False, qk_norm=False)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, parts: Parts, rotary: Rotary | None = None):
        super().__init__()
        self.ln_attn = parts.norm(config.n_embd)
        self.attn = CausalSelfAttention(config, rotary, parts.norm if parts.qk_norm else None)
        self.ln_mlp = parts.norm(config.n_embd)
        self.mlp = parts.mlp(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), cache)
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        parts = parts_for(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = None if parts.rotary else nn.Embedding(config.block_size, config.n_embd)
        rotary = Rotary(config.head_size, config.block_size) if parts.rotary else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, parts, rotary) for _ in range(config.n_layer))
        self.ln_final = parts.norm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the head reads tokens out with the same vectors that embed them.
        self.lm_head.weight = self.token_embedding.weight

        self.apply(self._init_weights)
        # GPT-2 init: each block adds two residual branches, so their output projections
        # start scaled by 1/sqrt(2 * n_layer) to keep the residual stream's variance flat.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, exclude_position_embedding: bool = True) -> int:
        """Parameter count as nanoGPT reports it: the tied embedding once, position
        embeddings excluded (they do no multiply-adds per token)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_position_embedding and self.position_embedding is not None:
            total -= self.position_embedding.weight.numel()
        return total

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, fused_loss: bool = False):
        """idx: (batch, seq) token ids. Returns (logits, loss); loss is None without targets.

        fused_loss (training, compiled): the head and the loss are fused chunk by chunk (see
        HeadCrossEntropy), which is faster compiled and never holds the whole logits; the logits
        are then not returned (None). The training step asks for it; evaluation does not.
        """
        hidden = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(hidden), None
        if fused_loss:
            hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
            return None, HeadCrossEntropy.apply(hidden, self.lm_head.weight, targets, LOSS_CHUNK_ROWS)
        logits = self.lm_head(hidden)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """The final LayerNorm's output, (batch, seq, n_embd), which the head turns into logits.

        With caches (one KVCache per block), idx continues the positions already cached.
        """
        past = caches[0].length if caches else 0
        end = past + idx.shape[1]
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than model.block_size={self.config.block_size}")
        x = self.token_embedding(idx)
        if self.position_embedding is not None:  # rotary models place tokens inside attention instead
            x = x + self.position_embedding(torch.arange(past, end, device=idx.device))
        x = self.dropout(x)
        for block, cache in zip(self.blocks, caches or repeat(None)):
            x = block(x, cache)
        return self.ln_final(x)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to each row of idx (batch, seq); call .eval() first.

        With use_cache, each step runs only the newest token through the model. Once the
        context outgrows block_size it is cropped to its last block_size tokens, as nanoGPT
        does; positions count from the window's start, so the cropped window's keys all change
        and the cache is rebuilt (from then on each token costs a full forward, as without it).
        """
        caches = None
        for _ in range(max_new_tokens):
            if caches is not None and idx.size(1) <= self.config.block_size:
                hidden = self.hidden_states(idx[:, -1:], caches)
            else:
                caches = [KVCache(self.config.block_size) for _ in self.blocks] if use_cache else None
                hidden = self.hidden_states(idx[:, -self.config.block_size :], caches)
            logits = self.lm_head(hidden[:, -1]).float() / temperature
            if self.config.vocab_size > GPT2_VOCAB_SIZE:
                logits[:, GPT2_VOCAB_SIZE:] = -math.inf  # padding rows: no token to decode
            if top_k is not None:
                kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_largest, -math.inf)
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def compile_gpt(model: GPT, tuning: bool = False):
    """torch.compile the model. tuning lets inductor time launch settings for each of its
    fused kernels (coordinate descent): about 3% faster for 124m on an H100, for about three
    more minutes of compiling the first time (the results are cached on disk)."""
    return torch.compile(model, options={"coordinate_descent_tuning": True} if tuning else None)
