"""The Hub streaming source, built on Hugging Face `datasets` (imported only when it is used).

`data=hf_stream` mirrors load_dataset's own arguments: data.dataset (a Hub repository such
as HuggingFaceFW/fineweb, or a builder such as `parquet` for local files), data.name (the
config, e.g. sample-10BT), data.data_files, data.split, data.revision. The dataset is
streamed (`streaming=True`): row groups are fetched as they are read, nothing whole first.

Each stream (ranks_and_workers.py) gets its own share: `reshard()` makes one shard per
parquet row group, and `split_dataset_by_node` deals them with the streams as its nodes
(strategy "shards"; with fewer shards than streams, "examples": every stream reads all rows
and keeps one in num_streams, still each row once). Each epoch after the first, `datasets`
reshuffles the shard order from the epoch alone, the same on every stream, so the deal stays
a partition. Hold-out, tokenizing and packing are the parquet path's (holdout.py, tokens.py):
chunks of data.rows_per_chunk rows, their windows shuffled with the seed.

Exact resume: a position is (epoch, the share's `state_dict()` before the current chunk,
windows of the chunk already yielded, carried tokens). `datasets` resumes from state_dict()
at the exact row, except for its shuffle buffer, which this source does not use: so a
resumed run continues bit for bit, as long as the dataset has not changed in between (set
data.revision to a commit to pin a Hub dataset).
"""

from dataclasses import dataclass

from torch.utils.data import get_worker_info

from fineweb_gpt.data.holdout import is_validation_document
from fineweb_gpt.data.parquet_files import as_list, expand_paths, is_text_type
from fineweb_gpt.data.parquet_stream import no_window_error
from fineweb_gpt.data.ranks_and_workers import TrainStream, packed_carry, unpacked_carry
from fineweb_gpt.data.tokens import NO_TOKENS, cut_windows, shuffled_order, tokenize_documents
from fineweb_gpt.errors import ConfigError, one_line
from fineweb_gpt.safe_files import NotARegularFile


def open_hub_dataset(dataset: str, name, data_files, split: str, revision, text_column: str):
    """(the streamed dataset, resharded, holding only the text and id columns as arrow; its key column)."""
    import datasets

    what = f"data.dataset={dataset}" + (f" data.name={name}" if name else "")
    try:
        stream = datasets.load_dataset(
            dataset, name=name, data_files=data_files, split=split, revision=revision, streaming=True
        )
    except Exception as err:  # unknown repository or config, missing files, no network: all end here
        raise ConfigError(
            f"{what} could not be opened ({type(err).__name__}: {one_line(err, limit=200)}); "
            "check data.dataset, data.name, data.data_files and data.split"
        ) from err
    columns = stream.column_names or []
    if columns and text_column not in columns:
        raise ConfigError(
            f"{what} has no '{text_column}' column (columns: {', '.join(columns)}); "
            "set data.text_column to the column holding the documents"
        )
    feature = (stream.features or {}).get(text_column)
    if feature is not None and not (hasattr(feature, "pa_type") and is_text_type(feature.pa_type)):
        raise ConfigError(
            f"{what}: column '{text_column}' holds {feature}, not text; "
            "set data.text_column to the column holding the documents"
        )
    key_column = "id" if "id" in columns else None
    stream = stream.select_columns([text_column] + ([key_column] if key_column else []))
    return stream.reshard().with_format("arrow"), key_column


def local_parquet_files(dataset: str, data_files, split: str) -> list:
    """The local files behind `data.dataset=parquet data.data_files=...`, or [] when not known here."""
    if dataset != "parquet" or not data_files:
        return []
    entries = data_files.get(split) if hasattr(data_files, "get") else data_files
    try:
        return expand_paths(as_list(entries), ".parquet", "data.data_files")
    except NotARegularFile:
        raise  # a local named pipe or device: datasets would wait on it for ever
    except ConfigError:
        return []  # not plain local paths: datasets resolves them (and reports what is wrong)


