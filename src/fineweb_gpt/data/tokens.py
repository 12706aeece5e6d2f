"""Documents -> GPT-2 token ids -> packed windows of block_size + 1 tokens.

Document text is always encoded as plain text (tokenizer.encode_text): a web page that quotes
`<|endoftext|>` gets the ordinary tokens of those characters, never the special id, so no
content can stop a run. Only the separator this module appends after each document is
END_OF_TEXT_ID. Empty and null documents are dropped before they get a separator.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from fineweb_gpt.tokenizer import END_OF_TEXT_ID, encode_text

NO_TOKENS = np.empty(0, dtype=np.int64)


def tokenize_documents(texts: list[str]) -> np.ndarray:
    """Token ids of all documents, each followed by <|endoftext|>, as one int64 array."""
    end = np.array([END_OF_TEXT_ID], dtype=np.int64)
    parts = [part for text in texts for part in (encode_text(text), end)]
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else NO_TOKENS


def cut_windows(carry: np.ndarray, tokens: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(full windows of carry + tokens as rows, the tokens left over for the next chunk)."""
    joined = np.concatenate([carry, tokens]) if len(carry) else tokens
    count = len(joined) // window
    return joined[: count * window].reshape(count, window), joined[count * window :]


def shuffled_order(count: int, *key: int) -> np.ndarray:
    """A permutation of range(count) that depends only on the key (seed, epoch, where)."""
    return np.random.default_rng(list(key)).permutation(count)


class PackedWindows(Dataset):
    """Non-overlapping windows of block_size + 1 tokens; the last partial window is dropped."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens = tokens
        self.window = block_size + 1

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[index * self.window : (index + 1) * self.window].astype(np.int64))
