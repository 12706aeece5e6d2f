"""Which documents are held out for validation, and the fixed validation set built from them.

A document is held out by a hash of its key, so the split never depends on file order, on
how rows are dealt to ranks and workers, or on the source: the parquet path, the Hub stream
and `fineweb-gpt-tokenize` hold out the very same documents. The key is the `id` column
(FineWeb has one); without it, the file name and row number (parquet files) or the text
itself (a Hub stream, which has no file rows to name).

The validation set is the first val_tokens (rounded up to whole windows) of the held-out
documents' tokens, in reading order: the same windows at every evaluation.
"""

import sys
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fineweb_gpt.data.parquet_files import ParquetInfo, inspect_parquet, reading
from fineweb_gpt.data.tokens import NO_TOKENS, tokenize_documents


def is_validation_document(key: str, val_fraction: float) -> bool:
    """Deterministic, order-free split: the same document is always on the same side."""
    return zlib.crc32(key.encode("utf-8")) % 1_000_000 < val_fraction * 1_000_000


def document_keys(ids: list | None, path: Path, first_row: int, count: int) -> list[str]:
    """The id column when there is one, else the file name and row number."""
    if ids is not None:
        return [str(i) for i in ids]
    return [f"{path.name}:{first_row + i}" for i in range(count)]


def validation_tokens_wanted(val_tokens: int | None, block_size: int) -> int:
    """val_tokens rounded up to whole windows of block_size + 1 tokens; None: every held-out token."""
    if val_tokens is None:
        return sys.maxsize
    return -(-val_tokens // block_size) * (block_size + 1)


def first_tokens(held_out_chunks: Iterable[list[str]], wanted: int) -> np.ndarray:
    """Tokens of the held-out documents, chunk after chunk, up to `wanted` of them."""
    parts, total = [], 0
    for texts in held_out_chunks:
        tokens = tokenize_documents([t for t in texts if t])
        parts.append(tokens)
        total += len(tokens)
        if total >= wanted:
            break
    return np.concatenate(parts)[:wanted] if parts else NO_TOKENS


def held_out_texts(infos: list[ParquetInfo], text_column: str, val_fraction: float):
    """Texts of the held-out documents of parquet files, one list per row group, in file order.

    Only the id column is read for the whole row group; the text of held-out rows alone.
    """
    for info in infos:
        parquet = pq.ParquetFile(info.path)
        first_row = 0
        for group, rows in enumerate(info.row_group_rows):
            with reading(info.path):
                ids = parquet.read_row_group(group, columns=["id"]).column(0).to_pylist() if info.has_id else None
            keys = document_keys(ids, info.path, first_row, rows)
            first_row += rows
            held_out = [i for i, k in enumerate(keys) if is_validation_document(k, val_fraction)]
            if held_out:
                with reading(info.path):
                    texts = parquet.read_row_group(group, columns=[text_column]).column(0).take(held_out)
                yield texts.to_pylist()


def read_documents(files: list[Path], text_column: str) -> tuple[list[str], list[str]]:
    """(keys, texts) of every non-empty document of small files, read whole (tests, tools)."""
    keys, texts = [], []
    for path in files:
        inspect_parquet(path, text_column)
        table = pq.read_table(path)
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        for key, text in zip(document_keys(ids, path, 0, table.num_rows), table.column(text_column).to_pylist()):
            if text:
                keys.append(key)
                texts.append(text)
    return keys, texts
