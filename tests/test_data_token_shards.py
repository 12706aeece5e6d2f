"""Token shards: fineweb-gpt-tokenize, llm.c's format as other tools write it, every window once, exact resume."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fineweb_gpt.data import FineWebDataModule, TokenShardDataModule, bundled_sample_path, read_documents
from fineweb_gpt.data.holdout import is_validation_document
from fineweb_gpt.data.tokens import tokenize_documents
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer
from helpers import SMALL, TESTS_DIR, run_cli

BLOCK = 32
SAMPLE_VAL_FRACTION = 0.05  # more held-out documents than data.val_fraction's default


def write_llm_c_shard(path: Path, tokens, version: int = 1, magic: int = 20240520, count: int | None = None) -> Path:
    """A shard exactly as llm.c's data scripts write one: 256 int32 of header, then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=np.uint16).tobytes())
    return path


def llm_c_documents(texts) -> np.ndarray:
    """llm.c's fineweb.py puts <|endoftext|> before each document (we put it after)."""
    enc = gpt2_tokenizer()
    return np.concatenate([[END_OF_TEXT_ID, *enc.encode_ordinary(t)] for t in texts]).astype(np.uint16)


def tokenize_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": ":".join(sys.path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fineweb_gpt.tokenize", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> Path:
    """The bundled sample, tokenized from the command line as a user would, from another folder."""
    folder = tmp_path_factory.mktemp("tokens")
    result = tokenize_cli(
        str(bundled_sample_path()), "--out", "sample", "--val-fraction", str(SAMPLE_VAL_FRACTION),
        "--shard-tokens", "300000", "--workers", "2", cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train on them: python -m fineweb_gpt.train data=token_shards data.paths=sample" in result.stdout
    return folder / "sample"


def test_tokenize_refuses_bad_input_in_one_line_and_keeps_existing_shards(sample_shards, tmp_path, capsys):
    from fineweb_gpt.tokenize import main

    def refusal(*argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        assert exited.value.code == 2
        return capsys.readouterr().err.strip()

    missing = tmp_path / "nowhere" / "000_00000.parquet"
    assert refusal(str(missing), "--out", str(tmp_path / "tokens")) == (
        f"error: data file {missing} does not exist; check the inputs"
    )
    before = {p.name: p.stat().st_mtime_ns for p in sample_shards.glob("*.bin")}
    assert refusal(str(bundled_sample_path()), "--out", str(sample_shards)) == (
        f"error: {sample_shards} already holds .bin shards; choose a new or empty --out folder"
    )
    assert {p.name: p.stat().st_mtime_ns for p in sample_shards.glob("*.bin")} == before


def sample_documents(held_out: bool) -> list[str]:
    keys, texts = read_documents([bundled_sample_path()], "text")
    return [t for k, t in zip(keys, texts) if is_validation_document(k, SAMPLE_VAL_FRACTION) == held_out]


def shard_tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16, offset=1024)


def test_tokenize_writes_the_parquet_paths_tokens_in_llm_c_format(sample_shards):
    names = sorted(p.name for p in sample_shards.glob("*.bin"))
    assert names == ["train_000000.bin", "train_000001.bin", "train_000002.bin", "train_000003.bin", "val_000000.bin"]
    for path in sample_shards.glob("*.bin"):
        header = np.fromfile(path, dtype=np.int32, count=256)
        assert (header[0], header[1], header[2]) == (20240520, 1, (path.stat().st_size - 1024) // 2)
    train = np.concatenate([shard_tokens(sample_shards / n) for n in names[:-1]])
    assert [len(shard_tokens(sample_shards / n)) for n in names[:-2]] == [300_000] * 3
    assert np.array_equal(train, tokenize_documents(sample_documents(held_out=False)))  # file order, all of it
    assert np.array_equal(shard_tokens(sample_shards / "val_000000.bin"), tokenize_documents(sample_documents(True)))


def test_token_shards_score_the_same_validation_windows_as_the_parquet_path(sample_shards):
    shards = TokenShardDataModule(block_size=BLOCK, micro_batch_size=4, paths=str(sample_shards), val_tokens=4096)
    shards.setup("validate")
    parquet = FineWebDataModule(
        block_size=BLOCK, micro_batch_size=4, bundled_sample=True, val_fraction=SAMPLE_VAL_FRACTION, val_tokens=4096
    )
    parquet.setup("validate")
    assert len(shards.val_windows) == 4096 // BLOCK
    assert torch.equal(torch.cat(list(shards.val_dataloader())), torch.cat(list(parquet.val_dataloader())))
    # The counts come from the headers: exact, not estimated.
    assert shards.unique_train_tokens == len(tokenize_documents(sample_documents(held_out=False)))
    assert not shards.unique_train_tokens_estimated
    assert [p.name for p in shards.files] == [f"train_00000{i}.bin" for i in range(4)]


def test_every_window_exactly_once_per_epoch_across_2_ranks_x_2_workers(sample_shards):
    block = 256
    dm = TokenShardDataModule(block_size=block, micro_batch_size=1, paths=str(sample_shards), num_workers=2)
    dm.setup("fit")
    dm.world_size = 2
    seen = []
    for rank in (0, 1):
        finished = set()
        for batch in DataLoader(dm.train_stream(rank), batch_size=None, num_workers=2):
            if batch["position"]["epoch"] > 0:
                finished.add(batch["stream"])
                if len(finished) == 2:
                    break
            elif batch["stream"] not in finished:
                seen.append((batch["stream"], tuple(batch["windows"][0].tolist())))
    assert sorted({stream for stream, _ in seen}) == [0, 1, 2, 3]
    train = tokenize_documents(sample_documents(held_out=False))  # the shards' sequence, across shard boundaries
    windows = len(train) // (block + 1)
    expected = [tuple(train[i * (block + 1) : (i + 1) * (block + 1)].tolist()) for i in range(windows)]
    assert Counter(window for _, window in seen) == Counter(expected)  # each window once: no gap, no overlap


def consume(dm, loader, count):
    return [dm.on_before_batch_transfer(next(loader), 0).clone() for _ in range(count)]


@pytest.mark.parametrize("num_workers, stop_after", [(0, 11), (2, 11), (2, 1500)])
def test_resume_from_saved_state_gives_the_same_batches(sample_shards, tmp_path, num_workers, stop_after):
    def make():
        dm = TokenShardDataModule(
            block_size=256, micro_batch_size=4, paths=[str(sample_shards)], num_workers=num_workers, seed=9
        )
        dm.setup("fit")
        return dm

    uninterrupted = make()
    reference = consume(uninterrupted, iter(uninterrupted.train_dataloader()), stop_after + 30)
    first = make()
    consumed = consume(first, iter(first.train_dataloader()), stop_after)
    torch.save(first.state_dict(), tmp_path / "state.ckpt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True))
    continued = consume(resumed, iter(resumed.train_dataloader()), 30)
    for a, b in zip(reference, consumed + continued, strict=True):
        assert torch.equal(a, b)
    if stop_after == 1500:  # 3000 windows of 257 tokens per stream: past the epoch's (about 4400 in all)
        assert min(p["epoch"] for p in first.positions.values()) >= 1
        assert first.epochs_seen == pytest.approx(1500 * 4 * 257 / first.unique_train_tokens)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_bytes(b"not a shard at all"), r"is not an llm\.c token shard \(no magic 20240520"),
        (lambda p: write_llm_c_shard(p, [1, 2, 3], magic=20240801), r"is not an llm\.c token shard"),
        (lambda p: write_llm_c_shard(p, [1, 2, 3], version=7), r"is an llm\.c token shard of version 7, not 1"),
        (lambda p: write_llm_c_shard(p, [1, 2, 3], count=10), r"holds 1030 bytes, but its header promises 10 tokens"),
    ],
)
def test_a_file_that_is_not_a_shard_is_refused_in_one_line_naming_it(tmp_path, write, message):
    write_llm_c_shard(tmp_path / "fineweb_val_000000.bin", range(100))
    write(tmp_path / "fineweb_train_000001.bin")
    with pytest.raises(ConfigError, match=r"fineweb_train_000001\.bin " + message) as raised:
        TokenShardDataModule(block_size=BLOCK, micro_batch_size=4, paths=str(tmp_path))
    assert "\n" not in str(raised.value)


