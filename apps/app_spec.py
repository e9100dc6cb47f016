"""Application files (YAML or JSON) -> :class:`planning.graph.AppGraph`, plus rejected requests.

An application file lists models, datasets and nodes (LLM calls); the format and every rule are
in ``docs/app-spec.md``. :func:`load_app` validates the file with pydantic, resolves every model's
profile per tensor-parallel degree on the cluster, reads the datasets, expands chain nodes
into one call per chunk, drops requests whose prompt cannot fit the model's context (and the
requests that depend on them) and returns a :class:`LoadedApp`.

Every error is a :class:`~apps.cluster_spec.SpecError` whose message starts with the file and
names the field path, e.g. ``ensemble.yaml: nodes[2].model: unknown model 'x' (not in models)``.
"""

from __future__ import annotations

import difflib
import heapq
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apps.chunking import Tokenizer, cached_tokenizer, load_tokenizer
from apps.cluster_spec import SpecError, _read, spec_error
from apps.datasets import Dataset, raw_lines, read_dataset
from apps.expand import Draft, Env, expand_all, rule_labels
from apps.prompts import parse_template
from apps.requests import CallPrompt, node_of
from planning.cluster import Cluster, fits_in_memory
from planning.estimate import ServingConfig, engine_for
from planning.graph import AppGraph, Dep, LlmCall, ModelInfo
from planning.io.lengths import LengthDataError, load_distribution
from planning.io.profiles import ProfileError, read_hf_config
from planning.length_dist import LengthDistribution
from planning.profile import (
    ModelArch,
    ModelProfile,
    ProfileSet,
    UnknownModelError,
    analytic_profile,
)

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
DEFAULT_SERVING = ServingConfig()  # vLLM's defaults
GIB = 2**30  # B per GiB


