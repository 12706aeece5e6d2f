"""FineWeb parquet files -> documents -> GPT-2 token ids -> packed training windows.

Each document's tokens are followed by <|endoftext|>, documents are concatenated, and the
stream is cut into non-overlapping windows of block_size + 1 tokens (inputs are the first
block_size, targets the last block_size), so no token is padding and none is used twice.
Validation documents are held out by a hash of their id, so the split never depends on
file order and never overlaps training.

This loader reads its files into memory, which suits the bundled sample; large shards
need the streaming loader.
"""

import glob
import zlib
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer


def bundled_sample_path() -> Path:
    """800 real FineWeb sample-10BT documents (ODC-By), shipped with the package."""
    return Path(str(resources.files("fineweb_gpt") / "assets" / "fineweb_sample10BT_800.parquet"))


def resolve_parquet_files(path: str | None = None, paths: list[str] | None = None) -> list[Path]:
    """Expand data.path / data.paths (files, directories or globs) into parquet files."""
    if path is None and not paths:
        return [bundled_sample_path()]
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


def is_validation_document(doc_id: str, val_fraction: float) -> bool:
    """Deterministic, order-free split: the same document is always on the same side."""
    return zlib.crc32(doc_id.encode("utf-8")) % 1_000_000 < val_fraction * 1_000_000


def read_documents(files: list[Path], text_column: str) -> tuple[list[str], list[str]]:
    """Return (ids, texts) of every non-empty document; ids fall back to the text's hash."""
    ids, texts = [], []
    for file in files:
        try:
            schema = pq.read_schema(file)
            if text_column not in schema.names:
                raise ConfigError(
                    f"{file} has no '{text_column}' column (columns: {', '.join(schema.names)}); "
                    "set data.text_column to the column holding the documents"
                )
            columns = [text_column] + (["id"] if "id" in schema.names else [])
            table = pq.read_table(file, columns=columns)
        except (pa.ArrowInvalid, OSError) as err:
            raise ConfigError(f"{file} is not a readable parquet file ({err}); re-download or remove it") from err
        if table.num_rows == 0:
            raise ConfigError(f"{file} has no rows; remove it from data.path / data.paths")
        file_texts = table.column(text_column).to_pylist()
        file_ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(file_texts)
        for doc_id, text in zip(file_ids, file_texts):
            if text:
                texts.append(text)
                ids.append(doc_id if doc_id is not None else str(zlib.crc32(text.encode("utf-8"))))
    return ids, texts


def tokenize_documents(texts: list[str]) -> np.ndarray:
    """Token ids of all documents, each followed by <|endoftext|>, as one uint16 array."""
    encoded = gpt2_tokenizer().encode_ordinary_batch(texts)
    total = sum(len(tokens) + 1 for tokens in encoded)
    out = np.empty(total, dtype=np.uint16)  # GPT-2 ids are below 65536
    position = 0
    for tokens in encoded:
        out[position : position + len(tokens)] = tokens
        out[position + len(tokens)] = END_OF_TEXT_ID
        position += len(tokens) + 1
    return out


class PackedWindows(Dataset):
    """Non-overlapping windows of block_size + 1 tokens; the last partial window is dropped."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens = tokens
        self.window = block_size + 1

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[index * self.window : (index + 1) * self.window].astype(np.int64))
        return chunk[:-1], chunk[1:]


class FineWebDataModule(L.LightningDataModule):
    def __init__(
        self,
        block_size: int,
        micro_batch_size: int,
        path: str | None = None,
        paths: list[str] | None = None,
        text_column: str = "text",
        val_fraction: float = 0.05,
        val_tokens: int = 65536,
        num_workers: int = 0,
    ):
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.05)")
        self.files = resolve_parquet_files(path, list(paths) if paths else None)
        self.text_column = text_column
        self.val_fraction = val_fraction
        self.val_tokens = val_tokens
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.train_windows: PackedWindows | None = None
        self.val_windows: PackedWindows | None = None

    @property
    def unique_train_tokens(self) -> int:
        """Tokens in one pass over the training windows (what one epoch feeds the model)."""
        return len(self.train_windows) * self.block_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        ids, texts = read_documents(self.files, self.text_column)
        held_out = [is_validation_document(doc_id, self.val_fraction) for doc_id in ids]
        train_texts = [t for t, val in zip(texts, held_out) if not val]
        val_texts = [t for t, val in zip(texts, held_out) if val]
        if not val_texts or not train_texts:
            raise ConfigError(
                f"{len(texts)} documents give {len(train_texts)} for training and {len(val_texts)} for "
                "validation; use more data or change data.val_fraction"
            )
        self.train_windows = PackedWindows(tokenize_documents(train_texts), self.block_size)
        self.val_windows = PackedWindows(tokenize_documents(val_texts), self.block_size)
        if len(self.train_windows) < self.micro_batch_size:
            raise ConfigError(
                f"the training documents fill {len(self.train_windows)} windows of {self.block_size + 1} "
                f"tokens, fewer than one micro-batch of {self.micro_batch_size}; use more data"
            )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_windows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # Always the same leading windows, so every evaluation scores the same tokens.
        windows = max(1, min(len(self.val_windows), -(-self.val_tokens // self.block_size)))
        return self._loader(torch.utils.data.Subset(self.val_windows, range(windows)), shuffle=False)
