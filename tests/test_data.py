from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from fineweb_gpt import data as data_module
from fineweb_gpt.data import (
    FineWebDataModule,
    PackedWindows,
    StreamPosition,
    TokenWindowStream,
    bundled_sample_path,
    download_hub_files,
    inspect_parquet,
    is_validation_document,
    read_documents,
    resolve_parquet_files,
    tokenize_documents,
)
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer

BLOCK = 64
VAL_FRACTION = 0.05


def write_parquet(path, row_group_size=None, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def sample_stream(rank=0, world_size=1, num_workers=0, micro_batch_size=1, files=None, block=BLOCK, **kwargs):
    infos = [inspect_parquet(f, "text") for f in (files or [bundled_sample_path()])]
    return TokenWindowStream(
        infos,
        "text",
        VAL_FRACTION,
        block,
        micro_batch_size,
        rows_per_chunk=64,
        seed=7,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        **kwargs,
    )


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
            per_stream.setdefault(stream, []).append(batch["windows"][0].numpy())
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
    print(
        f"exactly-once: source {len(source)} tokens, seen {windows.size} in {len(windows)} windows, dropped {dropped}"
    )


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
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    continued = consume(iter(resumed.train_dataloader()), resumed, 40)

    for a, b in zip(reference, consumed + continued, strict=True):
        assert torch.equal(a, b)
    if docs == 20:  # 20 documents: the run resumes in the second epoch
        assert min(p.epoch for p in first.positions.values()) == 1


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
    assert first.shape == (windows, BLOCK + 1)
    assert torch.equal(first, torch.cat(list(dm.val_dataloader())))


def test_split_is_deterministic_and_about_the_asked_fraction():
    keys, _ = read_documents([bundled_sample_path()], "text")
    held_out = [k for k in keys if is_validation_document(k, VAL_FRACTION)]
    assert held_out == [k for k in keys if is_validation_document(k, VAL_FRACTION)]
    assert 20 <= len(held_out) <= 60 and len(keys) == len(set(keys)) == 800


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
    stream = TokenWindowStream([inspect_parquet(path, "text")], "text", 0.01, 8, 1, 1024, seed=0)
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


def test_missing_text_column_lists_the_columns_found(tmp_path):
    path = write_parquet(tmp_path / "edu.parquet", content=["hello"], score=[3.1])
    with pytest.raises(ConfigError, match=r"edu\.parquet has no 'text' column \(columns: content, score\)"):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4, path=str(path))
    assert FineWebDataModule(block_size=BLOCK, micro_batch_size=4, path=str(path), text_column="content").files == [
        path
    ]


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


# --- Hugging Face hub shards, cached locally -------------------------------------------


def test_cached_hub_files_are_used_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shard_dir = tmp_path / "HuggingFaceFW" / "fineweb" / "sample" / "10BT"
    shard_dir.mkdir(parents=True)
    for name in ("000_00000.parquet", "001_00000.parquet", "004_00000.parquet"):
        write_parquet(shard_dir / name, text=["hello world"])
    files = download_hub_files("HuggingFaceFW/fineweb", "sample/10BT/00[0-3]_00000.parquet", str(tmp_path))
    assert [f.name for f in files] == ["000_00000.parquet", "001_00000.parquet"]


def test_offline_without_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"no files matching sample/10BT/00\[0-3\]_00000\.parquet cached in"):
        download_hub_files("HuggingFaceFW/fineweb", "sample/10BT/00[0-3]_00000.parquet", str(tmp_path))


def test_unreachable_hub_without_cache_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    with pytest.raises(ConfigError, match="cannot list HuggingFaceFW/fineweb on the Hugging Face hub"):
        download_hub_files("HuggingFaceFW/fineweb", "sample/10BT/*.parquet", str(tmp_path))


def test_hub_files_are_downloaded_once(tmp_path, monkeypatch):
    import huggingface_hub

    downloads = []
    repo_files = ["README.md", "sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet", "data/x.parquet"]

    def fake_download(repo, name, repo_type, local_dir):
        downloads.append(name)
        target = local_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bundled_sample_path().read_bytes())
        return str(target)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for _ in range(2):
        dm = FineWebDataModule(
            block_size=BLOCK,
            micro_batch_size=4,
            hf_repo="HuggingFaceFW/fineweb",
            hf_files="sample/10BT/*.parquet",
            cache_dir=str(tmp_path),
        )
        dm.prepare_data()
        dm.setup("fit")
    assert downloads == ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    assert [f.name for f in dm.files] == ["000_00000.parquet", "001_00000.parquet"]


def test_stream_position_round_trips_through_a_plain_dict():
    position = StreamPosition(epoch=2, unit=3, chunk=1, window=17, carry=[1, 2, 3], skipped=4)
    assert StreamPosition(**position.to_dict()) == position
    assert data_module.StreamPosition() == StreamPosition(0, 0, 0, 0, [], 0)


def test_no_data_given_is_refused_instead_of_silently_using_the_sample():
    with pytest.raises(ConfigError, match="no training data given: set data.path or data.paths"):
        FineWebDataModule(block_size=BLOCK, micro_batch_size=4)