# --------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling settings of one call (only ``max_tokens`` reaches the planner)."""

    max_tokens: int  # tokens, output cap per request
    temperature: float = 1.0  # >= 0
    top_p: float = 1.0  # in (0, 1]
    ignore_eos: bool = False  # keep generating past EOS until max_tokens


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request dropped at load time, with the reason."""

    node: str  # call name (a node name, or "<chain>.<k>" for a chain's chunk call)
    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ModelRuntime:
    """How the workers load one model (``models[]`` options that do not affect planning)."""

    path: str  # what vLLM loads: a local folder (absolute) or a Hugging Face id
    trust_remote_code: bool = False
    chat_template: str = "auto"  # auto | required | off


@dataclass(frozen=True, slots=True, eq=False)
class LoadedApp:
    """A loaded application file."""

    graph: AppGraph  # calls in topological order; models = ModelInfo per used model
    rejected: tuple[Rejection, ...]  # requests dropped at load time, in call order
    sampling: Mapping[str, Sampling]  # call name -> sampling settings
    notes: Mapping[str, str]  # model id -> how its profile and lengths were chosen
    profiles: ProfileSet  # exactly the kept (model, tp) profiles; no archs, no analytic fallback
    description: str = ""
    runtime: Mapping[str, ModelRuntime] = field(default_factory=dict)  # model id -> engine options
    prompts: Mapping[str, CallPrompt] = field(default_factory=dict)  # call -> prompt building
    # the calls that run: ``graph`` with every candidate of a router-decided route (the planner
    # gets ``graph``, where each row is under its estimated label); None = ``graph``
    run_graph: AppGraph | None = None
    sinks: frozenset[str] = frozenset()  # nodes no other node consumes

    @property
    def runs(self) -> AppGraph:
        """The calls that run (see ``run_graph``)."""
        return self.run_graph if self.run_graph is not None else self.graph


# --------------------------------------------------------------------------------------------
# File schema.
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SamplingSpec(_Strict):
    """``sampling:`` of a node or of ``defaults``; unset fields come from the defaults."""

    max_tokens: int | None = Field(default=None, ge=1)  # tokens
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    ignore_eos: bool | None = None


class DefaultsSpec(_Strict):
    """``defaults:``."""

    sampling: SamplingSpec | None = None


class ModelSpec(_Strict):
    """One entry of ``models:``."""

    id: str = Field(min_length=1)  # HF id, or a local model folder holding config.json
    profile: str = "auto"  # auto | measured | analytic | twin:<HF id>
    lengths: str = Field(default="authors", min_length=1)  # authors | like:<model> | <path>
    tp: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)  # GPUs
    max_model_len: int | None = Field(default=None, ge=1)  # tokens
    config: str | None = Field(default=None, min_length=1)  # HF config.json, relative to the file
    # Local folder the workers load (weights, tokenizer), relative to the file; default: ``id``
    path: str | None = Field(default=None, min_length=1)
    trust_remote_code: bool = False  # let vLLM run code shipped with the model
    chat_template: Literal["auto", "required", "off"] = "auto"  # apply the tokenizer's template

    @field_validator("profile")
    @classmethod
    def _known_choice(cls, v: str) -> str:
        if v in ("auto", "measured", "analytic") or (v.startswith("twin:") and len(v) > 5):
            return v
        raise ValueError(
            f"unknown profile choice {v!r} (use auto, measured, analytic or twin:<HF id>)"
        )

    @field_validator("tp")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"tp lists a degree twice: {v}")
        return v


class DatasetSpec(_Strict):
    """One entry of ``datasets:``: a file, or the rows inline (what a job submission carries)."""

    path: str | None = Field(default=None, min_length=1)  # relative to the application file
    records: list[Any] | None = Field(default=None, min_length=1)  # rows inline
    # rows: one request per row; openai: OpenAI Batch API lines; auto: openai when the first
    # row has custom_id and body
    format: Literal["auto", "rows", "openai"] = "auto"
    source: str | None = None  # the file inline records were read from (errors name it)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.records is None):
            raise ValueError("give exactly one of 'path' and 'records'")
        return self


class _Source(_Strict):
    """Fields shared by ``input:`` and ``chain:``."""

    where: dict[str, Any] | None = None  # column -> value, compared as text
    template_tokens: int = Field(default=0, ge=0)  # tokens added to every prompt estimate
    template: str | None = None  # prompt text with {placeholders} (docs/app-spec.md)

    @field_validator("template")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_template(v)  # TemplateError is a ValueError: pydantic names the field
        return v

    @field_validator("where")
    @classmethod
    def _scalars(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for col, value in (v or {}).items():
            if not isinstance(value, str | int | float | bool):
                raise ValueError(f"{col!r}: expected a string, number or boolean")
        return v


class InputSpec(_Source):
    """``input:`` of a node."""

    dataset: str | None = None
    nodes: list[str] | None = Field(default=None, min_length=1)  # upstream node names
    repeat: int = Field(default=1, ge=1)  # requests per id

    @model_validator(mode="after")
    def _has_source(self) -> InputSpec:
        if self.dataset is None and self.nodes is None:
            raise ValueError("input needs a dataset or nodes")
        if self.dataset is None and self.where is not None:
            raise ValueError("where filters a dataset; give dataset too")
        if self.nodes is not None and len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"nodes lists a node twice: {self.nodes}")
        return self


class ChainSpec(_Source):
    """``chain:`` of a node: documents split into chunks, summarised in sequence.

    ``template`` is used for chunks after the first (``{chunk}``, ``{summary}``: the summary so
    far), ``first_template`` for the first chunk (default: ``template``, ``{summary}`` empty).
    """

    dataset: str
    chunk_tokens: int = Field(ge=1)  # tokens per chunk
    column: str = Field(default="prompt", min_length=1)  # the column holding the document text
    first_template: str | None = None

    @field_validator("first_template")
    @classmethod
    def _first_parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_template(v)
        return v


class RouteSpec(_Source):
    """``route:`` of a node: each row goes to one target model, by a label column, a rule (a
    Python callable ``module:function``) or the output of a router LLM node."""

    dataset: str
    targets: dict[str, str] = Field(min_length=1)  # label -> model id
    column: str | None = Field(default=None, min_length=1)  # the column holding the label
    rule: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    router: str | None = None  # name of the router node (its output names a label)
    estimate: dict[str, float] | None = None  # label -> share of rows, for planning (router)
    default: str | None = None  # label for rows whose label is unknown; else they fail
    # the rule's answers, made where the file was read (a submission): row id -> label, or
    # "!<error>" when the rule raised; with it, the rule is not imported again
    labels: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> RouteSpec:
        ways = [w for w in ("column", "rule", "router") if getattr(self, w) is not None]
        if len(ways) != 1:
            raise ValueError("give exactly one of column, rule and router")
        for label in self.targets:
            if not _NAME_RE.fullmatch(label):
                raise ValueError(f"targets: label {label!r}: use letters, digits, '_' and '-'")
        if self.estimate is not None:
            if self.router is None:
                raise ValueError("estimate is for routes made by a router node; give router")
            unknown = sorted(set(self.estimate) - set(self.targets))
            if unknown:
                known = list(self.targets)
                raise ValueError(f"estimate: unknown labels {unknown} (targets: {known})")
            if any(not math.isfinite(x) or x < 0 for x in self.estimate.values()) or not sum(
                self.estimate.values()
            ):
                raise ValueError("estimate: shares must be >= 0 with a positive sum")
        if self.default is not None and self.default not in self.targets:
            raise ValueError(f"default: {self.default!r} is not a label of targets")
        return self


class NodeSpec(_Strict):
    """One entry of ``nodes:``."""

    name: str
    model: str | None = None  # required, except for a route node (its targets name models)
    input: InputSpec | None = None
    chain: ChainSpec | None = None
    route: RouteSpec | None = None
    sampling: SamplingSpec | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError(f"node name {v!r}: use letters, digits, '_' and '-' only")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> NodeSpec:
        if sum(x is not None for x in (self.input, self.chain, self.route)) != 1:
            raise ValueError("give exactly one of input, chain and route")
        if self.route is None and self.model is None:
            raise ValueError("model: required (the model this node calls)")
        if self.route is not None and self.model is not None:
            raise ValueError("model: a route node calls its targets' models; remove model")
        return self


class AppSpec(_Strict):
    """An application file."""

    name: str | None = Field(default=None, min_length=1)
    description: str | None = None
    defaults: DefaultsSpec | None = None
    models: list[ModelSpec] = Field(min_length=1)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    nodes: list[NodeSpec] = Field(min_length=1)


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ctx:
    """What every step needs: the file label, its folder and the planning inputs."""

    where: str  # file label at the start of every error
    base_dir: Path  # relative paths in the file are relative to this
    cluster: Cluster
    profiles: ProfileSet
    authors_pdfs: Mapping[str, LengthDistribution]
    serving: ServingConfig


def load_app(
    path: str | Path,
    *,
    cluster: Cluster,
    profiles: ProfileSet,
    authors_pdfs: Mapping[str, LengthDistribution],
    serving: ServingConfig = DEFAULT_SERVING,
) -> LoadedApp:
    """Read and validate an application file (``.json`` as JSON, anything else as YAML).

    Raises:
        SpecError: the message starts with the file and names the field path.
    """
    p = Path(path)
    return parse_app(
        _read(p), str(p), p.parent,
        cluster=cluster, profiles=profiles, authors_pdfs=authors_pdfs, serving=serving,
    )  # fmt: skip


def parse_app(
    doc: Any,
    where: str,
    base_dir: str | Path,
    *,
    cluster: Cluster,
    profiles: ProfileSet,
    authors_pdfs: Mapping[str, LengthDistribution],
    serving: ServingConfig = DEFAULT_SERVING,
) -> LoadedApp:
    """Validate a parsed application document; ``where`` names the file in errors (its stem
    is the default app name) and relative paths are taken from ``base_dir``.

    Raises:
        SpecError: the message starts with ``where`` and names the field path.
    """
    ctx = _Ctx(where, Path(base_dir), cluster, profiles, authors_pdfs, serving)
    spec = _validate(doc, where)
    _check_refs(spec, where)
    order = _topo_order(spec, where)
    used = {m for n in spec.nodes for m in _node_models(n)}
    limit = _tp_limit(ctx)
    infos = {
        m.id: _resolve_model(i, m, limit, ctx) for i, m in enumerate(spec.models) if m.id in used
    }
    datasets = {name: _load_dataset(name, d, ctx) for name, d in spec.datasets.items()}
    env = Env(where, ctx.base_dir, datasets, _tokenizers(spec, ctx), serving)
    drafts = expand_all(spec, order, env)
    samplings = [_sampling(i, n, spec, where) for i, n in enumerate(spec.nodes)]
    run = _assemble(drafts, spec, infos, samplings, env)
    run.rejected[:0] = _data_rejections(datasets, env)
    plan = None
    if any(d.plan is not None for d in drafts):
        plan = _assemble(drafts, spec, infos, samplings, env, planning=True).calls
    return _result(spec, run, plan, infos, samplings, drafts, ctx)


def _node_models(node: NodeSpec) -> list[str]:
    if node.route is not None:
        return list(node.route.targets.values())
    assert node.model is not None
    return [node.model]


def _load_dataset(name: str, d: DatasetSpec, ctx: _Ctx) -> Dataset:
    path = ctx.base_dir / d.path if d.path is not None else None
    return read_dataset(name, path, d.records, d.format, ctx.where, d.source)


def _data_rejections(datasets: Mapping[str, Dataset], env: Env) -> list[Rejection]:
    """Rows dropped when reading, then rows a route could not place."""
    out = [Rejection(f"datasets.{n}", r.request_id, r.reason)
           for n, ds in datasets.items() for r in ds.rejected]  # fmt: skip
    out += [Rejection(node, rid, why) for (node, rid), why in env.lost.items()]
    return out


def _tokenizers(spec: AppSpec, ctx: _Ctx) -> Callable[[str], Tokenizer | None]:
    """Model id -> the tokenizer of its local folder (None without one)."""
    models = {m.id: m for m in spec.models}

    def get(model: str) -> Tokenizer | None:
        folder = _local_folder(models[model], ctx)
        return load_tokenizer(folder) if folder is not None else cached_tokenizer(model)

    return get


def _validate(doc: Any, where: str) -> AppSpec:
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: expected a mapping with 'models' and 'nodes' at the top level")
    try:
        return AppSpec.model_validate(doc)
    except ValidationError as e:
        raise spec_error(e, where) from None


def _result(
    spec: AppSpec,
    run: _Built,
    plan: list[LlmCall] | None,
    infos: dict[str, ModelInfo],
    samplings: list[Sampling],
    drafts: list[Draft],
    ctx: _Ctx,
) -> LoadedApp:
    node_of_call = {d.name: d.node for d in drafts}
    kept = {(m, tp): p for m, info in infos.items() for tp, p in info.profiles.items()}
    name = spec.name or Path(ctx.where).stem
    try:
        graph = AppGraph(tuple(run.calls), infos, name)
        planned = AppGraph(tuple(plan), infos, name) if plan is not None else None
    except ValueError as e:  # checked above; kept so no raw error escapes
        raise SpecError(f"{ctx.where}: {e}") from None
    return LoadedApp(
        graph=planned or graph,
        rejected=tuple(run.rejected),
        sampling={c.name: samplings[node_of_call[c.name]] for c in run.calls},
        notes={m: info.source_note for m, info in infos.items()},
        profiles=ProfileSet(ctx.profiles.gpu, kept),
        description=spec.description or "",
        runtime={m.id: _runtime(m, ctx) for m in spec.models if m.id in infos},
        prompts=run.prompts,
        run_graph=graph,
        sinks=_sinks(spec),
    )


def _sinks(spec: AppSpec) -> frozenset[str]:
    """Nodes no other node consumes (a router node is consumed by its route)."""
    used = {u for n in spec.nodes for u in _upstream(n)}
    return frozenset(n.name for n in spec.nodes if n.name not in used)


def _runtime(m: ModelSpec, ctx: _Ctx) -> ModelRuntime:
    local = _local_folder(m, ctx)
    where = str(local.resolve()) if local is not None else m.id
    return ModelRuntime(where, m.trust_remote_code, m.chat_template)


def _local_folder(m: ModelSpec, ctx: _Ctx) -> Path | None:
    """``path:``, else ``id`` when it names a local folder holding config.json, else None."""
    if m.path is not None:
        return ctx.base_dir / m.path
    local = ctx.base_dir / m.id
    return local if local.is_dir() and (local / "config.json").is_file() else None


# --------------------------------------------------------------------------------------------
# Names, references and order.
# --------------------------------------------------------------------------------------------


def _check_refs(spec: AppSpec, where: str) -> None:
    """Duplicate names; nodes naming unknown models, datasets or nodes."""
    _no_duplicates([m.id for m in spec.models], "models", "id", "model", where)
    _no_duplicates([n.name for n in spec.nodes], "nodes", "name", "node name", where)
    models = {m.id for m in spec.models}
    names = [n.name for n in spec.nodes]
    for i, node in enumerate(spec.nodes):
        at = f"{where}: nodes[{i}]"
        if node.model is not None and node.model not in models:
            raise SpecError(f"{at}.model: unknown model {node.model!r} (not in models)")
        kind, src = _source(node)
        if src.dataset is not None and src.dataset not in spec.datasets:
            known = ", ".join(sorted(spec.datasets)) or "none"
            raise SpecError(
                f"{at}.{kind}.dataset: unknown dataset {src.dataset!r} (datasets: {known})"
            )
        for j, up in enumerate(getattr(src, "nodes", None) or ()):
            if up not in names:
                raise SpecError(
                    f"{at}.input.nodes[{j}]: unknown node {up!r} (nodes: {', '.join(names)})"
                )
        if node.route is not None:
            _check_route(node.route, models, names, f"{at}.route")


def _source(node: NodeSpec) -> tuple[str, InputSpec | ChainSpec | RouteSpec]:
    """The node's kind and its source section (NodeSpec checks that exactly one is given)."""
    for kind in ("input", "chain", "route"):
        src = getattr(node, kind)
        if src is not None:
            return kind, src
    raise AssertionError("NodeSpec has no source")


