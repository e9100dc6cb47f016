"""Search units (vertically fused calls) and sampled realisations of an application's lengths.

A :class:`Unit` is what the stage search schedules: one LLM call, or a chain of calls of the
same model where each call consumes only the previous one (method.md §5.4, vertical fusion). A
fused chain runs on one engine with no reload between its calls; inside it, a request that
consumes an earlier request of the chain waits for it (``SimRequest.after``).

A :class:`Draw` fixes every request's prompt and output length for one Monte-Carlo sample: the
calls are visited in topological order, a request's prompt is its own tokens plus the sampled
outputs it consumes (clipped to the model's context), and its output is drawn from the model's
length distribution capped by ``max_tokens`` and the context left (method.md §1.3, §2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from planning.graph import AppGraph

IntArray = NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class Unit:
    """Calls scheduled together on one engine (one call, or a fused same-model chain)."""

    name: str  # the call name, or "<first>..<last>" for a fused chain
    model: str  # Hugging Face id
    calls: tuple[int, ...]  # call indices in chain order
    offsets: tuple[int, ...]  # first unit-local request index of each call
    num_requests: int  # requests over all its calls
    after: IntArray  # per unit request: unit-local index it waits for, -1 = none
    ext_unit: IntArray  # (n, k): upstream unit of each cross-unit input, -1 = none
    ext_req: IntArray  # (n, k): unit-local request index in that upstream unit
    upstream: tuple[int, ...]  # units this unit consumes from
    call_of: IntArray  # per unit request: index into ``calls``


@dataclass(frozen=True, slots=True, eq=False)
class Draw:
    """One sample of all lengths, per unit."""

    prompt: tuple[IntArray, ...]  # tokens per request of each unit
    output: tuple[IntArray, ...]  # tokens per request of each unit
    generated: tuple[IntArray, ...]  # tokens per request of each unit generated before (prefix)


def _chains(graph: AppGraph, fuse: bool) -> list[list[int]]:
    """Groups of call indices: fused chains (same model, sole upstream is the chain's tail)."""
    group_of: dict[int, int] = {}
    groups: list[list[int]] = []
    for i, call in enumerate(graph.calls):
        ups = call.upstream()
        if fuse and len(ups) == 1 and len(call.deps) == 1:
            u = ups[0]
            g = group_of.get(u)
            same = graph.calls[u].model == call.model
            if g is not None and same and groups[g][-1] == u and _chain_edge(call.deps[0].src):
                groups[g].append(i)
                group_of[i] = g
                continue
        group_of[i] = len(groups)
        groups.append([i])
    return groups


def _chain_edge(src: IntArray) -> bool:
    """Every request consumes one upstream request, and no upstream request feeds two."""
    used = src[src >= 0]
    return used.size == src.size and np.unique(used).size == used.size


def build_units(graph: AppGraph, *, fuse: bool = True) -> tuple[Unit, ...]:
    """Units in topological order; ``fuse=False`` keeps one unit per call (the baselines)."""
    groups = _chains(graph, fuse)
    unit_of_call: dict[int, int] = {}
    local: dict[int, int] = {}  # call -> offset in its unit
    for u, calls in enumerate(groups):
        off = 0
        for c in calls:
            unit_of_call[c] = u
            local[c] = off
            off += graph.calls[c].num_requests
    return tuple(_unit(graph, u, calls, unit_of_call, local) for u, calls in enumerate(groups))


def _unit(
    graph: AppGraph, u: int, calls: list[int], unit_of_call: dict[int, int], local: dict[int, int]
) -> Unit:
    sizes = [graph.calls[c].num_requests for c in calls]
    n = sum(sizes)
    after = np.full(n, -1, dtype=np.int64)
    ext: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    call_of = np.repeat(np.arange(len(calls), dtype=np.int64), sizes)
    for c in calls:
        base = local[c]
        for dep in graph.calls[c].deps:
            up_unit, up_base = unit_of_call[dep.call], local[dep.call]
            for r in np.flatnonzero(dep.src >= 0).tolist():
                src = up_base + int(dep.src[r])
                if up_unit == u:
                    after[base + r] = src
                else:
                    ext[base + r].append((up_unit, src))
    width = max((len(e) for e in ext), default=0)
    ext_unit = np.full((n, width), -1, dtype=np.int64)
    ext_req = np.full((n, width), -1, dtype=np.int64)
    for r, items in enumerate(ext):
        for k, (uu, rr) in enumerate(items):
            ext_unit[r, k], ext_req[r, k] = uu, rr
    ups = tuple(sorted({int(x) for x in ext_unit.ravel() if x >= 0}))
    first, last = graph.calls[calls[0]].name, graph.calls[calls[-1]].name
    offsets = tuple(local[c] for c in calls)
    return Unit(
        name=first if len(calls) == 1 else f"{first}..{last}",
        model=graph.calls[calls[0]].model,
        calls=tuple(calls),
        offsets=offsets,
        num_requests=n,
        after=after,
        ext_unit=ext_unit,
        ext_req=ext_req,
        upstream=ups,
        call_of=call_of,
    )


def realise(graph: AppGraph, units: tuple[Unit, ...], rng: np.random.Generator) -> Draw:
    """Sample every output length once (calls in topological order)."""
    outs: dict[int, IntArray] = {}
    prompts: dict[int, IntArray] = {}
    for i, call in enumerate(graph.calls):
        info = graph.models[call.model]
        limit = info.max_model_len
        prompt = call.base_prompt_len.copy()
        for dep in call.deps:
            has = dep.src >= 0
            prompt[has] += outs[dep.call][dep.src[has]]
        prompt = np.minimum(prompt, limit - 1)
        room = limit - prompt
        out = info.lengths.sample(
            rng, call.num_requests, max_tokens=call.max_tokens, context_left=room, prompt_len=prompt
        )
        if call.generated is not None and (call.generated > 0).any():
            # a request that already produced g tokens runs past g: draw from L | L > g
            part = call.generated > 0
            out[part] = info.lengths.sample_conditional(
                rng, call.generated[part], max_tokens=call.max_tokens[part],
                context_left=np.maximum(room[part], call.generated[part] + 1),
                prompt_len=prompt[part],
            )  # fmt: skip
        prompts[i], outs[i] = prompt, out.astype(np.int64)

    def per_unit(arrays: dict[int, IntArray]) -> tuple[IntArray, ...]:
        return tuple(np.concatenate([arrays[c] for c in u.calls]) for u in units)

    gens = {i: np.minimum(c.prefix(), outs[i] - 1) for i, c in enumerate(graph.calls)}
    return Draw(prompt=per_unit(prompts), output=per_unit(outs), generated=per_unit(gens))


def realise_draws(
    graph: AppGraph, units: tuple[Unit, ...], seed: int, count: int
) -> tuple[Draw, ...]:
    """``count`` independent draws; draw k depends only on (seed, k)."""
    if count < 1:
        raise ValueError(f"draws must be >= 1, got {count}")
    seqs = np.random.SeedSequence(seed).spawn(count)
    return tuple(realise(graph, units, np.random.default_rng(s)) for s in seqs)
