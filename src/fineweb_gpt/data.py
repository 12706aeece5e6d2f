"""FineWeb parquet files -> documents -> GPT-2 token ids -> packed windows -> micro-batches.

Streaming is built on pyarrow row groups rather than Hugging Face `datasets` streaming:
`datasets` shards a parquet stream by file, so a single 2 GB shard can feed only one
DataLoader worker of one rank ("Too many dataloader workers ... max is
dataset.num_shards=1"), while row groups (split further into row ranges when there are
too few) give every worker of every rank its own share of even one file.

Each worker of each rank is one *stream*. Per epoch, the (file, row group) units are
shuffled with the epoch's seed and dealt round-robin to the streams. A stream reads its
units in chunks of rows, drops held-out and empty documents, tokenizes the rest with an
<|endoftext|> after each, and cuts non-overlapping windows of block_size + 1 tokens
(tokens that do not fill a window carry over to the next chunk, so only the last partial
window of a stream's epoch is dropped). The windows of a chunk are yielded in a shuffled
order, so the chunk is the shuffle buffer.

Every micro-batch carries its stream's position (epoch, unit, chunk, window, carried
tokens). The DataModule records the position of each batch the model actually trains on,
saves it in Lightning checkpoints, and a resumed run re-reads only the current chunk to
continue with the very batches the uninterrupted run would have seen.

Validation documents are held out by a hash of their id (or of file name and row when
there is no id column), so the split never depends on file order and never overlaps
training; the first val_tokens of them form a fixed set scored at every evaluation.
"""

import fnmatch
import glob
import logging
import math
import os
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer

log = logging.getLogger("fineweb_gpt")


def bundled_sample_path() -> Path:
    """800 real FineWeb sample-10BT documents (ODC-By), shipped with the package."""
    return Path(str(resources.files("fineweb_gpt") / "assets" / "fineweb_sample10BT_800.parquet"))


# --- finding the files -----------------------------------------------------------------


def resolve_parquet_files(path: str | None = None, paths: list[str] | None = None) -> list[Path]:
    """Expand data.path / data.paths (files, directories or globs) into parquet files."""
    if path is None and not paths:
        raise ConfigError(
            "no training data given: set data.path or data.paths (files, folders or globs), or data.hf_repo "
            "with data.hf_files; data=sample trains on the bundled sample"
        )
    entries = ([path] if path is not None else []) + list(paths or [])
    files: list[Path] = []
    for entry in entries:
        entry = str(Path(entry).expanduser())
        if glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True) if m.endswith(".parquet"))
            if not matches:
                raise ConfigError(f"data path {entry} matches no .parquet files; check the pattern")
            files.extend(matches)
        elif Path(entry).is_dir():
            matches = sorted(Path(entry).rglob("*.parquet"))
            if not matches:
                raise ConfigError(
                    f"data directory {entry} holds no .parquet files; "
                    "point data.path at a parquet file or a folder of them"
                )
            files.extend(matches)
        elif Path(entry).is_file():
            files.append(Path(entry))
        else:
            raise ConfigError(f"data file {entry} does not exist; check data.path / data.paths")
    return files


def hub_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("FINEWEB_GPT_CACHE", "~/.cache/fineweb_gpt")).expanduser()


def download_hub_files(repo: str, pattern: str, cache_dir: str | None = None) -> list[Path]:
    """Download the dataset files of `repo` matching `pattern` once; later runs reuse them.

    Files land at <cache_dir>/<repo>/<path in repo>, so a cache can also be filled by hand
    (or by tests) and used with no network.
    """
    from huggingface_hub import hf_hub_download, list_repo_files

    local_root = hub_cache_dir(cache_dir) / repo
    cached = sorted(p for p in local_root.glob(pattern) if p.is_file()) if local_root.is_dir() else []
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        names = [str(p.relative_to(local_root)) for p in cached]
    else:
        try:
            names = sorted(fnmatch.filter(list_repo_files(repo, repo_type="dataset"), pattern))
        except Exception as err:  # no network, unknown repo, auth: all end the same way
            if not cached:
                raise ConfigError(
                    f"cannot list {repo} on the Hugging Face hub ({type(err).__name__}) and no files matching "
                    f"{pattern} are cached in {local_root}; check the network and data.hf_repo, or use data.paths"
                ) from err
            log.warning("Hugging Face hub unreachable; using the %d cached files of %s", len(cached), repo)
            names = [str(p.relative_to(local_root)) for p in cached]
    if not names:
        where = f"cached in {local_root} (offline)" if offline else f"in {repo}"
        raise ConfigError(f"no files matching {pattern} {where}; check data.hf_files")
    files = []
    for name in names:
        local = local_root / name
        if not local.is_file():
            if offline:
                raise ConfigError(f"{repo}/{name} is not cached in {local_root} and HF_HUB_OFFLINE is set")
            log.info("Downloading %s/%s to %s", repo, name, local_root)
            hf_hub_download(repo, name, repo_type="dataset", local_dir=local_root)
        files.append(local)
    return files


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


