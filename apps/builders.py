"""Application documents built in Python: ensembles, routes, chain summaries, mixes, batches.

Each builder returns the plain ``dict`` an application file holds (``docs/app-spec.md``), so
``yaml.safe_dump(doc)`` is a valid file, :func:`write` saves it and
:func:`apps.app_spec.parse_app` loads it as it is::

    doc = ensemble(["lmsys/vicuna-13b-v1.5", "NousResearch/Llama-2-7b-chat-hf"],
                   ["What is a KV cache?", "Name three sorting algorithms."],
                   fuser="lmsys/vicuna-13b-v1.5")
    write(doc, "jobs/ensemble.yaml")

**Models** are Hugging Face ids (``"lmsys/vicuna-13b-v1.5"``) or model entries
(``{"id": ..., "tp": [1], ...}``); a model given twice must be given the same way.

**Prompts and documents** are a dataset file or rows. A ``str`` or :class:`~pathlib.Path` is
kept as ``{path: ...}``: like every relative path of an application file, it is read from the
folder of the file the document is written to (or the ``base_dir`` given to ``parse_app``), so
give it relative to that folder, or absolute. A list becomes inline ``records``: a ``dict`` is a
row as it is (``id``, ``prompt``, other columns), a ``str`` is the row
``{"id": "<position>", "prompt": <text>}``.

Every bad argument raises :class:`ValueError` whose message starts with the argument's name.
The loader checks the rest (unknown models, missing columns) when the document is loaded.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from apps.prompts import (
    CHAIN_FIRST_TEMPLATE,
    CHAIN_NEXT_TEMPLATE,
    FUSE_TEMPLATE,
    JUDGE_TEMPLATE,
    RANK_TEMPLATE,
    ROUTER_TEMPLATE,
    TemplateError,
    parse_template,
)

Model = str | Mapping[str, Any]  # a model id, or a models[] entry with an "id"
Rows = str | Path | Sequence[str | Mapping[str, Any]]  # a dataset file, or rows inline
Doc = dict[str, Any]

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # node names and route labels
_RULE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # module:function
# a brace escape, or a placeholder (group 1 = its name)
_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_-]*)\}")
_CHAIN_BUILT_INS = frozenset({"chunk", "summary", "inputs"})
# models[] keys at their default values (two entries differing only by these are the same)
_MODEL_DEFAULTS: Mapping[str, Any] = {
    "profile": "auto", "lengths": "authors", "trust_remote_code": False, "chat_template": "auto",
}  # fmt: skip
RANK_MAX_TOKENS = 16  # tokens: a ranker replies with one number
ROUTER_MAX_TOKENS = 16  # tokens: a router replies with one label


# --------------------------------------------------------------------------------------------
# Arguments.
# --------------------------------------------------------------------------------------------


def model_entry(model: Model, arg: str) -> dict[str, Any]:
    """The ``models[]`` entry of ``model`` (a copy); ``arg`` names the argument in errors."""
    if isinstance(model, str):
        if not model.strip():
            raise ValueError(f"{arg}: empty model id")
        return {"id": model}
    if isinstance(model, Mapping):
        mid = model.get("id")
        if not isinstance(mid, str) or not mid.strip():
            raise ValueError(f"{arg}: a model entry needs an 'id' string, got {dict(model)!r}")
        return copy.deepcopy(dict(model))
    raise ValueError(f"{arg}: expected a model id or a model entry (dict), got {model!r}")


def model_label(model_id: str) -> str:
    """A short node-name part for a model: the last part of its id, with every character other
    than letters, digits, ``_`` and ``-`` turned into ``_`` (``lmsys/vicuna-13b-v1.5`` ->
    ``vicuna-13b-v1_5``)."""
    last = model_id.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_-]", "_", last).lower() or "model"


def _unique(names: Sequence[str]) -> list[str]:
    """``names`` with repeats suffixed ``_2``, ``_3``, ... (in order)."""
    out: list[str] = []
    for n in names:
        name, k = n, 2
        while name in out:
            name, k = f"{n}_{k}", k + 1
        out.append(name)
    return out


def _same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def norm(m: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in m.items() if _MODEL_DEFAULTS.get(k, object()) != v}

    return norm(a) == norm(b)


def merge_models(entries: Sequence[Mapping[str, Any]], arg: str) -> list[dict[str, Any]]:
    """Model entries with each id once, in first-seen order; the same id given two different
    ways is a ValueError naming ``arg`` and the id."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        mid = e["id"]
        if mid in out and not _same_model(out[mid], e):
            raise ValueError(
                f"{arg}: model {mid!r} is given two different ways: {out[mid]!r} and {dict(e)!r}"
            )
        out.setdefault(mid, dict(e))
    return list(out.values())


