"""Build a tiny random Llama and its tokenizer locally, for tests and the vLLM CPU check.

No hub access: a byte-level BPE is trained on a few sentences, a random ``LlamaForCausalLM`` is
created from a fixed seed, cast to bf16 and saved with the tokenizer into one directory that
vLLM and transformers both load (docs: /work/shared/docs/cpu-vllm.md §4). Weights are never
committed; build them at test time (a few seconds).

Run as ``python -m tests.tiny_model OUT_DIR [tiny|small]``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TEXT: tuple[str, ...] = (
    "a stage ends when its first model finishes",
    "the worker reports token progress to the coordinator",
)
MARKER = "samullm_tiny_model.json"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Llama shape of a generated test model."""

    hidden_size: int  # model width
    intermediate_size: int  # MLP width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # KV heads (GQA)
    head_dim: int = 64  # 64 is a CPU attention head size known to work
    max_position_embeddings: int = 2048  # tokens


SHAPES: dict[str, ModelShape] = {
    # ~1.4 M parameters: step time is mostly engine overhead.
    "tiny": ModelShape(256, 512, 2, 4, 2),
    # ~10 M parameters: token and attention work become visible in step time.
    "small": ModelShape(512, 1536, 4, 8, 4),
    # ~25 M parameters: model work dominates step time.
    "mid": ModelShape(640, 2048, 6, 10, 2),
}


def build(out_dir: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random Llama of the named shape and a BPE tokenizer into ``out_dir``.

    Reuses the directory when a previous build with the same shape and seed is complete.

    Args:
        out_dir: target directory (created if missing).
        shape: a key of :data:`SHAPES`.
        seed: torch seed for the random weights.

    Returns:
        The model directory.
    """
    out = Path(out_dir)
    spec = {"shape": shape, "seed": seed, **asdict(SHAPES[shape])}
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer()
    _build_weights(out, len(tok), SHAPES[shape], seed)
    tok.save_pretrained(str(out))
    marker.write_text(json.dumps(spec))
    return out


def _build_tokenizer() -> Any:
    """Byte-level BPE with ``<s>``, ``</s>``, ``<pad>`` as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(list(TEXT) * 16, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    tok: Any = PreTrainedTokenizerFast  # loosely typed in transformers
    return tok(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _build_weights(out: Path, vocab_size: int, shape: ModelShape, seed: int) -> None:
    """Save a seeded random ``LlamaForCausalLM`` in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        **asdict(shape),
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model_cls: Any = LlamaForCausalLM  # loosely typed in transformers
    model_cls(cfg).to(torch.bfloat16).save_pretrained(str(out))


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tiny"))