def _check_route(rt: RouteSpec, models: set[str], names: list[str], at: str) -> None:
    for label, model in rt.targets.items():
        if model not in models:
            raise SpecError(f"{at}.targets.{label}: unknown model {model!r} (not in models)")
    if rt.router is not None and rt.router not in names:
        raise SpecError(f"{at}.router: unknown node {rt.router!r} (nodes: {', '.join(names)})")


def _no_duplicates(values: list[str], section: str, key: str, what: str, where: str) -> None:
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        if v in seen:
            raise SpecError(
                f"{where}: {section}[{i}].{key}: duplicate {what} {v!r} (also {section}[{seen[v]}])"
            )
        seen[v] = i


def _upstream(node: NodeSpec) -> list[str]:
    if node.route is not None:
        return [node.route.router] if node.route.router is not None else []
    return list(node.input.nodes or ()) if node.input is not None else []


def _topo_order(spec: AppSpec, where: str) -> list[int]:
    """Node indices, each after its upstream nodes; file order where that leaves a choice."""
    index = {n.name: i for i, n in enumerate(spec.nodes)}
    ups = [{index[u] for u in _upstream(n)} for n in spec.nodes]
    waiting = [len(u) for u in ups]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j, u in enumerate(ups):
            if i in u:
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(ready, j)
    if len(order) < len(spec.nodes):
        cycle = _find_cycle(ups, set(range(len(ups))) - set(order))
        path = " -> ".join(spec.nodes[i].name for i in cycle)
        raise SpecError(
            f"{where}: nodes[{cycle[0]}].input.nodes: dependency cycle: {path} "
            "(a -> b: a takes input from b)"
        )
    return order


