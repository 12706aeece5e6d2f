"""GPT-2 byte-pair encoding through tiktoken, with no network; document text is always plain text.

tiktoken's own get_encoding("gpt2") downloads its ranks at first use, which fails offline
and on clusters without internet. The ranks ship inside this package instead, and their
sha256 is checked so a damaged or substituted file cannot silently change every token id.

Documents are encoded with encode_text: a web page that quotes "<|endoftext|>" gets the
ordinary tokens of those characters (tiktoken's encode() would refuse the page, and
allowing the special would plant a fake separator). Only the data pipeline's own separator
after each document is END_OF_TEXT_ID.
"""

import base64
import hashlib
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from fineweb_gpt.errors import ConfigError

# Same bytes as tiktoken's r50k_base file (OpenAI's GPT-2 release, MIT license).
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
GPT2_VOCAB_SIZE = 50257  # token ids 0..50256, the last one <|endoftext|>
# GPT-2's vocabulary rounded up to a multiple of 64: the embedding and head matmuls run
# on faster kernels, and the 47 extra rows are never targets, so they only learn to be rare.
PADDED_VOCAB_SIZE = 50304


def bundled_ranks_path() -> Path:
    return Path(str(resources.files("fineweb_gpt") / "assets" / "gpt2.tiktoken"))


def gpt2_ranks(ranks_path: str | Path | None = None) -> dict[bytes, int]:
    """GPT-2's byte-pair merge ranks from a ranks file (the bundled one by default), hash checked."""
    path = Path(ranks_path) if ranks_path is not None else bundled_ranks_path()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"tokenizer ranks file {path} cannot be read ({err.strerror}); reinstall fineweb_gpt"
        ) from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise ConfigError(
            f"tokenizer ranks file {path} has sha256 {digest}, not GPT-2's {GPT2_RANKS_SHA256}; "
            "it is damaged or not the GPT-2 file: reinstall fineweb_gpt"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_gpt2_encoding(ranks_path: str | Path | None = None) -> tiktoken.Encoding:
    """Build the GPT-2 encoding from a ranks file (the bundled one by default)."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=gpt2_ranks(ranks_path),
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


@cache
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The bundled GPT-2 encoding, built once per process (each DataLoader worker too)."""
    return load_gpt2_encoding()


def encode_text(text: str) -> np.ndarray:
    """A document's token ids (uint32), reading any special-token string in it as plain text."""
    return gpt2_tokenizer().encode_to_numpy(text, disallowed_special=())
