"""HellaSwag, scored the way build-nanogpt and llm.c score it, so that the figures compare with theirs.

Each example is a context and four endings, one of them right. Each ending is encoded on its own
with a leading space and appended to the context's tokens; the model's cross-entropy over the
ending's tokens alone is summed. `acc` picks the ending with the lowest sum (the highest
log-likelihood, lm-evaluation-harness's `acc` too), `acc_norm` the lowest mean per ending token.
The padded vocabulary's extra rows are left out of the softmax: they are no token, and the
exported model (export.py) does not have them either, so both score the same.

The data: HellaSwag's validation set as published (hellaswag_val.jsonl: ctx, endings, label as
an int, ...), or the Hugging Face Hub's parquet copy of it (label as a string), downloaded once
into the Hugging Face cache (HF_HOME and HF_HUB_OFFLINE honoured).
"""

import json
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from fineweb_gpt.errors import ConfigError, one_line
from fineweb_gpt.model import GPT
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, GPT2_VOCAB_SIZE, gpt2_tokenizer

# The Hub's own parquet conversion of the dataset (the repository's main branch holds a loading
# script, which `datasets` no longer runs); lm-evaluation-harness reads the same repository.
HUB_REPO = "Rowan/hellaswag"
HUB_REVISION = "refs/convert/parquet"
HUB_FILE = "default/validation/0000.parquet"
VALIDATION_EXAMPLES = 10_042
ENDINGS = 4


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int


def example_from_row(row: dict, where: str) -> Example:
    """One example from a published row (label an int) or a Hub row (label a string)."""
    try:
        context, endings, label = row["ctx"], row["endings"], int(row["label"])
    except KeyError as err:
        raise ConfigError(
            f"{where} has no {err.args[0]!r} field; give HellaSwag's jsonl (ctx, endings, label)"
        ) from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: label {row['label']!r} is not a number from 0 to 3") from None
    if not isinstance(context, str) or not isinstance(endings, list) or len(endings) != ENDINGS:
        raise ConfigError(f"{where}: ctx must be text and endings a list of {ENDINGS} texts")
    if not 0 <= label < ENDINGS:
        raise ConfigError(f"{where}: label {label} is not a number from 0 to 3")
    return Example(context, tuple(str(e) for e in endings), label)


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a HellaSwag file: the published jsonl, or the Hub's parquet copy."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hellaswag.path={path} does not exist; give HellaSwag's hellaswag_val.jsonl")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path, columns=["ctx", "endings", "label"]).to_pylist()
            examples = [example_from_row(row, f"{path} row {i + 1}") for i, row in enumerate(rows[:limit])]
        else:
            examples = []
            with path.open(encoding="utf-8") as file:
                for number, line in enumerate(file, 1):
                    if limit is not None and len(examples) >= limit:
                        break
                    if line.strip():
                        examples.append(example_from_row(json.loads(line), f"{path} line {number}"))
    except ConfigError:
        raise
    except Exception as err:  # not JSON, not parquet, not UTF-8: the file is not what it should be
        raise ConfigError(
            f"hellaswag.path={path} cannot be read ({one_line(err, 160)}); give HellaSwag's jsonl"
        ) from err
    if not examples:
        raise ConfigError(f"hellaswag.path={path} holds no examples; give HellaSwag's hellaswag_val.jsonl")
    return examples


def download_validation_set(cache_dir: str | None = None) -> Path:
    """HellaSwag's validation set from the Hub, downloaded once into the Hugging Face cache."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", revision=HUB_REVISION, cache_dir=cache_dir)
        )
    except Exception as err:  # no network and no cache, a proxy, a moved file: all end here
        raise ConfigError(
            f"cannot get HellaSwag's validation set ({HUB_REPO}) from the Hugging Face Hub or its cache "
            f"({type(err).__name__}: {one_line(err, 160)}); give the published file instead: "
            "hellaswag.path=hellaswag_val.jsonl (from github.com/rowanz/hellaswag, data/)"
        ) from err


def load_examples(path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """The validation examples from `path`, or else from the Hub (through its cache)."""
    return read_examples(path if path is not None else download_validation_set(), limit)


@dataclass(frozen=True)
class EncodedExample:
    """An example's four rows of tokens (context then ending), each cut from the left to fit the
    model's block, and where in each row the ending's tokens start."""

    rows: tuple[tuple[int, ...], ...]
    ending_starts: tuple[int, ...]
    label: int
    cut: bool  # the context (or more) was cut to fit

    @property
    def length(self) -> int:
        return max(len(row) for row in self.rows)


def encode_example(example: Example, block_size: int) -> EncodedExample:
    """The model sees a row's tokens but the last (block_size at most), and predicts each next token;
    a row longer than block_size + 1 keeps its last block_size + 1 tokens."""
    encoder = gpt2_tokenizer()
    context = encoder.encode_ordinary(example.context)
    rows, starts, cut = [], [], False
    for ending in example.endings:
        ending_tokens = encoder.encode_ordinary(" " + ending)
        row = context + ending_tokens
        keep = block_size + 1
        cut = cut or len(row) > keep
        rows.append(tuple(row[-keep:]))
        # The first ending token is predicted from the token before it, so a row starts it at 1 at the earliest.
        starts.append(max(1, len(rows[-1]) - len(ending_tokens)))
    return EncodedExample(tuple(rows), tuple(starts), example.label, cut)


@dataclass
class Scores:
    """Counts that add up across batches and ranks, and each example's chosen ending."""

    correct: int = 0
    correct_norm: int = 0
    examples: int = 0
    cut: int = 0  # examples whose context was cut from the left to fit the block
    chosen: dict[int, int] = field(default_factory=dict)  # example index -> ending with the lowest summed loss
    chosen_norm: dict[int, int] = field(default_factory=dict)  # ... the lowest mean loss per token

    @property
    def acc(self) -> float:
        return self.correct / self.examples if self.examples else float("nan")

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.examples if self.examples else float("nan")

    def counts(self) -> list[int]:
        return [self.correct, self.correct_norm, self.examples, self.cut]

    @classmethod
    def from_counts(cls, counts) -> "Scores":
        correct, correct_norm, examples, cut = (int(c) for c in counts)
        return cls(correct, correct_norm, examples, cut)

    def result(self) -> dict:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "examples": self.examples, "contexts_cut": self.cut}


