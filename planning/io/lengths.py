"""File edge for output-length data: the authors' pdfs, user observations, saved distributions.

- :func:`load_authors_pdfs` reads ``output_length_pdfs.json`` (shared data README §5) into
  :class:`~planning.length_dist.LengthDistribution` objects, reachable by short model name and
  by Hugging Face id. Degenerate entries (all mass in the last bin, e.g. AquilaChat-7B) are not
  loaded; they are listed in ``.skipped`` with the reason, and looking one up raises a KeyError
  that gives the reason.
- :func:`load_observations` reads per-request lengths users collect (CSV or JSONL with columns
  ``prompt_len,output_len,finished`` and optional ``model``; ``.gz`` allowed). The authors' raw
  observations are not available.
- :func:`save_distribution` / :func:`load_distribution` write and read ``samullm.lengths/1``
  JSON; writes are atomic (temporary file in the same folder, then ``os.replace``).

Every bad input raises :class:`LengthDataError` naming the file, the field and the line.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from planning.io.files import atomic_write_text, open_text
from planning.length_dist import LengthDistribution, LengthFormatError, LengthObservations

logger = logging.getLogger(__name__)

_INT_RE = re.compile(r"[+-]?[0-9]+")
_REQUIRED = ("prompt_len", "output_len", "finished")
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
_DEGENERATE_LAST_BIN = 1.0 - 1e-9  # probability in the last bin that marks a degenerate pdf


class LengthDataError(ValueError):
    """Bad length data: the message names the file, and the field and line where known."""

    def __init__(
        self, path: str | Path, message: str, *, field: str | None = None, line: int | None = None
    ) -> None:
        where = f"{path}" + (f":{line}" if line is not None else "")
        what = f" field {field!r}" if field is not None else ""
        super().__init__(f"{where}:{what} {message}")
        self.path = str(path)
        self.field = field
        self.line = line


class AuthorsPdfs(dict[str, LengthDistribution]):
    """The authors' distributions keyed by short name and by hf_id; ``skipped`` gives reasons."""

    def __init__(self, skipped: dict[str, str]) -> None:
        super().__init__()
        self.skipped = skipped  # model key (name or hf_id) -> why it was not loaded

    def __missing__(self, key: str) -> LengthDistribution:
        if key in self.skipped:
            raise KeyError(f"{key}: not loaded: {self.skipped[key]}")
        raise KeyError(key)


# ------------------------------------------------------------------ authors' pdfs
def load_authors_pdfs(path: str | Path) -> AuthorsPdfs:
    """Load ``output_length_pdfs.json`` (or the superseded file).

    Keys starting with ``_`` are metadata. Each entry (or, in the superseded file, a list of
    entries, of which the last is used) needs ``pdf``, a list of probabilities with ``pdf[i]`` =
    P(len = i + 1); ``max_model_len``, if present, must equal its length.
    Degenerate entries are skipped (logged at INFO) and recorded in ``.skipped``.
    """
    text = _read_text(path)
    doc = _parse_json(path, text)
    if not isinstance(doc, dict):
        raise LengthDataError(path, "top level must be a JSON object", line=1)
    result = AuthorsPdfs({})
    for name, entry in doc.items():
        if name.startswith("_"):
            continue
        line = _line_of(text, f'"{name}"')
        dist, hf_id = _authors_entry(path, name, entry, line)
        reason = _degenerate_reason(dist)
        for key in (name, hf_id):
            if key is None:
                continue
            if key in result or key in result.skipped:
                raise LengthDataError(path, f"duplicate model key {key!r}", field=name, line=line)
            if reason is None:
                result[key] = dist
            else:
                result.skipped[key] = reason
        if reason is not None:
            logger.info("%s: skipping %s: %s", path, name, reason)
    return result


def _authors_entry(
    path: str | Path, name: str, entry: Any, line: int
) -> tuple[LengthDistribution, str | None]:
    if isinstance(entry, list) and entry:
        entry = entry[-1]  # NOTE(lengths): a list of versions (superseded file): the last wins
    if not isinstance(entry, dict):
        raise LengthDataError(path, "model entry must be an object", field=name, line=line)
    pdf = entry.get("pdf")
    if not isinstance(pdf, list) or not pdf:
        raise LengthDataError(path, "missing or empty list", field=f"{name}.pdf", line=line)
    for i, x in enumerate(pdf):
        if isinstance(x, bool) or not isinstance(x, int | float) or not np.isfinite(x) or x < 0:
            raise LengthDataError(
                path, f"not a finite probability >= 0: {x!r}", field=f"{name}.pdf[{i}]", line=line
            )
    declared = entry.get("max_model_len")
    if declared is not None and declared != len(pdf):
        raise LengthDataError(
            path, f"{declared} != len(pdf) {len(pdf)}", field=f"{name}.max_model_len", line=line
        )
    hf_id = entry.get("hf_id")
    if hf_id is not None and not isinstance(hf_id, str):
        raise LengthDataError(path, "must be a string or null", field=f"{name}.hf_id", line=line)
    try:
        return LengthDistribution.from_pmf(pdf), hf_id
    except ValueError as exc:
        raise LengthDataError(path, str(exc), field=f"{name}.pdf", line=line) from exc


