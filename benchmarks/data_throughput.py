"""Tokens per second of each data source, from the files to packed micro-batches, and its memory
as the input grows 10x; against baselines measured in the same run on the same data.

    python benchmarks/data_throughput.py                      # all sources, 4x and 40x the bundled sample
    python benchmarks/data_throughput.py --sources token_shards --copies 8

The inputs are copies of the bundled FineWeb sample (fresh ids, 100 rows per row group), so
the text is real; the token shards are those inputs tokenized by fineweb-gpt-tokenize. Each
source runs in a fresh process per input for one full epoch of all its streams:

- parquet: DataLoader workers read row groups, drop held-out documents, tokenize, pack
  block_size + 1 windows and shuffle them. Baseline: raw tiktoken on the same text.
- hf_stream: the same through `datasets` streaming (data.dataset=parquet). Same baseline.
- token_shards: windows read from the memory-mapped shards in the training process.
  Baseline: the same tokens copied front to back, a micro-batch at a time, into one int64
  buffer: the data movement alone.

Every measurement runs in a process of its own. Memory: peak RSS of that process and its
workers; for token shards also the anonymous memory (RssAnon) at the end of the epoch, since
the mapped shards' pages are the page cache's, shared and dropped as needed.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_gpt.data import FineWebDataModule, HubStreamDataModule, TokenShardDataModule, bundled_sample_path
from fineweb_gpt.data.token_shards import memmap_tokens, read_token_count
from fineweb_gpt.tokenize import main as tokenize_main
from fineweb_gpt.tokenizer import gpt2_tokenizer

SOURCES = ("parquet", "hf_stream", "token_shards")


def write_copies(path: Path, copies: int) -> None:
    """The bundled sample repeated `copies` times, each copy with its own document ids."""
    sample = pq.read_table(bundled_sample_path())
    with pq.ParquetWriter(path, sample.schema) as writer:
        for copy in range(copies):
            ids = pa.array([f"{i}-copy{copy}" for i in sample.column("id").to_pylist()])
            writer.write_table(sample.set_column(sample.schema.get_field_index("id"), "id", ids), row_group_size=100)


def raw_tiktoken_tokens_per_sec(path: Path) -> float:
    """tiktoken alone on the same documents already in memory: the faster of one thread and its batch API."""
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    enc = gpt2_tokenizer()
    enc.encode_ordinary_batch(texts[:100])
    start = time.perf_counter()
    tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
    one_thread = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    tokens = sum(len(t) for t in enc.encode_ordinary_batch(texts))
    return max(one_thread, tokens / (time.perf_counter() - start))


def raw_read_tokens_per_sec(folder: Path, block_size: int, micro_batch: int) -> float:
    """The training shards copied front to back into one int64 micro-batch buffer: the data
    movement alone, with no shuffling, no positions and no DataLoader."""
    batch = np.empty(micro_batch * (block_size + 1), dtype=np.int64)
    shards = [memmap_tokens(path, read_token_count(path)) for path in sorted(folder.glob("train_*.bin"))]
    for tokens in shards:  # into the page cache, as the pipeline run finds them
        tokens.sum()
    start, copied = time.perf_counter(), 0
    for tokens in shards:
        for offset in range(0, len(tokens) - len(batch) + 1, len(batch)):
            batch[:] = tokens[offset : offset + len(batch)]
            copied += len(batch)
    return copied / (time.perf_counter() - start)


def own_memory_mib(field: str) -> float:
    """VmHWM (peak RSS of this program, not counting what its parent held before exec) or RssAnon."""
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024


def make_datamodule(source: str, path: str, workers: int, block_size: int, micro_batch: int):
    common = dict(block_size=block_size, micro_batch_size=micro_batch, num_workers=workers)
    if source == "parquet":
        return FineWebDataModule(path=path, **common)
    if source == "hf_stream":
        return HubStreamDataModule(dataset="parquet", data_files=path, **common)
    return TokenShardDataModule(paths=path, **common)


def pipeline_run(source: str, path: str, workers: int, block_size: int, micro_batch: int) -> dict:
    """One epoch of every stream's training batches; runs in its own process so peak RSS is its own."""
    dm = make_datamodule(source, path, workers, block_size, micro_batch)
    dm.setup("fit")
    start = time.perf_counter()
    loader = iter(dm.train_dataloader())
    finished, windows = set(), 0
    while len(finished) < max(1, workers):
        batch = dm.on_before_batch_transfer(next(loader), 0)
        windows += batch.shape[0]
        finished.update(stream for stream, position in dm.positions.items() if position["epoch"] >= 1)
    elapsed = time.perf_counter() - start
    anonymous = own_memory_mib("RssAnon")
    del loader  # workers exit, so their peak RSS is counted below
    time.sleep(0.5)
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "tokens": windows * (block_size + 1),
        "seconds": elapsed,
        "peak_rss_mib": max(own_memory_mib("VmHWM"), workers_peak),
        "anonymous_rss_mib": anonymous,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="copies of the sample in the small input")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of parquet and hf_stream")
    parser.add_argument("--shard-workers", type=int, default=0, help="DataLoader workers of token_shards")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--run", nargs=2, metavar=("SOURCE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        source, path = args.run
        if source == "tokenizing":
            speed = raw_tiktoken_tokens_per_sec(Path(path))
        elif source == "reading":
            speed = raw_read_tokens_per_sec(Path(path), args.block_size, args.micro_batch)
        else:
            workers = args.shard_workers if source == "token_shards" else args.workers
            speed = pipeline_run(source, path, workers, args.block_size, args.micro_batch)
        print(json.dumps(speed))
        return

    print(f"{os.cpu_count()} CPU cores; block_size {args.block_size}, micro-batch {args.micro_batch}")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for copies in (args.copies, 10 * args.copies):
            inputs[copies] = Path(tmp) / f"sample_x{copies}.parquet"
            write_copies(inputs[copies], copies)

        def run(source: str, path: Path):
            command = [sys.executable, __file__, "--run", source, str(path), "--workers", str(args.workers)]
            command += ["--shard-workers", str(args.shard_workers)]
            command += ["--block-size", str(args.block_size), "--micro-batch", str(args.micro_batch)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

        baselines = {"tokenizing": run("tokenizing", inputs[args.copies])}
        print(f"baseline, raw tiktoken on the same text: {baselines['tokenizing'] / 1e6:.2f}M tokens/s")
        shard_folders = {}
        if "token_shards" in args.sources:
            for copies, path in inputs.items():
                shard_folders[copies] = Path(tmp) / f"shards_x{copies}"
                with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
                    tokenize_main([str(path), "--out", str(shard_folders[copies])])
            baselines["reading"] = run("reading", shard_folders[10 * args.copies])
            print(f"baseline, the shards copied front to back: {baselines['reading'] / 1e6:.0f}M tokens/s")
        for source in args.sources:
            results = {}
            for copies, path in inputs.items():
                results[copies] = run(source, shard_folders[copies] if source == "token_shards" else path)
            report(source, results, baselines, args)


def report(source: str, results: dict, baselines: dict, args) -> None:
    small, large = results[args.copies], results[10 * args.copies]
    workers = args.shard_workers if source == "token_shards" else args.workers
    baseline = baselines["reading" if source == "token_shards" else "tokenizing"]
    for copies, result in results.items():
        speed = result["tokens"] / result["seconds"]
        memory = f"peak RSS {result['peak_rss_mib']:.0f} MiB"
        if source == "token_shards":
            memory += f", anonymous {result['anonymous_rss_mib']:.0f} MiB"
        print(
            f"{source}, {copies}x sample ({result['tokens'] / 1e6:.1f}M tokens, {workers} workers): "
            f"{speed / 1e6:.2f}M tokens/s = {speed / baseline:.2f} x baseline; {memory}"
        )
    speed = large["tokens"] / large["seconds"]
    key = "anonymous_rss_mib" if source == "token_shards" else "peak_rss_mib"
    growth = large[key] / small[key]
    target = speed >= 50e6 if source == "token_shards" else speed >= 0.5 * baseline
    goal = ">= 50M tokens/s" if source == "token_shards" else ">= 0.50 x raw tiktoken"
    print(
        f"{source} targets: {goal}: {'met' if target else 'MISSED'}; "
        f"memory flat at 10x the input (<= 1.25x): {growth:.2f}x, {'met' if growth <= 1.25 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
