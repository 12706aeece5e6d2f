"""The settings every data source shares, checked in one place before any data is read.

Every DataModule builds a DataSettings first thing, so `data.block_size=0`,
`data.num_workers=-1`, `data.rows_per_chunk=0` or `data.val_fraction=2` stop the run with one
line naming the key and the fix, instead of a traceback from deep inside a DataLoader.
"""

from dataclasses import dataclass, fields

from fineweb_gpt.errors import ConfigError


def _whole(key: str, value, minimum: int, fix: str) -> None:
    # bool is an int in Python, and `data.num_workers=true` is surely a slip.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} is not a whole number; {fix}")
    if value < minimum:
        raise ConfigError(f"{key}={value} must be at least {minimum}; {fix}")


@dataclass(frozen=True)
class DataSettings:
    block_size: int  # tokens per training sequence; windows hold block_size + 1 (inputs and shifted targets)
    micro_batch_size: int
    text_column: str = "text"
    val_fraction: float = 0.01  # every source's default, so a file holds out the same documents in each
    val_tokens: int | None = 1_048_576  # None: every held-out token (scoring a whole file)
    num_workers: int = 2
    rows_per_chunk: int = 1024
    seed: int = 1337

    def __post_init__(self):
        _whole(
            "data.block_size",
            self.block_size,
            1,
            "it is the training sequence length in tokens (by default model.block_size), e.g. data.block_size=1024",
        )
        _whole("hw.micro_batch_size", self.micro_batch_size, 1, "windows per micro-batch, e.g. hw.micro_batch_size=8")
        if self.val_tokens is not None:
            _whole(
                "data.val_tokens", self.val_tokens, 1, "tokens scored at each evaluation, e.g. data.val_tokens=1048576"
            )
        _whole("data.num_workers", self.num_workers, 0, "DataLoader workers per device (0: none)")
        _whole("data.rows_per_chunk", self.rows_per_chunk, 1, "rows tokenized and shuffled together, e.g. 1024")
        _whole("seed", self.seed, 0, "e.g. seed=1337")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ConfigError(f"data.text_column={self.text_column!r} must name the column holding the documents")
        fraction = self.val_fraction
        # 1 holds out every document: nothing to train on (setup("fit") refuses it), a whole file to score.
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ConfigError(
                f"data.val_fraction={fraction!r} must be a fraction above 0 and at most 1 (of documents held out), "
                "e.g. data.val_fraction=0.01"
            )

    @property
    def window(self) -> int:
        return self.block_size + 1

    @property
    def workers(self) -> int:
        """Streams per rank: with no workers, the training process is the one stream."""
        return max(1, self.num_workers)


def check_data_config(data, micro_batch_size, source: str | None = None) -> DataSettings:
    """The shared data settings of a composed config (cfg.data), checked before anything is built;
    `source` is the data= option chosen."""
    check_source_keys(data, source)
    names = [f.name for f in fields(DataSettings) if f.name != "micro_batch_size"]
    given = {name: data[name] for name in names if name in data}
    return DataSettings(micro_batch_size=micro_batch_size, **given)


def check_source_keys(data, source: str | None) -> None:
    """A key the chosen source does not read is refused, naming the source that does: with
    data=sample, `+data.path=x.parquet` would otherwise train on the bundled sample without a word.
    A data config of the user's own (not in conf/data) is theirs to define."""
    from fineweb_gpt.config_files import group_options, load_option, options_with_key  # Hydra: not for tokenize

    if source not in group_options("data"):
        return
    own = load_option("data", source)
    for key in data:
        if key in own:
            continue
        readers = options_with_key("data", key)
        where = f"data={' or data='.join(readers)} reads it: use data={readers[0]}" if readers else "no source reads it"
        raise ConfigError(f"data.{key} is not a setting of data={source}; {where}")
