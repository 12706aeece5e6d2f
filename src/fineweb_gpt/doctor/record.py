"""The run record every check reads, and the finding every check returns.

A run is a summary (run_summary.json's keys, plus "source") and metric rows in training
order, one dict per logged optimizer step or evaluation holding only the columns that row
has (train/loss, val/loss, train/lr, data/tokens_seen, perf/...). Readers of each log format
build one; the checks never read files.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import human_count, parameter_count
from fineweb_gpt.model_config import MODEL_KEYS, SWITCHES, GPTConfig
from fineweb_gpt.run.run_files import one_line_text

SOURCE_NAMES = {
    "fineweb_gpt": "fineweb_gpt run folder",
    "nanogpt": "nanoGPT log",
    "llmc": "llm.c log",
    "modded": "modded-nanogpt log",
    "buildnanogpt": "build-nanogpt log",
    "csv": "metrics CSV",
}

# What a summary value may be: a crafted file must not make a check divide by zero, loop for
# ever or allocate what it asks. A value outside these bounds is dropped, as if not logged.
NUMBER_BOUNDS = {
    "n_layer": (1, 10_000),
    "n_head": (1, 10_000),
    "n_embd": (1, 1_000_000),
    "block_size": (1, 10_000_000),
    "vocab_size": (1, 100_000_000),
    "micro_batch_size": (1, 10_000_000),
    "grad_accum": (1, 10_000_000),
    "world_size": (1, 10_000_000),
    "tokens_per_step": (1, 1e13),
    "max_steps": (1, 1e13),
    "decay_steps": (1, 1e13),
    "warmup_steps": (0, 1e13),
    "val_every_steps": (1, 1e13),
    "num_params": (1, 1e14),
    "planned_tokens": (1, 1e16),
    "unique_train_tokens": (1, 1e16),
    "chinchilla_tokens": (1, 1e16),
    "flops_per_token": (1, 1e16),
    "lr": (1e-12, 100.0),
    "min_lr": (0.0, 100.0),
    "dropout": (0.0, 1.0),
    "peak_flops": (1e9, 1e19),
    "mfu_peak_flops": (1e9, 1e19),
    "gpu_memory_gb": (0.01, 100_000.0),
}
INTEGER_KEYS = {key for key in NUMBER_BOUNDS if key not in ("lr", "min_lr", "dropout", "gpu_memory_gb")}
BOOLEAN_KEYS = ("bias", "compile", "unique_train_tokens_estimated", *SWITCHES)
SOFTCAP_BOUNDS = (1e-6, 1e6)  # model.logit_softcap: a number, or false
LIST_KEYS = ("data_files", "run_names")


def sanitized(summary: dict) -> dict:
    """The summary with every number finite (and within its bounds where the checks use it),
    every text one line, every list a list of one-line texts; anything else is dropped."""
    clean = {}
    for key, value in summary.items():
        if key in NUMBER_BOUNDS:
            low, high = NUMBER_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                continue  # NaN fails the comparison too
            clean[key] = int(value) if key in INTEGER_KEYS else float(value)
        elif key in BOOLEAN_KEYS:
            if isinstance(value, bool):
                clean[key] = value
        elif key == "logit_softcap":
            if value is False or (type(value) in (int, float) and SOFTCAP_BOUNDS[0] <= value <= SOFTCAP_BOUNDS[1]):
                clean[key] = value
        elif key in LIST_KEYS:
            if isinstance(value, list):
                items = [item for item in value[:10_000] if isinstance(item, str | int | float)]
                clean[key] = [one_line_text(item, 300) for item in items]
        elif isinstance(value, str):
            clean[key] = one_line_text(value, 300)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            clean[key] = value
    return clean


class Point(NamedTuple):
    tokens: float | None  # None where the log does not say how many tokens a step has
    value: float
    step: int

    @property
    def x(self) -> float:
        """Where the point lies on the run's progress axis: tokens, or steps when tokens are unknown."""
        return self.tokens if self.tokens is not None else float(self.step)


