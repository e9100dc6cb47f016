"""Token counts for planning when only text is at hand.

Planning needs prompt lengths in tokens before any tokenizer is loaded (and the presets must plan
without model downloads). :func:`estimate_tokens` uses the common rule of thumb for Llama-family
BPE tokenizers on English text: about 4 bytes of UTF-8 per token. The runtime counts real tokens
with the model's tokenizer; this estimate only orders and sizes work for the planner.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 4.0  # UTF-8 bytes per token, English text, Llama-style BPE (rule of thumb)


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (at least 1)."""
    return max(1, round(len(text.encode("utf-8")) / BYTES_PER_TOKEN))
