"""Split a document into chunks of at most C tokens, for chain summarisation.

Two ways of counting, chosen by the caller:

* **With a tokenizer** (the model's local folder has a ``tokenizer.json``, or the Hugging Face
  cache already holds the model id's, and the ``tokenizers`` package is installed: see
  :func:`load_tokenizer`, :func:`cached_tokenizer`): the document is encoded once, without special
  tokens, and the ids are cut into consecutive slices of at most C tokens, each decoded back to
  text. A cut is moved back to a whitespace boundary when one lies in the last 20% of the slice,
  so words stay whole; otherwise it is hard. Every token lies in exactly one chunk, and joining
  the chunk texts gives the document back up to whitespace (as the tokenizer decodes it).
* **Without a tokenizer** (the approximation of :mod:`apps.tokens`: ``BYTES_PER_TOKEN`` = 4
  UTF-8 bytes per token): a chunk holds at most ``C * 4`` UTF-8 bytes, cut after the last
  whitespace when one lies in the last 20% of that budget, otherwise hard but never inside a
  character. Concatenating the chunks gives the document back exactly. A chunk that would be
  whitespace only is merged into the previous one (into the next at the document's start), the
  one case where a chunk may exceed the budget (by whitespace alone).

With a tokenizer the token limit is strict instead: cuts are placed so that trailing whitespace
tokens travel with the last words, and only a whitespace run longer than a chunk can still
give a whitespace-only chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from apps.tokens import BYTES_PER_TOKEN, estimate_tokens

TOKENIZER_FILE = "tokenizer.json"
WINDOW_FRACTION = 0.2  # share of a chunk's budget (tokens or bytes) searched for a word boundary


class ChunkError(ValueError):
    """A document that cannot be chunked (for instance, an empty one)."""


class Tokenizer(Protocol):
    """What chunking needs of a tokenizer: text to ids and back."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ``decode(encode(t))`` equals ``t`` up to whitespace."""
        ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a document."""

    text: str  # the chunk's text
    tokens: int  # tokens, counted by the tokenizer used (or estimated, see apps.tokens)


class _HFTokenizer:
    """:class:`Tokenizer` over a ``tokenizers.Tokenizer`` (special tokens neither added nor
    skipped)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def encode(self, text: str) -> list[int]:
        return list(self._inner.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._inner.decode(list(ids), skip_special_tokens=False))


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer of a model folder, or None when chunking must use the approximation.

    Args:
        folder: a model folder (as vLLM loads it).

    Returns:
        A :class:`Tokenizer` over ``folder/tokenizer.json`` (cached per resolved folder), or None
        when the folder has no ``tokenizer.json`` or the ``tokenizers`` package is missing.
    """
    path = Path(folder).resolve() / TOKENIZER_FILE
    if not path.is_file():
        return None  # NOTE(chunking): not cached, so a tokenizer written later is found
    return _load_file(str(path))


def cached_tokenizer(repo_id: str, cache_dir: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer of a Hugging Face model id when its ``tokenizer.json`` is already in the
    local Hugging Face cache (``cache_dir``, default the usual one); nothing is downloaded.
    None when it is not there or ``huggingface_hub`` / ``tokenizers`` is missing."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        got = try_to_load_from_cache(repo_id, TOKENIZER_FILE, cache_dir=cache_dir)
    except ValueError:  # not a valid repo id (a path, say)
        return None
    return _load_file(got) if isinstance(got, str) else None


@functools.lru_cache(maxsize=16)
def _load_file(path: str) -> Tokenizer | None:
    try:
        import tokenizers
    except ImportError:
        return None
    return _HFTokenizer(tokenizers.Tokenizer.from_file(path))


def split_chunks(text: str, chunk_tokens: int, tokenizer: Tokenizer | None = None) -> list[Chunk]:
    """Cut a document into chunks of at most ``chunk_tokens`` tokens (see the module docstring).

    Args:
        text: the document.
        chunk_tokens: the most tokens per chunk (at least 1).
        tokenizer: the model's tokenizer; None uses the 4-bytes-per-token approximation.

    Returns:
        The chunks in document order (at least one).

    Raises:
        ValueError: ``chunk_tokens`` is below 1.
        ChunkError: the document is empty or whitespace only.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if not text.strip():
        raise ChunkError("document is empty")
    if tokenizer is None:
        return _merge_blank(
            [Chunk(p, estimate_tokens(p)) for p in _byte_pieces(text, chunk_tokens)]
        )
    return _token_chunks(text, chunk_tokens, tokenizer)


# --- approximation: UTF-8 byte budget -------------------------------------------------------


