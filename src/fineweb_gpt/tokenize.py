"""fineweb-gpt-tokenize: parquet files, folders or Hub files -> llm.c-format token shards.

    fineweb-gpt-tokenize /data/fineweb --out /data/fineweb_tokens
    fineweb-gpt-tokenize --hf-repo HuggingFaceFW/fineweb --hf-files 'sample/10BT/*.parquet' --out /data/sample10BT
    python -m fineweb_gpt.train data=token_shards data.paths=/data/fineweb_tokens

Documents are held out exactly as training holds them out (the same --val-fraction as
data.val_fraction holds out the same documents) and written, in file order, to
val_000000.bin; the others go, in file order, to train_000000.bin, train_000001.bin, ... of
--shard-tokens tokens each. Every document is plain text followed by <|endoftext|>, as in
training. One process per core tokenizes the row groups; the shards come out the same
whatever the number of processes.
"""

import argparse
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from fineweb_gpt.data.holdout import document_keys, is_validation_document
from fineweb_gpt.data.hub_files import download_hub_files
from fineweb_gpt.data.parquet_files import ParquetInfo, estimate_train_tokens, expand_paths, inspect_parquet, reading
from fineweb_gpt.data.settings import DataSettings
from fineweb_gpt.data.token_shards import TOKEN_DTYPE, ShardWriter
from fineweb_gpt.data.tokens import tokenize_documents
from fineweb_gpt.errors import ConfigError, UserError, exit_with

MAX_SHARD_TOKENS = 2**31 - 1  # the header's count is an int32
MAX_SHARDS = 10_000  # training shards one command writes


def tokenize_row_group(info: ParquetInfo, group: int, text_column: str, val_fraction: float):
    """(training tokens, held-out tokens, rows) of one row group, as uint16."""
    columns = [text_column] + (["id"] if info.has_id else [])
    with reading(info.path):
        table = pq.ParquetFile(info.path).read_row_group(group, columns=columns)
    texts = table.column(text_column).to_pylist()
    ids = table.column("id").to_pylist() if info.has_id else None
    keys = document_keys(ids, info.path, sum(info.row_group_rows[:group]), len(texts))
    held_out = [is_validation_document(k, val_fraction) for k in keys]
    train = tokenize_documents([t for t, h in zip(texts, held_out) if t and not h])
    val = tokenize_documents([t for t, h in zip(texts, held_out) if t and h])
    return train.astype(TOKEN_DTYPE), val.astype(TOKEN_DTYPE), len(texts)


