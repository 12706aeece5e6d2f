"""Training data: sources -> documents -> GPT-2 token ids -> packed windows -> micro-batches.

Three sources, one per DataModule (datamodules.py), chosen with `data=`:

- parquet files (`data=sample`, `single_parquet`, `multi_shard`): local files, folders and
  globs, or files of a Hub repository downloaded once into the Hugging Face cache
  (parquet_files.py, hub_files.py), read by row groups with pyarrow (parquet_stream.py);
- a Hub stream (`data=hf_stream`): any `datasets` dataset streamed with no whole-file
  download, e.g. FineWeb's sample-10BT, or local parquet files through the same call
  (hf_stream.py; `datasets` is imported only when this source is used);
- token shards (`data=token_shards`): llm.c-format .bin files made by `fineweb-gpt-tokenize`
  (or by llm.c / modded-nanogpt), memory-mapped, nothing tokenized while training
  (token_shards.py).

How data flows: each DataLoader worker of each rank is one stream, and every unit of the
data (a row group, a range of windows) is dealt to exactly one stream per epoch
(ranks_and_workers.py). A stream drops the held-out documents (holdout.py), tokenizes the
rest as plain text with an <|endoftext|> after each, and packs non-overlapping windows of
block_size + 1 tokens (tokens.py), shuffled within a chunk; so every token of every training
document is trained on exactly once per epoch, except one partial window per stream. The
DataLoaders are made in one place (loader.py); the shared settings are checked in one place
before anything is read (settings.py).

Exact resume: every micro-batch carries its stream's position; the DataModule records the
position of each batch the model actually trains on and saves it in Lightning checkpoints,
and a resumed run continues with the very batches the uninterrupted run would have seen,
bit for bit, for all three sources (each module says why it holds for its source).

Validation: documents are held out by a hash of their id, the same documents whatever the
source; the first val_tokens of them form a fixed set scored at every evaluation.

Nothing here reads a file or imports `datasets` at import time.
"""

import importlib

from fineweb_gpt.data.holdout import is_validation_document, read_documents
from fineweb_gpt.data.parquet_files import bundled_sample_path, inspect_parquet, resolve_parquet_files
from fineweb_gpt.data.parquet_stream import StreamPosition, TokenWindowStream
from fineweb_gpt.data.settings import DataSettings
from fineweb_gpt.data.tokens import PackedWindows, tokenize_documents

__all__ = [
    "DataSettings",
    "FineWebDataModule",
    "HubStreamDataModule",
    "PackedWindows",
    "StreamPosition",
    "TokenShardDataModule",
    "TokenWindowStream",
    "bundled_sample_path",
    "inspect_parquet",
    "is_validation_document",
    "make_loader",
    "read_documents",
    "resolve_parquet_files",
    "tokenize_documents",
]


LIGHTNING_USERS = {
    "FineWebDataModule": "fineweb_gpt.data.datamodules",
    "HubStreamDataModule": "fineweb_gpt.data.datamodules",
    "TokenShardDataModule": "fineweb_gpt.data.datamodules",
    "make_loader": "fineweb_gpt.data.loader",
}


def __getattr__(name: str):
    """The DataModules and the DataLoaders on first use (the config's `_target_:
    fineweb_gpt.data.FineWebDataModule`): they bring in Lightning, which fineweb-gpt-tokenize and
    the doctor never need."""
    if name in LIGHTNING_USERS:
        return getattr(importlib.import_module(LIGHTNING_USERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
