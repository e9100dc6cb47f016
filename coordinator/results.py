"""Export a job's committed outputs: JSONL rows, Parquet rows, or an OpenAI Batch output file.

**Rows** (``jsonl``, ``parquet``): one per committed output, in the order given (commit order
from :meth:`coordinator.client.Job.results`), with the columns of :data:`COLUMNS`; ``model`` is
the call's model id ("" when unknown). Failed requests are left out (``samullm status`` and
:meth:`coordinator.client.Job.failed` list them).

**OpenAI** (``openai``): the lines of an OpenAI Batch output file (:mod:`apps.openai_batch`),
what ``vllm run-batch`` or the OpenAI Batch API would return for the application's input file.

- Which nodes: only the *sink* nodes, those no other node consumes (:attr:`ExportMeta.sinks`;
  every node when it is empty). A chain node gives one line per document: its last chunk call.
- ``custom_id`` is the request id (a batch input's ``custom_id``); ``response.request_id`` is the
  ledger key ``<call>/<request id>``. A request whose input line used ``/v1/completions`` gets a
  ``text_completion`` body, any other a ``chat.completion`` body.
- Ensembles: each member node answers the same request, so their lines share a ``custom_id``
  and differ in ``response.body.model`` (and in ``response.request_id``).
- After the outputs, one error line (``response`` null) per failed or rejected request of a
  sink node, per request rejected while its dataset was read (a node named ``datasets.<name>``),
  and per failed or rejected request of another node whose request id got no line at all, so
  every input record appears; a chain document whose later chunk failed is an error, not its
  earlier summary. Code ``invalid_request`` for rejections at load time, ``request_failed`` for
  requests that failed while running.

Every file appears whole or not at all (written to a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.openai_batch import error_line, output_line
from coordinator.messages import RequestOutput

COLUMNS = ("job_id", "key", "node", "model", "request_id", "text", "prompt_tokens",
           "output_tokens", "finish_reason")  # fmt: skip
FORMATS = ("jsonl", "parquet", "openai")
DATASET_PREFIX = "datasets."  # rejections made while reading a dataset name it so


@dataclass(frozen=True, slots=True)
class CallMeta:
    """What the export needs to know about one call."""

    node: str  # the application node the call belongs to (a chain's calls share it)
    model: str  # the model id that answers it ("" when unknown)


@dataclass(frozen=True, slots=True)
class ExportMeta:
    """The application facts an OpenAI export needs (:meth:`coordinator.client.Job.export_meta`)."""

    calls: Mapping[str, CallMeta] = field(default_factory=dict)  # call name -> its node, model
    completion_ids: frozenset[str] = frozenset()  # request ids from /v1/completions lines
    errors: tuple[tuple[str, str, str], ...] = ()  # (call or node, request id, message)
    sinks: frozenset[str] = frozenset()  # nodes no other node consumes; empty = every node
    rejected: frozenset[tuple[str, str]] = frozenset()  # (call or node, request id) of errors
    # that were rejections at load time (error code invalid_request; the rest request_failed)


def rows(
    job_id: str, outputs: list[RequestOutput], models: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Plain rows, one per output; ``models`` maps a call name to its model id."""
    models = models or {}
    return [
        {"job_id": job_id, "key": o.key, "node": o.node, "model": models.get(o.node, ""),
         "request_id": o.request_id, "text": o.text, "prompt_tokens": o.prompt_tokens,
         "output_tokens": o.output_tokens, "finish_reason": o.finish_reason}
        for o in outputs
    ]  # fmt: skip


