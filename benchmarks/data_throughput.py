"""Tokens per second of the whole data pipeline (parquet -> packed micro-batches) against
raw tiktoken on the same text, in the same run, and peak memory as the input grows 10x.

    python benchmarks/data_throughput.py            # inputs of 4x and 40x the bundled sample
    python benchmarks/data_throughput.py --copies 2 --workers 2

The inputs are copies of the bundled FineWeb sample (fresh ids, 100 rows per row group),
so the text is real. The pipeline runs in a fresh process per input: DataLoader workers
read row groups, drop held-out documents, tokenize, pack block_size + 1 windows and shuffle
them, for one full epoch. Peak RSS is the largest of the main process and its workers.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_gpt.data import FineWebDataModule, bundled_sample_path
from fineweb_gpt.tokenizer import gpt2_tokenizer


def write_copies(path: Path, copies: int) -> None:
    """The bundled sample repeated `copies` times, each copy with its own document ids."""
    sample = pq.read_table(bundled_sample_path())
    with pq.ParquetWriter(path, sample.schema) as writer:
        for copy in range(copies):
            ids = pa.array([f"{i}-copy{copy}" for i in sample.column("id").to_pylist()])
            writer.write_table(sample.set_column(sample.schema.get_field_index("id"), "id", ids), row_group_size=100)


def raw_tiktoken_tokens_per_sec(path: Path) -> dict:
    """tiktoken alone on the same documents already in memory: one thread, and its batch API."""
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    enc = gpt2_tokenizer()
    enc.encode_ordinary_batch(texts[:100])
    start = time.perf_counter()
    tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
    one_thread = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    tokens = sum(len(t) for t in enc.encode_ordinary_batch(texts))
    batch = tokens / (time.perf_counter() - start)
    return {"one_thread": one_thread, "batch": batch, "tokens": tokens}


def pipeline_run(path: str, workers: int, block_size: int, micro_batch: int) -> dict:
    """One epoch of training batches; runs in its own process so peak RSS is its own."""
    dm = FineWebDataModule(block_size=block_size, micro_batch_size=micro_batch, path=path, num_workers=workers)
    dm.setup("fit")
    start = time.perf_counter()
    loader = iter(dm.train_dataloader())
    finished, windows = set(), 0
    while len(finished) < max(1, workers):
        batch = dm.on_before_batch_transfer(next(loader), 0)
        windows += batch.shape[0]
        for stream, position in dm.positions.items():
            if position.epoch >= 1:
                finished.add(stream)
    elapsed = time.perf_counter() - start
    del loader  # workers exit, so their peak RSS is counted below
    time.sleep(0.5)
    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    return {"tokens": windows * (block_size + 1), "seconds": elapsed, "peak_rss_mib": peak_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="copies of the sample in the small input")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(pipeline_run(args.run, args.workers, args.block_size, args.micro_batch)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for copies in (args.copies, 10 * args.copies):
            inputs[copies] = Path(tmp) / f"sample_x{copies}.parquet"
            write_copies(inputs[copies], copies)
        raw = raw_tiktoken_tokens_per_sec(inputs[args.copies])
        results = {}
        for copies, path in inputs.items():
            command = [sys.executable, __file__, "--run", str(path), "--workers", str(args.workers)]
            command += ["--block-size", str(args.block_size), "--micro-batch", str(args.micro_batch)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[copies] = json.loads(done.stdout.strip().splitlines()[-1])

    baseline = max(raw["one_thread"], raw["batch"])
    print(
        f"raw tiktoken, same text: {raw['one_thread'] / 1e6:.2f}M tokens/s on one thread, "
        f"{raw['batch'] / 1e6:.2f}M tokens/s with encode_ordinary_batch"
    )
    for copies, result in results.items():
        speed = result["tokens"] / result["seconds"]
        print(
            f"pipeline, {copies}x sample ({result['tokens'] / 1e6:.1f}M tokens, {args.workers} workers): "
            f"{speed / 1e6:.2f}M tokens/s = {speed / baseline:.2f} x raw tiktoken; "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB"
        )
    small, large = results[args.copies], results[10 * args.copies]
    speed = large["tokens"] / large["seconds"]
    print(f"peak RSS at 10x the input: {large['peak_rss_mib'] / small['peak_rss_mib']:.2f} x")
    print(
        f"targets: >= 0.50 x raw tiktoken: {'met' if speed >= 0.5 * baseline else 'MISSED'}; "
        f">= 1M tokens/s: {'met' if speed >= 1e6 else 'MISSED'}; "
        f"RSS flat (<= 1.25x): {'met' if large['peak_rss_mib'] <= 1.25 * small['peak_rss_mib'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
