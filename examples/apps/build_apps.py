"""Write the application files of this folder with :mod:`apps.builders` (run from the repo root).

    .venv/bin/python examples/apps/build_apps.py

Every file reads its data from ``data/`` next to it (``make_data.py`` writes it) and uses
models whose A100 profiles and output-length pdfs ship with samullm, so it runs on the sim
engine with no download: ``samullm run examples/apps/<file>.yaml --cluster
examples/clusters/a100x2.yaml --time-scale 0.01``. ``mixed.yaml`` is ``builders.mixed`` of three
of the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apps import builders

HERE = Path(__file__).resolve().parent
VICUNA = "lmsys/vicuna-13b-v1.5"
LLAMA7 = "NousResearch/Llama-2-7b-chat-hf"
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
QUESTIONS = "data/questions.jsonl"  # relative to this folder, where the files are written
CODE_CHAT = {"code": MISTRAL, "chat": LLAMA7}


def apps() -> dict[str, tuple[str, dict[str, Any]]]:
    """File stem -> (header comment, document)."""
    return {
        "ensemble": ("Three models answer 24 questions; vicuna fuses their answers.",
                     builders.ensemble([VICUNA, LLAMA7, MISTRAL], QUESTIONS, fuser=VICUNA,
                                       max_tokens=128, fuse_max_tokens=256)),
        "routing_label": ("Each question goes to the model its 'label' column names.",
                          builders.route(CODE_CHAT, QUESTIONS, column="label",
                                         name="routing_label")),
        "routing_rule": ("Each question goes to the model routing_rule.py:label picks "
                         "(code words -> code).",
                         builders.route(CODE_CHAT, QUESTIONS, rule="routing_rule:label",
                                        default="chat", name="routing_rule")),
        "routing_router": ("vicuna reads each question and names a label; the planner assumes "
                           "half go to each\n# (estimate); unknown answers go to chat.",
                           builders.route(CODE_CHAT, QUESTIONS, router=VICUNA,
                                          estimate={"code": 0.5, "chat": 0.5}, default="chat",
                                          name="routing_router")),
        "chain_summary": ("Six documents (1-6 chunks of 400 tokens) summarised chunk by chunk; "
                          "each summary judged twice.",
                          builders.chain_summary(VICUNA, "data/docs.jsonl", chunk_tokens=400,
                                                 judge=LLAMA7, judges=2, max_tokens=200)),
        "batch": ("An OpenAI Batch file: body.model 'small' -> vicuna, 'tiny' -> Llama-2-7b-chat; "
                  "its one\n# broken line is rejected on its own.",
                  builders.openai_batch("data/batch.jsonl", {"small": VICUNA, "tiny": LLAMA7})),
    }  # fmt: skip


def main() -> None:
    built = apps()
    parts = [built[k][1] for k in ("ensemble", "routing_router", "chain_summary")]
    built["mixed"] = ("ensemble.yaml, routing_router.yaml and chain_summary.yaml in one job "
                      "(builders.mixed).", builders.mixed(*parts))  # fmt: skip
    for stem, (about, doc) in built.items():
        path = HERE / f"{stem}.yaml"
        header = f"# {about}\n# Written by examples/apps/build_apps.py; do not edit.\n"
        path.write_text(header + builders.dumps(doc), encoding="utf-8")
        print(f"wrote {path.relative_to(HERE)}")


if __name__ == "__main__":
    main()
