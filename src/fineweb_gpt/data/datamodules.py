"""The LightningDataModules, one per source: parquet files, a Hub stream, token shards.

What they share lives in StreamDataModule: the settings (checked before anything is read),
the fixed validation windows, the position of every stream in the batches actually trained
on (saved in Lightning checkpoints: exact resume), and the counts a run reports (`files`,
`unique_train_tokens`, `unique_train_tokens_estimated`, `epochs_seen`).
"""

import logging
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from fineweb_gpt.data.hf_stream import HubTextStream, held_out_chunks, local_parquet_files, open_hub_dataset
from fineweb_gpt.data.holdout import first_tokens, held_out_texts, validation_tokens_wanted
from fineweb_gpt.data.hub_files import download_hub_files
from fineweb_gpt.data.loader import make_loader
from fineweb_gpt.data.parquet_files import (
    as_list,
    bundled_sample_path,
    estimate_train_tokens,
    expand_paths,
    inspect_parquet,
    resolve_parquet_files,
)
from fineweb_gpt.data.parquet_stream import TokenWindowStream
from fineweb_gpt.data.ranks_and_workers import TrainStream
from fineweb_gpt.data.settings import DataSettings
from fineweb_gpt.data.token_shards import TokenShardStream, check_token_ids, memmap_tokens, read_token_count
from fineweb_gpt.data.tokens import PackedWindows
from fineweb_gpt.errors import ConfigError

log = logging.getLogger("fineweb_gpt")


class StreamDataModule(L.LightningDataModule):
    """What every source shares. A source sets `files` and the token counts in open_source(),
    returns its held-out tokens from validation_tokens(), and its stream from train_stream()."""

    too_little_validation = "raise data.val_fraction or use more data"

    def __init__(self, settings: DataSettings):
        super().__init__()
        self.settings = settings
        self.block_size = settings.block_size
        self.micro_batch_size = settings.micro_batch_size
        self.files: list[Path] = []
        self.unique_train_tokens: int | None = None
        self.unique_train_tokens_estimated = True
        self.val_windows: PackedWindows | None = None
        self.positions: dict[int, dict] = {}  # of the last batch trained on, per stream
        self.batches_consumed = 0  # on this rank
        self.world_size = 1

    # --- what a source provides ---------------------------------------------------------

    def open_source(self) -> None:
        raise NotImplementedError

    def validation_tokens(self, wanted: int) -> np.ndarray:
        raise NotImplementedError

    def train_stream(self, rank: int) -> TrainStream:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.settings.val_fraction >= 1.0:
            raise ConfigError("data.val_fraction=1 holds out every document, leaving none to train on; use e.g. 0.01")
        if self.val_windows is not None:
            return
        if self.trainer is not None:
            self.world_size = self.trainer.world_size
        self.open_source()
        tokens = self.validation_tokens(validation_tokens_wanted(self.settings.val_tokens, self.block_size))
        self.val_windows = PackedWindows(tokens, self.block_size)
        if len(self.val_windows) == 0:
            raise ConfigError(
                f"the held-out documents hold less than one window of {self.settings.window} tokens; "
                f"{self.too_little_validation}"
            )

    @property
    def epochs_seen(self) -> float | None:
        """Epochs of training data consumed so far by all ranks: 1.25 is a quarter into the second."""
        if not self.unique_train_tokens:
            return None
        windows = self.batches_consumed * self.micro_batch_size * self.world_size
        return windows * self.settings.window / self.unique_train_tokens

    def train_dataloader(self):
        return make_loader(self.train_stream(self.rank), num_workers=self.settings.num_workers)

    def val_dataloader(self):
        # The same windows in the same order at every evaluation.
        return make_loader(self.val_windows, batch_size=self.micro_batch_size, evaluation=True)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called for the batch about to be trained on (not for batches prefetched ahead of
        # it), so the recorded positions are exactly what the model has consumed.
        if isinstance(batch, dict):
            self.positions[int(batch["stream"])] = batch["position"]
            self.batches_consumed += 1
            return batch["windows"]
        return batch

    def state_dict(self) -> dict:
        positions, consumed = dict(self.positions), [self.batches_consumed]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (positions, self.batches_consumed))
            positions = {s: p for rank_positions, _ in gathered for s, p in rank_positions.items()}
            consumed = [c for _, c in gathered]
        return {
            "positions": positions,
            "batches_consumed": consumed,
            "num_workers": self.settings.workers,
            "world_size": len(consumed),
        }

    def load_state_dict(self, state: dict) -> None:
        world_size = self.trainer.world_size if self.trainer else 1
        workers = self.settings.workers
        if state["num_workers"] != workers or state["world_size"] != world_size:
            log.warning(
                "The checkpoint's data position was saved with %d rank(s) x %d worker(s), this run has %d x %d: "
                "data restarts at the beginning of the epoch",
                state["world_size"],
                state["num_workers"],
                world_size,
                workers,
            )
            epoch = min((p["epoch"] for p in state["positions"].values()), default=0)
            self.positions = {s: {"epoch": epoch} for s in range(world_size * workers)}
            return
        self.positions = {int(s): p for s, p in state["positions"].items()}
        self.batches_consumed = state["batches_consumed"][self.rank]


