"""The parquet source: local files read by row groups with pyarrow, tokenized on the fly.

A stream reads its units (ranks_and_workers.py) in chunks of data.rows_per_chunk rows, drops
held-out and empty documents, tokenizes the rest with an <|endoftext|> after each, and cuts
non-overlapping windows of block_size + 1 tokens (tokens that do not fill a window carry
over to the next chunk, so only the last partial window of a stream's epoch is dropped). The
windows of a chunk are yielded in a shuffled order: the chunk is the shuffle buffer.

Exact resume: a position is (epoch, unit, chunk, windows of the chunk already yielded,
tokens carried into the chunk). Everything else (which units, which rows, the shuffle of a
chunk) follows from the seed, so a resumed run re-reads only the current chunk and goes on
with the very batches the uninterrupted run would have seen, bit for bit.
"""

from dataclasses import dataclass

import pyarrow.parquet as pq

from fineweb_gpt.data.holdout import document_keys, is_validation_document
from fineweb_gpt.data.parquet_files import ParquetInfo, reading
from fineweb_gpt.data.ranks_and_workers import (
    TrainStream,
    Unit,
    packed_carry,
    plan_units,
    units_of_stream,
    unpacked_carry,
)
from fineweb_gpt.data.settings import DataSettings
from fineweb_gpt.data.tokens import NO_TOKENS, cut_windows, shuffled_order, tokenize_documents
from fineweb_gpt.errors import ConfigError


@dataclass
class StreamPosition:
    """Where a parquet stream is: the next window to yield, and the state needed to rebuild it."""

    epoch: int = 0
    unit: int = 0  # index into the stream's units for this epoch
    chunk: int = 0  # index of the chunk of rows within the unit
    window: int = 0  # windows of the chunk already yielded
    carry: str = ""  # tokens carried into the chunk (ranks_and_workers.packed_carry)
    skipped: int = 0  # empty documents skipped this epoch


def no_window_error(stream: int, window: int) -> ConfigError:
    return ConfigError(
        f"data stream {stream} got no full window of {window} tokens in a whole epoch; "
        "use more data, fewer data.num_workers or devices, or a smaller model.block_size"
    )


class TokenWindowStream(TrainStream):
    """Endless micro-batches of token windows from parquet files, for the stream each worker plays."""

    def __init__(self, infos: list[ParquetInfo], settings: DataSettings, rank=0, world_size=1, start=None, rotation=0):
        super().__init__(settings, rank, world_size, start, rotation)
        self.infos = infos
        pieces = [(f, g, rows) for f, info in enumerate(infos) for g, rows in enumerate(info.row_group_rows)]
        self.units = plan_units(pieces, self.num_streams)

    def stream_units(self, stream: int, epoch: int) -> list[int]:
        return units_of_stream(len(self.units), stream, self.num_streams, self.settings.seed, epoch)

    def chunks(self, unit: Unit):
        """(texts of the training documents, count of empty ones) per chunk of rows, in row order."""
        s = self.settings
        info = self.infos[unit.file]
        columns = [s.text_column] + (["id"] if info.has_id else [])
        group_start = sum(info.row_group_rows[: unit.row_group])  # the row group's first row in the file
        row = 0  # the batch's first row within the row group
        with reading(info.path):
            parquet = pq.ParquetFile(info.path)
            for batch in parquet.iter_batches(s.rows_per_chunk, row_groups=[unit.row_group], columns=columns):
                lo, hi = max(unit.start - row, 0), min(unit.stop - row, batch.num_rows)
                if hi > lo:
                    texts = batch.column(s.text_column)[lo:hi].to_pylist()
                    ids = batch.column("id")[lo:hi].to_pylist() if info.has_id else None
                    keys = document_keys(ids, info.path, group_start + row + lo, len(texts))
                    kept = [t for k, t in zip(keys, texts) if not is_validation_document(k, s.val_fraction)]
                    yield [t for t in kept if t], sum(1 for t in kept if not t)
                row += batch.num_rows
                if row >= unit.stop:
                    return

    def stream_windows(self, stream: int):
        """(window, position after it) for one stream, epoch after epoch, from its start position."""
        s = self.settings
        pos = StreamPosition(**self.start.get(stream, {}))
        epoch, carry, skipped = pos.epoch, unpacked_carry(pos.carry), pos.skipped
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
                    windows, rest = cut_windows(carry, tokenize_documents(texts), s.window)
                    order, carried = shuffled_order(len(windows), s.seed, epoch, units[u], c), packed_carry(carry)
                    for w in range(first_window, len(windows)):
                        yield windows[order[w]], StreamPosition(epoch, u, c, w + 1, carried, skipped)
                    produced += len(windows) - first_window
                    carry = rest
            if produced == 0 and resume == (0, 0, 0):
                raise no_window_error(stream, s.window)
            epoch, carry, skipped, resume = epoch + 1, NO_TOKENS, 0, (0, 0, 0)
