"""The parquet source: every token once per epoch, exact resume, held-out validation, bad input refused."""

import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from fineweb_gpt.data import (
    DataSettings,
    FineWebDataModule,
    PackedWindows,
    TokenWindowStream,
    bundled_sample_path,
    inspect_parquet,
    is_validation_document,
    read_documents,
    resolve_parquet_files,
    tokenize_documents,
)
from fineweb_gpt.data.ranks_and_workers import packed_carry, unpacked_carry
from fineweb_gpt.data.tokens import NO_TOKENS
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer
from fineweb_gpt.training import train
from helpers import SMALL, run_cli

BLOCK = 64
VAL_FRACTION = 0.05


def write_parquet(path, row_group_size=None, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def settings(block=BLOCK, micro_batch_size=1, num_workers=0, val_fraction=VAL_FRACTION, rows_per_chunk=64, seed=7):
    return DataSettings(block, micro_batch_size, "text", val_fraction, 1024, num_workers, rows_per_chunk, seed)


def sample_stream(rank=0, world_size=1, files=None, start=None, rotation=0, **kwargs):
    infos = [inspect_parquet(f, "text") for f in (files or [bundled_sample_path()])]
    return TokenWindowStream(infos, settings(**kwargs), rank, world_size, start, rotation)


def training_tokens(files=None) -> np.ndarray:
    keys, texts = read_documents(files or [bundled_sample_path()], "text")
    return tokenize_documents([t for k, t in zip(keys, texts) if not is_validation_document(k, VAL_FRACTION)])


def first_epoch_per_stream(stream_dataset, num_workers):
    """Windows of each stream's first epoch, read through a real DataLoader (batch of one window)."""
    loader = DataLoader(stream_dataset, batch_size=None, num_workers=num_workers)
    per_stream, finished = {}, set()
    for batch in loader:
        stream, epoch = batch["stream"], batch["position"]["epoch"]
        if epoch == 0:
            assert stream not in finished
            per_stream.setdefault(stream, []).append(batch["windows"][0].numpy().copy())
        else:
            finished.add(stream)
            if len(finished) == max(1, num_workers):
                return per_stream


def test_documents_are_separated_by_end_of_text():
    enc = gpt2_tokenizer()
    texts = ["First document.", "Second one, a bit longer.", "Third."]
    expected = []
    for text in texts:
        expected += enc.encode_ordinary(text) + [END_OF_TEXT_ID]
    assert tokenize_documents(texts).tolist() == expected


def test_every_training_token_exactly_once_per_epoch_across_2_ranks_x_2_workers():
    source, block = training_tokens(), 256
    seen = {}
    for rank in (0, 1):
        streams = sample_stream(rank, world_size=2, num_workers=2, block=block)
        seen.update(first_epoch_per_stream(streams, num_workers=2))
    assert sorted(seen) == [0, 1, 2, 3]  # every worker of every rank got data
    windows = np.concatenate([np.stack(w) for w in seen.values()])
    assert windows.shape[1] == block + 1
    source_counts, seen_counts = Counter(source.tolist()), Counter(windows.ravel().tolist())
    assert not seen_counts - source_counts  # nothing duplicated, nothing from validation
    dropped = len(source) - windows.size
    assert 0 <= dropped < 4 * (block + 1)  # at most one partial window per stream


def test_one_row_group_is_split_so_every_worker_gets_data(tmp_path):
    keys, texts = read_documents([bundled_sample_path()], "text")
    path = write_parquet(tmp_path / "one_group.parquet", text=texts[:200], id=keys[:200])
    assert len(inspect_parquet(path, "text").row_group_rows) == 1
    seen = first_epoch_per_stream(sample_stream(files=[path], num_workers=4), num_workers=4)
    assert sorted(seen) == [0, 1, 2, 3]
    windows = np.concatenate([np.stack(w) for w in seen.values()])
    source = training_tokens([path])
    assert not Counter(windows.ravel().tolist()) - Counter(source.tolist())
    assert 0 <= len(source) - windows.size < 4 * (BLOCK + 1)


def test_micro_batches_group_consecutive_windows_of_a_stream():
    singles = iter(sample_stream(micro_batch_size=1))
    batches = iter(sample_stream(micro_batch_size=4))
    for _ in range(30):
        batch = next(batches)
        expected = [next(singles) for _ in range(4)]
        assert torch.equal(batch["windows"], torch.cat([e["windows"] for e in expected]))
        assert batch["windows"].dtype == torch.int64
        assert batch["position"] == expected[-1]["position"]


def test_next_epoch_is_reshuffled():
    stream = sample_stream()
    epochs: dict[int, list] = {0: [], 1: []}
    for window, position in stream.stream_windows(0):
        if position.epoch > 1:
            break
        epochs[position.epoch].append(window.tobytes())
    assert len(epochs[0]) > 100 and abs(len(epochs[0]) - len(epochs[1])) <= 1
    assert epochs[0][:50] != epochs[1][:50]
    assert stream.stream_units(0, 0) != stream.stream_units(0, 1)
    # Windows are cut differently when units come in another order, but each epoch reads every document.
    tokens = [Counter(np.frombuffer(b"".join(epochs[e]), dtype=np.int64).tolist()) for e in (0, 1)]
    assert sum((tokens[0] - tokens[1]).values()) < 2 * (BLOCK + 1)


def consume(loader_iter, datamodule, count):
    """Feed batches through the DataModule's hook as Lightning does; return their windows."""
    return [datamodule.on_before_batch_transfer(next(loader_iter), 0).clone() for _ in range(count)]


def through_a_checkpoint(state: dict, tmp_path) -> dict:
    """The state as a resumed run gets it: saved with torch.save, loaded with weights_only=True."""
    torch.save({"datamodule": state}, tmp_path / "state.ckpt")
    return torch.load(tmp_path / "state.ckpt", weights_only=True)["datamodule"]


@pytest.mark.parametrize("num_workers, stop_after, docs", [(0, 7, 800), (2, 7, 800), (2, 31, 800), (2, 150, 20)])
def test_resume_from_saved_state_gives_the_same_batches(tmp_path, num_workers, stop_after, docs):
    keys, texts = read_documents([bundled_sample_path()], "text")
    path = write_parquet(tmp_path / "docs.parquet", row_group_size=10, text=texts[:docs], id=keys[:docs])

    def make():
        dm = FineWebDataModule(
            block_size=BLOCK,
            micro_batch_size=4,
            path=str(path),
            val_fraction=VAL_FRACTION,
            val_tokens=128,
            num_workers=num_workers,
            rows_per_chunk=64,
            seed=3,
        )
        dm.setup("fit")
        return dm

    uninterrupted = make()
    reference = consume(iter(uninterrupted.train_dataloader()), uninterrupted, stop_after + 40)

    first = make()
    consumed = consume(iter(first.train_dataloader()), first, stop_after)
    resumed = make()
    resumed.load_state_dict(through_a_checkpoint(first.state_dict(), tmp_path))
    continued = consume(iter(resumed.train_dataloader()), resumed, 40)

    for a, b in zip(reference, consumed + continued, strict=True):
        assert torch.equal(a, b)
    if docs == 20:  # 20 documents: the run resumes in the second epoch
        assert min(p["epoch"] for p in first.positions.values()) == 1


def test_validation_is_held_out_fixed_and_the_same_every_time():
    dm = FineWebDataModule(
        block_size=BLOCK, micro_batch_size=4, bundled_sample=True, val_fraction=VAL_FRACTION, val_tokens=2048
    )
    dm.setup("fit")
    keys, texts = read_documents([bundled_sample_path()], "text")
    held_out = tokenize_documents([t for k, t in zip(keys, texts) if is_validation_document(k, VAL_FRACTION)])
    windows = 2048 // BLOCK
    assert dm.val_windows.tokens.tolist() == held_out[: windows * (BLOCK + 1)].tolist()
    first = torch.cat(list(dm.val_dataloader()))
    assert first.shape == (windows, BLOCK + 1) and first.dtype == torch.int64
    assert torch.equal(first, torch.cat(list(dm.val_dataloader())))


def test_split_is_about_the_asked_fraction_and_the_same_in_every_process():
    keys, _ = read_documents([bundled_sample_path()], "text")
    held_out = [k for k in keys if is_validation_document(k, VAL_FRACTION)]
    assert 20 <= len(held_out) <= 60 and len(keys) == len(set(keys)) == 800
    # A DataLoader worker, a resumed run and fineweb-gpt-tokenize are other processes: with a
    # per-process hash (Python's hash() and PYTHONHASHSEED), they would split differently.
    script = (
        "from fineweb_gpt.data import bundled_sample_path, is_validation_document, read_documents\n"
        "keys, _ = read_documents([bundled_sample_path()], 'text')\n"
        f"print(' '.join(k for k in keys if is_validation_document(k, {VAL_FRACTION})))"
    )
    env = {"PYTHONHASHSEED": "12345", "PYTHONPATH": ":".join(sys.path)}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.split() == held_out


def test_unique_training_tokens_are_estimated_closely():
    dm = FineWebDataModule(
        block_size=BLOCK, micro_batch_size=4, bundled_sample=True, val_fraction=VAL_FRACTION, val_tokens=1024
    )
    dm.setup("fit")
    exact = len(training_tokens())
    assert dm.unique_train_tokens_estimated
    assert dm.unique_train_tokens == pytest.approx(exact, rel=0.05)


def test_token_count_column_is_used_when_present(tmp_path):
    enc = gpt2_tokenizer()
    texts = ["alpha beta gamma " * (i + 1) for i in range(300)]
    counts = [len(enc.encode_ordinary(t)) for t in texts]
    path = write_parquet(tmp_path / "fw.parquet", text=texts, id=[f"d{i}" for i in range(300)], token_count=counts)
    dm = FineWebDataModule(block_size=16, micro_batch_size=2, path=str(path), val_fraction=0.1, val_tokens=64)
    dm.setup("fit")
    assert dm.unique_train_tokens == int((sum(counts) + 300) * 0.9)


def test_epochs_seen_counts_consumed_windows():
    dm = FineWebDataModule(
        block_size=BLOCK, micro_batch_size=4, bundled_sample=True, val_fraction=VAL_FRACTION, val_tokens=1024
    )
    dm.setup("fit")
    windows_per_epoch = dm.unique_train_tokens / (BLOCK + 1)
    consume(iter(dm.train_dataloader()), dm, int(windows_per_epoch / 4 / 2))
    assert dm.epochs_seen == pytest.approx(0.5, abs=0.01)


def test_empty_and_null_texts_are_skipped_and_counted(tmp_path):
    texts = ["one two three four five six seven eight nine ten"] * 40 + [None, "", None] + ["x y z"] * 10
    path = write_parquet(tmp_path / "s.parquet", text=texts, id=[f"k{i}" for i in range(len(texts))])
    stream = TokenWindowStream([inspect_parquet(path, "text")], settings(block=8, val_fraction=0.01, seed=0))
    epoch0 = [p for _, p in zip(range(10_000), (p for _, p in stream.stream_windows(0))) if p.epoch == 0]
    assert epoch0[-1].skipped == 3


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.parquet", r"missing\.parquet does not exist"),
        (lambda d: d, "holds no .parquet files"),
        (lambda d: d / "*.parquet", "matches no .parquet files"),
    ],
)
def test_missing_inputs_are_named(tmp_path, make_input, message):
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(ConfigError, match=message):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4, path=str(make_input(tmp_path)))