def _find_cycle(ups: list[set[int]], left: set[int]) -> list[int]:
    """A cycle among ``left`` (every node there has an upstream node there), closed."""
    path = [min(left)]
    while True:
        nxt = min(u for u in ups[path[-1]] if u in left)
        if nxt in path:
            return [*path[path.index(nxt) :], nxt]
        path.append(nxt)


# --------------------------------------------------------------------------------------------
# Models: profiles per tensor-parallel degree, lengths.
# --------------------------------------------------------------------------------------------


def _tp_limit(ctx: _Ctx) -> int:
    """The largest tp the cluster offers on the profile set's GPU type."""
    gpu = ctx.profiles.gpu.name
    nodes = [n for n in ctx.cluster.nodes if n.gpu == gpu]
    if not nodes:
        have = ", ".join(sorted({n.gpu for n in ctx.cluster.nodes}))
        raise SpecError(
            f"{ctx.where}: models: the cluster has no {gpu} GPUs (the profiles are for {gpu}; "
            f"cluster: {have})"
        )
    return min(max(n.max_island for n in nodes), max(n.num_gpus for n in nodes))


def _resolve_model(i: int, m: ModelSpec, limit: int, ctx: _Ctx) -> ModelInfo:
    """ModelInfo of ``models[i]``: a profile per usable tp, and its lengths."""
    at = f"{ctx.where}: models[{i}]"
    arch = _arch_for(m, at, ctx)
    _check_choice(m, arch, at, ctx)
    kept: dict[int, ModelProfile] = {}
    skipped: list[str] = []
    for tp in _tps(m, limit, at, ctx):
        prof, why = _usable_at(m, tp, arch, at, ctx)
        if prof is not None:
            kept[tp] = prof
        elif m.tp is not None:
            raise SpecError(f"{at}.tp: {m.id}: {why}")
        else:
            skipped.append(why)
    if not kept:
        raise SpecError(
            f"{at}: model {m.id!r} fits at no tensor-parallel degree on this cluster "
            f"({'; '.join(skipped)})"
        )
    lengths, lengths_note = _lengths_for(m, at, ctx)
    note = _note(m, kept, skipped, lengths_note)
    return ModelInfo(m.id, lengths, kept, note)


