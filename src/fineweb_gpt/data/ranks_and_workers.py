"""Where rows are dealt to ranks and DataLoader workers: every training document once per epoch.

Each DataLoader worker of each rank is one *stream*, numbered rank x workers + worker (a rank
with data.num_workers=0 is one stream, its training process). The data is cut into *units*,
each read by exactly one stream per epoch:

- parquet files: a unit is a row group, cut into equal row ranges when there are fewer row
  groups than streams, so even one file feeds every worker of every rank;
- token shards: a unit is a range of windows of the shards' tokens, about UNIT_TOKENS long;
- a Hub stream (`datasets`): a unit is one of the dataset's shards after `reshard()` (a
  parquet row group), dealt by `datasets.distributed.split_dataset_by_node` with the
  streams as its nodes (see hf_stream.py).

Per epoch, the parquet and token-shard units are shuffled with (seed, epoch) and dealt
round-robin, so the streams of all ranks split every epoch between them with no overlap and
no gap, and each stream knows its units without talking to the others.

A stream yields micro-batches that carry its position (what it needs to rebuild the very next
batch), which the DataModule records for the batches actually trained on: that is the exact
resume. A resumed DataLoader starts again at worker 0, so the worker that plays a stream is
rotated by the batches already consumed: batch k of the run comes from the same stream as in
the uninterrupted run.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fineweb_gpt.data.settings import DataSettings

# Token shards: windows shuffled together, about as many tokens as a chunk of 1024 FineWeb rows.
UNIT_TOKENS = 1 << 20


@dataclass(frozen=True)
class Unit:
    """Rows (or windows) [start, stop) of one piece of data: a file's row group, or the token shards."""

    file: int
    row_group: int
    start: int
    stop: int


def plan_units(pieces: list[tuple[int, int, int]], num_streams: int, max_size: int | None = None) -> list[Unit]:
    """Each (file, row_group, size) piece cut into equal ranges: enough for every stream, none over max_size."""
    pieces = [piece for piece in pieces if piece[2]]
    cuts = max(1, -(-num_streams // len(pieces)))
    units = []
    for file, row_group, size in pieces:
        parts = max(cuts, -(-size // max_size)) if max_size else cuts
        bounds = np.linspace(0, size, parts + 1).astype(int)
        units += [Unit(file, row_group, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return units


def units_of_stream(num_units: int, stream: int, num_streams: int, seed: int, epoch: int) -> list[int]:
    """Indices of one stream's units for an epoch: all units shuffled, dealt round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(num_units)
    return order[stream::num_streams].tolist()


class TrainStream(IterableDataset):
    """Endless micro-batches of (micro_batch_size, block_size + 1) token windows for one stream.

    A source implements stream_windows(stream) -> (window, position after it) forever; this
    class finds which stream the current worker plays and groups its windows into
    micro-batches: dicts of windows (int64 tensor), stream (int) and position (a dict).
    """

    def __init__(
        self, settings: DataSettings, rank: int, world_size: int, start: dict | None = None, rotation: int = 0
    ):
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.workers = settings.workers
        self.num_streams = self.workers * world_size
        self.start = start or {}  # stream -> position dict to start from
        self.rotation = rotation

    def stream_id(self, worker: int) -> int:
        return self.rank * self.workers + (worker + self.rotation) % self.workers

    def stream_windows(self, stream: int):
        raise NotImplementedError

    def __iter__(self):
        worker = get_worker_info()
        stream = self.stream_id(worker.id if worker else 0)
        batch, size = [], self.settings.micro_batch_size
        for window, position in self.stream_windows(stream):
            batch.append(window)
            if len(batch) == size:
                windows = torch.from_numpy(np.array(batch, dtype=np.int64))
                yield {"windows": windows, "stream": stream, "position": asdict(position)}
                batch = []


def packed_carry(carry: np.ndarray) -> str:
    """The tokens carried into a chunk, as a stream position holds them: one hex string (of
    uint16 ids), which passes through the DataLoader's collate and into a checkpoint as one
    value, where a list of ints would be copied and converted number by number for every
    micro-batch (as much time as tokenizing it)."""
    return carry.astype(np.uint16).tobytes().hex()


def unpacked_carry(carry: str | list[int]) -> np.ndarray:
    """packed_carry's tokens back as int64 (checkpoints written before it hold a list)."""
    if isinstance(carry, str):
        return np.frombuffer(bytes.fromhex(carry), dtype=np.uint16).astype(np.int64)
    return np.array(carry, dtype=np.int64)
