"""Clusters, NVLink islands, candidate execution plans and GPU-group placement.

A :class:`Cluster` is a tuple of :class:`Node` s; each node has GPUs of one type split into
NVLink islands (method.md §1.4: U = 2 on the authors' 8-GPU servers, U = 4 on the 4-GPU one).
An :class:`ExecPlan` is ``(model, tp, dp)`` and occupies ``tp x dp`` GPUs exclusively. Every tp
group must lie inside one island of one node; dp replicas may sit anywhere.

:func:`candidate_exec_plans` lists the plans the stage search may consider for one model
(method.md §5.2, with the island and node limits taken from the cluster), and
:func:`place_groups` turns a set of tp sizes into concrete, disjoint :class:`GpuGroup` s, or
reports that they do not fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from planning.estimate import ServingConfig, engine_for
from planning.profile import ProfileSet, UnknownModelError

GpuId = tuple[str, int]  # (node name, local GPU index)


@dataclass(frozen=True, slots=True)
class Node:
    """One server: ``num_gpus`` GPUs of one type, split into NVLink islands."""

    name: str  # unique within the cluster
    gpu: str  # GpuSpec.name, e.g. "A100-80GB"
    num_gpus: int  # GPUs on this node
    islands: tuple[tuple[int, ...], ...]  # disjoint local GPU indices covering 0..num_gpus-1

    def __post_init__(self) -> None:
        where = f"node {self.name!r}"
        if not self.name:
            raise ValueError("node: empty name")
        if not self.gpu:
            raise ValueError(f"{where}: empty gpu type")
        if self.num_gpus <= 0:
            raise ValueError(f"{where}: num_gpus must be > 0, got {self.num_gpus}")
        seen: set[int] = set()
        for island in self.islands:
            if not island:
                raise ValueError(f"{where}: empty NVLink island")
            for idx in island:
                if not 0 <= idx < self.num_gpus:
                    raise ValueError(
                        f"{where}: GPU index {idx} in island {list(island)} is outside "
                        f"0..{self.num_gpus - 1}"
                    )
                if idx in seen:
                    raise ValueError(f"{where}: GPU {idx} is in more than one NVLink island")
                seen.add(idx)
        missing = sorted(set(range(self.num_gpus)) - seen)
        if missing:
            raise ValueError(f"{where}: GPUs {missing} are in no NVLink island")

    @property
    def max_island(self) -> int:
        """GPUs in the largest island (the largest tp this node can host)."""
        return max(len(i) for i in self.islands)


@dataclass(frozen=True, slots=True)
class Cluster:
    """Nodes with unique names."""

    nodes: tuple[Node, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("cluster: no nodes")
        names = [n.name for n in self.nodes]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"cluster: duplicate node names {dups}")

    @property
    def num_gpus(self) -> int:
        """GPUs over all nodes."""
        return sum(n.num_gpus for n in self.nodes)

    def node(self, name: str) -> Node:
        """The node called ``name``.

        Raises:
            ValueError: no such node.
        """
        for n in self.nodes:
            if n.name == name:
                return n
        raise ValueError(f"cluster: no node {name!r} (nodes: {[n.name for n in self.nodes]})")

    def gpu_ids(self) -> tuple[GpuId, ...]:
        """Global GPU ids ``(node name, local index)``, nodes in order, indices ascending."""
        return tuple((n.name, i) for n in self.nodes for i in range(n.num_gpus))

    def island_of(self, node: str, idx: int) -> tuple[int, ...]:
        """The NVLink island (local indices) holding GPU ``idx`` of ``node``.

        Raises:
            ValueError: no such node or GPU.
        """
        for island in self.node(node).islands:
            if idx in island:
                return island
        raise ValueError(f"node {node!r}: no GPU {idx}")


@dataclass(frozen=True, slots=True)
class GpuGroup:
    """GPUs of one node that host one engine (one tp group)."""

    node: str  # Node.name
    gpus: tuple[int, ...]  # local GPU indices, ascending, unique

    def __post_init__(self) -> None:
        if not self.gpus:
            raise ValueError(f"GpuGroup on {self.node!r}: no GPUs")
        if any(g < 0 for g in self.gpus) or list(self.gpus) != sorted(set(self.gpus)):
            raise ValueError(
                f"GpuGroup on {self.node!r}: GPUs must be unique, ascending and >= 0, "
                f"got {list(self.gpus)}"
            )

    @property
    def queue_name(self) -> str:
        """Worker queue of this group: ``samullm.n0.gpu0-1``, ``samullm.n0.gpu3``.

        Non-consecutive indices (an island that is not a contiguous range) are joined with
        ``_``: ``samullm.n0.gpu0_2``.
        """
        first, last = self.gpus[0], self.gpus[-1]
        if len(self.gpus) == 1:
            part = str(first)
        elif last - first == len(self.gpus) - 1:
            part = f"{first}-{last}"
        else:
            part = "_".join(str(g) for g in self.gpus)
        return f"samullm.{self.node}.gpu{part}"

    def overlaps(self, other: GpuGroup) -> bool:
        """Whether the two groups share a GPU."""
        return self.node == other.node and not set(self.gpus).isdisjoint(other.gpus)


@dataclass(frozen=True, slots=True)
class ExecPlan:
    """``dp`` replicas of ``model``, each on ``tp`` GPUs of one NVLink island."""

    model: str  # Hugging Face id
    tp: int  # tensor-parallel degree, GPUs per replica
    dp: int  # data-parallel replicas

    def __post_init__(self) -> None:
        if self.tp <= 0 or self.dp <= 0:
            raise ValueError(f"ExecPlan {self.model!r}: tp and dp must be > 0")

    @property
    def num_gpus(self) -> int:
        """Footprint: ``tp x dp`` GPUs."""
        return self.tp * self.dp


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tp_group_count(cluster: Cluster, tp: int, *, gpu: str | None = None) -> int:
    """Disjoint tp groups the cluster offers (contiguous runs inside islands).

    Only nodes whose GPU type is ``gpu`` count when it is given.
    """
    return sum(
        len(island) // tp
        for n in cluster.nodes
        if gpu is None or n.gpu == gpu
        for island in n.islands
    )


def candidate_exec_plans(
    model: str,
    profiles: ProfileSet,
    cluster: Cluster,
    serving: ServingConfig,
    *,
    max_gpus: int | None = None,
) -> list[ExecPlan]:
    """Every ``(tp, dp)`` the planner may use for ``model``, sorted by ``(tp, dp)``.

    Only nodes with the profile set's GPU type are used. ``tp`` is a power of two no larger
    than the largest island of those nodes; vLLM must accept it for the model's shape
    (:meth:`ModelArch.check_tp`) and the weights must leave KV room for at least one
    full-length request (``max_model_len`` after ``serving``). ``dp`` runs from 1 to the
    number of disjoint tp groups the cluster offers, and ``tp x dp <= max_gpus`` when given.

    Raises:
        UnknownModelError: ``profiles`` knows nothing about ``model``.
        ValueError: no node has the profile set's GPU type; ``max_gpus`` < 1.
    """
    if model not in profiles.models():
        raise UnknownModelError(f"model {model!r}: no profile and no architecture")
    if max_gpus is not None and max_gpus < 1:
        raise ValueError(f"candidate_exec_plans: max_gpus must be >= 1, got {max_gpus}")
    gpu = profiles.gpu
    nodes = [n for n in cluster.nodes if n.gpu == gpu.name]
    if not nodes:
        have = sorted({n.gpu for n in cluster.nodes})
        raise ValueError(f"cluster has no {gpu.name} GPUs (profiles are for it; cluster: {have})")
    limit = min(max(n.max_island for n in nodes), max(n.num_gpus for n in nodes))
    plans: list[ExecPlan] = []
    tp = 1
    while tp <= limit:
        if fits_in_memory(model, tp, profiles, serving):
            groups = tp_group_count(cluster, tp, gpu=gpu.name)
            if max_gpus is not None:
                groups = min(groups, max_gpus // tp)
            plans.extend(ExecPlan(model, tp, dp) for dp in range(1, groups + 1))
        tp *= 2
    return sorted(plans, key=lambda p: (p.tp, p.dp))


def fits_in_memory(model: str, tp: int, profiles: ProfileSet, serving: ServingConfig) -> bool:
    """Whether vLLM accepts ``tp`` and one full-length request's KV fits next to the weights.

    The profile is ``profiles.resolve(model, tp)``; full length is its ``max_model_len``
    capped by ``serving``. False (never an error) when the model is unknown or refused.
    """
    try:
        profile = profiles.resolve(model, tp)
        engine = engine_for(profile, profiles.gpu, serving)
    except (ValueError, UnknownModelError):
        return False
    need = math.ceil(engine.max_model_len / engine.block_size)  # blocks
    return engine.num_kv_blocks >= need


# --------------------------------------------------------------------------------------------
# Placement.
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    """A maximal run of free GPUs inside one island (positions in the island tuple)."""

    node: str
    island: tuple[int, ...]
    start: int  # position in ``island`` of the first free GPU
    free: int  # GPUs left in the run


def _free_runs(cluster: Cluster, taken: frozenset[GpuId]) -> list[_Run]:
    runs: list[_Run] = []
    for n in cluster.nodes:
        for island in n.islands:
            pos = 0
            while pos < len(island):
                if (n.name, island[pos]) in taken:
                    pos += 1
                    continue
                end = pos
                while end < len(island) and (n.name, island[end]) not in taken:
                    end += 1
                runs.append(_Run(n.name, island, pos, end - pos))
                pos = end
    return runs


def place_groups(
    cluster: Cluster,
    tps: Sequence[int],
    *,
    taken: frozenset[GpuId] = frozenset(),
    prefer: Sequence[GpuGroup | None] = (),
    allowed: frozenset[GpuGroup] | None = None,
) -> list[GpuGroup] | None:
    """Disjoint GPU groups for the tp sizes ``tps``; ``result[i]`` hosts ``tps[i]``.

    Each group is a contiguous run of one NVLink island of one node and avoids ``taken``.
    Larger groups are placed first, each into the smallest free run that holds it (best fit),
    with backtracking, so ``None`` means no placement exists. Deterministic.

    ``prefer[i]`` (a mid-run re-plan: where slot i's model runs now) is kept when it has the
    slot's size and is free, so a running model is not moved; the other slots are placed
    around the kept ones (and everything afresh when that fails). ``allowed`` limits the groups
    to those that have a worker.

    Raises:
        ValueError: a tp < 1, or a ``taken`` GPU the cluster does not have.
    """
    if any(t < 1 for t in tps):
        raise ValueError(f"place_groups: tp sizes must be >= 1, got {list(tps)}")
    unknown = sorted(taken - set(cluster.gpu_ids()))
    if unknown:
        raise ValueError(f"place_groups: taken GPUs not in the cluster: {unknown}")
    kept = _keep_preferred(tps, taken, prefer, allowed)
    if kept:
        held = taken | {(g.node, i) for g in kept.values() for i in g.gpus}
        rest = [i for i in range(len(tps)) if i not in kept]
        placed = _place(cluster, [tps[i] for i in rest], held, allowed)
        if placed is not None:
            kept.update(zip(rest, placed, strict=True))
            return [kept[i] for i in range(len(tps))]
    return _place(cluster, tps, taken, allowed)


def _keep_preferred(
    tps: Sequence[int], taken: frozenset[GpuId], prefer: Sequence[GpuGroup | None],
    allowed: frozenset[GpuGroup] | None,
) -> dict[int, GpuGroup]:  # fmt: skip
    """Slot -> its preferred group, for the preferred groups that fit and are free."""
    kept: dict[int, GpuGroup] = {}
    used: set[GpuId] = set(taken)
    for i, g in enumerate(prefer):
        if g is None or len(g.gpus) != tps[i] or (allowed is not None and g not in allowed):
            continue
        ids = {(g.node, x) for x in g.gpus}
        if ids & used:
            continue
        used |= ids
        kept[i] = g
    return kept


def _place(
    cluster: Cluster, tps: Sequence[int], taken: frozenset[GpuId],
    allowed: frozenset[GpuGroup] | None,
) -> list[GpuGroup] | None:  # fmt: skip
    if allowed is not None:
        return _place_allowed(sorted(allowed, key=lambda g: (g.node, g.gpus)), tps, taken)
    return _place_runs(cluster, tps, taken)


def _place_allowed(
    groups: list[GpuGroup], tps: Sequence[int], taken: frozenset[GpuId]
) -> list[GpuGroup] | None:
    """Disjoint groups out of ``groups`` (those with a worker) for ``tps``, by backtracking."""
    order = sorted(range(len(tps)), key=lambda i: (-tps[i], i))
    result: dict[int, GpuGroup] = {}
    used: set[GpuId] = set(taken)

    def search(depth: int) -> bool:
        if depth == len(order):
            return True
        slot = order[depth]
        for g in groups:
            ids = {(g.node, x) for x in g.gpus}
            if len(g.gpus) != tps[slot] or ids & used:
                continue
            used.update(ids)
            result[slot] = g
            if search(depth + 1):
                return True
            used.difference_update(ids)
        return False

    return [result[i] for i in range(len(tps))] if search(0) else None


def _place_runs(
    cluster: Cluster, tps: Sequence[int], taken: frozenset[GpuId]
) -> list[GpuGroup] | None:
    """Best-fit placement into the free runs of the islands (see :func:`place_groups`)."""
    runs = _free_runs(cluster, taken)
    order = sorted(range(len(tps)), key=lambda i: (-tps[i], i))
    sizes = [tps[i] for i in order]
    if sum(sizes) > sum(r.free for r in runs):
        return None
    chosen: list[int] = []  # run index per entry of ``order``
    failed: set[tuple[int, tuple[int, ...]]] = set()  # (depth, sorted free sizes) with no fit

    def search(depth: int) -> bool:
        if depth == len(sizes):
            return True
        key = (depth, tuple(sorted(r.free for r in runs)))
        if key in failed:
            return False
        size = sizes[depth]
        tried: set[int] = set()
        fitting = sorted(
            (i for i, r in enumerate(runs) if r.free >= size), key=lambda i: (runs[i].free, i)
        )
        for i in fitting:
            if runs[i].free in tried:
                continue  # a run with the same free size leads to the same state
            tried.add(runs[i].free)
            runs[i].free -= size
            chosen.append(i)
            if search(depth + 1):
                return True
            chosen.pop()
            runs[i].free += size
        failed.add(key)
        return False

    if not search(0):
        return None
    # Lay the groups out: each run hands out its GPUs from its start, in placement order.
    base = {i: r.start for i, r in enumerate(_free_runs(cluster, taken))}
    result: list[GpuGroup | None] = [None] * len(tps)
    for slot, run_idx in zip(order, chosen, strict=True):
        r = runs[run_idx]
        pos = base[run_idx]
        base[run_idx] = pos + tps[slot]
        gpus = tuple(sorted(r.island[pos : pos + tps[slot]]))
        result[slot] = GpuGroup(r.node, gpus)
    return [g for g in result if g is not None]