def _degenerate_reason(dist: LengthDistribution) -> str | None:
    if dist.pmf[-1] < _DEGENERATE_LAST_BIN:
        return None
    return (
        f"degenerate: all probability mass at max_model_len={dist.max_len} (no request "
        "stopped by EOS in the source data, or the run failed); sampling it would give every "
        "request the full context"
    )


# ------------------------------------------------------------------ observations
def load_observations(path: str | Path) -> LengthObservations:
    """Read per-request observations from ``.csv`` or ``.jsonl`` (optionally ``.gz``).

    Columns: ``prompt_len`` (int >= 0), ``output_len`` (int >= 1), ``finished`` (bool; false =
    cut by max_tokens or the context limit), optional ``model`` (string). Extra columns are
    ignored.
    """
    name = Path(path).name.lower()
    kind = Path(name.removesuffix(".gz")).suffix
    if kind == ".csv":
        rows = _csv_rows(path)
    elif kind in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    else:
        raise LengthDataError(path, f"unknown format {kind or '(none)'!r}; use .csv or .jsonl")
    return _collect(path, rows)


def _csv_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for name in _REQUIRED:
            if name not in header:
                raise LengthDataError(path, "missing column", field=name, line=1)
        has_model = "model" in header
        for row in reader:
            record = {k: row.get(k) for k in _REQUIRED}
            record["model"] = row.get("model") if has_model else None
            yield reader.line_num, record


def _jsonl_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise LengthDataError(path, f"invalid JSON: {exc.msg}", line=number) from exc
            if not isinstance(record, dict):
                raise LengthDataError(path, "each line must be a JSON object", line=number)
            for name in _REQUIRED:
                if name not in record:
                    raise LengthDataError(path, "missing field", field=name, line=number)
            yield number, record


def _collect(path: str | Path, rows: Iterator[tuple[int, dict[str, Any]]]) -> LengthObservations:
    prompt: list[int] = []
    output: list[int] = []
    done: list[bool] = []
    models: list[str] = []
    with_model: bool | None = None
    for line, row in rows:
        prompt.append(_as_int(path, row["prompt_len"], "prompt_len", line, minimum=0))
        output.append(_as_int(path, row["output_len"], "output_len", line, minimum=1))
        done.append(_as_bool(path, row["finished"], line))
        model = row.get("model")
        if with_model is None:
            with_model = model is not None
        if (model is not None) != with_model or (model is not None and not isinstance(model, str)):
            raise LengthDataError(
                path, "must be a string on every line or on none", field="model", line=line
            )
        if model is not None:
            models.append(model)
    if not prompt:
        raise LengthDataError(path, "no observations")
    return LengthObservations(
        np.asarray(prompt, dtype=np.int64),
        np.asarray(output, dtype=np.int64),
        np.asarray(done, dtype=np.bool_),
        tuple(models) if with_model else None,
    )


def _as_int(path: str | Path, value: Any, field: str, line: int, *, minimum: int) -> int:
    if isinstance(value, str):
        text = value.strip()
        number = int(text) if _INT_RE.fullmatch(text) else None
    elif isinstance(value, float) and np.isfinite(value) and value.is_integer():
        number = int(value)
    else:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
    if number is None:
        raise LengthDataError(path, f"not an integer: {value!r}", field=field, line=line)
    if number < minimum:
        raise LengthDataError(path, f"must be >= {minimum}, got {number}", field=field, line=line)
    return number


def _as_bool(path: str | Path, value: Any, line: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise LengthDataError(path, f"not a boolean: {value!r}", field="finished", line=line)


# ------------------------------------------------------------------ saved distributions
def save_distribution(path: str | Path, dist: LengthDistribution) -> None:
    """Write ``dist`` as ``samullm.lengths/1`` JSON, atomically (tmp file + os.replace)."""
    atomic_write_text(path, json.dumps(dist.to_dict(), allow_nan=False) + "\n")


def load_distribution(path: str | Path) -> LengthDistribution:
    """Read a file written by :func:`save_distribution`."""
    text = _read_text(path)
    doc = _parse_json(path, text)
    try:
        return LengthDistribution.from_dict(doc)
    except LengthFormatError as exc:
        key = exc.field.split(".")[-1].split("[")[0]
        raise LengthDataError(
            path, str(exc), field=exc.field, line=_line_of(text, f'"{key}"')
        ) from exc


# ------------------------------------------------------------------ small helpers
def _open_text(path: str | Path) -> IO[str]:
    try:
        return open_text(path)
    except OSError as exc:
        raise LengthDataError(path, f"cannot open: {exc.strerror}") from exc


def _read_text(path: str | Path) -> str:
    with _open_text(path) as fh:
        return fh.read()


def _parse_json(path: str | Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LengthDataError(path, f"invalid JSON: {exc.msg}", line=exc.lineno) from exc


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first ``needle`` in ``text`` (1 if absent)."""
    pos = text.find(needle)
    return 1 if pos < 0 else text.count("\n", 0, pos) + 1