@torch.no_grad()
def ending_losses(model: GPT, batch: list[EncodedExample], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(summed, mean) cross-entropy of each ending's tokens, each (len(batch), 4), in one forward pass."""
    rows = [row for example in batch for row in example.rows]
    starts = [start for example in batch for start in example.ending_starts]
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), END_OF_TEXT_ID, dtype=torch.long)  # padding after a row is never read
    scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)  # which targets are ending tokens
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, : len(row)] = torch.tensor(row)
        scored[i, start - 1 : len(row) - 1] = True
    tokens, scored = tokens.to(device), scored.to(device)
    # The head only where an ending token is predicted (as GPT.generate reads the last position):
    # the logits of every position would be most of the work and the memory.
    hidden = model.hidden_states(tokens[:, :-1])[scored]
    logits = model.lm_head(hidden)[:, :GPT2_VOCAB_SIZE]
    losses = F.cross_entropy(logits.float(), tokens[:, 1:][scored], reduction="none")
    per_row = torch.zeros(scored.shape, dtype=torch.float32, device=losses.device)
    per_row[scored] = losses
    summed = per_row.sum(dim=1)
    mean = summed / scored.sum(dim=1)
    return summed.view(len(batch), ENDINGS), mean.view(len(batch), ENDINGS)


def batches_by_length(encoded: list[EncodedExample], batch_size: int) -> Iterator[list[int]]:
    """Indices of examples of similar length together, longest first (little padding; too large a
    batch shows at once)."""
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].length)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def score_examples(
    model: GPT,
    examples: list[Example],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    context: AbstractContextManager | None = None,
    progress: bool = False,
    indices: list[int] | None = None,
) -> Scores:
    """Score `examples` (those at `indices` only, if given: one rank's share) with `model`, in eval
    mode, `batch_size` examples (4 rows each) per forward pass, inside `context` (autocast)."""
    indices = list(range(len(examples))) if indices is None else indices
    encoded = [encode_example(examples[i], model.config.block_size) for i in indices]
    scores = Scores(examples=len(encoded), cut=sum(e.cut for e in encoded))
    # disable=None as well: no bar where stderr is not a terminal (a log file would get every redraw).
    hidden = None if progress else True  # None: tqdm hides the bar where stderr is not a terminal
    bar = tqdm(total=len(encoded), desc="HellaSwag", unit="example", file=sys.stderr, disable=hidden)
    with context or nullcontext(), bar:
        for batch in batches_by_length(encoded, batch_size):
            summed, mean = ending_losses(model, [encoded[i] for i in batch], device)
            for i, chosen, chosen_norm in zip(batch, summed.argmin(1).tolist(), mean.argmin(1).tolist()):
                label = encoded[i].label
                scores.correct += chosen == label
                scores.correct_norm += chosen_norm == label
                scores.chosen[indices[i]], scores.chosen_norm[indices[i]] = chosen, chosen_norm
            bar.update(len(batch))
    return scores


def rank_share(total: int, rank: int, world_size: int) -> list[int]:
    """The examples one of `world_size` ranks scores: rank r takes r, r + world_size, ..."""
    return list(range(rank, total, world_size))


def synthetic_examples(count: int, seed: int = 0) -> list[Example]:
    """Examples shaped like HellaSwag's (a context of 20 to 80 words, endings of 10 to 30) cut from
    the bundled FineWeb documents, for timing and tests without the real file: the right ending
    continues the context's document, the others come from other documents."""
    import random

    import pyarrow.parquet as pq

    from fineweb_gpt.data import bundled_sample_path

    documents = [t.split() for t in pq.read_table(bundled_sample_path(), columns=["text"]).column("text").to_pylist()]
    documents = [words for words in documents if len(words) >= 120]
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = rng.choice(documents)
        start, context_words = rng.randrange(len(words) - 110), rng.randint(20, 80)
        right = words[start + context_words : start + context_words + rng.randint(10, 30)]
        others = []
        for _ in range(ENDINGS - 1):
            other = rng.choice(documents)
            at = rng.randrange(len(other) - 30)
            others.append(other[at : at + rng.randint(10, 30)])
        label = rng.randrange(ENDINGS)
        endings = others[:label] + [right] + others[label:]
        examples.append(Example(" ".join(words[start : start + context_words]), tuple(map(" ".join, endings)), label))
    return examples