def in_order(tasks: list[tuple], workers: int):
    """tokenize_row_group(*task) for each task, in order, with at most 2 x workers in flight."""
    if workers <= 1:
        yield from (tokenize_row_group(*task) for task in tasks)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.submit(tokenize_row_group, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class TrainShards:
    """train_000000.bin, train_000001.bin, ...: a new shard every shard_tokens tokens."""

    def __init__(self, out: Path, shard_tokens: int):
        self.out, self.shard_tokens = out, shard_tokens
        self.written: list[Path] = []
        self.writer: ShardWriter | None = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.writer is None:
                self.writer = ShardWriter(self.out / f"train_{len(self.written):06d}.bin")
            room = self.shard_tokens - self.writer.count
            self.writer.write(tokens[:room])
            tokens = tokens[room:]
            if self.writer.count == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.written.append(self.writer.close())
            self.writer = None

    def discard(self) -> None:
        """The shard being written is removed; those finished stay."""
        if self.writer is not None:
            self.writer.discard()
            self.writer = None


def tokenize_files(infos, out: Path, text_column: str, val_fraction: float, shard_tokens: int, workers: int):
    """Write the shards; returns (training shards, validation shard, training tokens, held-out tokens)."""
    tasks = [(info, g, text_column, val_fraction) for info in infos for g in range(len(info.row_group_rows))]
    train = TrainShards(out, shard_tokens)
    val = ShardWriter(out / "val_000000.bin")
    train_tokens = 0
    try:
        with tqdm(total=sum(info.num_rows for info in infos), unit=" docs", desc="tokenizing") as bar:
            for train_part, val_part, rows in in_order(tasks, workers):
                train.write(train_part)
                val.write(val_part)
                train_tokens += len(train_part)
                bar.update(rows)
        train.close()
    except BaseException:  # no half-written shard is left under its name or beside it
        train.discard()
        val.discard()
        raise
    held_out = val.count
    return train.written, val.close(), train_tokens, held_out


def check_shard_count(infos: list[ParquetInfo], args: argparse.Namespace) -> None:
    """Refuse a --shard-tokens that would write more than MAX_SHARDS files, from the size the
    inputs are estimated to hold (training reads shards of millions of tokens each)."""
    tokens = estimate_train_tokens(infos, args.text_column, args.val_fraction)
    shards = -(-tokens // args.shard_tokens)
    if shards > MAX_SHARDS:
        smallest = -(-tokens // MAX_SHARDS)
        raise ConfigError(
            f"--shard-tokens {args.shard_tokens} would write about {shards:,} shard files (the inputs hold about "
            f"{tokens:,} training tokens); give --shard-tokens {smallest} or more (the default, 100000000, is llm.c's)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fineweb-gpt-tokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="*", help="parquet files, folders or globs")
    parser.add_argument("--out", required=True, type=Path, help="folder for the .bin shards (new or empty)")
    parser.add_argument("--hf-repo", help="a Hugging Face dataset repository, e.g. HuggingFaceFW/fineweb")
    parser.add_argument("--hf-files", nargs="+", help="patterns of its files, e.g. 'sample/10BT/*.parquet'")
    parser.add_argument("--cache-dir", help="where Hub files are cached (default: the Hugging Face cache)")
    parser.add_argument("--text-column", default="text", help="the column holding the documents (default: %(default)s)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DataSettings.val_fraction,
        help="documents held out, as data.val_fraction holds them out (default: %(default)s)",
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per training shard (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        if not 0.0 < args.val_fraction < 1.0:
            example = DataSettings.val_fraction
            raise ConfigError(f"--val-fraction {args.val_fraction} must be between 0 and 1, e.g. {example}")
        if not 0 < args.shard_tokens <= MAX_SHARD_TOKENS:
            raise ConfigError(f"--shard-tokens {args.shard_tokens} must be between 1 and {MAX_SHARD_TOKENS}")
        if bool(args.hf_repo) != bool(args.hf_files):
            raise ConfigError(
                "--hf-repo and --hf-files go together, e.g. --hf-repo HuggingFaceFW/fineweb "
                "--hf-files 'sample/10BT/000_00000.parquet'"
            )
        if not args.inputs and not args.hf_repo:
            raise ConfigError("nothing to tokenize: give parquet files, folders or globs, or --hf-repo with --hf-files")
        files = expand_paths(args.inputs, ".parquet", "the inputs")
        if args.hf_repo:
            files += download_hub_files(args.hf_repo, args.hf_files, args.cache_dir)
        infos = [inspect_parquet(f, args.text_column) for f in files]
        if os.path.lexists(args.out) and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} exists and is not a folder; choose a new or empty --out folder")
        if args.out.exists() and any(args.out.glob("*.bin")):
            raise ConfigError(f"{args.out} already holds .bin shards; choose a new or empty --out folder")
        check_shard_count(infos, args)
        args.out.mkdir(parents=True, exist_ok=True)
        workers = max(1, min(args.workers, sum(len(i.row_group_rows) for i in infos)))
        shards, val, train_tokens, val_tokens = tokenize_files(
            infos, args.out, args.text_column, args.val_fraction, args.shard_tokens, workers
        )
    except UserError as err:
        exit_with(err)
    print(
        f"wrote {train_tokens:,} training tokens in {len(shards)} shard(s) and {val_tokens:,} held-out tokens "
        f"({val.name}) to {args.out}\ntrain on them: python -m fineweb_gpt.train data=token_shards "
        f"data.paths={args.out}"
    )


if __name__ == "__main__":
    main()