def keys_and_texts(table, text_column: str, key_column: str | None, source: str) -> tuple[list, list]:
    column = table.column(text_column)
    if not is_text_type(column.type):
        raise ConfigError(f"{source}: column '{text_column}' holds {column.type}, not text; set data.text_column")
    texts = column.to_pylist()
    keys = [str(k) for k in table.column(key_column).to_pylist()] if key_column else [t or "" for t in texts]
    return keys, texts


def held_out_chunks(stream, settings, key_column: str | None, source: str):
    """Texts of held-out documents from the start of the whole dataset, one list per chunk."""
    for table in stream.iter(batch_size=settings.rows_per_chunk):
        keys, texts = keys_and_texts(table, settings.text_column, key_column, source)
        yield [t for k, t in zip(keys, texts) if is_validation_document(k, settings.val_fraction)]


@dataclass
class HubPosition:
    """Where a Hub stream is: the next window to yield, and the state needed to rebuild it."""

    epoch: int = 0
    chunk: int = 0  # chunks of the epoch read before the current one
    state: dict | None = None  # the share's state_dict() before the current chunk; None: the epoch's start
    window: int = 0  # windows of the chunk already yielded
    carry: str = ""  # tokens carried into the chunk (ranks_and_workers.packed_carry)
    skipped: int = 0  # empty documents skipped this epoch


class HubTextStream(TrainStream):
    """Endless micro-batches of token windows from a streamed `datasets` dataset."""

    def __init__(self, stream, key_column, source: str, settings, rank=0, world_size=1, start=None, rotation=0):
        super().__init__(settings, rank, world_size, start, rotation)
        self.stream = stream
        self.key_column = key_column
        self.source = source

    def share(self, stream: int, epoch: int):
        from datasets.distributed import split_dataset_by_node

        strategy = "shards" if self.stream.num_shards >= self.num_streams else "examples"
        share = split_dataset_by_node(self.stream, rank=stream, world_size=self.num_streams, strategy=strategy)
        share.set_epoch(epoch)
        return share

    def chunks(self, share):
        """(training texts, count of empty ones, the share's state before the chunk) per chunk."""
        s = self.settings
        state = None
        for table in share.iter(batch_size=s.rows_per_chunk):
            keys, texts = keys_and_texts(table, s.text_column, self.key_column, self.source)
            kept = [t for k, t in zip(keys, texts) if not is_validation_document(k, s.val_fraction)]
            yield [t for t in kept if t], sum(1 for t in kept if not t), state
            state = share.state_dict()

    def stream_windows(self, stream: int):
        import fsspec

        if get_worker_info() is not None:
            fsspec.asyn.reset_lock()  # a forked worker must not wait on its parent's fsspec lock (as datasets does)
        s = self.settings
        start = HubPosition(**self.start.get(stream, {}))
        epoch, carry, skipped = start.epoch, unpacked_carry(start.carry), start.skipped
        resuming = start != HubPosition(epoch=start.epoch)
        while True:
            share = self.share(stream, epoch)
            first_chunk = start.chunk if resuming else 0
            if resuming and start.state is not None:
                share.load_state_dict(start.state)
            produced = 0
            for c, (texts, empty, state) in enumerate(self.chunks(share), start=first_chunk):
                state = start.state if resuming and c == first_chunk else state
                first_window = start.window if resuming and c == first_chunk else 0
                if first_window == 0:
                    skipped += empty
                windows, rest = cut_windows(carry, tokenize_documents(texts), s.window)
                order, carried = shuffled_order(len(windows), s.seed, epoch, stream, c), packed_carry(carry)
                for w in range(first_window, len(windows)):
                    yield windows[order[w]], HubPosition(epoch, c, state, w + 1, carried, skipped)
                produced += len(windows) - first_window
                carry = rest
            if produced == 0 and not resuming:
                raise no_window_error(stream, s.window)
            epoch, carry, skipped, resuming = epoch + 1, NO_TOKENS, 0, False