def test_shards_without_a_validation_shard_are_refused(tmp_path):
    write_llm_c_shard(tmp_path / "fineweb_train_000001.bin", range(1000))
    with pytest.raises(ConfigError, match=r"no validation shard \(a file named like \*_val_\*\.bin\)"):
        TokenShardDataModule(block_size=BLOCK, micro_batch_size=4, paths=str(tmp_path))


def test_a_shard_written_by_llm_c_trains_as_it_is(tmp_path):
    # Written the way llm.c's data scripts write fineweb10B: our code plays no part in these files.
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    train_texts, val_texts = sample_documents(held_out=False)[:300], sample_documents(held_out=True)
    write_llm_c_shard(folder / "fineweb_val_000000.bin", llm_c_documents(val_texts))
    write_llm_c_shard(folder / "fineweb_train_000001.bin", llm_c_documents(train_texts[:150]))
    write_llm_c_shard(folder / "fineweb_train_000002.bin", llm_c_documents(train_texts[150:]))
    result = run_cli(
        *SMALL, "data=token_shards", f"data.paths={folder}", "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["unique_train_tokens"] == len(llm_c_documents(train_texts))
    assert summary["unique_train_tokens_estimated"] is False
    assert [Path(f).name for f in summary["data_files"]] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]


def final_val_loss(run_dir: Path) -> float:
    from fineweb_gpt.run.names import METRICS_FILE
    from fineweb_gpt.run.run_files import read_metrics

    return [row["val/loss"] for row in read_metrics(run_dir / METRICS_FILE) if "val/loss" in row][-1]


@pytest.mark.slow
def test_token_shards_train_to_the_parquet_paths_val_loss(sample_shards, tmp_path):
    """Same documents, same validation windows: the val loss matches within the noise of the data order."""
    steps = ["trainer.max_steps=40", "val_every_steps=40", "optim.warmup_steps=10", "data.val_tokens=4096"]

    def train(name: str, *data: str) -> float:
        result = run_cli(*SMALL, *steps, *data, f"hydra.run.dir={tmp_path / name}", cwd=TESTS_DIR)
        assert result.returncode == 0, result.stderr[-3000:]
        return final_val_loss(tmp_path / name)

    held_out = f"data.val_fraction={SAMPLE_VAL_FRACTION}"  # as the shards were tokenized
    parquet = [train(f"parquet{seed}", "data=sample", held_out, f"seed={seed}") for seed in (1, 2)]
    shards = train("shards", "data=token_shards", f"data.paths={sample_shards}", "seed=1")
    noise = abs(parquet[0] - parquet[1])  # another data order (and initialisation) of the same documents
    print(f"final val loss: parquet {parquet}, token shards {shards:.4f}")
    assert max(parquet) < 9.5  # both learned: a fresh model scores about ln(50304) = 10.8, 40 steps about 9.1
    assert abs(shards - parquet[0]) <= max(3 * noise, 0.01 * parquet[0]), (shards, parquet)