def test_directory_and_glob_find_shards_in_order(tmp_path):
    for name in ("001_00000.parquet", "000_00000.parquet"):
        write_parquet(tmp_path / name, text=["a"])
    expected = [tmp_path / "000_00000.parquet", tmp_path / "001_00000.parquet"]
    assert resolve_parquet_files(str(tmp_path)) == expected
    assert resolve_parquet_files(str(tmp_path / "00*_00000.parquet")) == expected


def write_three_shards(folder):
    folder.mkdir()
    sample = pq.read_table(bundled_sample_path())
    for i in range(3):
        pq.write_table(sample.slice(i * 200, 200), folder / f"00{i}_00000.parquet", row_group_size=50)
    return sorted(folder.glob("*.parquet"))


@pytest.mark.parametrize(
    "paths, expected",
    [
        ("{d}", [0, 1, 2]),  # one folder, no brackets: a list of one, not of its characters
        ("{d}/00*_00000.parquet", [0, 1, 2]),  # one glob
        ("{d}/001_00000.parquet", [1]),  # one file
        ("[{d}/002_00000.parquet,{d}/000_00000.parquet]", [2, 0]),  # a list
    ],
)
def test_data_paths_as_typed_on_the_command_line(make_config, tmp_path, paths, expected):
    shards = write_three_shards(tmp_path / "shards")
    cfg = make_config(*SMALL, "data=multi_shard", "data.paths=" + paths.format(d=tmp_path / "shards"))
    datamodule = instantiate(cfg.data, micro_batch_size=cfg.hw.micro_batch_size)
    assert datamodule.files == [shards[i] for i in expected]