class FineWebDataModule(StreamDataModule):
    """Parquet files: local (data.path / data.paths), the bundled sample, or a Hub repository's files."""

    def __init__(
        self,
        block_size: int,
        micro_batch_size: int,
        path: str | None = None,
        paths=None,
        bundled_sample: bool = False,
        hf_repo: str | None = None,
        hf_files=None,
        cache_dir: str | None = None,
        **shared,  # text_column, val_fraction, val_tokens, num_workers, rows_per_chunk, seed: see DataSettings
    ):
        super().__init__(DataSettings(block_size, micro_batch_size, **shared))
        if bool(hf_repo) != bool(hf_files):
            raise ConfigError(
                "data.hf_repo and data.hf_files go together, e.g. data.hf_repo=HuggingFaceFW/fineweb "
                "data.hf_files='sample/10BT/00[0-3]_00000.parquet'"
            )
        self.hub = (hf_repo, hf_files, cache_dir) if hf_repo else None
        # Local files are checked now, so a bad path stops the run before anything starts.
        files = [bundled_sample_path()] if bundled_sample else None if self.hub else resolve_parquet_files(path, paths)
        self.infos = [inspect_parquet(f, self.settings.text_column) for f in files] if files else None
        self.files = files or []

    def prepare_data(self) -> None:
        if self.hub:  # Lightning runs this on one process per node, before setup on every rank
            download_hub_files(*self.hub)

    def open_source(self) -> None:
        if self.infos is None:  # the other ranks find the files prepare_data put in the cache
            self.files = download_hub_files(*self.hub, local_only=True)
            self.infos = [inspect_parquet(f, self.settings.text_column) for f in self.files]
        s = self.settings
        self.unique_train_tokens = estimate_train_tokens(self.infos, s.text_column, s.val_fraction)

    def validation_tokens(self, wanted: int) -> np.ndarray:
        return first_tokens(held_out_texts(self.infos, self.settings.text_column, self.settings.val_fraction), wanted)

    def train_stream(self, rank: int) -> TrainStream:
        return TokenWindowStream(
            self.infos, self.settings, rank, self.world_size, self.positions, self.batches_consumed
        )