def _arch_for(m: ModelSpec, at: str, ctx: _Ctx) -> ModelArch | None:
    """``config:``, else a local model folder's config.json, else the profile set's arch."""
    config = ctx.base_dir / m.config if m.config is not None else None
    local = _local_folder(m, ctx)
    if m.path is not None and not (ctx.base_dir / m.path / "config.json").is_file():
        raise SpecError(f"{at}.path: {ctx.base_dir / m.path}: no model folder with a config.json")
    if config is None and local is not None:
        config = local
    if config is None:
        return ctx.profiles.archs.get(m.id)
    try:
        return read_hf_config(config)
    except ProfileError as e:
        which = "config" if m.config is not None else ("path" if m.path else "id")
        raise SpecError(f"{at}.{which}: {e}") from None


def _check_choice(m: ModelSpec, arch: ModelArch | None, at: str, ctx: _Ctx) -> None:
    """The ``profile:`` choice can work for this model at some tp."""
    ps = ctx.profiles
    if m.profile == "auto" and arch is None and m.id not in ps.models():
        raise SpecError(
            f"{at}.id: model {m.id!r}: no profile and no architecture (give config: <path to its "
            "config.json>, or a local model folder as id)"
        )
    if m.profile == "measured" and not _measured_tps(ps, m.id):
        stored = _stored(ps, m.id) or "none"
        raise SpecError(
            f"{at}.profile: measured: no measured profile of {m.id!r} is stored (stored: {stored})"
        )
    if m.profile == "analytic" and arch is None:
        raise SpecError(
            f"{at}.profile: analytic: no architecture for {m.id!r} (give config: <path to its "
            "config.json>)"
        )
    if m.profile == "analytic" and ps.calib is None:
        raise SpecError(f"{at}.profile: analytic: the profile set has no analytic calibration")
    if m.profile.startswith("twin:"):
        _check_twin(m, m.profile.removeprefix("twin:"), arch, at, ctx)


