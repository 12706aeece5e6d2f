"""The model's settings (GPTConfig) and the presets that fill them, apart from the model itself
(model.py): the plan, the doctor, resume and the sweep table read them without loading torch."""

import math
from dataclasses import asdict, dataclass, field, fields

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import PADDED_VOCAB_SIZE

# What each preset (model.arch) gives the switches left unset. gpt2 and modern are what those
# names always meant. speedrun: of the modded-nanogpt speedrun's choices that this model has
# (ReLU², RMSNorm, rotary, QK-norm, an untied head starting at zero, zero-initialised projections,
# a logit soft-cap of 15, document masking), those the ablation on the bundled sample supported
# (docs/speed.md): ReLU², rotary and QK-norm clearly, RMSNorm at no cost. The untied zero head
# cost loss there and the others made no difference it could resolve, so they stay off here;
# each is a switch of its own.
GPT2 = dict(
    norm="layernorm",
    mlp="gelu",
    positions="learned",
    qk_norm=False,
    tied_head=True,
    zero_init_proj=False,
    logit_softcap=False,
    doc_mask=False,
)
MODERN = {**GPT2, "norm": "rmsnorm", "mlp": "swiglu", "positions": "rotary", "qk_norm": True}
PRESETS = {"gpt2": GPT2, "modern": MODERN, "speedrun": {**MODERN, "mlp": "relu2"}}
CHOICES = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2"), "positions": ("learned", "rotary")}
SWITCHES = ("qk_norm", "tied_head", "zero_init_proj", "doc_mask")  # true or false


def alternatives(key: str, choices) -> str:
    """'model.mlp=gelu, model.mlp=swiglu or model.mlp=relu2': what to type instead."""
    typed = [f"model.{key}={choice}" for choice in choices]
    return ", ".join(typed[:-1]) + " or " + typed[-1]


def setting(weights: bool = True):
    """A GPTConfig field. weights=False: it does not change what the trained weights mean (it
    acts on initialisation or training only), so a checkpoint resumes and exports under any value."""
    return field(default=None, metadata={"weights": weights})


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = field(default=0.0, metadata={"weights": False})
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2 had them, they only cost speed
    arch: str = "gpt2"  # a preset (PRESETS): fills every switch below left unset (None)
    norm: str | None = setting()  # layernorm or rmsnorm: before attention, before the MLP and at the end
    mlp: str | None = setting()  # gelu (4x wide), swiglu (gated, GELU's parameter count), relu2 (4x, ReLU squared)
    positions: str | None = setting()  # learned embeddings added to the tokens, or rotary inside attention
    qk_norm: bool | None = setting()  # normalise queries and keys (with `norm`) before attention
    tied_head: bool | None = setting()  # the head is the token embedding; untied: a matrix of its own, from zero
    zero_init_proj: bool | None = setting(weights=False)  # attention's and the MLP's output projections start at zero
    logit_softcap: float | bool | None = setting()  # logits = cap * tanh(logits / cap); false: no cap
    doc_mask: bool | None = setting(weights=False)  # a token sees only its own document of a packed window

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
        if self.arch not in PRESETS:
            raise ConfigError(f"model.arch={self.arch!r} is not known; use {alternatives('arch', PRESETS)}")
        self.from_preset = {key for key, value in PRESETS[self.arch].items() if getattr(self, key) is None}
        for key in self.from_preset:
            setattr(self, key, PRESETS[self.arch][key])
        self.check_switches()

    def named(self, key: str) -> str:
        """model.key=value as typed, saying when the preset chose it: for one-line refusals."""
        value = getattr(self, key)
        typed = str(value).lower() if isinstance(value, bool) else value
        return f"model.{key}={typed}" + (f" (model.arch={self.arch}'s)" if key in self.from_preset else "")

    def check_switches(self) -> None:
        """Refuse, in one line naming the setting and the fix, a switch or combination that cannot work."""
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{self.named(key)} is not known; use {alternatives(key, choices)}")
        for key in SWITCHES:
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{self.named(key)} must be true or false")
        cap = self.logit_softcap
        is_number = isinstance(cap, (int, float)) and not isinstance(cap, bool)
        if not (cap is False or (is_number and 0 < cap < math.inf)):
            raise ConfigError(f"{self.named('logit_softcap')} must be a positive number such as 15, or false for none")
        if self.bias and self.norm == "rmsnorm":
            raise ConfigError(
                f"model.bias=true with {self.named('norm')}: RMSNorm has no bias; set model.bias=false, "
                "or model.norm=layernorm"
            )
        if self.bias and self.mlp == "swiglu":
            raise ConfigError(
                f"model.bias=true with {self.named('mlp')}: the SwiGLU MLP has no biases; set model.bias=false, "
                "or model.mlp=gelu"
            )
        if self.positions == "rotary" and self.head_size % 2:
            raise ConfigError(
                f"{self.named('positions')} rotates pairs of dimensions, so the head size n_embd / n_head = "
                f"{self.head_size} must be even; change model.n_embd or model.n_head, or use model.positions=learned"
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
        """Every setting, the switches as resolved: what a checkpoint records it trained."""
        return asdict(self)


# The model's settings, the one list that resume, the doctor and the export read. Those that fix
# what the weights mean (all but dropout, zero_init_proj and doc_mask) are ARCHITECTURE_KEYS: a
# checkpoint resumes, loads or exports only under its own values.
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig))
ARCHITECTURE_KEYS = tuple(f.name for f in fields(GPTConfig) if f.metadata.get("weights", True))


def resolved_model_settings(model: dict) -> dict:
    """The model settings a config or checkpoint holds (its model group, or a checkpoint's
    model_config of any version) with the preset filled in, so that a command and a checkpoint
    compare switch by switch however each chose them. Keys that are no model setting are ignored."""
    return GPTConfig(**{key: value for key, value in model.items() if key in MODEL_KEYS}).to_dict()
