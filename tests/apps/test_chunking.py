"""Document chunking: the byte approximation and real tokenizers built here with ``tokenizers``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from apps.chunking import Chunk, ChunkError, Tokenizer, load_tokenizer, split_chunks
from apps.tokens import BYTES_PER_TOKEN, estimate_tokens

tokenizers = pytest.importorskip("tokenizers")

WORDS = (
    *("the", "stage", "ends", "when", "its", "first", "model", "finishes", "and", "the"),
    *("worker", "reports", "token", "progress", "to", "the", "coordinator", "which", "plans"),
)  # 19 words, all in DOC
DOC = (
    "The stage ends when its first model finishes. The worker reports token progress to the "
    "coordinator,\nwhich plans the next stage.\n\nLater stages reuse the models of the first; "
    "every model finishes in turn, and the coordinator stops when the last stage ends.\n"
)


def _squeeze(text: str) -> str:
    """``text`` without any whitespace (for comparisons "up to whitespace")."""
    return "".join(text.split())


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


# --- approximation ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_tokens", [1, 2, 3, 5, 8, 13, 40, 10_000])
def test_approximation_concatenates_exactly_within_budget(chunk_tokens: int) -> None:
    chunks = split_chunks(DOC, chunk_tokens)
    budget = chunk_tokens * BYTES_PER_TOKEN
    assert "".join(c.text for c in chunks) == DOC
    assert all(_bytes(c.text) <= budget for c in chunks)
    assert all(c.text.strip() for c in chunks)
    assert [c.tokens for c in chunks] == [estimate_tokens(c.text) for c in chunks]


def test_approximation_single_chunk_when_document_fits() -> None:
    assert split_chunks("short text", 100) == [Chunk("short text", estimate_tokens("short text"))]


def test_approximation_cuts_after_last_whitespace_in_window() -> None:
    # budget 20 bytes, window = last 4 bytes; the space after "abcdefghijklmnop" ends at byte 17
    text = "abcdefghijklmnop qrstuvwxyz"
    chunks = split_chunks(text, 5)
    assert [c.text for c in chunks] == ["abcdefghijklmnop ", "qrstuvwxyz"]


def test_approximation_cuts_hard_without_whitespace_in_window() -> None:
    # the only space ends at byte 4, outside the last 20% of a 20-byte budget
    text = "abc " + "x" * 30
    chunks = split_chunks(text, 5)
    assert [c.text for c in chunks] == ["abc " + "x" * 16, "x" * 14]


def test_approximation_keeps_words_whole_in_prose() -> None:
    chunks = split_chunks(DOC, 10)
    for left, right in zip(chunks, chunks[1:], strict=False):
        assert left.text[-1].isspace() or right.text[0].isspace()


def test_approximation_never_splits_multibyte_characters() -> None:
    text = "東京" * 20 + " é" * 10 + "😀" * 9
    for chunk_tokens in (1, 2, 3, 7):
        chunks = split_chunks(text, chunk_tokens)
        assert "".join(c.text for c in chunks) == text
        assert all(_bytes(c.text) <= chunk_tokens * BYTES_PER_TOKEN for c in chunks)
    # 4-byte budget: one 3-byte kanji per chunk, never a half character
    assert [c.text for c in split_chunks("東京都", 1)] == ["東", "京", "都"]


def test_approximation_merges_whitespace_only_chunks() -> None:
    # budget 8 bytes: "abcdefgh" | 8 spaces (merged back) | "  ijkl"
    text = "abcdefgh" + " " * 10 + "ijkl"
    chunks = split_chunks(text, 2)
    assert [c.text for c in chunks] == ["abcdefgh" + " " * 8, "  ijkl"]
    assert chunks[0].tokens == estimate_tokens(chunks[0].text) == 4
    # budget 4 bytes: three whitespace-only pieces go forward into the first chunk with text
    leading = " " * 12 + "word"
    assert [c.text for c in split_chunks(leading, 1)] == [leading]
    trailing = "abcd" + "\n" * 9
    assert [c.text for c in split_chunks(trailing, 1)] == [trailing]


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_document_is_an_error(text: str) -> None:
    with pytest.raises(ChunkError, match="document is empty"):
        split_chunks(text, 10)


@pytest.mark.parametrize("chunk_tokens", [0, -3])
def test_chunk_tokens_below_one_is_an_error(chunk_tokens: int) -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        split_chunks("text", chunk_tokens)


# --- real tokenizers -------------------------------------------------------------------------


def _word_level_folder(folder: Path) -> Path:
    """A word-level tokenizer whose post-processor would add ``[CLS]`` if asked to."""
    from tokenizers import decoders, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "[CLS]": 1}
    for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(DOC.lower()):
        vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _byte_level_folder(folder: Path) -> Path:
    """A small byte-level BPE trained on :data:`DOC` (decodes back to the exact text)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([DOC] * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    tok = load_tokenizer(_word_level_folder(tmp_path_factory.mktemp("word")))
    assert tok is not None
    return tok


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    tok = load_tokenizer(_byte_level_folder(tmp_path_factory.mktemp("bpe")))
    assert tok is not None
    return tok


def test_load_tokenizer_adds_no_special_tokens(word_tokenizer: Tokenizer) -> None:
    ids = word_tokenizer.encode("the worker reports progress .")
    assert ids and 1 not in ids  # no [CLS]
    assert 0 not in ids  # every word is known
    assert word_tokenizer.decode(ids) == "the worker reports progress."  # WordPiece cleanup


def test_load_tokenizer_is_cached_per_folder(tmp_path: Path) -> None:
    folder = _word_level_folder(tmp_path / "model")
    first = load_tokenizer(folder)
    assert first is not None
    assert load_tokenizer(str(folder)) is first
    assert load_tokenizer(tmp_path / "." / "model") is first


def test_load_tokenizer_none_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(tmp_path / "missing") is None


def test_cached_tokenizer_reads_the_hugging_face_cache_only(tmp_path: Path) -> None:
    """An HF id's tokenizer is used when its tokenizer.json is in the cache; no download."""
    from apps.chunking import cached_tokenizer

    repo = tmp_path / "models--acme--tiny-chat"
    snap = _word_level_folder(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    got = cached_tokenizer("acme/tiny-chat", cache_dir=tmp_path)
    assert got is not None and got is load_tokenizer(snap)
    assert cached_tokenizer("acme/not-cached", cache_dir=tmp_path) is None
    assert cached_tokenizer("/not/a/repo id", cache_dir=tmp_path) is None


@pytest.mark.parametrize("chunk_tokens", [1, 2, 3, 5, 7, 10, 16, 1000])
def test_word_level_chunks_conserve_tokens(word_tokenizer: Tokenizer, chunk_tokens: int) -> None:
    text = DOC.lower()
    ids = word_tokenizer.encode(text)
    assert 0 not in ids  # every word is in the vocabulary
    chunks = split_chunks(text, chunk_tokens, word_tokenizer)
    assert all(1 <= c.tokens <= chunk_tokens for c in chunks)
    assert sum(c.tokens for c in chunks) == len(ids)
    rejoined = [i for c in chunks for i in word_tokenizer.encode(c.text)]
    assert rejoined == ids  # every token in exactly one chunk, in order
    joined = "".join(c.text for c in chunks)
    assert _squeeze(joined) == _squeeze(word_tokenizer.decode(ids)) == _squeeze(text)


def test_word_level_full_chunks_when_every_boundary_is_a_word(
    word_tokenizer: Tokenizer,
) -> None:
    text = " ".join(WORDS)
    assert 0 not in word_tokenizer.encode(text)
    chunks = split_chunks(text, 4, word_tokenizer)
    assert [c.tokens for c in chunks] == [4] * (len(WORDS) // 4) + [len(WORDS) % 4]
    assert chunks[0].text == " ".join(WORDS[:4])


@pytest.mark.parametrize("chunk_tokens", [5, 8, 10, 20, 64])
def test_byte_level_chunks_rejoin_exactly(bpe_tokenizer: Tokenizer, chunk_tokens: int) -> None:
    ids = bpe_tokenizer.encode(DOC)
    chunks = split_chunks(DOC, chunk_tokens, bpe_tokenizer)
    assert "".join(c.text for c in chunks) == DOC
    assert all(1 <= c.tokens <= chunk_tokens for c in chunks)
    assert sum(c.tokens for c in chunks) == len(ids)
    assert [c.tokens for c in chunks] == [len(bpe_tokenizer.encode(c.text)) for c in chunks]


def test_byte_level_prefers_whitespace_cuts(bpe_tokenizer: Tokenizer) -> None:
    chunks = split_chunks(DOC, 20, bpe_tokenizer)
    assert len(chunks) > 2
    for left, right in zip(chunks, chunks[1:], strict=False):
        assert left.text[-1].isspace() or right.text[0].isspace()


def test_final_newline_never_becomes_its_own_chunk(bpe_tokenizer: Tokenizer) -> None:
    body = DOC.rstrip("\n")
    n = len(bpe_tokenizer.encode(body))
    for text in (body + "\n", body + "\n\n"):
        for chunk_tokens in (n, n - 1, n // 2):
            chunks = split_chunks(text, chunk_tokens, bpe_tokenizer)
            assert all(c.text.strip() for c in chunks)
            assert "".join(c.text for c in chunks) == text


def test_hard_cut_without_whitespace() -> None:
    class Chars:
        """One token per character, decoded without separators (no whitespace anywhere)."""

        def encode(self, text: str) -> list[int]:
            return [ord(ch) for ch in text]

        def decode(self, ids: Sequence[int]) -> str:
            return "".join(chr(i) for i in ids)

    text = "x" * 23
    chunks = split_chunks(text, 10, Chars())
    assert [c.tokens for c in chunks] == [10, 10, 3]
    assert "".join(c.text for c in chunks) == text


def test_empty_document_is_an_error_with_tokenizer(word_tokenizer: Tokenizer) -> None:
    with pytest.raises(ChunkError, match="document is empty"):
        split_chunks(" \n ", 4, word_tokenizer)