def _check_twin(m: ModelSpec, twin: str, arch: ModelArch | None, at: str, ctx: _Ctx) -> None:
    ps = ctx.profiles
    if twin == m.id:
        raise SpecError(f"{at}.profile: {m.id!r} cannot be its own twin")
    if not _measured_tps(ps, twin):
        measured = sorted({mod for (mod, _), p in ps.profiles.items() if p.source == "measured"})
        close = difflib.get_close_matches(twin, measured, n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise SpecError(f"{at}.profile: twin {twin!r} has no stored measured profile{hint}")
    other = ps.archs.get(twin)
    if arch is not None and other is not None:
        diff = [
            f"{f.name} {getattr(arch, f.name)} vs {getattr(other, f.name)}"
            for f in fields(ModelArch)
            if f.name != "max_model_len" and getattr(arch, f.name) != getattr(other, f.name)
        ]
        if diff:
            raise SpecError(
                f"{at}.profile: twin {twin!r} has a different architecture ({', '.join(diff)})"
            )


def _measured_tps(ps: ProfileSet, model: str) -> list[int]:
    return sorted(t for (m, t), p in ps.profiles.items() if m == model and p.source == "measured")


def _stored(ps: ProfileSet, model: str) -> str:
    """``"measured tp1,tp2, analytic tp4"``: the stored profiles of ``model`` by source."""
    by_source: dict[str, list[int]] = {}
    for (m, t), p in sorted(ps.profiles.items()):
        if m == model:
            by_source.setdefault(p.source, []).append(t)
    return ", ".join(f"{s} " + ",".join(f"tp{t}" for t in ts) for s, ts in by_source.items())


def _tps(m: ModelSpec, limit: int, at: str, ctx: _Ctx) -> list[int]:
    """Candidate tps: the listed ones (checked), else every power of two up to ``limit``."""
    if m.tp is None:
        return [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]
    gpu = ctx.profiles.gpu.name
    for tp in m.tp:
        if tp & (tp - 1):
            raise SpecError(
                f"{at}.tp: tp={tp} is not a power of two (the planner uses 1, 2, 4, ...)"
            )
        if tp > limit:
            raise SpecError(
                f"{at}.tp: tp={tp} exceeds the largest NVLink island of the cluster's {gpu} nodes "
                f"({limit} GPUs)"
            )
    return sorted(m.tp)


def _profile_at(
    m: ModelSpec, tp: int, arch: ModelArch | None, ctx: _Ctx
) -> tuple[ModelProfile | None, str]:
    """The profile ``profile:`` asks for at ``tp``, or None and why there is none (the reason
    starts with ``tp=N``)."""
    ps = ctx.profiles
    if arch is not None:
        try:
            arch.check_tp(tp, m.id)
        except ValueError as e:
            return None, str(e).removeprefix(f"{m.id}: ")
    if m.profile == "measured":
        p = ps.profiles.get((m.id, tp))
        if p is None or p.source != "measured":
            return None, f"tp={tp}: no measured profile is stored"
        return p, ""
    if m.profile == "analytic":
        assert arch is not None and ps.calib is not None  # _check_choice
        return analytic_profile(arch, tp, ps.gpu, ps.calib, model=m.id), ""
    if m.profile.startswith("twin:"):
        twin = m.profile.removeprefix("twin:")
        if (twin, tp) not in ps.profiles:
            return None, f"tp={tp}: twin {twin!r} has no stored profile at this tp"
        others = {k: p for k, p in ps.profiles.items() if k[0] != m.id}
        return replace(ps, profiles=others).resolve(m.id, tp, arch, twin), ""
    try:
        return ps.resolve(m.id, tp, arch), ""
    except (ValueError, UnknownModelError) as e:
        return None, f"tp={tp}: {e}"


def _usable_at(
    m: ModelSpec, tp: int, arch: ModelArch | None, at: str, ctx: _Ctx
) -> tuple[ModelProfile | None, str]:
    """The profile at ``tp`` with the model's overrides if it fits in memory, else why not."""
    prof, why = _profile_at(m, tp, arch, ctx)
    if prof is None:
        return None, why
    prof = _capped(prof, m, at)
    why = _why_no_fit(prof, ctx)
    return (None, why) if why else (prof, "")


def _capped(prof: ModelProfile, m: ModelSpec, at: str) -> ModelProfile:
    """``prof`` with the model's ``max_model_len`` override, which may only lower the limit."""
    if m.max_model_len is None:
        return prof
    if m.max_model_len > prof.max_model_len:
        raise SpecError(
            f"{at}.max_model_len: {m.max_model_len} exceeds the model's own limit of "
            f"{prof.max_model_len} tokens"
        )
    return replace(prof, max_model_len=m.max_model_len)


def _why_no_fit(prof: ModelProfile, ctx: _Ctx) -> str:
    """Empty when ``prof`` fits in memory on the profile set's GPU, else why not."""
    one = ProfileSet(ctx.profiles.gpu, {(prof.model, prof.tp): prof})
    if fits_in_memory(prof.model, prof.tp, one, ctx.serving):
        return ""
    gpu, util = ctx.profiles.gpu, ctx.serving.gpu_memory_utilization
    head = f"tp={prof.tp}: does not fit in memory: {prof.weight_bytes_per_gpu / GIB:.1f} GiB of "
    try:
        engine = engine_for(prof, gpu, ctx.serving)
    except ValueError:
        return (
            f"{head}weights and {prof.activation_bytes_per_gpu / GIB:.1f} GiB of activations "
            f"per GPU exceed {util:.2f} x {gpu.memory_bytes / GIB:.1f} GiB of {gpu.name}"
        )
    room = max(0, engine.num_kv_blocks) * engine.block_size
    return (
        f"{head}weights per GPU leave KV room for {room} tokens, less than one full-length "
        f"request ({engine.max_model_len} tokens)"
    )


def _lengths_for(m: ModelSpec, at: str, ctx: _Ctx) -> tuple[LengthDistribution, str]:
    """The output-length distribution ``lengths:`` names, and a note on where it came from."""
    src = m.lengths
    if src != "authors" and not src.startswith("like:"):
        path = ctx.base_dir / src
        if not path.is_file():
            raise SpecError(
                f"{at}.lengths: unknown length source {src!r}: not 'authors', 'like:<model>' or "
                f"an existing distribution file ({path})"
            )
        try:
            return load_distribution(path), f"file {src}"
        except LengthDataError as e:
            raise SpecError(f"{at}.lengths: {e}") from None
    key = m.id if src == "authors" else src.removeprefix("like:")
    if key in ctx.authors_pdfs:
        return ctx.authors_pdfs[key], "authors pdf" if src == "authors" else src
    skipped = getattr(ctx.authors_pdfs, "skipped", {}).get(key)
    close = difflib.get_close_matches(key, list(ctx.authors_pdfs), n=3)
    hint = f": {skipped}" if skipped else (f" (close: {', '.join(close)})" if close else "")
    raise SpecError(
        f"{at}.lengths: {src}: no authors' output-length pdf for {key!r}{hint}; use "
        "like:<model> or a distribution file"
    )


def _note(m: ModelSpec, kept: dict[int, ModelProfile], skipped: list[str], lengths: str) -> str:
    """``"profile: measured tp1,tp2; lengths: authors pdf"`` plus overrides and skipped tps."""
    by_source: dict[str, list[int]] = {}
    for tp, p in sorted(kept.items()):
        by_source.setdefault(p.source, []).append(tp)
    parts = [
        "profile: " + ", ".join(f"{s} " + ",".join(f"tp{t}" for t in ts) for s, ts in
                                by_source.items()),
        f"lengths: {lengths}",
    ]  # fmt: skip
    if m.max_model_len is not None:
        parts.append(f"max_model_len: {m.max_model_len}")
    parts += [f"skipped {why}" for why in skipped]  # each starts with tp=N
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Expansion into calls, rejection, assembly.
# --------------------------------------------------------------------------------------------


def _sampling(i: int, node: NodeSpec, spec: AppSpec, where: str) -> Sampling:
    """``node.sampling`` merged over ``defaults.sampling``."""
    default = spec.defaults.sampling if spec.defaults is not None else None
    merged: dict[str, Any] = {}
    for s in (default, node.sampling):
        if s is not None:
            merged.update(s.model_dump(exclude_none=True))
    if "max_tokens" not in merged:
        raise SpecError(
            f"{where}: nodes[{i}].sampling.max_tokens: required (set it here or in "
            "defaults.sampling)"
        )
    return Sampling(**merged)


@dataclass(slots=True)
class _Built:
    """Calls of one graph (the run's, or the planner's) and what was dropped."""

    calls: list[LlmCall] = field(default_factory=list)
    prompts: dict[str, CallPrompt] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)


