"""Nodes of an application file -> drafts of LLM calls (one per node, per chunk, per route).

- An ``input:`` node is one call: a request per dataset row (or per upstream request id),
  ``repeat`` times.
- A ``chain:`` node is calls ``<name>.0``, ``<name>.1``, ...: call k holds chunk k of every
  document that long; its request depends on call k-1's request of the same document.
- A ``route:`` node is a call ``<name>.<label>`` per target. With ``column`` or ``rule`` each row
  is in the call of its label. With ``router`` every row is in every target's call (a candidate,
  depending on the router's request); the runtime keeps the one the router's output names, and
  the planner sees each row only under a label drawn from ``estimate`` (:attr:`Draft.plan`).

Problems of one row become a reason in :attr:`Draft.pre` (a rejection of that request); problems
of the node (an unknown placeholder, a rule that cannot be imported) raise ``SpecError``.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apps.chunking import ChunkError, Tokenizer, split_chunks
from apps.cluster_spec import SpecError
from apps.datasets import Dataset, Row, filtered
from apps.prompts import Template, parse_template
from apps.requests import RequestText, RouteInfo
from apps.tokens import estimate_tokens
from planning.estimate import ServingConfig

if TYPE_CHECKING:
    from apps.app_spec import AppSpec, ChainSpec, InputSpec, NodeSpec, RouteSpec

Ref = tuple[str, str]  # (call name, request id)
Outputs = dict[str, dict[str, tuple[Ref, ...]]]  # node -> request id -> the requests giving it


@dataclass(frozen=True, slots=True)
class Draft:
    """One call before over-long prompts are dropped."""

    name: str  # call name
    node: int  # index into AppSpec.nodes
    part: int | None  # chunk index of a chain call; None otherwise
    model: str
    ids: tuple[str, ...]  # one per request
    base: tuple[int, ...]  # tokens per request: own prompt + template, no inputs
    deps: tuple[tuple[Ref, ...], ...]  # per request: the upstream requests it consumes
    texts: tuple[RequestText, ...]  # per request: what its prompt is built from
    pre: tuple[str | None, ...]  # per request: why it is rejected already, None = kept
    caps: tuple[int | None, ...]  # per request: the row's own max_tokens
    template: Template | None = None
    chain: bool = False
    route: RouteInfo | None = None
    plan: tuple[bool, ...] | None = None  # router candidates: in the planning graph


@dataclass(slots=True)
class Env:
    """What expansion reads and accumulates."""

    where: str  # file label
    base_dir: Path
    datasets: Mapping[str, Dataset]
    tokenizer: Callable[[str], Tokenizer | None]  # model id -> its tokenizer, if local
    serving: ServingConfig
    outputs: Outputs = field(default_factory=dict)
    lost: dict[Ref, str] = field(default_factory=dict)  # (node, id) rejected outside any call


def expand_all(spec: AppSpec, order: list[int], env: Env) -> list[Draft]:
    """Drafts of every node, in topological order."""
    drafts: list[Draft] = []
    for i in order:
        node = spec.nodes[i]
        at = f"{env.where}: nodes[{i}]"
        if node.input is not None:
            drafts.append(_expand_input(i, node, node.input, env, at))
        elif node.chain is not None:
            drafts += _expand_chain(i, node, node.chain, env, at)
        else:
            assert node.route is not None
            drafts += _expand_route(i, node, node.route, spec, env, at)
    return drafts


# ------------------------------------------------------------------ templates and tokens


def _parsed(text: str | None) -> Template | None:
    return parse_template(text) if text is not None else None


def _check_fields(tmpl: Template | None, allowed: set[str], at: str, what: str) -> None:
    for f in tmpl.fields if tmpl is not None else ():
        if f not in allowed:
            raise SpecError(
                f"{at}.{what}: placeholder {{{f}}}: not a column of the dataset, an input node "
                f"or a built-in name (available: {', '.join(sorted(allowed)) or 'none'})"
            )


def _fixed_tokens(tmpl: Template | None, extra: int) -> int:
    fixed = tmpl.fixed_text() if tmpl is not None else ""
    return extra + (estimate_tokens(fixed) if fixed.strip() else 0)


def own_tokens(
    row: Row | None, tmpl: Template | None, extra: int, skip: set[str]
) -> tuple[int, str | None]:
    """Tokens of a request's own prompt (template and row columns, no inputs), or why the row
    cannot fill it. ``skip``: placeholders filled at run time (inputs, chunk, summary)."""
    total = _fixed_tokens(tmpl, extra)
    if tmpl is None or not tmpl.fields:
        if row is None:
            return max(1, total), None
        if row.tokens is None:
            return 1, f"{row.label}: needs column 'prompt_tokens' or 'prompt'"
        return row.tokens + total, None
    for f in tmpl.fields:
        if f in skip or row is None:
            continue
        if f == "prompt" and row.tokens is not None:
            total += row.tokens
        elif f not in row.fields:
            return 1, f"{row.label}: no column {f!r} (template placeholder {{{f}}})"
        elif row.fields[f]:
            total += estimate_tokens(row.fields[f])
    return max(1, total), None


def _text(row: Row | None, extra_fields: Mapping[str, str] | None = None) -> RequestText:
    if row is None:
        return RequestText(dict(extra_fields or {}))
    fields = {**row.fields, **extra_fields} if extra_fields else row.fields
    return RequestText(fields, row.messages, row.temperature, row.top_p, row.completion)


# ------------------------------------------------------------------ input nodes


def _expand_input(i: int, node: NodeSpec, inp: InputSpec, env: Env, at: str) -> Draft:
    tmpl = _parsed(inp.template)
    ups = [env.outputs[u] for u in inp.nodes or ()]
    names = set(inp.nodes or ()) | {"inputs"}
    rows: list[Row | None]
    if inp.dataset is not None:
        ds = env.datasets[inp.dataset]
        _check_fields(tmpl, set(ds.columns) | {"prompt"} | names, f"{at}.input", "template")
        rows = list(filtered(ds, inp.where, f"{at}.input"))
        ids = [r.id for r in rows if r is not None]
    else:
        _check_fields(tmpl, names, f"{at}.input", "template")
        assert inp.nodes is not None
        ids = list(env.outputs[inp.nodes[0]])
        rows = [None] * len(ids)
    acc = _Acc()
    for rid, row in zip(ids, rows, strict=True):
        dep = tuple(ref for up in ups for ref in up.get(rid, ()))
        base, why = own_tokens(row, tmpl, inp.template_tokens, names)
        for j in range(inp.repeat):
            acc.add(rid if inp.repeat == 1 else f"{rid}#{j}", base, dep, _text(row), why, row)
    env.outputs[node.name] = {rid: ((node.name, rid),) for rid in acc.ids}
    assert node.model is not None
    return acc.draft(node.name, i, None, node.model, tmpl)


@dataclass(slots=True)
class _Acc:
    """Per-request columns of a draft being built."""

    ids: list[str] = field(default_factory=list)
    base: list[int] = field(default_factory=list)
    deps: list[tuple[Ref, ...]] = field(default_factory=list)
    texts: list[RequestText] = field(default_factory=list)
    pre: list[str | None] = field(default_factory=list)
    caps: list[int | None] = field(default_factory=list)

    def add(self, rid: str, base: int, dep: tuple[Ref, ...], text: RequestText,
            why: str | None, row: Row | None) -> None:  # fmt: skip
        self.ids.append(rid)
        self.base.append(base)
        self.deps.append(dep)
        self.texts.append(text)
        self.pre.append(why)
        self.caps.append(row.max_tokens if row is not None else None)

    def draft(self, name: str, i: int, part: int | None, model: str, tmpl: Template | None,
              **kw: Any) -> Draft:  # fmt: skip
        return Draft(name, i, part, model, tuple(self.ids), tuple(self.base), tuple(self.deps),
                     tuple(self.texts), tuple(self.pre), tuple(self.caps), tmpl, **kw)  # fmt: skip


# ------------------------------------------------------------------ chains


def _expand_chain(i: int, node: NodeSpec, ch: ChainSpec, env: Env, at: str) -> list[Draft]:
    """Calls ``<name>.0``, ``<name>.1``, ...: call k holds chunk k of every long-enough doc."""
    assert node.model is not None
    first, nxt = _parsed(ch.first_template or ch.template), _parsed(ch.template)
    ds = env.datasets[ch.dataset]
    built_in = {"chunk", "summary", node.name}
    for t, what in ((nxt, "template"), (_parsed(ch.first_template), "first_template")):
        _check_fields(t, set(ds.columns) | built_in, f"{at}.chain", what)
        if t is not None and t.fields and "chunk" not in t.fields:
            raise SpecError(f"{at}.chain.{what}: a chain template needs the {{chunk}} placeholder")
    docs = filtered(ds, ch.where, f"{at}.chain")
    tok = env.tokenizer(node.model)
    parts = {d.id: _chunks(d, ch, tok) for d in docs}
    longest = max((len(p) for p in parts.values() if not isinstance(p, str)), default=1)
    drafts: list[Draft] = []
    for k in range(longest):
        acc, tmpl = _Acc(), (first if k == 0 else nxt)
        for d in docs:
            got = parts[d.id]
            if isinstance(got, str):
                if k == 0:
                    acc.add(d.id, 1, (), _text(d), got, d)
                continue
            if len(got) <= k:
                continue
            text, tokens = got[k]
            own, why = _chain_tokens(d, tmpl, ch, tokens, built_in | {ch.column})
            dep = ((f"{node.name}.{k - 1}", d.id),) if k else ()
            acc.add(d.id, max(1, own), dep, _text(d, {"chunk": text}), why, d)
        if acc.ids:
            drafts.append(acc.draft(f"{node.name}.{k}", i, k, node.model, tmpl, chain=True))
    env.outputs[node.name] = {
        d.id: ((f"{node.name}.{len(p) - 1}", d.id),) for d in docs
        if not isinstance(p := parts[d.id], str)
    }  # fmt: skip
    return drafts


def _chain_tokens(
    d: Row, tmpl: Template | None, ch: ChainSpec, chunk: int, skip: set[str]
) -> tuple[int, str | None]:
    """Tokens of a chain request's own prompt: its chunk, the template and other columns."""
    if tmpl is None or not tmpl.fields:
        return _fixed_tokens(tmpl, ch.template_tokens) + chunk, None
    own, why = own_tokens(d, tmpl, ch.template_tokens, skip)
    return own + chunk, why