def _byte_pieces(text: str, chunk_tokens: int) -> list[str]:
    """Consecutive pieces of ``text`` within the byte budget (concatenation is ``text``)."""
    budget = max(1, int(chunk_tokens * BYTES_PER_TOKEN))  # UTF-8 bytes per chunk
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = start + _piece_length(text[start : start + budget + 1], budget)
        pieces.append(text[start:end])
        start = end
    return pieces


def _piece_length(head: str, budget: int) -> int:
    """Characters of ``head`` to take as one chunk.

    ``head`` is the rest of the document, cut to ``budget + 1`` characters: when it fits the
    budget it is the whole rest.
    """
    data = head.encode("utf-8")
    if len(data) <= budget:
        return len(head)
    cut = budget
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # never inside a multi-byte character
        cut -= 1
    if cut == 0:  # a single character above the budget (budget < 4): take it alone
        return 1
    fitting = data[:cut].decode("utf-8")
    if head[len(fitting)].isspace():
        return len(fitting)  # the hard cut already falls before whitespace
    window_start = budget - int(budget * WINDOW_FRACTION)  # bytes
    for i in range(len(fitting) - 1, 0, -1):
        if fitting[i].isspace():
            if len(fitting[: i + 1].encode("utf-8")) < window_start:
                break
            return i + 1  # the whitespace ends this chunk
    return len(fitting)


def _merge_blank(chunks: list[Chunk]) -> list[Chunk]:
    """Merge whitespace-only chunks into the previous chunk (or the next, at the start)."""
    merged: list[Chunk] = []
    pending = ""  # leading whitespace waiting for the first chunk with text
    for chunk in chunks:
        if chunk.text.isspace() and merged:
            text = merged[-1].text + chunk.text
            merged[-1] = Chunk(text, estimate_tokens(text))
        elif chunk.text.isspace():
            pending += chunk.text
        else:
            text = pending + chunk.text
            merged.append(Chunk(text, estimate_tokens(text)))
            pending = ""
    return merged


# --- real tokenizer -------------------------------------------------------------------------


def _token_chunks(text: str, chunk_tokens: int, tokenizer: Tokenizer) -> list[Chunk]:
    """Encode once, cut the ids into slices of at most ``chunk_tokens``, decode each."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ChunkError("document encodes to no tokens")
    content_end = _content_end(ids, tokenizer)
    chunks: list[Chunk] = []
    start = 0
    while start < len(ids):
        end = _token_cut(ids, start, chunk_tokens, content_end, tokenizer)
        chunks.append(Chunk(tokenizer.decode(ids[start:end]), end - start))
        start = end
    return chunks


def _content_end(ids: Sequence[int], tokenizer: Tokenizer) -> int:
    """Index after the last token that decodes to more than whitespace."""
    end = len(ids)
    while end > 0 and not tokenizer.decode(ids[end - 1 : end]).strip():
        end -= 1
    return end


def _token_cut(
    ids: Sequence[int], start: int, limit: int, content_end: int, tokenizer: Tokenizer
) -> int:
    """End index of the chunk starting at ``start``: whitespace boundary, clean cut, or hard.

    NOTE(chunking): a cut never leaves only trailing whitespace tokens for the next chunk when
    some content can go with them, so the document's final newline does not become a chunk.
    """
    if len(ids) - start <= limit:
        return len(ids)
    high = start + limit
    if high >= content_end and content_end - 1 > start:
        high = content_end - 1
    low = max(start + 1, high - int(limit * WINDOW_FRACTION))
    candidates = range(high, low - 1, -1)
    for cut in candidates:
        if _space_between(ids, cut, tokenizer):
            return cut
    for cut in candidates:
        if _clean_between(ids, cut, tokenizer):
            return cut
    return high


def _space_between(ids: Sequence[int], cut: int, tokenizer: Tokenizer) -> bool:
    """Whether decoded text has whitespace where ``ids[cut - 1]`` meets ``ids[cut]``."""
    left = tokenizer.decode(ids[cut - 1 : cut])
    right = tokenizer.decode(ids[cut : cut + 1])
    if left[-1:].isspace() or right[:1].isspace():
        return True
    pair = tokenizer.decode(ids[cut - 1 : cut + 1])  # e.g. Metaspace or word-level decoders
    return pair.startswith(left) and pair[len(left) : len(left) + 1].isspace()


def _clean_between(ids: Sequence[int], cut: int, tokenizer: Tokenizer) -> bool:
    """Whether cutting at ``cut`` leaves no partial character (U+FFFD) on either side."""
    left = tokenizer.decode(ids[cut - 1 : cut])
    right = tokenizer.decode(ids[cut : cut + 1])
    return not left.endswith("\ufffd") and not right.startswith("\ufffd")