def _models(models: Sequence[Model] | Model, arg: str) -> list[dict[str, Any]]:
    if isinstance(models, str | Mapping) or not isinstance(models, Sequence) or not models:
        raise ValueError(
            f"{arg}: expected a non-empty list of model ids or entries, got {models!r}"
        )
    return [model_entry(m, f"{arg}[{i}]") for i, m in enumerate(models)]


def dataset(rows: Rows, arg: str) -> dict[str, Any]:
    """The ``datasets:`` entry of a file path or of rows (see the module docstring)."""
    if isinstance(rows, Path):
        return {"path": rows.as_posix()}
    if isinstance(rows, str):
        if not rows.strip():
            raise ValueError(f"{arg}: empty path")
        return {"path": rows}
    if not isinstance(rows, Sequence) or not rows:
        raise ValueError(
            f"{arg}: expected a dataset path or a non-empty list of rows, got {rows!r}"
        )
    records: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            records.append({"id": str(i), "prompt": row})
        elif isinstance(row, Mapping):
            records.append(copy.deepcopy(dict(row)))
        else:
            raise ValueError(f"{arg}[{i}]: expected a prompt string or a row (dict), got {row!r}")
    return {"records": records}


def _positive(value: object, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg}: expected an integer >= 1, got {value!r}")
    return value


def _template(text: str | None, arg: str) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{arg}: expected a template string, got {text!r}")
    try:
        parse_template(text)
    except TemplateError as e:
        raise ValueError(f"{arg}: {e}") from None
    return text


