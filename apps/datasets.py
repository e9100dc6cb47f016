"""Datasets of an application file: rows read from CSV, JSONL, JSON or OpenAI Batch files.

A row is one prompt (or one document of a chain): an ``id``, its prompt length (``prompt_tokens``,
else the estimate of its ``prompt`` text, else unknown), every column as text for ``where:`` and
templates, and what an OpenAI Batch line adds (chat ``messages``, ``max_tokens``, sampling).

**Errors per record, refusals per file** (docs/app-spec.md, "Bad input"): a row that cannot be
used (invalid JSON, a bad ``prompt_tokens``, a duplicate id, a bad OpenAI Batch line) becomes a
:class:`DataRejection` naming its file and line, and the other rows go on. A file that cannot be
read at all (missing, unknown format, a JSON document that is not a list) or that has no usable
row is refused with a :class:`~apps.cluster_spec.SpecError` before anything is enqueued.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from apps.cluster_spec import SpecError
from apps.openai_batch import batch_row, looks_like_batch
from apps.tokens import estimate_tokens
from planning.io.files import open_text

_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")
FORMATS = (".csv", ".jsonl", ".json")
Messages = tuple[tuple[str, str], ...]  # chat messages as (role, content)


class DataError(ValueError):
    """A bad dataset file or row; the message names the data file and the line."""


@dataclass(frozen=True, slots=True)
class Row:
    """One usable row."""

    id: str
    tokens: int | None  # prompt tokens: prompt_tokens, else estimated from prompt, else None
    fields: Mapping[str, str]  # every column as text (for where: and templates)
    label: str  # "file:line", for errors
    messages: Messages | None = None  # chat messages of an OpenAI Batch line
    max_tokens: int | None = None  # tokens: the row's own output cap (overrides the node's)
    temperature: float | None = None
    top_p: float | None = None
    completion: bool = False  # an OpenAI Batch /v1/completions line (else chat)


@dataclass(frozen=True, slots=True)
class DataRejection:
    """A row dropped when the dataset was read."""

    request_id: str  # the row's id when readable, else "line <n>"
    reason: str  # starts with "file:line"


@dataclass(frozen=True, slots=True)
class Dataset:
    """A read dataset."""

    name: str
    path: Path
    rows: tuple[Row, ...]
    columns: frozenset[str]
    rejected: tuple[DataRejection, ...] = ()
    openai: bool = False  # read as OpenAI Batch lines


def read_dataset(
    name: str, path: Path | None, records: list[Any] | None, fmt: str, where: str,
    source: str | None = None,
) -> Dataset:  # fmt: skip
    """Read ``datasets.<name>`` from ``path`` or inline ``records`` (``where`` labels errors;
    inline records are labelled ``<source or name>:<n>``, n = their line in that file).

    Raises:
        SpecError: the file cannot be read, or no row of it is usable.
    """
    at = f"{where}: datasets.{name}"
    if records is not None:
        raw: Iterable[tuple[str, Any]] = _inline_rows(records, source or name)
        ds = _parse(name, Path(source or f"<{name}>"), raw, fmt, at)
    else:
        assert path is not None
        if not path.is_file():
            raise SpecError(f"{at}.path: file not found: {path}")
        kind = Path(path.name.lower().removesuffix(".gz")).suffix
        if kind not in FORMATS:
            raise SpecError(
                f"{at}.path: {path}: unknown format (use .csv, .jsonl or .json; .gz ok)"
            )
        try:
            with open_text(path) as fh:
                ds = _parse(name, path, raw_rows(fh, path, kind), fmt, at)
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise SpecError(f"{at}: {path}: cannot read: {e}") from None
    if not ds.rows:
        first = f" (first: {ds.rejected[0].reason})" if ds.rejected else ""
        raise SpecError(f"{at}: {ds.path}: no usable rows{first}")
    return ds


def _inline_rows(records: list[Any], name: str) -> Iterator[tuple[str, Any]]:
    """Inline records; a string is a raw JSONL line (how OpenAI Batch lines travel). Labels
    follow the file they came from: a JSONL line, a CSV line after the header, a JSON index."""
    kind = Path(name.lower().removesuffix(".gz")).suffix
    for i, rec in enumerate(records):
        label = (
            f"{name}: [{i}]" if kind == ".json" else f"{name}:{i + (2 if kind == '.csv' else 1)}"
        )
        if isinstance(rec, str):
            if rec.strip():  # blank lines keep their place, so labels are line numbers
                yield label, _loads(rec, label)
        else:
            yield label, rec


@dataclass(frozen=True, slots=True)
class _Bad:
    """A line that is not JSON (kept so that it becomes a rejection, not a refusal)."""

    reason: str


def _loads(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _Bad(f"{label}: invalid JSON: {e.msg}")


def _parse(name: str, path: Path, raw: Iterable[tuple[str, Any]], fmt: str, at: str) -> Dataset:
    try:
        items = list(raw)
    except DataError as e:
        raise SpecError(f"{at}: {e}") from None
    first = next((row for _, row in items if not isinstance(row, _Bad)), None)
    openai = fmt == "openai" or (fmt == "auto" and looks_like_batch(first))
    rows: list[Row] = []
    rejected: list[DataRejection] = []
    seen: dict[str, str] = {}
    columns: set[str] = set()
    for n, (label, row) in enumerate(items):
        try:
            got = _row(row, n, label, openai)
            if got.id in seen and openai:
                raise DataError(
                    f"{label} (custom_id {got.id!r}): custom_id: duplicate of {seen[got.id]}"
                )
            if got.id in seen:
                raise DataError(
                    f"{label}: column 'id': duplicate id {got.id!r} (also {seen[got.id]})"
                )
        except DataError as e:
            rid = _readable_id(row, openai) or f"line {label.rsplit(':', 1)[-1]}"
            rejected.append(DataRejection(rid, str(e)))
            continue
        seen[got.id] = label
        columns.update(got.fields)
        rows.append(got)
    return Dataset(name, path, tuple(rows), frozenset(columns), tuple(rejected), openai)


def _readable_id(row: Any, openai: bool) -> str | None:
    if not isinstance(row, dict):
        return None
    if openai:  # a custom_id must be a non-blank string
        cid = row.get("custom_id")
        return cid if isinstance(cid, str) and cid.strip() else None
    value = row.get("id")
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def _row(row: Any, n: int, label: str, openai: bool) -> Row:
    """A checked row; DataError names the label and the column."""
    if isinstance(row, _Bad):
        raise DataError(row.reason)
    if openai:
        try:
            row = batch_row(row, label)
        except ValueError as e:
            raise DataError(str(e)) from None
        return _batch(row, label)
    if not isinstance(row, dict):
        raise DataError(f"{label}: expected an object, got {type(row).__name__}")
    fields = {str(k): as_text(v) for k, v in row.items()}
    return Row(_row_id(row.get("id"), n, label), _prompt_tokens(row, label), fields, label,
               max_tokens=_max_tokens(row, label))  # fmt: skip


def _batch(row: dict[str, Any], label: str) -> Row:
    msgs = row.get("messages")
    messages = tuple((m["role"], m["content"]) for m in msgs) if msgs else None
    fields = {k: as_text(v) for k, v in row.items() if k != "messages"}
    return Row(
        str(row["id"]), estimate_tokens(row["prompt"]) + 4 * len(messages or ()), fields, label,
        messages=messages, max_tokens=row.get("max_tokens"), temperature=row.get("temperature"),
        top_p=row.get("top_p"), completion=messages is None,
    )  # fmt: skip


def _row_id(value: Any, n: int, label: str) -> str:
    if value is None or value == "":
        return str(n)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{label}: column 'id': expected a string, got {value!r}")
    return str(value)


def _as_int(value: Any) -> int | None:
    if isinstance(value, str) and _INT_RE.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _prompt_tokens(row: dict[str, Any], label: str) -> int | None:
    """``prompt_tokens`` (int >= 1), else the estimated tokens of ``prompt``, else None."""
    value = row.get("prompt_tokens")
    if value is not None and value != "":
        number = _as_int(value)
        if number is None or number < 1:
            raise DataError(
                f"{label}: column 'prompt_tokens': expected an integer >= 1, got {value!r}"
            )
        return number
    text = row.get("prompt")
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise DataError(f"{label}: column 'prompt': expected text, got {type(text).__name__}")
    return estimate_tokens(text)


def _max_tokens(row: dict[str, Any], label: str) -> int | None:
    value = row.get("max_tokens")
    if value is None or value == "":
        return None
    number = _as_int(value)
    if number is None or number < 1:
        raise DataError(f"{label}: column 'max_tokens': expected an integer >= 1, got {value!r}")
    return number


def as_text(value: Any) -> str:
    """A cell or a ``where`` value as text: booleans as true/false, null as ""."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def dataset_rows(path: Path) -> list[tuple[str, Any]]:
    """``(label, row)`` of every row of a dataset file in the formats of ``datasets:`` (.csv,
    .jsonl, .json list; .gz allowed), e.g. for ``samullm lengths --prompts``.

    Raises:
        SpecError: missing file, unknown format, bad JSON; names file and line.
    """
    kind = Path(path.name.lower().removesuffix(".gz")).suffix
    if kind not in FORMATS:
        raise SpecError(f"{path}: unknown format (use .csv, .jsonl or .json; .gz ok)")
    try:
        with open_text(path) as fh:
            out = list(raw_rows(fh, path, kind))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except DataError as e:
        raise SpecError(str(e)) from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read: {e}") from None
    bad = next((row for _, row in out if isinstance(row, _Bad)), None)
    if bad is not None:
        raise SpecError(bad.reason)
    return out