def _chunks(d: Row, ch: ChainSpec, tok: Tokenizer | None) -> list[tuple[str, int]] | str:
    """(text, tokens) per chunk of a document, or why it cannot be chunked."""
    text = d.fields.get(ch.column, "")
    if ch.column == "prompt" and not text and d.tokens is not None:  # a length-only document
        n = math.ceil(d.tokens / ch.chunk_tokens)
        return [("", min(ch.chunk_tokens, d.tokens - k * ch.chunk_tokens)) for k in range(n)]
    if ch.column not in d.fields:
        return f"{d.label}: no column {ch.column!r} (the document text)"
    try:
        return [(c.text, c.tokens) for c in split_chunks(text, ch.chunk_tokens, tok)]
    except ChunkError as e:
        return f"{d.label}: column {ch.column!r}: cannot be chunked: {e}"


# ------------------------------------------------------------------ routes


def _expand_route(
    i: int, node: NodeSpec, rt: RouteSpec, spec: AppSpec, env: Env, at: str
) -> list[Draft]:
    tmpl = _parsed(rt.template)
    ds = env.datasets[rt.dataset]
    _check_fields(tmpl, set(ds.columns) | {"prompt"}, f"{at}.route", "template")
    rows = filtered(ds, rt.where, f"{at}.route")
    if rt.router is not None:
        return _router_candidates(i, node, rt, rows, tmpl, env, at)
    pick = _labeller(rt, env, f"{at}.route")
    accs: dict[str, _Acc] = {label: _Acc() for label in rt.targets}
    out: dict[str, tuple[Ref, ...]] = {}
    for row in rows:
        label, why = pick(row)
        if label is None:
            env.lost[(node.name, row.id)] = why or "no route"
            out[row.id] = ((node.name, row.id),)
            continue
        base, why = own_tokens(row, tmpl, rt.template_tokens, set())
        accs[label].add(row.id, base, (), _text(row), why, row)
        out[row.id] = ((f"{node.name}.{label}", row.id),)
    env.outputs[node.name] = out
    return [
        acc.draft(f"{node.name}.{label}", i, None, rt.targets[label], tmpl)
        for label, acc in accs.items() if acc.ids
    ]  # fmt: skip