def test_one_folder_without_brackets_trains(tmp_path):
    write_three_shards(tmp_path / "shards")
    folder = tmp_path / "shards"
    result = run_cli(*SMALL, "data=multi_shard", f"data.paths={folder}", "trainer.max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"data             multi_shard: {folder}/" in result.stdout and " and 2 more files, " in result.stdout


def test_missing_text_column_lists_the_columns_found(tmp_path):
    path = write_parquet(tmp_path / "edu.parquet", content=["hello"], score=[3.1])
    with pytest.raises(ConfigError, match=r"edu\.parquet has no 'text' column \(columns: content, score\)"):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4, path=str(path))
    datamodule = FineWebDataModule(block_size=BLOCK, micro_batch_size=4, path=str(path), text_column="content")
    assert datamodule.files == [path]


def test_text_column_that_is_not_text_is_refused(tmp_path):
    path = write_parquet(tmp_path / "ints.parquet", text=[1, 2, 3], body=["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"ints\.parquet: column 'text' holds int64, not text; set data\.text_column"):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4, path=str(path))


def test_empty_shard_is_refused(tmp_path):
    path = write_parquet(tmp_path / "empty.parquet", text=pa.array([], pa.string()))
    with pytest.raises(ConfigError, match=r"empty\.parquet has no rows"):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4, paths=[str(path)])


def test_truncated_parquet_is_refused(tmp_path):
    raw = bundled_sample_path().read_bytes()
    path = tmp_path / "000_00000.parquet"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match=r"000_00000\.parquet is not a readable parquet file"):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4, path=str(path))


