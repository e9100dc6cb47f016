"""Write the small datasets of the application examples (deterministic, standard library only).

    python examples/apps/make_data.py

- ``data/questions.jsonl``: 24 short instructions, ``id``, ``prompt`` and ``label`` (``code`` or
  ``chat``: the column the label route reads).
- ``data/docs.jsonl``: 6 made-up reports of 150 to 1500 words, built from a fixed list of
  sentences (``id``, ``prompt``), for the chain summary.
- ``data/batch.jsonl``: an OpenAI Batch input file: 12 chat lines and 2 completion lines whose
  ``body.model`` is ``small`` or ``tiny``, and one line that is not JSON (it is rejected on its
  own, with its line number; the other lines run).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7  # fixed: the files are committed and must not change from run to run

CODE_TASKS = [
    "Write a Python function that reverses a linked list.",
    "Explain what a race condition is and show a small example in Go.",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "Fix the bug in this loop: for i in range(len(xs)): xs.remove(xs[i])",
    "Write a bash script that counts the lines of every .py file in a folder.",
    "Explain the difference between a process and a thread, with code.",
    "Write a JavaScript function that debounces another function.",
    "Implement binary search in Rust and explain its edge cases.",
    "Write a regular expression that matches ISO dates and test it in Python.",
    "Explain how a hash map handles collisions, with a short C example.",
    "Refactor this function to avoid the global variable: def add(x): total += x",
    "Write a unit test for a function that parses 'key=value' lines.",
]
CHAT_TASKS = [
    "Suggest three names for a small bakery by the sea.",
    "How do tides work? Answer in two short paragraphs.",
    "Write a polite email asking a neighbour to trim their hedge.",
    "What should I pack for a two-day hike in autumn?",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me a simple recipe for lentil soup.",
    "Summarise the plot of a detective story in four sentences.",
    "What are good habits for learning a new language?",
    "Write a short poem about a train station at night.",
    "Compare cats and dogs as pets in a short list.",
    "How can I sleep better when I travel across time zones?",
    "Describe a calm morning in a mountain village.",
]

SUBJECTS = ["The harbour council", "A young engineer", "The old lighthouse keeper",
            "The river authority", "A group of students", "The town library",
            "The night ferry crew", "A travelling merchant"]  # fmt: skip
ACTIONS = ["reported that", "argued that", "noticed that", "wrote in a letter that",
           "announced at the meeting that", "explained to the visitors that"]  # fmt: skip
EVENTS = ["the spring floods had damaged the lower bridge",
          "the new canal would shorten the journey to the capital by a day",
          "the grain stores were running low after the long winter",
          "a storm had carried away two of the fishing boats",
          "the market would move to the square beside the church",
          "the railway company planned a station on the northern hill",
          "the school needed a second teacher before the autumn term",
          "old maps showed a road that nobody remembered building"]  # fmt: skip
ENDINGS = ["Most people agreed.", "Nobody was sure what to do next.",
           "The decision was put off until the following week.",
           "Work began the next morning.", "Some families left the town.",
           "The mayor promised to look into it."]  # fmt: skip
DOC_WORDS = [150, 300, 500, 800, 1100, 1500]  # approximate length of each document, in words


def questions() -> list[dict[str, str]]:
    """Code and chat instructions interleaved, labelled."""
    rows = []
    for i in range(len(CODE_TASKS)):
        rows.append({"prompt": CODE_TASKS[i], "label": "code"})
        rows.append({"prompt": CHAT_TASKS[i], "label": "chat"})
    return [{"id": f"q{i:02d}", **row} for i, row in enumerate(rows)]


def document(rng: random.Random, words: int) -> str:
    """Readable-ish prose of about ``words`` words, in paragraphs of four sentences."""
    sentences: list[str] = []
    count = 0
    while count < words:
        text = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(EVENTS)}."
        if rng.random() < 0.4:
            text += " " + rng.choice(ENDINGS)
        sentences.append(text)
        count += len(text.split())
    paragraphs = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
    return "\n\n".join(paragraphs)


def docs() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    return [{"id": f"doc{i}", "prompt": document(rng, n)} for i, n in enumerate(DOC_WORDS)]


def batch_lines() -> list[str]:
    """12 chat lines, 2 completion lines, and one broken line in the middle."""
    lines = []
    for i, q in enumerate(questions()[:12]):
        body = {"model": "small" if q["label"] == "code" else "tiny", "max_tokens": 64 + 16 * i,
                "messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": q["prompt"]}]}  # fmt: skip
        lines.append({"custom_id": f"chat-{i:02d}", "method": "POST",
                      "url": "/v1/chat/completions", "body": body})  # fmt: skip
    for i, (model, prompt) in enumerate(
        [("small", "def fibonacci(n):"), ("tiny", "Once upon a time, in a quiet harbour,")]
    ):
        body = {"model": model, "prompt": prompt, "max_tokens": 48}
        lines.append({"custom_id": f"text-{i:02d}", "url": "/v1/completions", "body": body})
    out = [json.dumps(line) for line in lines]
    out.insert(6, '{"custom_id": "broken", "body": {"model": "small",')  # not JSON: rejected
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]] | list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(HERE)} ({len(rows)} lines)")


def main() -> None:
    write_jsonl(HERE / "data" / "questions.jsonl", questions())
    write_jsonl(HERE / "data" / "docs.jsonl", docs())
    write_jsonl(HERE / "data" / "batch.jsonl", batch_lines())


if __name__ == "__main__":
    main()
