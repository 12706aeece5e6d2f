"""What each key of the training config may hold: one table, checked before anything is built.

A value of the wrong type or out of range is refused in one line that names the key and says
what it must be (`optim.lr=0 must be a number above 0`), instead of a traceback later on.
"""

import math
from dataclasses import dataclass

from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fineweb_gpt.errors import ConfigError


def is_one_of(value, choices) -> bool:
    """Equal by type too: 1 is not true, and the text "32" is not the number 32."""
    return any(type(value) is type(choice) and value == choice for choice in choices)


def typed(value) -> str:
    """A value as it is typed on the command line; text that would read as something else is quoted."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, DictConfig | ListConfig):
        return str(OmegaConf.to_container(value)).replace(" ", "")
    if isinstance(value, str) and (not value.replace("-", "").replace("_", "").isalnum() or reads_as_other(value)):
        return repr(value)
    return str(value)


def reads_as_other(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text in ("null", "true", "false")
    return True


def or_also(values: tuple) -> str:
    return "".join(f", or {typed(v)}" for v in values)


@dataclass(frozen=True)
class Whole:
    """A whole number from `low` to `high`, or one of `also`."""

    low: int
    high: float = math.inf
    also: tuple = ()

    def accepts(self, value) -> bool:
        return is_one_of(value, self.also) or (type(value) is int and self.low <= value <= self.high)

    def __str__(self) -> str:
        bound = f"at least {self.low}" if self.high == math.inf else f"from {self.low} to {self.high}"
        return f"a whole number {bound}{or_also(self.also)}"


@dataclass(frozen=True)
class Number:
    """A finite number: `above` and `below` exclude their bound, `at_least` includes it; or one of `also`."""

    above: float = -math.inf
    at_least: float = -math.inf
    below: float = math.inf
    also: tuple = ()

    def accepts(self, value) -> bool:
        if is_one_of(value, self.also):
            return True
        if type(value) not in (int, float) or not math.isfinite(value):
            return False
        return self.above < value < self.below and value >= self.at_least

    def __str__(self) -> str:
        bounds = [f"above {self.above:g}"] if self.above > -math.inf else []
        bounds += [f"at least {self.at_least:g}"] if self.at_least > -math.inf else []
        bounds += [f"below {self.below:g}"] if self.below < math.inf else []
        return f"a number {' and '.join(bounds)}{or_also(self.also)}"


class OneOf:
    def __init__(self, *choices, meaning: str = ""):
        self.choices, self.meaning = choices, meaning

    def accepts(self, value) -> bool:
        return is_one_of(value, self.choices)

    def __str__(self) -> str:
        return "one of " + ", ".join(typed(c) for c in self.choices) + (f" ({self.meaning})" if self.meaning else "")


class Text:
    """Some text (a name, a path), or one of `also`."""

    def __init__(self, also: tuple = ()):
        self.also = also

    def accepts(self, value) -> bool:
        return is_one_of(value, self.also) or (isinstance(value, str) and value.strip() != "")

    def __str__(self) -> str:
        return f"some text{or_also(self.also)}"


class Devices:
    """trainer.devices as Lightning reads it: a count, -1 or auto (all), or device ids ([0,1] or "0,1")."""

    def accepts(self, value) -> bool:
        if isinstance(value, str) and "," not in value and value.strip().removeprefix("-").isdigit():
            value = int(value)  # Lightning reads "2" as 2
        if is_one_of(value, (-1, "auto")) or (type(value) is int and value >= 1):
            return True
        ids = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, ListConfig) else []
        ids = [i.strip() if isinstance(i, str) else i for i in ids]
        ids = [i for i in ids if i != ""]
        return bool(ids) and all((type(i) is int and i >= 0) or (isinstance(i, str) and i.isdigit()) for i in ids)

    def __str__(self) -> str:
        return "a number of devices (at least 1), -1 or auto (all of them), or device ids such as [0,1]"


class Pair:
    """Two values, each as `item` allows: optim.betas."""

    def __init__(self, item):
        self.item = item

    def accepts(self, value) -> bool:
        return isinstance(value, ListConfig) and len(value) == 2 and all(self.item.accepts(v) for v in value)

    def __str__(self) -> str:
        return f"two values, each {self.item}, such as [0.9,0.95]"


# Lightning's precisions and their short forms, and auto (bf16 on GPUs that have it, fp16 on
# older ones, fp32 on the CPU).
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
PRECISIONS += ("transformer-engine", "transformer-engine-float16", 32, 16, 64, "32", "16", "64", "bf16")

# Every key the run plan and the Trainer rely on. The data package checks the data.*
# keys, GPTConfig the model's shape, the module optim.optimizer and loss_guard.action, and
# checkpointing ckpt_path and resume, each when it is built (still before any work).
ALLOWED = {
    "seed": Whole(0, 2**32 - 1),
    "total_batch_tokens": Whole(1),
    "max_tokens": Number(above=0, also=(None,)),
    "val_every_steps": Whole(1),
    "hw.micro_batch_size": Whole(1),
    "hw.peak_flops": Number(above=0, also=(None,)),
    "hw.compile": OneOf(False, True),
    "hw.compile_tuning": OneOf(False, True),
    "model.dropout": Number(at_least=0, below=1),
    "model.bias": OneOf(False, True),
    "optim.lr": Number(above=0),
    "optim.min_lr": Number(at_least=0),
    "optim.warmup_steps": Whole(0),
    "optim.weight_decay": Number(at_least=0),
    "optim.eps": Number(above=0),
    "optim.betas": Pair(Number(at_least=0, below=1)),
    "optim.muon_lr": Number(above=0),
    "optim.muon_momentum": Number(at_least=0, below=1),
    "loss_guard.spike_factor": Number(above=1, also=(None,)),
    "init_from": Text(also=(None,)),
    "eval.hellaswag_every_steps": Whole(1, also=(None, "auto")),
    "eval.hellaswag_path": Text(also=(None,)),
    "eval.hellaswag_examples": Whole(1, also=(None,)),
    "eval.hellaswag_batch_size": Whole(1),
    "eval.samples": Whole(0, 100),
    "eval.sample_prompt": Text(also=("",)),
    "eval.sample_tokens": Whole(1, 100_000),
    "trainer.accelerator": OneOf("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())),
    "trainer.devices": Devices(),
    "trainer.num_nodes": Whole(1),
    "trainer.precision": OneOf(*PRECISIONS),
    "trainer.max_steps": Whole(1, also=(-1,)),
    "trainer.log_every_n_steps": Whole(1, also=(None,)),
    "trainer.gradient_clip_val": Number(at_least=0, also=(None,)),
    "callbacks.model_checkpoint.every_n_train_steps": Whole(0, also=(None,)),
    "callbacks.model_checkpoint.every_n_minutes": Number(above=0, also=(None,)),
    "callbacks.model_checkpoint.save_top_k": Whole(0, also=(-1,)),
    "trainer.num_sanity_val_steps": OneOf(
        None,
        0,
        -1,
        meaning="null: the whole validation set before a fresh run, its step-0 val loss; 0: none; -1: always",
    ),
}

# Trainer arguments fineweb_gpt works out or builds itself: set by hand, they are refused.
SET_INSTEAD = {
    "trainer.accumulate_grad_batches": "total_batch_tokens (accumulation is derived from it)",
    "trainer.val_check_interval": "val_every_steps",
    "trainer.logger": "the logger group: logger=csv, 'logger=[csv,wandb]' or logger=null",
    "trainer.callbacks": "the callbacks group: +callbacks.<name>._target_=...",
}
NOT_SET = object()


def check_values(cfg: DictConfig) -> None:
    """Refuse, in one line naming the key, a value of the wrong type or out of range."""
    for key, allowed in ALLOWED.items():
        try:
            value = OmegaConf.select(cfg, key, default=NOT_SET, throw_on_resolution_failure=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key} cannot be read: {' '.join(str(err).split())}") from None
        if value is not NOT_SET and not allowed.accepts(value):
            raise ConfigError(f"{key}={typed(value)}{set_from(cfg, key)} must be {allowed}")
    for key, instead in SET_INSTEAD.items():
        if OmegaConf.select(cfg, key) is not None:
            raise ConfigError(f"{key} is set by fineweb_gpt; set {instead}")


def set_from(cfg: DictConfig, key: str) -> str:
    """(from ${model.block_size}) when the key takes its value from another one."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not OmegaConf.is_interpolation(node, leaf):
        return ""
    return f" (from {OmegaConf.to_container(node, resolve=False)[leaf]})"
