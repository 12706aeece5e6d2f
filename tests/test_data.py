import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineweb_gpt.data import (
    FineWebDataModule,
    PackedWindows,
    bundled_sample_path,
    is_validation_document,
    read_documents,
    resolve_parquet_files,
    tokenize_documents,
)
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer


def write_parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_documents_are_separated_by_end_of_text():
    enc = gpt2_tokenizer()
    texts = ["First document.", "Second one, a bit longer.", "Third."]
    tokens = tokenize_documents(texts)
    expected = []
    for text in texts:
        expected += enc.encode_ordinary(text) + [END_OF_TEXT_ID]
    assert tokens.tolist() == expected


def test_packed_windows_use_every_token_once_and_drop_only_the_tail():
    tokens = np.arange(103, dtype=np.uint16)
    windows = PackedWindows(tokens, block_size=9)  # windows of 10 tokens
    assert len(windows) == 10
    seen = []
    for i in range(len(windows)):
        inputs, targets = windows[i]
        assert inputs.shape == targets.shape == (9,)
        assert targets[:-1].tolist() == inputs[1:].tolist()  # targets are inputs shifted by one
        seen += inputs.tolist() + [targets[-1].item()]
    assert seen == list(range(100))  # the 3-token tail is the only loss


def test_validation_split_is_deterministic_disjoint_and_about_the_asked_fraction():
    ids, _ = read_documents([bundled_sample_path()], "text")
    held_out = {i for i in ids if is_validation_document(i, 0.05)}
    again = {i for i in ids if is_validation_document(i, 0.05)}
    assert held_out == again
    assert 20 <= len(held_out) <= 60  # 5% of 800 documents
    assert len(ids) == 800 == len(set(ids))


def test_datamodule_holds_out_documents_and_scores_the_same_val_batches(tmp_path):
    dm = FineWebDataModule(block_size=64, micro_batch_size=4, val_fraction=0.05, val_tokens=1024)
    dm.setup("fit")
    ids, texts = read_documents([bundled_sample_path()], "text")
    val_texts = [t for i, t in zip(ids, texts) if is_validation_document(i, 0.05)]
    train_texts = [t for i, t in zip(ids, texts) if not is_validation_document(i, 0.05)]
    assert dm.train_windows.tokens.tolist() == tokenize_documents(train_texts).tolist()
    assert dm.val_windows.tokens.tolist() == tokenize_documents(val_texts).tolist()
    assert dm.unique_train_tokens == (len(dm.train_windows.tokens) // 65) * 64

    first = [x.clone() for x, _ in dm.val_dataloader()]
    second = [x.clone() for x, _ in dm.val_dataloader()]
    assert sum(x.numel() for x in first) == 1024
    assert all((a == b).all() for a, b in zip(first, second))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.parquet does not exist"):
        resolve_parquet_files(str(tmp_path / "nope.parquet"))


def test_directory_and_glob_without_parquet_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no .parquet files"):
        resolve_parquet_files(str(tmp_path))
    with pytest.raises(ConfigError, match="matches no .parquet files"):
        resolve_parquet_files(str(tmp_path / "*.parquet"))


def test_directory_and_glob_find_shards_in_order(tmp_path):
    for name in ("001_00000.parquet", "000_00000.parquet"):
        write_parquet(tmp_path / name, text=["a"])
    expected = [tmp_path / "000_00000.parquet", tmp_path / "001_00000.parquet"]
    assert resolve_parquet_files(str(tmp_path)) == expected
    assert resolve_parquet_files(str(tmp_path / "00*_00000.parquet")) == expected


def test_missing_text_column_lists_the_columns_found(tmp_path):
    path = write_parquet(tmp_path / "edu.parquet", content=["hello"], score=[3.1])
    with pytest.raises(ConfigError, match=r"no 'text' column \(columns: content, score\)"):
        read_documents([path], "text")
    assert read_documents([path], "content")[1] == ["hello"]


def test_empty_shard_is_refused(tmp_path):
    path = write_parquet(tmp_path / "empty.parquet", text=pa.array([], pa.string()))
    with pytest.raises(ConfigError, match="empty.parquet has no rows"):
        read_documents([path], "text")


def test_truncated_parquet_is_refused(tmp_path):
    data = bundled_sample_path().read_bytes()
    path = tmp_path / "000_00000.parquet"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="000_00000.parquet is not a readable parquet file"):
        read_documents([path], "text")


def test_null_and_empty_texts_are_skipped(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", text=["one", None, "", "two"], id=["a", "b", "c", "d"])
    assert read_documents([path], "text") == (["a", "d"], ["one", "two"])
