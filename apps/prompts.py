"""Prompt templates for application nodes, and the default texts the applications use.

A template is text with ``{name}`` placeholders; ``{{`` and ``}}`` stand for literal braces. A
placeholder name matches ``[A-Za-z_][A-Za-z0-9_-]*`` (node names may contain ``-``). Anything
else between braces, an unclosed ``{`` or a lone ``}`` is a :class:`TemplateError` that names
the character position, so a bad application file points at the exact spot.

Rendering is pure string work: upstream outputs are numbered with :func:`numbered`, nodes
without a template join their own text and their inputs with :func:`default_prompt`, and the
label a router model chose is read back with :func:`route_choice`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_WORD_CHARS = "A-Za-z0-9_-"  # characters that may not touch a routed label


class TemplateError(ValueError):
    """A template that does not parse, or a render call that lacks a placeholder's value."""


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed prompt template; build it with :func:`parse_template`."""

    text: str  # the template as written
    fields: tuple[str, ...]  # distinct placeholder names, in order of first appearance

    def fixed_text(self) -> str:
        """The template without its placeholders and with ``{{``/``}}`` unescaped.

        Used to estimate how many tokens the template itself adds to every prompt.
        """
        return "".join(literal for literal, _, _ in _scan(self.text))

    def render(self, values: Mapping[str, str]) -> str:
        """The template with every placeholder replaced by its value.

        Args:
            values: placeholder name to text; names the template does not use are ignored.

        Returns:
            The prompt text.

        Raises:
            TemplateError: a placeholder has no value (the message names it and its position).
        """
        parts: list[str] = []
        for literal, name, pos in _scan(self.text):
            parts.append(literal)
            if name is None:
                continue
            if name not in values:
                raise TemplateError(f"position {pos}: no value for placeholder '{{{name}}}'")
            parts.append(values[name])
        return "".join(parts)


def parse_template(text: str) -> Template:
    """Parse and check a template.

    Args:
        text: template text with ``{name}`` placeholders and ``{{``/``}}`` escapes.

    Returns:
        The :class:`Template`, with its distinct placeholder names in order of first use.

    Raises:
        TemplateError: a bad placeholder, an unclosed ``{`` or a lone ``}`` (with its position).
    """
    names = [name for _, name, _ in _scan(text) if name is not None]
    return Template(text=text, fields=tuple(dict.fromkeys(names)))


def _scan(text: str) -> Iterator[tuple[str, str | None, int]]:
    """Yield ``(literal text, placeholder name or None, placeholder position)`` pieces in order.

    Raises:
        TemplateError: on the first malformed brace.
    """
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{}" and text.startswith(ch * 2, i):
            literal.append(ch)
            i += 2
        elif ch == "}":
            raise TemplateError(f"position {i}: single '}}' (write '}}}}' for a literal brace)")
        elif ch == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise TemplateError(f"position {i}: unclosed '{{'")
            name = text[i + 1 : end]
            if not _NAME.fullmatch(name):
                raise TemplateError(f"position {i}: invalid placeholder name {name!r}")
            yield "".join(literal), name, i
            literal = []
            i = end + 1
        else:
            literal.append(ch)
            i += 1
    yield "".join(literal), None, len(text)


def numbered(items: Sequence[tuple[str, str]]) -> str:
    """The ``{inputs}`` value: ``(label, text)`` pairs as ``[1] label`` blocks.

    Args:
        items: upstream outputs as (node name, output text), in input order.

    Returns:
        ``"[1] <label>\\n<text>\\n\\n[2] <label>\\n<text>"``; a single item is still numbered,
        no items give ``""``.
    """
    return "\n\n".join(
        f"[{i}] {label}\n{text}" if label else f"[{i}]\n{text}"
        for i, (label, text) in enumerate(items, start=1)
    )


def default_prompt(own: str, upstream: Sequence[tuple[str, str]]) -> str:
    """The prompt of a node without a template.

    Args:
        own: the node's own prompt text (may be empty).
        upstream: upstream outputs as (node name, output text); names are not shown.

    Returns:
        ``own`` and each upstream text joined with blank lines; empty or blank parts are skipped.
    """
    parts = [own, *(text for _, text in upstream)]
    return "\n\n".join(part for part in parts if part.strip())


def route_choice(text: str, labels: Sequence[str]) -> str | None:
    """The label a router model's output names.

    A label counts where it appears as a whole word (case-insensitive, not touching a letter,
    digit, ``_`` or ``-``); the label is matched literally, so it may contain ``-``, ``.`` or
    ``/``. The earliest occurrence wins; at the same position the longer label wins.

    Args:
        text: the router model's output.
        labels: the candidate model labels.

    Returns:
        The chosen label as given in ``labels``, or None when no label occurs.
    """
    best: tuple[int, int, str] | None = None  # (position, -length, label)
    for label in labels:
        if not label:
            continue
        pattern = rf"(?<![{_WORD_CHARS}]){re.escape(label)}(?![{_WORD_CHARS}])"
        found = re.search(pattern, text, flags=re.IGNORECASE)
        if found is None:
            continue
        key = (found.start(), -len(label), label)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else best[2]


FUSE_TEMPLATE = """\
Several assistants answered the same instruction. Their answers are listed below.

Instruction:
{prompt}

Candidate answers:
{inputs}

Compare the candidates. Keep what is correct and useful in each of them, and leave out what is \
wrong, off-topic or repeated. Then write one answer to the instruction that is at least as good \
as the best candidate; if one candidate is already the best possible answer, give it, improved \
where you can. Reply with the final answer only, without referring to the candidates."""

RANK_TEMPLATE = """\
Instruction:
{prompt}

Candidate answers:
{inputs}

Which candidate answers the instruction best? Reply with the number of that candidate only \
(for example: 2), with no other words."""

CHAIN_FIRST_TEMPLATE = """\
Below is the first part of a long document.

---
{chunk}
---

Write a short summary of this part. Cover the main people, events and ideas in the order in \
which they appear, and do not add anything the text does not say. Reply with the summary only."""

CHAIN_NEXT_TEMPLATE = """\
Here is a summary of a long document up to a certain point:

---
{summary}
---

Here is the part of the document that comes next:

---
{chunk}
---

Update the summary so that it also covers the new part. Keep the important points of the \
summary so far, add the new people, events and ideas, and keep the whole summary short and in \
story order. Reply with the updated summary only."""

JUDGE_TEMPLATE = """\
Read the following summary.

---
{summary}
---

Answer two questions about it:
1. Is the summary easy to understand?
2. Is the summary grammatical?

Reply with JSON only, in exactly this form, writing true or false for each answer:
{{"easy_to_understand": true, "grammatical": true}}"""

JUDGE_KEYS: tuple[str, ...] = ("easy_to_understand", "grammatical")  # JSON keys JUDGE asks for

ROUTER_TEMPLATE = """\
Pick the model best suited to answer the request below.

Request:
{prompt}

Models: {labels}

Reply with exactly one model name from this list, written as it appears there, and nothing \
else."""
