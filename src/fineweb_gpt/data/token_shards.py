"""The token-shard source: llm.c-format .bin files, memory-mapped, no tokenizing while training.

The format is llm.c's and modded-nanogpt's (fineweb10B's `fineweb_train_000001.bin`): a
header of 256 int32 (magic 20240520, version 1, token count), then the tokens as uint16.
`fineweb-gpt-tokenize` writes it; shards written by those projects train as they are. A file
whose header is not that format, or whose size disagrees with its count, is refused in one
line naming it. (llm.c's documents start with <|endoftext|>, ours end with it: the model
sees the same separator between documents either way.)

The training shards are read as one sequence of tokens (their concatenation), cut into
non-overlapping windows of block_size + 1 tokens; only the last partial window of the whole
sequence is left out. Units of about UNIT_TOKENS tokens are shuffled with (seed, epoch) and
dealt to the streams (ranks_and_workers.py), and each unit's windows are shuffled too: every
window exactly once per epoch across ranks x workers. Memory stays flat as the shards grow:
the shards are memory-mapped, and a stream holds only its list of units.

Exact resume: a position is (epoch, unit, windows of the unit already yielded); the rest
follows from the seed, so a resumed run continues bit for bit.
"""

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fineweb_gpt.data.ranks_and_workers import UNIT_TOKENS, TrainStream, plan_units, units_of_stream
from fineweb_gpt.data.settings import DataSettings
from fineweb_gpt.data.tokens import shuffled_order
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.safe_files import AtomicFile, regular_file
from fineweb_gpt.tokenizer import GPT2_VOCAB_SIZE

MAGIC = 20240520
VERSION = 1  # GPT-2 tokens as uint16 (llm.c's version 7 holds LLaMA-3 tokens as uint32)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


def read_token_count(path: Path) -> int:
    """The token count from a shard's header, after checking that the file is one."""
    regular_file(path, "give llm.c token shards in data.paths")
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as err:
        raise ConfigError(f"token shard {path} cannot be read ({err.strerror}); check data.paths") from err
    header = np.frombuffer(raw, dtype="<i4") if len(raw) == HEADER_BYTES else np.zeros(HEADER_INTS, dtype="<i4")
    if header[0] != MAGIC:
        raise ConfigError(
            f"{path} is not an llm.c token shard (no magic {MAGIC} in its header); "
            "make shards with fineweb-gpt-tokenize, or train on parquet files with data=multi_shard"
        )
    if header[1] != VERSION:
        raise ConfigError(
            f"{path} is an llm.c token shard of version {header[1]}, not {VERSION} (GPT-2 tokens as uint16); "
            "re-tokenize it with fineweb-gpt-tokenize"
        )
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise ConfigError(
            f"{path} holds {size} bytes, but its header promises {count} tokens ({HEADER_BYTES + 2 * count} bytes): "
            "it is truncated or damaged; re-download or re-tokenize it"
        )
    return count


def check_token_ids(tokens: np.ndarray, path: Path, offset: int = 0) -> None:
    """Refuse, in one line, tokens of a shard (from token `offset` on) with an id outside GPT-2's
    vocabulary: the model would fail on it part way through the run (on a GPU, a device-side assert)."""
    if len(tokens) and int(tokens.max()) >= GPT2_VOCAB_SIZE:
        first = int(np.flatnonzero(tokens >= GPT2_VOCAB_SIZE)[0])
        raise ConfigError(
            f"{path} holds token id {int(tokens[first])} (token {offset + first:,}), beyond GPT-2's {GPT2_VOCAB_SIZE} "
            "ids: it does not hold GPT-2 tokens; make shards with fineweb-gpt-tokenize"
        )


def shard_header(count: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, count)
    return header.tobytes()