def _labeller(rt: RouteSpec, env: Env, at: str) -> Callable[[Row], tuple[str | None, str | None]]:
    """Row -> (label, None) or (None, why): by column or by rule, with the default."""
    labels = rt.labels
    if rt.rule is not None and labels is None:
        labels = rule_labels(rt.rule, env.datasets[rt.dataset].rows, env.base_dir, f"{at}.rule")

    def pick(row: Row) -> tuple[str | None, str | None]:
        if labels is not None:
            got: Any = labels.get(row.id)
            if isinstance(got, str) and got.startswith("!"):
                return None, f"{row.label}: route rule {rt.rule} raised {got[1:]}"
            where = f"route rule {rt.rule} returned"
        else:
            assert rt.column is not None
            got, where = row.fields.get(rt.column), f"column {rt.column!r} holds"
        if isinstance(got, str) and got in rt.targets:
            return got, None
        if rt.default is not None:
            return rt.default, None
        return (
            None,
            f"{row.label}: {where} {got!r}, not a label of targets ({', '.join(rt.targets)})",
        )

    return pick


def rule_labels(ref: str, rows: Sequence[Row], base_dir: Path, at: str) -> dict[str, str]:
    """The rule's label per row id ("!<error>" where it raised, repr where not text)."""
    rule = load_rule(ref, base_dir, at)
    out: dict[str, str] = {}
    for row in rows:
        try:
            got = rule(dict(row.fields))
        except Exception as e:  # noqa: BLE001 - a user's rule failing on one row
            got = f"!{type(e).__name__}: {e}"
        out[row.id] = got if isinstance(got, str) else repr(got)
    return out