def test_packed_windows_use_every_token_once_and_drop_only_the_tail():
    windows = PackedWindows(np.arange(103, dtype=np.int64), block_size=9)
    assert len(windows) == 10
    assert torch.cat([windows[i] for i in range(10)]).tolist() == list(range(100))


def test_no_data_given_is_refused_instead_of_silently_using_the_sample():
    with pytest.raises(ConfigError, match="no training data given: set data.path or data.paths"):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.block_size=0", "data.block_size=0 must be at least 1; it is the training sequence length"),
        ("data.block_size=-8", "data.block_size=-8 must be at least 1"),
        ("data.block_size=abc", "data.block_size='abc' is not a whole number"),
        ("data.num_workers=-1", "data.num_workers=-1 must be at least 0; DataLoader workers per device"),
        ("data.rows_per_chunk=0", "data.rows_per_chunk=0 must be at least 1; rows tokenized and shuffled together"),
        ("data.val_fraction=0", "data.val_fraction=0 must be a fraction above 0 and at most 1"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 must be a fraction above 0 and at most 1"),
        ("data.val_tokens=0", "data.val_tokens=0 must be at least 1"),
    ],
)
def test_bad_data_settings_are_refused_before_anything_is_read(make_config, override, message):
    # The data file does not exist: the settings must be refused first, in one line.
    cfg = make_config(*SMALL, "data=single_parquet", "data.path=/nowhere/000_00000.parquet", override)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")) as raised:
        train(cfg)
    assert "\n" not in str(raised.value)


def test_bad_data_setting_is_one_line_on_the_command_line(tmp_path):
    result = run_cli(*SMALL, "data.block_size=0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.block_size=0 must be at least 1;")
    assert "Traceback" not in result.stderr


def test_carried_tokens_round_trip_and_older_checkpoints_lists_still_read():
    """A stream position keeps the tokens carried into its chunk packed; every GPT-2 id (and the
    padded vocabulary's) comes back, and positions saved as a list of ints still resume."""
    carried = np.array([0, 1, 220, END_OF_TEXT_ID, 50303], dtype=np.int64)
    assert unpacked_carry(packed_carry(carried)).tolist() == carried.tolist()
    assert unpacked_carry(carried.tolist()).tolist() == carried.tolist()
    assert unpacked_carry(packed_carry(NO_TOKENS)).tolist() == []