class ShardWriter:
    """Writes one shard: tokens appended as they come, the header's count filled in at the end.

    The file appears under its name only when complete (safe_files.AtomicFile: written beside
    it, flushed, then renamed).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.atomic = AtomicFile(self.path)
        self.file = self.atomic.file
        self.file.write(shard_header(0))
        self.count = 0

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(np.asarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        self.count += len(tokens)

    def close(self) -> Path:
        self.file.seek(0)
        self.file.write(shard_header(self.count))
        return self.atomic.commit()

    def discard(self) -> None:
        self.atomic.discard()


def memmap_tokens(path: Path, count: int) -> np.ndarray:
    """The shard's tokens, memory-mapped: pages are read as windows need them, and the OS may drop them."""
    if count == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    # A plain ndarray view slices several times faster than np.memmap, and keeps the map open.
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,)).view(np.ndarray)


@dataclass
class ShardPosition:
    """Where a token-shard stream is: the next window to yield."""

    epoch: int = 0
    unit: int = 0  # index into the stream's units for this epoch
    window: int = 0  # windows of the unit already yielded


class TokenShardStream(TrainStream):
    """Endless micro-batches of windows of the training shards, for the stream each worker plays."""

    def __init__(
        self, shards: list[tuple[Path, int]], settings: DataSettings, rank=0, world_size=1, start=None, rotation=0
    ):
        super().__init__(settings, rank, world_size, start, rotation)
        self.shards = shards  # (path, token count); opened in the worker that reads them
        counts = [count for _, count in shards]
        self.starts = np.cumsum([0] + counts).tolist()  # each shard's first token in the whole sequence
        total_windows = self.starts[-1] // settings.window
        if total_windows < self.num_streams:
            raise ConfigError(
                f"the token shards hold {total_windows} windows of {settings.window} tokens, fewer than the "
                f"{self.num_streams} data streams (devices x data.num_workers); use more data, fewer workers "
                "or a smaller model.block_size"
            )
        unit_windows = max(1, UNIT_TOKENS // settings.window)
        self.units = plan_units([(0, 0, total_windows)], self.num_streams, max_size=unit_windows)
        self.tokens: list[np.ndarray] | None = None

    def __getstate__(self):
        return {**self.__dict__, "tokens": None}  # a pickled memmap would copy the data: workers map it themselves

    def pieces(self, start: int, stop: int):
        """(shard, offset, length) of tokens start..stop of the whole sequence, shard by shard."""
        shard = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            offset = start - self.starts[shard]
            take = min(stop, self.starts[shard + 1]) - start
            yield shard, offset, take
            start += take
            shard += 1

    def window_at(self, index: int) -> np.ndarray:
        """Window `index` of the whole sequence, read from one shard or across a shard boundary."""
        start = index * self.settings.window
        parts = [self.tokens[s][o : o + n] for s, o, n in self.pieces(start, start + self.settings.window)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def check_unit(self, unit) -> None:
        """Refuse a unit holding an id the model has no embedding for, before any of it is trained
        on (one pass over about UNIT_TOKENS tokens the unit's windows then read from the page cache)."""
        window = self.settings.window
        for shard, offset, take in self.pieces(unit.start * window, unit.stop * window):
            check_token_ids(self.tokens[shard][offset : offset + take], self.shards[shard][0], offset)

    def stream_windows(self, stream: int):
        s = self.settings
        if self.tokens is None:
            self.tokens = [memmap_tokens(path, count) for path, count in self.shards]
        pos = ShardPosition(**self.start.get(stream, {}))
        epoch, first_unit, first_window = pos.epoch, pos.unit, pos.window
        while True:
            units = units_of_stream(len(self.units), stream, self.num_streams, s.seed, epoch)
            for u in range(first_unit, len(units)):
                unit = self.units[units[u]]
                self.check_unit(unit)
                order = shuffled_order(unit.stop - unit.start, s.seed, epoch, units[u])
                for w in range(first_window if u == first_unit else 0, len(order)):
                    yield self.window_at(unit.start + int(order[w])), ShardPosition(epoch, u, w + 1)
            epoch, first_unit, first_window = epoch + 1, 0, 0
