import pytest

from fineweb_gpt.data import bundled_sample_path, read_documents
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, bundled_ranks_path, encode_text, gpt2_tokenizer, load_gpt2_encoding


def test_known_gpt2_ids_offline():
    enc = gpt2_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [END_OF_TEXT_ID] == [enc.eot_token]
    assert enc.n_vocab == 50257


def test_real_fineweb_text_round_trips():
    enc = gpt2_tokenizer()
    _, texts = read_documents([bundled_sample_path()], "text")
    for text in texts[:50]:
        tokens = enc.encode_ordinary(text)
        assert max(tokens) < END_OF_TEXT_ID
        assert enc.decode(tokens) == text


def test_ranks_file_with_wrong_hash_is_refused(tmp_path):
    tampered = tmp_path / "gpt2.tiktoken"
    data = bytearray(bundled_ranks_path().read_bytes())
    data[-3] = ord("9") if data[-3] != ord("9") else ord("8")  # change one rank's digit
    tampered.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256"):
        load_gpt2_encoding(tampered)


def test_missing_ranks_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_gpt2_encoding(tmp_path / "nope.tiktoken")


def test_special_token_text_in_a_document_is_plain_text():
    enc = gpt2_tokenizer()
    page = "GPT-2 separates documents with <|endoftext|>; chat models use <|im_start|>."
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode(page)  # what a web page quoting the separator did to a run before
    tokens = encode_text(page).tolist()
    assert tokens == enc.encode_ordinary(page) and END_OF_TEXT_ID not in tokens
    assert enc.decode(tokens) == page
