"""The rule of ``routing_rule.yaml``: a row's columns -> its route label.

Prompts that mention programming words go to the ``code`` model, the rest to ``chat``. The
loader imports this module from the application file's folder and calls :func:`label` once per
row (every column as text); a label that is not a target (or an exception) rejects that row
only, unless the route has a ``default``.
"""

from __future__ import annotations

import re

CODE_WORDS = re.compile(
    r"\b(python|sql|bash|rust|go|javascript|c|function|script|query|bug|code|regular "
    r"expression|unit test|thread|hash map|refactor|binary search)\b",
    re.IGNORECASE,
)


def label(row: dict[str, str]) -> str:
    """``code`` when the prompt names a programming word, else ``chat``."""
    return "code" if CODE_WORDS.search(row.get("prompt", "")) else "chat"