class HubStreamDataModule(StreamDataModule):
    """A `datasets` dataset, streamed: a Hub repository, or a builder such as parquet for local files."""

    def __init__(
        self,
        block_size: int,
        micro_batch_size: int,
        dataset: str | None = None,
        name: str | None = None,
        data_files=None,
        split: str = "train",
        revision: str | None = None,
        **shared,  # text_column, val_fraction, val_tokens, num_workers, rows_per_chunk, seed: see DataSettings
    ):
        super().__init__(DataSettings(block_size, micro_batch_size, **shared))
        if not dataset:
            raise ConfigError(
                "data.dataset has no value: name a Hub dataset, e.g. data.dataset=HuggingFaceFW/fineweb "
                "data.name=sample-10BT, or local parquet files: data.dataset=parquet 'data.data_files=/data/*.parquet'"
            )
        # data.data_files={train:[...]} arrives as a DictConfig, which datasets would read as a list of its keys.
        if isinstance(data_files, (DictConfig, ListConfig)):
            data_files = OmegaConf.to_container(data_files)
        self.source = dict(dataset=dataset, name=name, data_files=data_files, split=split, revision=revision)
        self.described = f"data.dataset={dataset}"
        self.stream = None
        self.key_column = None

    def open_source(self) -> None:
        s = self.settings
        self.files = local_parquet_files(self.source["dataset"], self.source["data_files"], self.source["split"])
        self.stream, self.key_column = open_hub_dataset(**self.source, text_column=s.text_column)
        if self.files:  # token counts are known (estimated) for local files only
            infos = [inspect_parquet(f, s.text_column) for f in self.files]
            self.unique_train_tokens = estimate_train_tokens(infos, s.text_column, s.val_fraction)

    def validation_tokens(self, wanted: int) -> np.ndarray:
        return first_tokens(held_out_chunks(self.stream, self.settings, self.key_column, self.described), wanted)

    def train_stream(self, rank: int) -> TrainStream:
        return HubTextStream(
            self.stream,
            self.key_column,
            self.described,
            self.settings,
            rank,
            self.world_size,
            self.positions,
            self.batches_consumed,
        )


# llm.c's and modded-nanogpt's validation shards are named like fineweb_val_000000.bin, as are ours.
VALIDATION_SHARD = re.compile(r"(^|[_\-.])val([_\-.]|$)")


class TokenShardDataModule(StreamDataModule):
    """llm.c-format token shards: the *_val_* shards are the validation set, the others train."""

    too_little_validation = "the validation shards are too short: give longer ones with data.val_paths"

    def __init__(
        self,
        block_size: int,
        micro_batch_size: int,
        paths,
        val_paths=None,
        val_tokens: int | None = 1_048_576,
        num_workers: int = 0,
        seed: int = 1337,
    ):
        super().__init__(
            DataSettings(block_size, micro_batch_size, val_tokens=val_tokens, num_workers=num_workers, seed=seed)
        )
        if not as_list(paths):
            raise ConfigError(
                "no token shards given: set data.paths to .bin files, folders or globs, "
                "e.g. data.paths=/data/fineweb10B"
            )
        found = expand_paths(as_list(paths), ".bin", "data.paths")
        explicit_val = expand_paths(as_list(val_paths), ".bin", "data.val_paths")
        train = [f for f in found if f not in explicit_val and (explicit_val or not VALIDATION_SHARD.search(f.stem))]
        val = explicit_val or [f for f in found if VALIDATION_SHARD.search(f.stem)]
        if not train:
            raise ConfigError(f"data.paths holds no training shards (only {', '.join(map(str, val))}); add them")
        if not val:
            raise ConfigError(
                "data.paths holds no validation shard (a file named like *_val_*.bin); give one with data.val_paths, "
                "or make shards with fineweb-gpt-tokenize, which writes one"
            )
        # Headers are checked now, so a file that is not a shard stops the run before anything starts.
        self.train_shards = [(f, read_token_count(f)) for f in train]
        self.val_shards = [(f, read_token_count(f)) for f in val]
        self.files = train
        self.unique_train_tokens = sum(count for _, count in self.train_shards)
        self.unique_train_tokens_estimated = False

    def open_source(self) -> None:
        pass  # everything was read from the headers

    def validation_tokens(self, wanted: int) -> np.ndarray:
        parts, total = [], 0
        for path, count in self.val_shards:
            tokens = memmap_tokens(path, count)[: wanted - total]
            check_token_ids(tokens, path)
            parts.append(np.array(tokens, dtype=np.int64))
            total += len(parts[-1])
            if total >= wanted:
                break
        return np.concatenate(parts)

    def train_stream(self, rank: int) -> TrainStream:
        return TokenShardStream(
            self.train_shards, self.settings, rank, self.world_size, self.positions, self.batches_consumed
        )