def _assemble(
    drafts: list[Draft],
    spec: AppSpec,
    infos: dict[str, ModelInfo],
    samplings: list[Sampling],
    env: Env,
    *,
    planning: bool = False,
) -> _Built:
    """Calls without the rejected requests, in draft order, and the rejections. ``planning``
    keeps, of router candidates, only the requests the planner assumes (Draft.plan)."""
    index: dict[str, dict[str, int]] = {}  # call -> kept request id -> request index
    pos: dict[str, int] = {}  # call -> index in the result
    dropped: dict[tuple[str, str], str] = dict(env.lost)  # (call, id) -> the first cause
    out = _Built()
    for dr in drafts:
        limit = _context_limit(infos[dr.model], env.serving)
        keep: list[int] = []
        for r, rid in enumerate(dr.ids):
            pre = dr.pre[r]
            got = (pre, pre) if pre else _reject_reason(dr, r, limit, dropped)
            if got is None:
                keep.append(r)
            else:
                dropped[(dr.name, rid)] = got[1]
                out.rejected.append(Rejection(dr.name, rid, got[0]))
        if planning and dr.plan is not None:
            keep = [r for r in keep if dr.plan[r]] or keep[:1]
        if not keep:
            if dr.part or dr.route is not None or spec.nodes[dr.node].route is not None:
                continue  # a later chunk or a route target left empty: its rows were dropped
            _all_rejected(dr, spec, out.rejected, env.where)
        index[dr.name] = {dr.ids[r]: n for n, r in enumerate(keep)}
        pos[dr.name] = len(out.calls)
        cap = samplings[dr.node].max_tokens
        out.calls.append(_call(dr, keep, index, pos, cap))
        texts = tuple(dr.texts[r] for r in keep)
        out.prompts[dr.name] = CallPrompt(dr.template, texts, dr.chain, dr.route)
    return out


def _context_limit(info: ModelInfo, serving: ServingConfig) -> int:
    """Tokens (prompt plus output) one request of the model may hold."""
    if serving.max_model_len is None:
        return info.max_model_len
    return min(info.max_model_len, serving.max_model_len)


