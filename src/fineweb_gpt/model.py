"""The GPT-2 language model, readable top to bottom, as a plain nn.Module.

Each architecture choice is a switch of GPTConfig, and model.arch is a preset that fills the
switches left unset (PRESETS):
- arch=gpt2, GPT-2 as released: pre-LayerNorm blocks, a 4x GELU MLP, learned position
  embeddings, the token embedding tied to the output head;
- arch=modern: rotary positions, RMSNorm, a SwiGLU MLP sized to GELU's parameter count,
  RMSNorm on queries and keys (QK-norm), no biases;
- arch=speedrun: of the modded-nanogpt speedrun's choices, those the evidence supported (PRESETS).
doc_mask=true lets a token of a packed window attend only to its own document: through
FlexAttention's block masks in compiled CUDA training, an explicit mask elsewhere.
Attention runs through PyTorch's scaled_dot_product_attention (flash or memory-efficient
kernels where available). Compiled training fuses the output head with the loss
(fused_head_loss.py). Generation keeps each layer's keys and values in a KVCache, so a new
token does not recompute the whole prefix.
"""

import math
from collections.abc import Callable
from functools import partial
from itertools import repeat

import torch
from torch import nn
from torch.nn import functional as F

from fineweb_gpt.fused_head_loss import LOSS_CHUNK_ROWS, HeadCrossEntropy

# The settings live in model_config.py (no torch there); imported here for the model and its users.
from fineweb_gpt.model_config import (  # noqa: F401
    ARCHITECTURE_KEYS,
    CHOICES,
    MODEL_KEYS,
    PRESETS,
    SWITCHES,
    GPTConfig,
    alternatives,
    resolved_model_settings,
)
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, GPT2_VOCAB_SIZE

try:  # torch 2.5 and newer
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = create_block_mask = flex_attention = None

Norm = Callable[[int], nn.Module]  # width -> a normalisation layer (LayerNorm or RMSNorm)


class KVCache:
    """One attention layer's keys and values for the positions generated so far.

    The buffers hold block_size positions and are allocated at the first call, in the dtype
    and on the device of the keys they receive (so autocast works too). With doc_mask, the
    first layer's cache also keeps each cached position's document (GPT.attention_mask).
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.length = 0  # positions cached so far
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.documents: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (batch, n_head, seq, head_size) keys and values; return those of every cached position."""
        if self.keys is None:
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        start, self.length = self.length, self.length + k.size(2)
        self.keys[:, :, start : self.length] = k
        self.values[:, :, start : self.length] = v
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def extend_documents(self, starts: torch.Tensor) -> torch.Tensor:
        """Record the documents of the positions about to be cached, from which of them start a
        document ((batch, seq) booleans); return the documents of every position so far."""
        if self.documents is None:
            self.documents = starts.new_zeros((starts.size(0), self.block_size), dtype=torch.long)
        last = self.documents[:, self.length - 1 : self.length] if self.length else 0
        end = self.length + starts.size(1)
        self.documents[:, self.length : end] = last + starts.long().cumsum(dim=1)
        return self.documents[:, :end]


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


# Which keys each query may see, the same for every layer: None is plain causal attention; a
# boolean tensor (True: visible) goes to scaled_dot_product_attention, a BlockMask to FlexAttention.
AttentionMask = object


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, rotary: Rotary | None = None, qk_norm: Norm | None = None):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # queries, keys, values stacked
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = rotary  # shared by every block; None for learned position embeddings
        self.qk_norm = qk_norm is not None  # keeps attention logits from growing without bound
        if self.qk_norm:
            self.q_norm, self.k_norm = qk_norm(config.head_size), qk_norm(config.head_size)

    def forward(self, x: torch.Tensor, mask: AttentionMask = None, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, width = x.shape
        # (batch, seq, 3 * width) -> three (batch, n_head, seq, head_size) tensors
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            start = cache.length if cache is not None else 0
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.extend(k, v)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif BlockMask is not None and isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(batch, seq, width)
        return self.resid_dropout(self.out_proj(y))


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class MLP(nn.Module):
    """GPT-2's MLP, down(activation(up(x))), four times as wide inside: GELU, or ReLU squared."""

    def __init__(self, config: GPTConfig, activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.activation = activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activation(self.up(x))))


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


MLPS = {"gelu": MLP, "relu2": partial(MLP, activation=relu_squared), "swiglu": SwiGLU}


def norm_layer(config: GPTConfig) -> Norm:
    return partial(nn.LayerNorm, bias=config.bias) if config.norm == "layernorm" else nn.RMSNorm