@contextmanager
def reading(path: Path):
    """Turn pyarrow's errors on a damaged file into one line naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"{path} could not be read ({one_line(err)}); re-download or remove it") from err


@dataclass(frozen=True)
class ParquetInfo:
    path: Path
    row_group_rows: tuple[int, ...]
    text_bytes: int  # uncompressed size of the text column, from the file's metadata
    has_id: bool
    has_token_count: bool

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


def inspect_parquet(path: Path, text_column: str) -> ParquetInfo:
    """Read a file's footer and refuse it with one clear line if it cannot be trained on."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ConfigError(f"{path} is not a readable parquet file ({one_line(err)}); re-download or remove it") from err
    names = parquet.schema_arrow.names
    if text_column not in names:
        raise ConfigError(
            f"{path} has no '{text_column}' column (columns: {', '.join(names)}); "
            "set data.text_column to the column holding the documents"
        )
    meta = parquet.metadata
    if meta.num_rows == 0:
        raise ConfigError(f"{path} has no rows; remove it from data.path / data.paths")
    text_index = names.index(text_column)
    row_groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    return ParquetInfo(
        path=path,
        row_group_rows=tuple(rg.num_rows for rg in row_groups),
        # Each value is stored with a 4-byte length prefix.
        text_bytes=sum(rg.column(text_index).total_uncompressed_size - 4 * rg.num_rows for rg in row_groups),
        has_id="id" in names,
        has_token_count="token_count" in names,
    )


# --- documents -------------------------------------------------------------------------


def is_validation_document(key: str, val_fraction: float) -> bool:
    """Deterministic, order-free split: the same document is always on the same side."""
    return zlib.crc32(key.encode("utf-8")) % 1_000_000 < val_fraction * 1_000_000


def document_keys(ids: list | None, path: Path, first_row: int, count: int) -> list[str]:
    """The id column when there is one, else the file name and row number."""
    if ids is not None:
        return [str(i) for i in ids]
    return [f"{path.name}:{first_row + i}" for i in range(count)]


