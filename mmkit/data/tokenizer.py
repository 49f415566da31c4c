"""Byte-level tokenizer: UTF-8 bytes shifted past three special ids. Nothing to download.

    "Hi" → [BOS, 3 + ord("H"), 3 + ord("i"), EOS, PAD, PAD, ...]   (length = context_length)

Every string has a tokenization (no unknown token), the vocabulary is fixed at `VOCAB_SIZE` = 259,
and `decode(encode(s)) == s` for any string that fits in `context_length - 2` bytes. Longer text is
cut at a character boundary and still ends with EOS, so a model can rely on `BOS … EOS PAD…`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD_ID = 0  # models mask it in attention and pooling
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3
BYTE_OFFSET = NUM_SPECIAL  # byte b has id b + 3
VOCAB_SIZE = 256 + NUM_SPECIAL  # 259: every byte value plus PAD, BOS, EOS

_MIN_CONTEXT = 2  # room for BOS and EOS


def _is_utf8_continuation(byte: int) -> bool:
    return byte & 0b1100_0000 == 0b1000_0000


def _truncate_utf8(data: bytes, max_bytes: int) -> bytes:
    """The longest prefix of at most `max_bytes` bytes that does not split a character."""
    if len(data) <= max_bytes:
        return data
    cut = max_bytes
    while cut > 0 and _is_utf8_continuation(data[cut]):
        cut -= 1
    return data[:cut]


def encode(text: str, context_length: int) -> list[int]:
    """`[BOS, bytes…, EOS, PAD…]` of exactly `context_length` ids; long text is truncated, EOS kept."""
    if context_length < _MIN_CONTEXT:
        raise ValueError(f"context_length must be at least {_MIN_CONTEXT} (BOS, EOS), got {context_length}")
    data = _truncate_utf8(text.encode("utf-8"), context_length - _MIN_CONTEXT)
    ids = [BOS_ID, *(byte + BYTE_OFFSET for byte in data), EOS_ID]
    return ids + [PAD_ID] * (context_length - len(ids))


def encode_batch(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """int64 `[N, context_length]`, one row per text (see `encode`)."""
    rows = [encode(text, context_length) for text in texts]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """The text of one row of ids: specials are dropped, the rest read back as UTF-8 bytes.

    Invalid byte sequences (only possible for ids not made by `encode`) become U+FFFD.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < VOCAB_SIZE)
    return data.decode("utf-8", errors="replace")