class Block(nn.Module):
    def __init__(self, config: GPTConfig, rotary: Rotary | None = None):
        super().__init__()
        norm = norm_layer(config)
        self.ln_attn = norm(config.n_embd)
        self.attn = CausalSelfAttention(config, rotary, norm if config.qk_norm else None)
        self.ln_mlp = norm(config.n_embd)
        self.mlp = MLPS[config.mlp](config)

    def forward(self, x: torch.Tensor, mask: AttentionMask = None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), mask, cache)
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        rotary = config.positions == "rotary"
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = None if rotary else nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        shared_rotary = Rotary(config.head_size, config.block_size) if rotary else None
        self.blocks = nn.ModuleList(Block(config, shared_rotary) for _ in range(config.n_layer))
        self.ln_final = norm_layer(config)(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tied_head:  # the head reads tokens out with the same vectors that embed them
            self.lm_head.weight = self.token_embedding.weight
        if not self.lm_head.weight.is_meta:  # built on the meta device only to be counted: no values
            self.initialise()

    def initialise(self) -> None:
        """GPT-2's initialisation, then the switches' zeros."""
        self.apply(self._init_weights)
        # Each block adds two residual branches, so their output projections start scaled by
        # 1/sqrt(2 * n_layer) to keep the residual stream's variance flat; or at zero, so that
        # every block starts as the identity (the speedrun's choice).
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            for projection in (block.attn.out_proj, block.mlp.down):
                if self.config.zero_init_proj:
                    nn.init.zeros_(projection.weight)
                else:
                    nn.init.normal_(projection.weight, mean=0.0, std=residual_std)
        if not self.config.tied_head:  # an untied head starts at zero: every first prediction uniform
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, exclude_position_embedding: bool = True) -> int:
        """Parameter count as nanoGPT reports it: a tied embedding once, position embeddings
        excluded (they do no multiply-adds per token)."""
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
            return self.logits(hidden), None
        if fused_loss:
            hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
            loss = HeadCrossEntropy.apply(
                hidden, self.lm_head.weight, targets, LOSS_CHUNK_ROWS, self.config.logit_softcap or None
            )
            return None, loss
        logits = self.logits(hidden)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's scores for the next token, soft-capped to (-cap, cap) with logit_softcap."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """The final norm's output, (batch, seq, n_embd), which the head turns into logits.

        With caches (one KVCache per block), idx continues the positions already cached.
        """
        past = caches[0].length if caches else 0
        end = past + idx.shape[1]
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than model.block_size={self.config.block_size}")
        mask = self.attention_mask(idx, caches[0] if caches else None)
        x = self.token_embedding(idx)
        if self.position_embedding is not None:  # rotary models place tokens inside attention instead
            x = x + self.position_embedding(torch.arange(past, end, device=idx.device))
        x = self.dropout(x)
        for block, cache in zip(self.blocks, caches or repeat(None)):
            x = block(x, mask, cache)
        return self.ln_final(x)

    def attention_mask(self, idx: torch.Tensor, cache: KVCache | None = None) -> AttentionMask:
        """Which earlier positions each new position of idx may attend to, for every layer alike.

        Causal; with doc_mask, also only within its own document. <|endoftext|>, which the data
        pipeline puts between documents, opens the document after it: the separator and what
        follows see nothing before it, and the first token of a document is predicted from the
        separator alone, as a prompt that starts a fresh document is (sample.py).
        """
        seq = idx.size(1)
        starts = idx == END_OF_TEXT_ID
        if cache is not None:  # generation: the new positions continue the cached ones
            past = cache.length
            visible = torch.ones(seq, past + seq, dtype=torch.bool, device=idx.device).tril(diagonal=past)
            if not self.config.doc_mask:
                return visible
            documents = cache.extend_documents(starts)
            return visible & (documents[:, -seq:, None] == documents[:, None, :]).unsqueeze(1)
        if not self.config.doc_mask:
            return None  # plain causal attention: the flash kernels' fast path
        documents = starts.long().cumsum(dim=1)
        if self.uses_flex_attention(idx):
            return document_block_mask(documents)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=idx.device).tril()
        return (causal & (documents[:, :, None] == documents[:, None, :])).unsqueeze(1)

    def uses_flex_attention(self, idx: torch.Tensor) -> bool:
        """FlexAttention's fused kernels come from torch.compile on CUDA (on the CPU torch 2.13 has
        no backward for it, and uncompiled it materialises every score); it has no dropout."""
        return (
            flex_attention is not None
            and idx.is_cuda
            and torch.compiler.is_compiling()
            and not (self.training and self.config.dropout > 0)
        )

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
            logits = self.logits(hidden[:, -1]).float() / temperature
            if self.config.vocab_size > GPT2_VOCAB_SIZE:
                logits[:, GPT2_VOCAB_SIZE:] = -math.inf  # padding rows: no token to decode
            if top_k is not None:
                kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_largest, -math.inf)
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def document_block_mask(documents: torch.Tensor):
    """FlexAttention's block mask for (batch, seq) document ids: causal and within a document.
    Blocks of 128 x 128 positions wholly outside are skipped, not computed and then masked."""
    batch, seq = documents.shape

    def visible(b, h, query, key):
        return (query >= key) & (documents[b, query] == documents[b, key])

    return create_block_mask(visible, batch, None, seq, seq, device=documents.device)


def compile_gpt(model: GPT, tuning: bool = False):
    """torch.compile the model. tuning lets inductor time launch settings for each of its
    fused kernels (coordinate descent): about 3% faster for 124m on an H100, for about three
    more minutes of compiling the first time (the results are cached on disk)."""
    return torch.compile(model, options={"coordinate_descent_tuning": True} if tuning else None)