def tokenize_documents(texts: list[str]) -> np.ndarray:
    """Token ids of all documents, each followed by <|endoftext|>, as one int64 array."""
    enc = gpt2_tokenizer()
    end = np.array([END_OF_TEXT_ID], dtype=np.int64)
    parts = [part for text in texts for part in (enc.encode_to_numpy(text).astype(np.int64), end)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def read_documents(files: list[Path], text_column: str) -> tuple[list[str], list[str]]:
    """(keys, texts) of every non-empty document of small files, read whole (tests, tools)."""
    keys, texts = [], []
    for path in files:
        inspect_parquet(path, text_column)
        table = pq.read_table(path)
        file_keys = document_keys(
            table.column("id").to_pylist() if "id" in table.column_names else None, path, 0, table.num_rows
        )
        for key, text in zip(file_keys, table.column(text_column).to_pylist()):
            if text:
                keys.append(key)
                texts.append(text)
    return keys, texts


# --- the training stream ---------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A share of one row group: rows [row_start, row_stop) of it."""

    file: int
    row_group: int
    row_start: int
    row_stop: int


def plan_units(infos: list[ParquetInfo], num_streams: int) -> list[Unit]:
    """All row groups, each cut into equal row ranges when there are fewer than streams."""
    row_groups = [(f, g, rows) for f, info in enumerate(infos) for g, rows in enumerate(info.row_group_rows) if rows]
    pieces = max(1, -(-num_streams // len(row_groups)))
    units = []
    for f, g, rows in row_groups:
        bounds = np.linspace(0, rows, pieces + 1).astype(int)
        units += [Unit(f, g, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return units


@dataclass
class StreamPosition:
    """Where a stream is: the next window to yield, and the state needed to rebuild it."""

    epoch: int = 0
    unit: int = 0  # index into the stream's units for this epoch
    chunk: int = 0  # index of the chunk of rows within the unit
    window: int = 0  # windows of the chunk already yielded
    carry: list[int] = field(default_factory=list)  # tokens carried into the chunk
    skipped: int = 0  # empty documents skipped this epoch

    def to_dict(self) -> dict:
        return asdict(self)


class TokenWindowStream(IterableDataset):
    """Endless micro-batches of (micro_batch_size, block_size + 1) token windows.

    Yields dicts: windows (int64 tensor), stream (int), position (StreamPosition as dict).
    """

    def __init__(
        self,
        infos: list[ParquetInfo],
        text_column: str,
        val_fraction: float,
        block_size: int,
        micro_batch_size: int,
        rows_per_chunk: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        start: dict[int, StreamPosition] | None = None,
        rotation: int = 0,
    ):
        self.infos = infos
        self.text_column = text_column
        self.val_fraction = val_fraction
        self.window = block_size + 1
        self.micro_batch_size = micro_batch_size
        self.rows_per_chunk = rows_per_chunk
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = max(1, num_workers)
        self.units = plan_units(infos, self.workers * world_size)
        self.start = start or {}
        # A resumed DataLoader starts again at worker 0; rotating which stream each worker
        # plays keeps the round-robin order of batches where the interrupted run left it.
        self.rotation = rotation

    def stream_id(self, worker: int) -> int:
        return self.rank * self.workers + (worker + self.rotation) % self.workers

    def stream_units(self, stream: int, epoch: int) -> list[int]:
        """Indices of this stream's units for the epoch: all units shuffled, dealt round-robin."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return order[stream :: self.workers * self.world_size].tolist()

    def chunks(self, unit: Unit):
        """Lists of texts of training documents, in row order, with the empties counted."""
        info = self.infos[unit.file]
        columns = [self.text_column] + (["id"] if info.has_id else [])
        parquet = pq.ParquetFile(info.path)
        group_start = sum(info.row_group_rows[: unit.row_group])  # the row group's first row in the file
        row = 0  # the batch's first row within the row group
        with reading(info.path):
            for batch in parquet.iter_batches(self.rows_per_chunk, row_groups=[unit.row_group], columns=columns):
                lo, hi = max(unit.row_start - row, 0), min(unit.row_stop - row, batch.num_rows)
                if hi > lo:
                    texts = batch.column(self.text_column)[lo:hi].to_pylist()
                    ids = batch.column("id")[lo:hi].to_pylist() if info.has_id else None
                    keys = document_keys(ids, info.path, group_start + row + lo, len(texts))
                    kept = [t for k, t in zip(keys, texts) if not is_validation_document(k, self.val_fraction)]
                    yield [t for t in kept if t], sum(1 for t in kept if not t)
                row += batch.num_rows
                if row >= unit.row_stop:
                    return

    def stream_windows(self, stream: int):
        """(window, position after it) for one stream, epoch after epoch, from its start position."""
        pos = self.start.get(stream, StreamPosition())
        epoch, carry, skipped = pos.epoch, np.array(pos.carry, dtype=np.int64), pos.skipped
        resume = (pos.unit, pos.chunk, pos.window)
        while True:
            units = self.stream_units(stream, epoch)
            produced = 0
            for u in range(resume[0], len(units)):
                for c, (texts, empty) in enumerate(self.chunks(self.units[units[u]])):
                    if (u, c) < resume[:2]:
                        continue
                    first_window = resume[2] if (u, c) == resume[:2] else 0
                    if first_window == 0:
                        skipped += empty
                    tokens = np.concatenate([carry, tokenize_documents(texts)])
                    count = len(tokens) // self.window
                    windows = tokens[: count * self.window].reshape(count, self.window)
                    order = np.random.default_rng([self.seed, epoch, units[u], c]).permutation(count)
                    for w in range(first_window, count):
                        yield windows[order[w]], StreamPosition(epoch, u, c, w + 1, carry.tolist(), skipped)
                    produced += count - first_window
                    carry = tokens[count * self.window :]
            if produced == 0 and resume == (0, 0, 0):
                raise ConfigError(
                    f"data stream {stream} got no full window of {self.window} tokens in a whole epoch; "
                    "use more data, fewer data.num_workers or devices, or a smaller model.block_size"
                )
            epoch, carry, skipped, resume = epoch + 1, np.empty(0, dtype=np.int64), 0, (0, 0, 0)

    def __iter__(self):
        worker = get_worker_info()
        stream = self.stream_id(worker.id if worker else 0)
        batch, position = [], None
        for window, position in self.stream_windows(stream):
            batch.append(window)
            if len(batch) == self.micro_batch_size:
                yield {"windows": torch.from_numpy(np.stack(batch)), "stream": stream, "position": position.to_dict()}
                batch = []


class PackedWindows(Dataset):
    """Non-overlapping windows of block_size + 1 tokens; the last partial window is dropped."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens = tokens
        self.window = block_size + 1

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[index * self.window : (index + 1) * self.window].astype(np.int64))


# --- the DataModule --------------------------------------------------------------------


class FineWebDataModule(L.LightningDataModule):
    def __init__(
        self,
        block_size: int,
        micro_batch_size: int,
        path: str | None = None,
        paths: list[str] | None = None,
        bundled_sample: bool = False,
        hf_repo: str | None = None,
        hf_files: str | None = None,
        cache_dir: str | None = None,
        text_column: str = "text",
        val_fraction: float = 0.005,
        val_tokens: int | None = 1_048_576,  # None: every held-out token
        num_workers: int = 2,
        rows_per_chunk: int = 1024,
        seed: int = 1337,
    ):
        super().__init__()
        # 1 holds out every document: nothing to train on, but a whole file to score (fineweb_gpt.evaluate).
        if not 0.0 < val_fraction <= 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must be above 0 and at most 1 (e.g. 0.005)")
        if bool(hf_repo) != bool(hf_files):
            raise ConfigError(
                "data.hf_repo and data.hf_files go together, e.g. data.hf_repo=HuggingFaceFW/fineweb "
                "data.hf_files='sample/10BT/00[0-3]_00000.parquet'"
            )
        self.hub = (hf_repo, hf_files, cache_dir) if hf_repo else None
        self.text_column = text_column
        self.val_fraction = val_fraction
        self.val_tokens = val_tokens
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.rows_per_chunk = rows_per_chunk
        self.seed = seed
        # Local files are checked now, so a bad path stops the run before anything starts.
        files = [bundled_sample_path()] if bundled_sample else None if self.hub else resolve_parquet_files(path, paths)
        self.infos = [inspect_parquet(f, text_column) for f in files] if files else None
        self.val_windows: PackedWindows | None = None
        self.unique_train_tokens: int | None = None
        self.unique_train_tokens_estimated = True
        self.positions: dict[int, StreamPosition] = {}  # of the last batch trained on, per stream
        self.batches_consumed = 0  # on this rank
        self.world_size = 1

    def prepare_data(self) -> None:
        if self.hub:  # once per node, before setup on every rank
            download_hub_files(*self.hub)

    @property
    def files(self) -> list[Path]:
        return [info.path for info in self.infos]

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.val_fraction >= 1.0:
            raise ConfigError("data.val_fraction=1 holds out every document, leaving none to train on; use e.g. 0.005")
        if self.val_windows is not None:
            return
        if self.infos is None:
            self.infos = [inspect_parquet(f, self.text_column) for f in download_hub_files(*self.hub)]
        if self.trainer is not None:
            self.world_size = self.trainer.world_size
        self.val_windows = PackedWindows(self.read_validation_tokens(), self.block_size)
        if len(self.val_windows) == 0:
            raise ConfigError(
                f"the held-out documents (data.val_fraction={self.val_fraction}) hold less than one window of "
                f"{self.block_size + 1} tokens; raise data.val_fraction or use more data"
            )
        self.unique_train_tokens, self.unique_train_tokens_estimated = self.count_train_tokens()

    def read_validation_tokens(self) -> np.ndarray:
        """Tokens of held-out documents in file order, up to val_tokens windows' worth."""
        wanted = math.inf if self.val_tokens is None else -(-self.val_tokens // self.block_size) * (self.block_size + 1)
        parts, total = [], 0
        for info in self.infos:
            parquet = pq.ParquetFile(info.path)
            first_row = 0
            for group, rows in enumerate(info.row_group_rows):
                with reading(info.path):
                    ids = parquet.read_row_group(group, columns=["id"]).column(0).to_pylist() if info.has_id else None
                keys = document_keys(ids, info.path, first_row, rows)
                held_out = [i for i, k in enumerate(keys) if is_validation_document(k, self.val_fraction)]
                first_row += rows
                if not held_out:
                    continue
                with reading(info.path):
                    texts = parquet.read_row_group(group, columns=[self.text_column]).column(0).take(held_out)
                tokens = tokenize_documents([t for t in texts.to_pylist() if t])
                parts.append(tokens)
                total += len(tokens)
                if total >= wanted:
                    return np.concatenate(parts)[:wanted]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def count_train_tokens(self) -> tuple[int, bool]:
        """Tokens in one pass over the training documents: (count, whether it is an estimate).

        FineWeb's token_count column holds GPT-2 counts; other files are estimated from the
        tokens per byte of their first chunk and the text size in their metadata.
        """
        if all(info.has_token_count for info in self.infos):
            total = 0
            for info in self.infos:
                with reading(info.path):
                    counts = pq.read_table(info.path, columns=["token_count"]).column(0)
                total += int(counts.to_numpy(zero_copy_only=False).sum()) + info.num_rows
            return int(total * (1 - self.val_fraction)), True
        with reading(self.infos[0].path):
            sample = pq.ParquetFile(self.infos[0].path).read_row_group(0, columns=[self.text_column]).column(0)
        texts = [t for t in sample.to_pylist()[: self.rows_per_chunk] if t]
        per_byte = len(tokenize_documents(texts)) / max(1, sum(len(t.encode("utf-8")) for t in texts))
        total_bytes = sum(info.text_bytes for info in self.infos)
        return int(total_bytes * per_byte * (1 - self.val_fraction)), True

    @property
    def epochs_seen(self) -> float:
        """Epochs of training data consumed so far by all ranks: 1.25 is a quarter into the second."""
        windows = self.batches_consumed * self.micro_batch_size * self.world_size
        return windows * (self.block_size + 1) / max(1, self.unique_train_tokens or 1)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = TokenWindowStream(
            self.infos,
            self.text_column,
            self.val_fraction,
            self.block_size,
            self.micro_batch_size,
            self.rows_per_chunk,
            self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=self.world_size,
            num_workers=self.num_workers,
            start=self.positions,
            rotation=self.batches_consumed,
        )
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        # The same windows in the same order at every evaluation.
        return DataLoader(
            self.val_windows, batch_size=self.micro_batch_size, shuffle=False, pin_memory=torch.cuda.is_available()
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called for the batch about to be trained on (not for batches prefetched ahead of
        # it), so the recorded positions are exactly what the model has consumed.
        if isinstance(batch, dict):
            self.positions[int(batch["stream"])] = StreamPosition(**batch["position"])
            self.batches_consumed += 1
            return batch["windows"]
        return batch

    def state_dict(self) -> dict:
        positions = {stream: pos.to_dict() for stream, pos in self.positions.items()}
        consumed = [self.batches_consumed]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (positions, self.batches_consumed))
            positions = {s: p for rank_positions, _ in gathered for s, p in rank_positions.items()}
            consumed = [c for _, c in gathered]
        return {
            "positions": positions,
            "batches_consumed": consumed,
            "num_workers": max(1, self.num_workers),
            "world_size": len(consumed),
        }

    def load_state_dict(self, state: dict) -> None:
        world_size = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        if state["num_workers"] != max(1, self.num_workers) or state["world_size"] != world_size:
            log.warning(
                "The checkpoint's data position was saved with %d rank(s) x %d worker(s), this run has %d x %d: "
                "data restarts at the beginning of the epoch",
                state["world_size"],
                state["num_workers"],
                world_size,
                max(1, self.num_workers),
            )
            epoch = min((p["epoch"] for p in state["positions"].values()), default=0)
            self.positions = {s: StreamPosition(epoch=epoch) for s in range(world_size * max(1, self.num_workers))}
            return
        self.positions = {int(s): StreamPosition(**p) for s, p in state["positions"].items()}
        self.batches_consumed = state["batches_consumed"][rank]