def _name(value: str, arg: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{arg}: {value!r}: use letters, digits, '_' and '-' only")
    return value


def _doc(name: str, description: str, models: list[dict[str, Any]], max_tokens: int) -> Doc:
    return {
        "name": _name(name, "name"),
        "description": description,
        "defaults": {"sampling": {"max_tokens": _positive(max_tokens, "max_tokens")}},
        "models": merge_models(models, "models"),
        "datasets": {},
        "nodes": [],
    }


# --------------------------------------------------------------------------------------------
# Templates.
# --------------------------------------------------------------------------------------------


def _map_placeholders(template: str, rename: Callable[[str], str]) -> str:
    """``template`` with each placeholder name ``n`` replaced by ``rename(n)``; escapes kept."""

    def sub(m: re.Match[str]) -> str:
        return m.group(0) if m.group(1) is None else "{" + rename(m.group(1)) + "}"

    return _PLACEHOLDER_RE.sub(sub, template)


def fill_placeholder(template: str, name: str, text: str) -> str:
    """``template`` with the placeholder ``{name}`` replaced by ``text``, escaped so that the
    result is still a template (its braces doubled); ``{{``/``}}`` escapes are kept."""
    escaped = text.replace("{", "{{").replace("}", "}}")

    def sub(m: re.Match[str]) -> str:
        return escaped if m.group(1) == name else m.group(0)

    return _PLACEHOLDER_RE.sub(sub, template)


def router_template(labels: Sequence[str]) -> str:
    """ROUTER_TEMPLATE with its ``{labels}`` filled in: a template whose only placeholder is
    ``{prompt}``."""
    return fill_placeholder(ROUTER_TEMPLATE, "labels", ", ".join(labels))


# --------------------------------------------------------------------------------------------
# Ensemble.
# --------------------------------------------------------------------------------------------


def ensemble(
    models: Sequence[Model],
    prompts: Rows,
    *,
    fuser: Model | None = None,
    ranker: Model | None = None,
    max_tokens: int = 256,
    fuse_max_tokens: int | None = None,
    name: str = "ensemble",
    template: str | None = None,
) -> Doc:
    """Every model answers every prompt; optionally one model fuses or ranks the answers.

    Args:
        models: the answering models; node ``answer_<label>`` per model (:func:`model_label`,
            made unique with ``_2``, ``_3``, ... when a model is listed twice).
        prompts: the dataset ``prompts`` (a path or rows, each with a ``prompt``).
        fuser: adds node ``fuse``: FUSE_TEMPLATE over the prompt and every answer.
        ranker: adds node ``rank``: RANK_TEMPLATE, replying with the best answer's number
            (``RANK_MAX_TOKENS`` output tokens).
        max_tokens: output cap of the answers (``defaults.sampling.max_tokens``).
        fuse_max_tokens: output cap of ``fuse``; default ``max_tokens``.
        name: the application name.
        template: prompt template of the answer nodes (``{prompt}``, other columns).

    Raises:
        ValueError: a bad argument (the message starts with its name).
    """
    entries = _models(models, "models")
    extra = [model_entry(m, arg) for m, arg in ((fuser, "fuser"), (ranker, "ranker")) if m]
    what = "fused" if fuser else "ranked" if ranker else "side by side"
    doc = _doc(name, f"{len(entries)} models answer every prompt, {what}", entries + extra,
               max_tokens)  # fmt: skip
    doc["datasets"]["prompts"] = dataset(prompts, "prompts")
    labels = _unique([f"answer_{model_label(e['id'])}" for e in entries])
    tmpl = _template(template, "template")
    for label, e in zip(labels, entries, strict=True):
        inp: dict[str, Any] = {"dataset": "prompts"}
        if tmpl is not None:
            inp["template"] = tmpl
        doc["nodes"].append({"name": label, "model": e["id"], "input": inp})
    if fuser:
        fuse = _judge_node("fuse", extra[0]["id"], labels, FUSE_TEMPLATE)
        if fuse_max_tokens is not None:
            fuse["sampling"] = {"max_tokens": _positive(fuse_max_tokens, "fuse_max_tokens")}
        doc["nodes"].append(fuse)
    elif fuse_max_tokens is not None:
        raise ValueError("fuse_max_tokens: only used with fuser=")
    if ranker:
        rank = _judge_node("rank", extra[-1]["id"], labels, RANK_TEMPLATE)
        rank["sampling"] = {"max_tokens": RANK_MAX_TOKENS}
        doc["nodes"].append(rank)
    return doc


def _judge_node(name: str, model: str, answers: list[str], template: str) -> dict[str, Any]:
    """A node that reads a prompt row and the answers to it (same id)."""
    inp = {"dataset": "prompts", "nodes": list(answers), "template": template}
    return {"name": name, "model": model, "input": inp}


# --------------------------------------------------------------------------------------------
# Routing.
# --------------------------------------------------------------------------------------------


def _targets(targets: Mapping[str, Model] | Sequence[Model], arg: str) -> dict[str, dict[str, Any]]:
    """label -> model entry; a list is labelled with :func:`model_label` (made unique)."""
    if isinstance(targets, Mapping):
        if not targets:
            raise ValueError(f"{arg}: give at least one label: model")
        out = {}
        for label, m in targets.items():
            if not isinstance(label, str) or not _NAME_RE.fullmatch(label):
                raise ValueError(f"{arg}: label {label!r}: use letters, digits, '_' and '-' only")
            out[label] = model_entry(m, f"{arg}[{label!r}]")
        return out
    entries = _models(targets, arg)
    labels = _unique([model_label(e["id"]) for e in entries])
    return dict(zip(labels, entries, strict=True))


def _route_way(
    column: str | None, rule: str | None, router: Model | None, estimate: Any, labels: list[str]
) -> None:
    """Exactly one way to route; ``rule`` and ``estimate`` well formed."""
    given = [n for n, v in (("column", column), ("rule", rule), ("router", router)) if v]
    if len(given) != 1:
        raise ValueError(
            "column/rule/router: give exactly one of column=, rule= and router= "
            f"(given: {', '.join(given) or 'none'})"
        )
    if rule is not None and not _RULE_RE.fullmatch(rule):
        raise ValueError(f"rule: {rule!r}: expected 'module:function'")
    if estimate is None:
        return
    if router is None:
        raise ValueError("estimate: only for routes decided by a router model (router=)")
    if not isinstance(estimate, Mapping) or not estimate:
        raise ValueError(f"estimate: expected a mapping label -> share, got {estimate!r}")
    unknown = sorted(set(estimate) - set(labels))
    if unknown:
        raise ValueError(f"estimate: unknown labels {unknown} (targets: {labels})")


def route(
    targets: Mapping[str, Model] | Sequence[Model],
    prompts: Rows,
    *,
    column: str | None = None,
    rule: str | None = None,
    router: Model | None = None,
    estimate: Mapping[str, float] | None = None,
    default: str | None = None,
    max_tokens: int = 256,
    template: str | None = None,
    name: str = "route",
) -> Doc:
    """Each prompt goes to one target model, chosen by a column, a rule or a router model.

    The route node is ``answer`` (calls ``answer.<label>``); with ``router=``, node ``router``
    asks that model to name a label (ROUTER_TEMPLATE with the labels filled in,
    ``ROUTER_MAX_TOKENS`` output tokens) and every prompt is a candidate under every label until
    the router's answer is known.

    Args:
        targets: label -> model, or a list of models (labels by :func:`model_label`).
        prompts: the dataset ``prompts``.
        column: route by this column of the rows (its value is the label).
        rule: route by a function ``module:function`` (row columns -> label); the module is
            looked up in the application file's folder first.
        router: route by this model's answer.
        estimate: label -> share of the prompts, what the planner assumes (router only).
        default: label for prompts whose label is unknown (else they are rejected).
        max_tokens: output cap of the answers.
        template: prompt template of the answers (dataset columns only).
        name: the application name.

    Raises:
        ValueError: a bad argument, or not exactly one of ``column``, ``rule``, ``router``.
    """
    entries = _targets(targets, "targets")
    labels = list(entries)
    _route_way(column, rule, router, estimate, labels)
    if default is not None and default not in entries:
        raise ValueError(f"default: {default!r} is not a label of targets ({labels})")
    extra = [model_entry(router, "router")] if router else []
    way = f"column {column!r}" if column else f"rule {rule}" if rule else "a router model"
    doc = _doc(name, f"each prompt goes to one of {len(labels)} models, by {way}",
               [*entries.values(), *extra], max_tokens)  # fmt: skip
    doc["datasets"]["prompts"] = dataset(prompts, "prompts")
    spec: dict[str, Any] = {
        "dataset": "prompts",
        "targets": {k: e["id"] for k, e in entries.items()},
    }
    if column:
        spec["column"] = column
    elif rule:
        spec["rule"] = rule
    else:
        spec["router"] = "router"
        doc["nodes"].append({
            "name": "router", "model": extra[0]["id"],
            "input": {"dataset": "prompts", "template": router_template(labels)},
            "sampling": {"max_tokens": ROUTER_MAX_TOKENS},
        })  # fmt: skip
        if estimate is not None:
            spec["estimate"] = dict(estimate)
    if default is not None:
        spec["default"] = default
    if (tmpl := _template(template, "template")) is not None:
        spec["template"] = tmpl
    doc["nodes"].append({"name": "answer", "route": spec})
    return doc


# --------------------------------------------------------------------------------------------
# Chain summary.
# --------------------------------------------------------------------------------------------


def chain_summary(
    summarizer: Model,
    documents: Rows,
    *,
    chunk_tokens: int = 2048,
    judge: Model | None = None,
    judges: int = 1,
    max_tokens: int = 900,
    column: str = "prompt",
    name: str = "chain_summary",
) -> Doc:
    """Documents summarised chunk by chunk; optionally judged ``judges`` times each.

    Node ``summary`` is a chain (calls ``summary.0``, ``summary.1``, ...; CHAIN_FIRST_TEMPLATE
    for the first chunk, CHAIN_NEXT_TEMPLATE after). With ``judge``, node ``judge`` reads each
    final summary ``judges`` times (JUDGE_TEMPLATE; request ids ``<doc>#0``, ``<doc>#1``, ...).

    Args:
        summarizer: the summarising model.
        documents: the dataset ``documents``; the text is in ``column``.
        chunk_tokens: tokens per chunk.
        judge: the judging model.
        judges: evaluator requests per summary (needs ``judge``).
        max_tokens: output cap of every call.
        column: the column holding each document's text.
        name: the application name.

    Raises:
        ValueError: a bad argument (the message starts with its name).
    """
    entry = model_entry(summarizer, "summarizer")
    extra = [model_entry(judge, "judge")] if judge else []
    _positive(judges, "judges")
    if judge is None and judges != 1:
        raise ValueError("judges: needs judge= (the model that judges the summaries)")
    if not isinstance(column, str) or not column:
        raise ValueError(f"column: expected a column name, got {column!r}")
    judged = f", each judged {judges} time(s)" if judge else ""
    doc = _doc(name, f"documents summarised chunk by chunk{judged}", [entry, *extra], max_tokens)
    doc["datasets"]["documents"] = dataset(documents, "documents")
    chain: dict[str, Any] = {
        "dataset": "documents", "chunk_tokens": _positive(chunk_tokens, "chunk_tokens"),
        "first_template": CHAIN_FIRST_TEMPLATE, "template": CHAIN_NEXT_TEMPLATE,
    }  # fmt: skip
    if column != "prompt":
        chain["column"] = column
    doc["nodes"].append({"name": "summary", "model": entry["id"], "chain": chain})
    if judge:
        inp = {"nodes": ["summary"], "repeat": judges, "template": JUDGE_TEMPLATE}
        doc["nodes"].append({"name": "judge", "model": extra[0]["id"], "input": inp})
    return doc


# --------------------------------------------------------------------------------------------
# OpenAI Batch files.
# --------------------------------------------------------------------------------------------


def openai_batch(
    path: str | Path,
    models: Mapping[str, Model],
    *,
    max_tokens: int = 256,
    default: str | None = None,
    name: str = "batch",
) -> Doc:
    """An OpenAI Batch input file run on the models its lines name in ``body.model``.

    Each key of ``models`` is a ``body.model`` value, written exactly as in the file, and is used
    as the route label (calls ``answer.<key>``), so it must be a label: letters, digits, ``_``
    and ``-`` (``gpt-4o-mini`` is fine; for ``org/model`` or ``v1.5`` rewrite those lines'
    ``body.model`` first). Lines naming no key are rejected one by one (or go to ``default``).
    With a single model there is no route: node ``answer`` runs every line, whatever its
    ``body.model``. A line's own ``max_tokens`` overrides ``max_tokens``.

    Args:
        path: the batch file (``.jsonl``), relative to the written document's folder.
        models: ``body.model`` value -> model.
        max_tokens: output cap of lines that give none.
        default: the key for lines whose ``body.model`` is missing or unknown.
        name: the application name.

    Raises:
        ValueError: a bad argument (the message starts with its name).
    """
    if not isinstance(path, str | Path) or not str(path).strip():
        raise ValueError(f"path: expected the batch file's path, got {path!r}")
    if not isinstance(models, Mapping):
        raise ValueError(f"models: expected a mapping body.model -> model, got {models!r}")
    entries = _targets(models, "models")
    if default is not None and default not in entries:
        raise ValueError(f"default: {default!r} is not a key of models ({list(entries)})")
    doc = _doc(name, f"OpenAI Batch file {Path(path).name} on {len(entries)} model(s)",
               list(entries.values()), max_tokens)  # fmt: skip
    doc["datasets"]["batch"] = {**dataset(path, "path"), "format": "openai"}
    if len(entries) == 1:
        only = next(iter(entries.values()))["id"]
        doc["nodes"].append({"name": "answer", "model": only, "input": {"dataset": "batch"}})
        return doc
    spec: dict[str, Any] = {
        "dataset": "batch", "targets": {k: e["id"] for k, e in entries.items()}, "column": "model",
    }  # fmt: skip
    if default is not None:
        spec["default"] = default
    doc["nodes"].append({"name": "answer", "route": spec})
    return doc


# --------------------------------------------------------------------------------------------
# Several applications in one job.
# --------------------------------------------------------------------------------------------


def mixed(*apps: Mapping[str, Any], name: str = "mixed") -> Doc:
    """Several application documents as one job.

    Each part's nodes and datasets get the prefix ``<part name>_`` (the part's ``name``, made a
    valid name part; ``part<i>`` without one; repeats get ``_2``, ...), and every reference to
    them is renamed too: ``input.nodes``, ``input.dataset``, ``chain.dataset``,
    ``route.dataset``, ``route.router`` and template placeholders that name an upstream node
    (a chain's ``{chunk}`` and ``{summary}`` are left alone). Models are merged by id. Each
    part's ``defaults.sampling`` is pushed into its nodes' ``sampling`` (a node's own values
    win), so the parts keep their settings. Relative paths are kept as they are: parts whose
    datasets are files must have them relative to the same folder.

    Raises:
        ValueError: no parts, a part that is not an application document, or one model id
            given two different ways (the message names it).
    """
    if not apps:
        raise ValueError("apps: give at least one application document")
    prefixes = _unique([_part_name(a, i) for i, a in enumerate(apps)])
    models: list[dict[str, Any]] = []
    out: Doc = {"name": _name(name, "name"), "description": "", "models": [], "datasets": {},
                "nodes": []}  # fmt: skip
    for i, (app, prefix) in enumerate(zip(apps, prefixes, strict=True)):
        arg = f"apps[{i}]"
        models += [model_entry(m, f"{arg}.models[{j}]") for j, m in enumerate(_list(app, arg))]
        datasets = app.get("datasets") or {}
        for ds_name, ds in datasets.items():
            out["datasets"][f"{prefix}_{ds_name}"] = copy.deepcopy(ds)
        defaults = ((app.get("defaults") or {}).get("sampling")) or {}
        out["nodes"] += [_renamed(n, prefix, defaults) for n in app["nodes"]]
    out["models"] = merge_models(models, "apps")
    out["description"] = "Mixed: " + ", ".join(
        str(a.get("name") or p) for a, p in zip(apps, prefixes, strict=True)
    )
    return out


def _part_name(app: Mapping[str, Any], i: int) -> str:
    if not isinstance(app, Mapping):
        raise ValueError(f"apps[{i}]: expected an application document (dict), got {app!r}")
    raw = app.get("name")
    part = re.sub(r"[^A-Za-z0-9_-]", "_", raw) if isinstance(raw, str) and raw else f"part{i}"
    return part


def _list(app: Mapping[str, Any], arg: str) -> list[Any]:
    """The part's models, after checking it has models and nodes lists."""
    for key in ("models", "nodes"):
        value = app.get(key)
        if not isinstance(value, list) or not value:
            raise ValueError(f"{arg}.{key}: expected a non-empty list, got {value!r}")
    return list(app["models"])


def _renamed(node: Mapping[str, Any], prefix: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``node`` with its name, references and placeholders prefixed, and the part's
    default sampling merged under its own."""
    out = copy.deepcopy(dict(node))
    own = str(out["name"])
    out["name"] = f"{prefix}_{own}"
    if defaults or out.get("sampling"):
        out["sampling"] = {**defaults, **(out.get("sampling") or {})}
    for kind in ("input", "chain", "route"):
        src = out.get(kind)
        if isinstance(src, dict):
            _rename_source(kind, src, own, prefix)
    return out


def _rename_source(kind: str, src: dict[str, Any], own: str, prefix: str) -> None:
    """Prefix the dataset, upstream nodes, router and node placeholders of one source section."""
    if "dataset" in src:
        src["dataset"] = f"{prefix}_{src['dataset']}"
    refs: set[str] = set()
    if kind == "input" and src.get("nodes"):
        refs = set(src["nodes"])
        src["nodes"] = [f"{prefix}_{n}" for n in src["nodes"]]
    if kind == "route" and src.get("router"):
        src["router"] = f"{prefix}_{src['router']}"
    if kind == "chain":
        refs = {own} - _CHAIN_BUILT_INS  # the chain's own name: the summary so far

    def rename(field: str) -> str:
        return f"{prefix}_{field}" if field in refs else field

    for key in ("template", "first_template"):
        if isinstance(src.get(key), str):
            src[key] = _map_placeholders(src[key], rename)


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def _str(dumper: Any, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


# safe YAML with multi-line strings (templates) as ``|`` blocks
_DUMPER: Any = type("_Dumper", (yaml.SafeDumper,), {})
_DUMPER.add_representer(str, _str)


def dumps(doc: Mapping[str, Any]) -> str:
    """``doc`` as YAML (keys in their order, templates as blocks)."""
    text = yaml.dump(dict(doc), Dumper=_DUMPER, sort_keys=False, allow_unicode=True, width=100)
    return str(text)


def write(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``doc`` as a YAML application file (parent folders created); returns the path.

    Relative dataset paths in ``doc`` are read from the file's folder when it is loaded.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps(doc), encoding="utf-8")
    return p
