"""Finding the parquet files a run trains on, and checking them before anything starts.

`data.path` / `data.paths` take files, folders and globs (one string is a list of one). Each
file's footer is read once: a file that cannot be trained on (unreadable, no rows, no text
column, a text column that holds no text) is refused with one line naming it and the fix.
"""

import glob
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fineweb_gpt.data.tokens import tokenize_documents
from fineweb_gpt.errors import ConfigError, one_line
from fineweb_gpt.safe_files import regular_file

log = logging.getLogger("fineweb_gpt")


def bundled_sample_path() -> Path:
    """800 real FineWeb sample-10BT documents (ODC-By), shipped with the package."""
    return Path(str(resources.files("fineweb_gpt") / "assets" / "fineweb_sample10BT_800.parquet"))


def as_list(paths) -> list[str]:
    """`data.paths=/data/shards` arrives as one string: a list of one, not of its characters."""
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


def expand_paths(entries: list[str], suffix: str, keys: str) -> list[Path]:
    """Files, folders (searched recursively) and globs -> the files ending in `suffix`, each entry
    sorted. Each must be a regular file: a named pipe or a device would make its reader wait for ever."""
    files: list[Path] = []
    fix = f"give {suffix} files in {keys}"
    for entry in entries:
        entry = str(Path(entry).expanduser())
        if glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True) if m.endswith(suffix))
            matches = [m for m in matches if not m.is_dir()]
            if not matches:
                raise ConfigError(f"data path {entry} matches no {suffix} files; check the pattern in {keys}")
            files.extend(regular_file(m, fix) for m in matches)
        elif Path(entry).is_dir():
            matches = sorted(p for p in Path(entry).rglob(f"*{suffix}") if not p.is_dir())
            if not matches:
                raise ConfigError(f"data directory {entry} holds no {suffix} files; point {keys} at them")
            files.extend(regular_file(m, fix) for m in matches)
        elif os.path.lexists(entry):
            files.append(regular_file(entry, fix))
        else:
            raise ConfigError(f"data file {entry} does not exist; check {keys}")
    return files


def resolve_parquet_files(path: str | None = None, paths=None) -> list[Path]:
    """Expand data.path / data.paths (files, folders or globs) into parquet files."""
    entries = as_list(path) + as_list(paths)
    if not entries:
        raise ConfigError(
            "no training data given: set data.path or data.paths (files, folders or globs), or data.hf_repo "
            "with data.hf_files; data=sample trains on the bundled sample"
        )
    return expand_paths(entries, ".parquet", "data.path / data.paths")


@contextmanager
def reading(path: Path):
    """Turn pyarrow's errors on a damaged file into one line naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"{path} could not be read ({one_line(err)}); re-download or remove it") from err


def is_text_type(kind: pa.DataType) -> bool:
    """string, large_string, string_view, or any of them dictionary-encoded."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


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
    schema = parquet.schema_arrow
    if text_column not in schema.names:
        raise ConfigError(
            f"{path} has no '{text_column}' column (columns: {', '.join(schema.names)}); "
            "set data.text_column to the column holding the documents"
        )
    kind = schema.field(text_column).type
    if not is_text_type(kind):
        raise ConfigError(
            f"{path}: column '{text_column}' holds {kind}, not text; "
            "set data.text_column to the column holding the documents"
        )
    meta = parquet.metadata
    if meta.num_rows == 0:
        raise ConfigError(f"{path} has no rows; remove it from data.path / data.paths")
    text_index = schema.names.index(text_column)
    row_groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    return ParquetInfo(
        path=path,
        row_group_rows=tuple(rg.num_rows for rg in row_groups),
        # Each value is stored with a 4-byte length prefix.
        text_bytes=sum(max(0, rg.column(text_index).total_uncompressed_size - 4 * rg.num_rows) for rg in row_groups),
        has_id="id" in schema.names,
        has_token_count="token_count" in schema.names,
    )


def estimate_train_tokens(infos: list[ParquetInfo], text_column: str, val_fraction: float) -> int:
    """Tokens in one pass over the training documents of parquet files.

    FineWeb's token_count column holds GPT-2 counts (without the separator); other files, and
    files whose token_count is not a whole, non-negative count in every row (null, NaN, text,
    negative), are estimated from the tokens per byte of their first 1024 rows and the text size
    in their metadata.
    """
    if all(info.has_token_count for info in infos):
        counts = [counted_tokens(info) for info in infos]
        if all(count is not None for count in counts):
            return int(sum(counts) * (1 - val_fraction))
        unusable = next(info for info, count in zip(infos, counts) if count is None)
        log.warning(
            "%s: its token_count column is not a whole, non-negative count in every row; the data's size is "
            "estimated from its text instead",
            unusable.path,
        )
    with reading(infos[0].path):
        sample = next(pq.ParquetFile(infos[0].path).iter_batches(1024, columns=[text_column])).column(0)
    texts = [t for t in sample.to_pylist() if t]
    per_byte = len(tokenize_documents(texts)) / max(1, sum(len(t.encode("utf-8")) for t in texts))
    return int(sum(info.text_bytes for info in infos) * per_byte * (1 - val_fraction))


MOST_TOKENS_PER_DOCUMENT = 2**32  # more is no real count, and a sum of such could overflow


def counted_tokens(info: ParquetInfo) -> int | None:
    """The file's tokens by its token_count column, each document's separator included, or None
    where the column is not an integer count in every row within 0..MOST_TOKENS_PER_DOCUMENT."""
    with reading(info.path):
        counts = pq.read_table(info.path, columns=["token_count"]).column(0)
    if not pa.types.is_integer(counts.type) or counts.null_count:
        return None
    low_high = pc.min_max(counts).as_py()
    if len(counts) and not (0 <= low_high["min"] and low_high["max"] <= MOST_TOKENS_PER_DOCUMENT):
        return None
    return int(pc.sum(counts.cast(pa.int64())).as_py() or 0) + info.num_rows
