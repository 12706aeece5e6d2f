"""Any text trains: arbitrary documents through tokenizing and packing, every token out exactly once.

Web pages hold anything: the GPT-2 separator quoted as text, NUL and control characters, emoji,
empty and whitespace-only pages, huge pages. None of it may stop a run or leak a special id.
"""

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineweb_gpt.data import DataSettings, FineWebDataModule, TokenWindowStream, inspect_parquet, tokenize_documents
from fineweb_gpt.data.holdout import is_validation_document
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, gpt2_tokenizer
from fineweb_gpt.training import train
from helpers import SMALL

SPECIAL_LOOKING = [END_OF_TEXT, "<|endoftext|><|endoftext|>", "<|fim_prefix|>", "<|im_start|>", "<|endofprompt|>"]
ODD = ["\x00", "\x00\x01\x1b[31m", "\r\n", "\t", "\u200b", "\ufeff", "🦜🔥", "👩‍👩‍👧‍👦", "\U0010ffff", " ", "  \n\t "]
document = st.one_of(
    st.none(),
    st.just(""),
    st.text(),
    st.sampled_from(SPECIAL_LOOKING + ODD),
    st.lists(st.sampled_from(SPECIAL_LOOKING + ODD) | st.text(max_size=20), max_size=12).map("".join),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=3000),
)
ENCODINGS = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()),
}
# No example database: nothing written into the checkout.
FAST = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FAST
@given(st.lists(document, max_size=20))
def test_any_text_is_plain_text_with_one_separator_per_document(texts):
    enc = gpt2_tokenizer()
    kept = [t for t in texts if t]
    tokens = tokenize_documents(kept)
    assert tokens.dtype == np.int64
    # Only the separators are END_OF_TEXT_ID: one after each document, none from inside a page.
    ends = np.flatnonzero(tokens == END_OF_TEXT_ID)
    assert len(ends) == len(kept) and (len(kept) == 0 or ends[-1] == len(tokens) - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    for text, start, end in zip(kept, starts, ends):
        assert enc.decode(tokens[start:end].tolist()) == text  # every character of every document is there


def write_documents(path, texts, encoding, row_group_size):
    ids = [f"doc-{i}" for i in range(len(texts))]
    text_column = pa.array(texts, pa.string()).cast(ENCODINGS[encoding])
    pq.write_table(pa.table({"text": text_column, "id": ids}), path, row_group_size=row_group_size)
    return ids


@FAST
@given(
    texts=st.lists(document, min_size=1, max_size=40),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    rows_per_chunk=st.integers(1, 16),
    block_size=st.integers(1, 24),
    val_fraction=st.sampled_from([0.01, 0.2, 0.5]),
)
def test_every_token_of_every_training_document_comes_out_exactly_once(
    tmp_path, texts, encoding, rows_per_chunk, block_size, val_fraction
):
    path = tmp_path / f"{encoding}.parquet"
    ids = write_documents(path, texts, encoding, row_group_size=len(texts))  # one row group: read in file order
    expected = tokenize_documents([t for i, t in zip(ids, texts) if t and not is_validation_document(i, val_fraction)])
    settings_ = DataSettings(block_size, 1, "text", val_fraction, 1, 0, rows_per_chunk, seed=0)
    stream = TokenWindowStream([inspect_parquet(path, "text")], settings_)
    window = block_size + 1
    if len(expected) < window:  # too little text for one window: the one refusal there is, in one line
        with pytest.raises(ConfigError, match="got no full window"):
            next(stream.stream_windows(0))
        return
    windows = []
    for tokens, position in stream.stream_windows(0):
        if position.epoch > 0:
            break
        windows.append(tuple(tokens.tolist()))
    full = len(expected) // window
    cut = [tuple(expected[i * window : (i + 1) * window].tolist()) for i in range(full)]
    assert Counter(windows) == Counter(cut)  # every window of the training text, each once, whatever its order
    assert len(expected) - full * window < window  # only the last partial window is left out


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_web_text_of_every_kind_trains_to_the_end(make_config, tmp_path, encoding):
    page = (
        "A page about language models: GPT-2 ends documents with <|endoftext|>, "
        "and chat models use <|im_start|> and <|im_end|>. Emoji 🦜🔥, NUL \x00 bytes, \x1b[31mcolour codes. "
    )
    huge = page * 15_000  # a single document of about 2.5 MB
    texts = [page, None, "", "   \n\t ", huge, "\x00" * 100, "👩‍👩‍👧‍👦" * 500, END_OF_TEXT * 40] + [page] * 60
    path = tmp_path / f"web_{encoding}.parquet"
    ids = write_documents(path, texts, encoding, row_group_size=16)
    assert len(huge.encode()) > 2_000_000

    # One whole epoch of the two streams of two workers: every training token once, nothing raises.
    datamodule = FineWebDataModule(
        block_size=64, micro_batch_size=1, path=str(path), val_fraction=0.05, val_tokens=64, num_workers=2
    )
    datamodule.setup("fit")
    stream = datamodule.train_stream(0)
    seen = np.zeros(END_OF_TEXT_ID + 1, dtype=np.int64)
    for worker in (0, 1):
        for tokens, position in stream.stream_windows(worker):
            if position.epoch > 0:
                break
            seen += np.bincount(tokens, minlength=len(seen))
    training = [t for i, t in zip(ids, texts) if t and not is_validation_document(i, 0.05)]
    expected = np.bincount(tokenize_documents(training), minlength=len(seen))
    assert (seen <= expected).all() and (expected - seen).sum() < 2 * 65  # at most a partial window per stream
    assert seen[END_OF_TEXT_ID] <= len(training)  # the quoted separators stayed text

    data = ["data=single_parquet", f"data.path={path}", "data.val_fraction=0.05"]
    cfg = make_config(*SMALL, *data, "trainer.max_steps=3")
    assert math.isfinite(train(cfg))