def export(
    job_id: str,
    outputs: list[RequestOutput],
    path: str | Path,
    *,
    fmt: str | None = None,
    meta: ExportMeta | None = None,
) -> int:
    """Write ``outputs`` to ``path`` as ``fmt`` (None: ``.parquet`` as Parquet, else JSONL);
    the number of rows (lines for ``openai``) written.

    Raises:
        ValueError: an unknown ``fmt``.
        RuntimeError: Parquet asked for and pyarrow is not installed.
    """
    p = Path(path)
    fmt = fmt or ("parquet" if p.suffix == ".parquet" else "jsonl")
    if fmt not in FORMATS:
        raise ValueError(f"export format: unknown {fmt!r} (one of {', '.join(FORMATS)})")
    meta = meta or ExportMeta()
    tmp = p.with_name(p.name + ".part")
    try:
        if fmt == "openai":
            lines = openai_lines(outputs, meta, created=int(time.time()))
            n = _write_jsonl(tmp, lines)
        else:
            models = {call: c.model for call, c in meta.calls.items()}
            data = rows(job_id, outputs, models)
            n = _write_parquet(tmp, data) if fmt == "parquet" else _write_jsonl(tmp, data)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _write_jsonl(tmp: Path, data: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in data:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_parquet(tmp: Path, data: list[dict[str, Any]]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        msg = "Parquet export needs pyarrow: pip install 'samullm[parquet]'"
        raise RuntimeError(msg) from e
    table = pa.table({c: [r[c] for r in data] for c in COLUMNS})
    pq.write_table(table, tmp)
    return len(data)


# --------------------------------------------------------------------------------------------
# OpenAI Batch output.
# --------------------------------------------------------------------------------------------


def node_of(call: str, meta: ExportMeta) -> str:
    """The node of a call (or a node's own name): from ``meta``, else the part before ``.``."""
    known = meta.calls.get(call)
    return known.node if known else call.split(".", 1)[0]


def _chunk(call: str, node: str) -> int:
    """A chain call's chunk index (``<node>.<k>``); -1 for any other call."""
    tail = call[len(node) + 1 :] if call.startswith(node + ".") else ""
    return int(tail) if tail.isdigit() else -1


def _final_outputs(
    outputs: list[RequestOutput], meta: ExportMeta, broken: Mapping[tuple[str, str], set[str]]
) -> dict[tuple[str, str], RequestOutput]:
    """(node, request id) -> the node's output for it: sink nodes only, a chain's last chunk;
    none where another call of the node failed or was rejected for that id (``broken``: the
    calls with an error), e.g. a chain whose later chunk failed."""
    picked: dict[tuple[str, str], RequestOutput] = {}
    for o in outputs:
        node = node_of(o.node, meta)
        key = (node, o.request_id)
        if (meta.sinks and node not in meta.sinks) or broken.get(key, set()) - {o.node}:
            continue
        old = picked.get(key)
        if old is None or _chunk(o.node, node) >= _chunk(old.node, node):
            picked[key] = o
    return picked


def openai_lines(
    outputs: list[RequestOutput], meta: ExportMeta, created: int
) -> list[dict[str, Any]]:
    """The OpenAI Batch output lines of a job (``created`` in unix s): outputs, then errors.

    Errors: every failed or rejected request of a sink node, then those of other nodes whose
    request id got no line at all (e.g. a document rejected before a chain it would have fed),
    so every record of the input ends up in the file."""
    broken: dict[tuple[str, str], set[str]] = {}
    for name, rid, _ in meta.errors:
        broken.setdefault((node_of(name, meta), rid), set()).add(name)
    picked = _final_outputs(outputs, meta, broken)
    lines = []
    for o in picked.values():
        call = meta.calls.get(o.node)
        lines.append(output_line(
            custom_id=o.request_id, model=call.model if call else "", text=o.text,
            prompt_tokens=o.prompt_tokens, output_tokens=o.output_tokens,
            finish_reason=o.finish_reason, chat=o.request_id not in meta.completion_ids,
            request_id=o.key, created=created,
        ))  # fmt: skip
    seen = set(picked)
    ids = {rid for _, rid in seen}
    for sink_pass in (True, False):
        for name, rid, message in meta.errors:
            node = node_of(name, meta)
            sink = not meta.sinks or node in meta.sinks or name.startswith(DATASET_PREFIX)
            if sink != sink_pass or (node, rid) in seen or (not sink and rid in ids):
                continue
            seen.add((node, rid))
            ids.add(rid)
            code = "invalid_request" if (name, rid) in meta.rejected else "request_failed"
            lines.append(error_line(custom_id=rid, message=f"{name}: {message}", code=code))
    return lines


# --------------------------------------------------------------------------------------------
# The coordinator's export_meta document.
# --------------------------------------------------------------------------------------------


def meta_from_doc(doc: Mapping[str, Any], failed: Mapping[str, str]) -> ExportMeta:
    """An :class:`ExportMeta` from the job state's ``export_meta`` document and failed requests.

    ``doc`` is ``{"calls": {call: {"node", "model"}}, "completion_ids": [...], "sinks": [...],
    "rejected": [{"node", "request_id", "reason"}]}`` (missing fields: empty); ``failed`` maps a
    ledger key ``<call>/<request id>`` to its error.

    Raises:
        ValueError: a field has the wrong shape (the message names it).
    """
    try:
        calls = {str(c): CallMeta(str(m["node"]), str(m.get("model") or ""))
                 for c, m in dict(doc.get("calls") or {}).items()}  # fmt: skip
        rejected = [(str(r["node"]), str(r["request_id"]), str(r["reason"]))
                    for r in doc.get("rejected") or ()]  # fmt: skip
        completion_ids = frozenset(str(i) for i in doc.get("completion_ids") or ())
        sinks = frozenset(str(s) for s in doc.get("sinks") or ())
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"export_meta: bad document ({type(e).__name__}: {e})") from None
    errors = list(rejected)
    for key, error in failed.items():
        call, _, request_id = key.partition("/")
        errors.append((call, request_id, error))
    return ExportMeta(
        calls=calls, completion_ids=completion_ids, errors=tuple(errors), sinks=sinks,
        rejected=frozenset((n, r) for n, r, _ in rejected),
    )  # fmt: skip