def _reject_reason(
    dr: Draft, r: int, limit: int, dropped: Mapping[tuple[str, str], str]
) -> tuple[str, str] | None:
    """Why request ``r`` is dropped, and the first cause down the chain: its prompt does not
    fit, or every request it would take from some upstream node was dropped (a route's
    candidates: all of them). None when it is kept."""
    tokens = dr.base[r]
    if tokens >= limit:
        why = (
            f"prompt of {tokens} tokens does not fit max_model_len {limit} of {dr.model} "
            "(at least 1 output token is needed)"
        )
        return why, why
    by_node: dict[str, list[tuple[str, str]]] = {}
    for ref in dr.deps[r]:
        by_node.setdefault(node_of(ref[0]), []).append(ref)
    for refs in by_node.values():
        if all(ref in dropped for ref in refs):
            call, uid = refs[0]
            root = dropped[refs[0]]
            return f"upstream request {uid!r} of node {call!r} was rejected: {root}", root
    return None


def _all_rejected(dr: Draft, spec: AppSpec, rejected: list[Rejection], where: str) -> NoReturn:
    node = spec.nodes[dr.node].name
    call = "" if dr.name == node else f", call {dr.name!r}"
    first = next(r for r in rejected if r.node == dr.name)
    raise SpecError(
        f"{where}: nodes[{dr.node}]: node {node!r}{call} has no requests left: all "
        f"{len(dr.ids)} were rejected (first: {first.request_id!r}: {first.reason})"
    )


def _call(
    dr: Draft, keep: list[int], index: dict[str, dict[str, int]], pos: dict[str, int],
    max_tokens: int,
) -> LlmCall:  # fmt: skip
    srcs: dict[str, list[int]] = {}
    for n, r in enumerate(keep):
        for call, uid in dr.deps[r]:
            if uid in index.get(call, {}):  # a dropped candidate is no input
                srcs.setdefault(call, [-1] * len(keep))[n] = index[call][uid]
    ordered = sorted(srcs.items(), key=lambda cs: pos[cs[0]])
    deps = tuple(Dep(pos[c], np.asarray(s, dtype=np.int64)) for c, s in ordered)
    caps = [dr.caps[r] or max_tokens for r in keep]
    return LlmCall(
        name=dr.name,
        model=dr.model,
        base_prompt_len=np.asarray([dr.base[r] for r in keep], dtype=np.int64),
        max_tokens=np.asarray(caps, dtype=np.int64),
        deps=deps,
        request_ids=tuple(dr.ids[r] for r in keep),
    )


def self_contained(path: str | Path) -> dict[str, Any]:
    """The application document of ``path`` with every dataset inlined as ``records`` and every
    other relative path (model folders, ``config:``, length files) made absolute, so that a
    coordinator on another host can load it with :func:`parse_app` (what a submission carries).

    Raises:
        SpecError: the file or a dataset cannot be read (validate with :func:`load_app` first).
    """
    p = Path(path)
    doc = _read(p)
    if not isinstance(doc, dict):
        raise SpecError(f"{p}: expected a mapping with 'models' and 'nodes' at the top level")
    base = p.parent.resolve()
    out = dict(doc)
    sets = doc.get("datasets") or {}
    out["datasets"] = {n: _inline(n, d, base, str(p)) for n, d in sets.items()}
    out["models"] = [_absolute_model(m, base) for m in doc.get("models") or []]
    out["nodes"] = [_rule_labels(n, sets, base, str(p)) for n in doc.get("nodes") or []]
    out.setdefault("name", p.stem)
    return out


def _inline(name: str, d: Any, base: Path, where: str) -> Any:
    if not isinstance(d, dict) or not isinstance(d.get("path"), str):
        return d
    path = base / d["path"]
    out = {k: v for k, v in d.items() if k != "path"}
    out["source"] = str(path)
    try:
        out["records"] = raw_lines(path)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}: datasets.{name}.path: {e}") from None
    return out


def _rule_labels(node: Any, sets: Any, base: Path, where: str) -> Any:
    """A route node with a ``rule``: the rule applied here, its labels carried as ``labels``
    (row id -> label), so the coordinator needs neither the rule's module nor its folder."""
    route = node.get("route") if isinstance(node, dict) else None
    if not isinstance(route, dict) or not isinstance(route.get("rule"), str):
        return node
    d = sets.get(route.get("dataset")) if isinstance(sets, dict) else None
    if not isinstance(d, dict) or "labels" in route:
        return node  # load_app reports what is wrong
    path = base / d["path"] if isinstance(d.get("path"), str) else None
    fmt = d.get("format", "auto")
    ds = read_dataset(str(route["dataset"]), path, d.get("records"), fmt, where)
    labels = rule_labels(route["rule"], ds.rows, base, f"{where}: route.rule")
    return {**node, "route": {**route, "labels": labels}}


def _absolute_model(m: Any, base: Path) -> Any:
    if not isinstance(m, dict):
        return m
    out = dict(m)
    if isinstance(m.get("config"), str):
        out["config"] = str(base / m["config"])
    if isinstance(m.get("path"), str):
        out["path"] = str(base / m["path"])
    if isinstance(m.get("id"), str) and (base / m["id"] / "config.json").is_file():
        out["id"] = str(base / m["id"])
    lengths = m.get("lengths")
    if isinstance(lengths, str) and lengths != "authors" and not lengths.startswith("like:"):
        out["lengths"] = str(base / lengths)
    return out
