"""Application graphs as the planner sees them: LLM calls, request-level dependencies, models.

An :class:`AppGraph` is a DAG of :class:`LlmCall` s (method.md §1.3). Each call is one call site
of one model over a request set. A request may consume outputs of requests of upstream calls
(:class:`Dep`); its prompt is then its own tokens (dataset text plus template) plus the output
tokens of every request it consumes. Several calls may share a model.

A :class:`ModelInfo` holds what the planner needs per model: its output-length distribution
and its profile at each tensor-parallel degree it may use. Specs (YAML/JSON) are converted to
these types outside ``planning/`` (``apps/app_spec.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from planning.length_dist import LengthDistribution
from planning.profile import ModelProfile

IntArray = NDArray[np.int64]


def _frozen_ints(values: object, name: str) -> IntArray:
    arr = np.array(values, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, slots=True, eq=False)
class Dep:
    """Requests of a call consume outputs of requests of the upstream call ``call``."""

    call: int  # index of the upstream call in AppGraph.calls
    src: IntArray  # per request of the consuming call: upstream request index, -1 = none

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _frozen_ints(self.src, "Dep.src"))


@dataclass(frozen=True, slots=True, eq=False)
class LlmCall:
    """One LLM call site: a model over a request set."""

    name: str  # unique within the graph
    model: str  # Hugging Face id (a key of the graph's models)
    base_prompt_len: IntArray  # tokens per request: own prompt + template, no upstream output
    max_tokens: IntArray  # tokens per request: output cap
    deps: tuple[Dep, ...] = ()  # request-level inputs from upstream calls
    request_ids: tuple[str, ...] = ()  # one per request (for reports); () = positional

    def __post_init__(self) -> None:
        base = _frozen_ints(self.base_prompt_len, f"call {self.name!r}: base_prompt_len")
        caps = _frozen_ints(self.max_tokens, f"call {self.name!r}: max_tokens")
        object.__setattr__(self, "base_prompt_len", base)
        object.__setattr__(self, "max_tokens", caps)
        where = f"call {self.name!r}"
        if not self.name:
            raise ValueError("LlmCall: empty name")
        if base.size == 0:
            raise ValueError(f"{where}: no requests")
        if caps.size != base.size:
            raise ValueError(
                f"{where}: max_tokens has {caps.size} entries for {base.size} requests"
            )
        if (base < 1).any() or (caps < 1).any():
            raise ValueError(f"{where}: prompt lengths and max_tokens must be >= 1")
        if self.request_ids and len(self.request_ids) != base.size:
            raise ValueError(f"{where}: {len(self.request_ids)} ids for {base.size} requests")
        for d in self.deps:
            if d.src.size != base.size:
                raise ValueError(f"{where}: a dep on call {d.call} has {d.src.size} entries")

    @property
    def num_requests(self) -> int:
        """Requests of this call."""
        return int(self.base_prompt_len.size)

    def upstream(self) -> tuple[int, ...]:
        """Indices of the calls this call depends on, ascending, unique."""
        return tuple(sorted({d.call for d in self.deps}))


@dataclass(frozen=True, slots=True, eq=False)
class ModelInfo:
    """What the planner knows about one model."""

    model: str  # Hugging Face id
    lengths: LengthDistribution  # output-length distribution
    profiles: Mapping[int, ModelProfile]  # tp -> profile on the cluster's GPU type
    source_note: str = ""  # how the profile/lengths were chosen, for reports

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ValueError(f"model {self.model!r}: no usable tensor-parallel degree")
        for tp, p in self.profiles.items():
            if p.tp != tp:
                raise ValueError(f"model {self.model!r}: profile for tp={tp} has tp={p.tp}")

    @property
    def max_model_len(self) -> int:
        """Context limit (tokens): the smallest over the profiles."""
        return min(p.max_model_len for p in self.profiles.values())


@dataclass(frozen=True, slots=True, eq=False)
class AppGraph:
    """LLM calls in topological order (a call depends only on earlier calls) and their models."""

    calls: tuple[LlmCall, ...]
    models: Mapping[str, ModelInfo] = field(default_factory=dict)  # model id -> info
    name: str = ""

    def __post_init__(self) -> None:
        if not self.calls:
            raise ValueError("AppGraph: no calls")
        names = [c.name for c in self.calls]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"AppGraph: duplicate call names {dups}")
        for i, c in enumerate(self.calls):
            if c.model not in self.models:
                raise ValueError(f"call {c.name!r}: model {c.model!r} has no ModelInfo")
            for d in c.deps:
                if not 0 <= d.call < i:
                    raise ValueError(
                        f"call {c.name!r}: depends on call index {d.call}; calls must be in "
                        "topological order (a call may depend only on earlier calls)"
                    )
                up = self.calls[d.call].num_requests
                if ((d.src < -1) | (d.src >= up)).any():
                    raise ValueError(
                        f"call {c.name!r}: a dep on {self.calls[d.call].name!r} names a request "
                        f"outside 0..{up - 1}"
                    )

    def downstream(self) -> list[tuple[int, ...]]:
        """For each call, the calls that depend on it."""
        out: list[set[int]] = [set() for _ in self.calls]
        for i, c in enumerate(self.calls):
            for u in c.upstream():
                out[u].add(i)
        return [tuple(sorted(s)) for s in out]