def load_rule(ref: str, base_dir: Path, at: str) -> Callable[[dict[str, str]], Any]:
    """The callable ``module:function`` (the application file's folder is importable too)."""
    module, _, name = ref.partition(":")
    added = str(base_dir.resolve())
    sys.path.insert(0, added)
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - any import problem is the user's to fix
        raise SpecError(f"{at}: cannot load {ref}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(added)
    if not callable(fn):
        raise SpecError(f"{at}: {ref} is not callable")
    return fn  # type: ignore[no-any-return]


def _router_candidates(
    i: int, node: NodeSpec, rt: RouteSpec, rows: list[Row], tmpl: Template | None, env: Env,
    at: str,
) -> list[Draft]:  # fmt: skip
    assert rt.router is not None
    labels = tuple(rt.targets)
    router = env.outputs[rt.router]
    planned = estimate_split([r.id for r in rows], labels, rt.estimate, node.name)
    drafts = []
    for label in labels:
        acc = _Acc()
        for row in rows:
            base, why = own_tokens(row, tmpl, rt.template_tokens, set())
            if row.id not in router:
                why = f"{row.label}: router node {rt.router!r} has no request {row.id!r}"
            acc.add(row.id, base, router.get(row.id, ()), _text(row), why, row)
        info = RouteInfo(rt.router, label, labels, rt.default)
        plan = tuple(planned[r.id] == label for r in rows)
        drafts.append(acc.draft(f"{node.name}.{label}", i, None, rt.targets[label], tmpl,
                                route=info, plan=plan))  # fmt: skip
    env.outputs[node.name] = {
        r.id: tuple((f"{node.name}.{label}", r.id) for label in labels) for r in rows
    }
    return drafts


def estimate_split(
    ids: list[str], labels: tuple[str, ...], shares: Mapping[str, float] | None, seed_text: str
) -> dict[str, str]:
    """A label per id for planning: counts by largest remainder of the shares (uniform when
    none; every label with a positive share gets at least one id when there are enough), ids
    shuffled by a generator seeded from ``seed_text``."""
    w = np.array([(shares or {}).get(lb, 0.0) if shares else 1.0 for lb in labels], dtype=float)
    want = w / w.sum() * len(ids)
    counts = np.floor(want).astype(np.int64)
    for j in np.argsort(-(want - counts), kind="stable")[: len(ids) - int(counts.sum())]:
        counts[j] += 1
    while (short := np.flatnonzero((counts == 0) & (w > 0))).size and counts.max() > 1:
        counts[short[0]] += 1
        counts[int(np.argmax(counts * (np.arange(len(counts)) != short[0])))] -= 1
    seed = int.from_bytes(seed_text.encode()[:8].ljust(8, b"\0"), "little")
    order = np.random.default_rng(seed).permutation(len(ids))
    names = np.repeat(np.arange(len(labels)), counts)
    return {ids[int(o)]: labels[int(names[n])] for n, o in enumerate(order)}