@dataclass(frozen=True)
class Finding:
    check: str  # the check that found it; the health monitor warns once per check
    problem: bool  # False: context worth knowing, nothing to fix
    title: str
    evidence: str  # the numbers behind it
    fix: str = ""  # the concrete change


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunRecord:
    summary: dict
    rows: list[dict] = field(default_factory=list)

    def get(self, key: str, default=None):
        value = self.summary.get(key)
        return default if value is None else value

    @property
    def source(self) -> str:
        return self.get("source", "fineweb_gpt")

    def tokens(self, row: dict) -> float | None:
        if finite(row.get("data/tokens_seen")) and row["data/tokens_seen"] >= 0:
            return float(row["data/tokens_seen"])
        if finite(row.get("step")) and self.get("tokens_per_step"):
            return max(0.0, row["step"]) * self.summary["tokens_per_step"]
        return None

    @property
    def knows_tokens(self) -> bool:
        return bool(self.get("tokens_per_step")) or any(finite(row.get("data/tokens_seen")) for row in self.rows)

    def points(self, column: str) -> list[Point]:
        """(tokens seen, value, step) of every row with a finite value in the column, in training order."""
        return [
            Point(self.tokens(row), float(row[column]), int(row["step"]) if finite(row.get("step")) else 0)
            for row in self.rows
            if finite(row.get(column))
        ]

    def first_not_finite(self, column: str) -> dict | None:
        """The first row whose value in the column is NaN or infinite."""
        return next((row for row in self.rows if column in row and not finite(row[column])), None)

    @property
    def tokens_seen(self) -> float:
        return max((t for row in self.rows if (t := self.tokens(row)) is not None), default=0.0)

    @property
    def last_step(self) -> int:
        return max((int(row["step"]) for row in self.rows if finite(row.get("step"))), default=0)

    @property
    def planned_tokens(self) -> float | None:
        if self.get("planned_tokens"):
            return self.summary["planned_tokens"]
        if self.get("max_steps") and self.get("tokens_per_step"):
            return self.summary["max_steps"] * self.summary["tokens_per_step"]
        return None

    @property
    def plan_is_assumed(self) -> bool:
        """The plan is a trainer's default the log never states, not what the run was told."""
        return bool(self.get("plan_source")) and "default" in self.summary["plan_source"]

    def plan_note(self, style: str = " (") -> str:
        """Where the planned length comes from, for the reader of a headline: ' (source)' or ', source'."""
        source = self.get("plan_source")
        if not source:
            return ""
        return f", {source}" if style == ", " else f" ({source})"

    @property
    def num_params(self) -> float | None:
        if self.get("num_params"):
            return self.summary["num_params"]
        model = self.model_config()
        return parameter_count(model) if model else None

    def model_config(self) -> GPTConfig | None:
        """The model the run trained, as far as its files say: every setting a fineweb_gpt run
        records; for other trainers' logs, which give the shape only, a GPT-2 of that shape."""
        if not (self.get("n_layer") and self.get("n_embd")):
            return None
        settings = {key: self.summary[key] for key in MODEL_KEYS if self.get(key) is not None}
        settings.setdefault("n_head", 1)  # changes no parameter count of a GPT-2
        try:
            return GPTConfig(**settings)
        except ConfigError:  # settings no model can have (a crafted or damaged file)
            return None

    @property
    def epochs(self) -> float | None:
        unique = self.get("unique_train_tokens")
        return self.tokens_seen / unique if unique else None

    def where(self, point: Point) -> str:
        """'step 1,200 (629.15M tokens)', or 'step 1,200' when the tokens are unknown."""
        tokens = f" ({human_count(point.tokens)} tokens)" if point.tokens is not None else ""
        return f"step {point.step:,}{tokens}"

    @property
    def progress_unit(self) -> str:
        return "tokens" if self.knows_tokens else "steps"

    def setting(self, name: str, value=None) -> str:
        """The setting as this run's own command line or script spells it, so a fix can be pasted."""
        spelling = SETTING_SPELLINGS.get(self.source, SETTING_SPELLINGS["fineweb_gpt"]).get(name, f"{name}={{}}")
        if name == "min_lr" and self.source == "llmc" and self.get("lr"):
            value = value / self.summary["lr"]  # llm.c takes the final learning rate as a fraction of the peak
        return spelling.format(value)


# How each source spells a setting where a user changes it.
SETTING_SPELLINGS = {
    "fineweb_gpt": {
        "n_embd": "model.n_embd={}",
        "dropout": "model.dropout={}",
        "lr": "optim.lr={:.2g}",
        "min_lr": "optim.min_lr={:.2g}",
        "max_steps": "trainer.max_steps={}",
        "decay_steps": "trainer.max_steps={}",
        "micro_batch": "hw.micro_batch_size={}",
        "compile": "hw.compile=true",
        "more_data": "data=multi_shard data.paths='[...]'",
    },
    "nanogpt": {
        "n_embd": "--n_embd={}",
        "dropout": "--dropout={}",
        "lr": "--learning_rate={:.2g}",
        "min_lr": "--min_lr={:.2g}",
        "max_steps": "--max_iters={}",
        "decay_steps": "--lr_decay_iters={}",
        "micro_batch": "--batch_size={}",
        "compile": "--compile=True",
        "more_data": "prepare more documents into train.bin",
    },
    "llmc": {
        "lr": "-l {:.2g}",
        "min_lr": "-q {:.2g}",
        "max_steps": "-x {}",
        "decay_steps": "-x {}",
        "micro_batch": "-b {}",
        "compile": "(llm.c is compiled CUDA already)",
        "more_data": "more .bin shards in the train data pattern (-i)",
    },
    "modded": {
        "lr": "the optimizers' lr={:.2g} in train_gpt.py",
        "max_steps": "num_iterations = {} in train_gpt.py",
        "decay_steps": "num_iterations = {} in train_gpt.py",
        "compile": "torch.compile (on by default)",
        "more_data": "more fineweb_train_*.bin shards",
    },
}
SETTING_SPELLINGS["buildnanogpt"] = {
    "lr": "max_lr = {:.2g} in train_gpt2.py",
    "min_lr": "min_lr = {:.2g} in train_gpt2.py",
    "max_steps": "max_steps = {} in train_gpt2.py",
    "decay_steps": "max_steps = {} in train_gpt2.py",
    "micro_batch": "B = {} in train_gpt2.py",
    "compile": "use_compile = True in train_gpt2.py",
    "more_data": "more edu_fineweb10B shards (fineweb.py)",
}
SETTING_SPELLINGS["csv"] = SETTING_SPELLINGS["fineweb_gpt"]