def raw_rows(fh: IO[str], path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    """``(label, row)`` per row; the label is ``file:line`` (JSON lists: ``file: [i]``). A JSONL
    line that is not JSON comes as a :class:`_Bad` row (a per-record error)."""
    if kind == ".csv":
        reader = csv.DictReader(fh)
        start = 2
        for row in reader:
            yield f"{path}:{start}", {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1
    elif kind == ".jsonl":
        for line, text in enumerate(fh, start=1):
            if text.strip():
                yield f"{path}:{line}", _loads(text, f"{path}:{line}")
    else:
        try:
            doc = json.loads(fh.read())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e.msg}") from None
        if not isinstance(doc, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        yield from ((f"{path}: [{i}]", row) for i, row in enumerate(doc))


def raw_lines(path: Path) -> list[Any]:
    """Every row of a dataset file as inline ``records`` (a JSONL line that is not JSON stays a
    string, so the coordinator reports it with its line number)."""
    kind = Path(path.name.lower().removesuffix(".gz")).suffix
    with open_text(path) as fh:
        if kind == ".jsonl":
            return [text.rstrip("\n") for text in fh]
        return [row for _, row in raw_rows(fh, path, kind)]


def filtered(ds: Dataset, where: dict[str, Any] | None, at: str) -> list[Row]:
    """Rows of ``ds`` whose columns equal every ``where`` value (as text)."""
    want = {col: as_text(v) for col, v in (where or {}).items()}
    for col in want:
        if col not in ds.columns:
            raise SpecError(
                f"{at}.where.{col}: column {col!r} not in dataset {ds.name!r} "
                f"(columns: {', '.join(sorted(ds.columns))})"
            )
    rows = [r for r in ds.rows if all(r.fields.get(c) == v for c, v in want.items())]
    if not rows:
        raise SpecError(f"{at}.where: no row of dataset {ds.name!r} matches {want}")
    return rows
