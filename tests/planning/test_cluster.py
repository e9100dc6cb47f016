"""Clusters, NVLink islands, candidate exec plans and GPU-group placement."""

from __future__ import annotations

import pytest

from planning.cluster import Cluster, ExecPlan, GpuGroup, Node, candidate_exec_plans, place_groups
from planning.estimate import ServingConfig
from planning.io.profiles import load_default_profiles
from planning.profile import ProfileSet, UnknownModelError

VICUNA = "lmsys/vicuna-13b-v1.5"
LLAMA70 = "meta-llama/Llama-2-70b-chat-hf"
PAIRS = Cluster((Node("n0", "A100-80GB", 8, ((0, 1), (2, 3), (4, 5), (6, 7))),))
QUAD = Cluster((Node("n0", "A100-80GB", 4, ((0, 1, 2, 3),)),))


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_default_profiles()


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("islands", "match"),
    [
        (((0, 1), (1, 2, 3)), "more than one"),
        (((0, 1), (2,)), r"\[3\] are in no NVLink island"),
        (((0, 1), (2, 3, 4)), "outside 0..3"),
        (((0, 1), (), (2, 3)), "empty NVLink island"),
    ],
)
def test_node_rejects_bad_islands(islands: tuple[tuple[int, ...], ...], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        Node("box", "A100-80GB", 4, islands)
    assert "'box'" in str(info.value)


def test_node_and_cluster_validation() -> None:
    with pytest.raises(ValueError, match="num_gpus must be > 0"):
        Node("n", "A100-80GB", 0, ())
    with pytest.raises(ValueError, match="duplicate node names"):
        Cluster((QUAD.nodes[0], QUAD.nodes[0]))
    with pytest.raises(ValueError, match="no nodes"):
        Cluster(())
    with pytest.raises(ValueError):
        ExecPlan("m", 0, 1)
    with pytest.raises(ValueError, match="ascending"):
        GpuGroup("n0", (1, 0))


def test_cluster_ids_and_islands() -> None:
    two = Cluster((QUAD.nodes[0], Node("n1", "A100-80GB", 2, ((0,), (1,)))))
    assert two.num_gpus == 6
    assert two.gpu_ids()[:2] == (("n0", 0), ("n0", 1))
    assert two.gpu_ids()[-1] == ("n1", 1)
    assert PAIRS.island_of("n0", 5) == (4, 5)
    assert two.island_of("n1", 1) == (1,)
    with pytest.raises(ValueError, match="no GPU 9"):
        PAIRS.island_of("n0", 9)
    with pytest.raises(ValueError, match="no node"):
        PAIRS.island_of("zz", 0)


def test_queue_names_and_overlap() -> None:
    assert GpuGroup("n0", (0, 1)).queue_name == "samullm.n0.gpu0-1"
    assert GpuGroup("n0", (3,)).queue_name == "samullm.n0.gpu3"
    assert GpuGroup("n1", (4, 5, 6, 7)).queue_name == "samullm.n1.gpu4-7"
    assert GpuGroup("n0", (0, 2)).queue_name == "samullm.n0.gpu0_2"
    a, b = GpuGroup("n0", (0, 1)), GpuGroup("n0", (1, 2))
    assert a.overlaps(b) and b.overlaps(a)
    assert not a.overlaps(GpuGroup("n0", (2, 3)))
    assert not a.overlaps(GpuGroup("n1", (0, 1)))
    assert ExecPlan("m", 2, 3).num_gpus == 6


# --- candidate plans -------------------------------------------------------------------------


def _tp_dp(plans: list[ExecPlan]) -> list[tuple[int, int]]:
    return [(p.tp, p.dp) for p in plans]


def test_vicuna_on_nvlink_pairs(profiles: ProfileSet) -> None:
    plans = candidate_exec_plans(VICUNA, profiles, PAIRS, ServingConfig())
    assert {p.tp for p in plans} == {1, 2}
    assert _tp_dp(plans) == [(1, d) for d in range(1, 9)] + [(2, d) for d in range(1, 5)]
    assert all(p.model == VICUNA for p in plans)


def test_vicuna_on_a100x4(profiles: ProfileSet) -> None:
    plans = candidate_exec_plans(VICUNA, profiles, QUAD, ServingConfig())
    assert {p.tp for p in plans} == {1, 2, 4}
    assert _tp_dp(plans) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (4, 1)]
    assert plans == sorted(plans, key=lambda p: (p.tp, p.dp))


def test_max_gpus_caps_the_footprint(profiles: ProfileSet) -> None:
    plans = candidate_exec_plans(VICUNA, profiles, PAIRS, ServingConfig(), max_gpus=3)
    assert _tp_dp(plans) == [(1, 1), (1, 2), (1, 3), (2, 1)]


def test_llama70_has_no_tp1_plan(profiles: ProfileSet) -> None:
    for cluster in (PAIRS, QUAD):
        plans = candidate_exec_plans(LLAMA70, profiles, cluster, ServingConfig())
        assert plans and min(p.tp for p in plans) == 2
    assert {p.tp for p in candidate_exec_plans(LLAMA70, profiles, QUAD, ServingConfig())} == {
        2,
        4,
    }


def test_three_gpu_tp_is_never_proposed(profiles: ProfileSet) -> None:
    odd = Cluster((Node("n0", "A100-80GB", 6, ((0, 1, 2), (3, 4, 5))),))
    plans = candidate_exec_plans(VICUNA, profiles, odd, ServingConfig())
    assert {p.tp for p in plans} == {1, 2}
    assert max(p.dp for p in plans if p.tp == 2) == 2  # one pair per 3-GPU island


def test_only_nodes_of_the_profiled_gpu_count(profiles: ProfileSet) -> None:
    mixed = Cluster((QUAD.nodes[0], Node("h", "H100-80GB", 8, (tuple(range(8)),))))
    plans = candidate_exec_plans(VICUNA, profiles, mixed, ServingConfig())
    assert max(p.tp for p in plans) == 4 and max(p.dp for p in plans) == 4
    h100_only = Cluster((Node("h", "H100-80GB", 8, (tuple(range(8)),)),))
    with pytest.raises(ValueError, match="no A100-80GB GPUs"):
        candidate_exec_plans(VICUNA, profiles, h100_only, ServingConfig())


def test_unknown_model_raises(profiles: ProfileSet) -> None:
    with pytest.raises(UnknownModelError):
        candidate_exec_plans("nobody/nothing", profiles, PAIRS, ServingConfig())


def test_context_longer_than_kv_room_is_refused(profiles: ProfileSet) -> None:
    # At 0.845 Llama-2-70b at tp2 still gets KV blocks (~210), but fewer than the 256 one
    # 4096-token request needs; capping the context at 2048 tokens makes it fit again.
    tight = ServingConfig(gpu_memory_utilization=0.845)
    assert {p.tp for p in candidate_exec_plans(LLAMA70, profiles, QUAD, tight)} == {4}
    short = ServingConfig(gpu_memory_utilization=0.845, max_model_len=2048)
    assert {p.tp for p in candidate_exec_plans(LLAMA70, profiles, QUAD, short)} == {2, 4}


# --- placement -------------------------------------------------------------------------------


def _check_valid(cluster: Cluster, groups: list[GpuGroup], tps: list[int]) -> None:
    assert [len(g.gpus) for g in groups] == tps
    for i, g in enumerate(groups):
        island = cluster.island_of(g.node, g.gpus[0])
        assert set(g.gpus) <= set(island)
        pos = [island.index(x) for x in g.gpus]
        assert pos == list(range(pos[0], pos[0] + len(pos)))  # contiguous within the island
        for h in groups[i + 1 :]:
            assert not g.overlaps(h)


def test_place_groups_respects_islands() -> None:
    tps = [1, 2, 2, 1, 2]
    groups = place_groups(PAIRS, tps)
    assert groups is not None
    _check_valid(PAIRS, groups, tps)
    assert place_groups(PAIRS, [4]) is None
    assert place_groups(PAIRS, [2, 2, 2, 2, 1]) is None
    assert place_groups(PAIRS, [1] * 8) is not None


def test_place_groups_avoids_taken() -> None:
    taken = frozenset({("n0", 0), ("n0", 3), ("n0", 6)})
    groups = place_groups(PAIRS, [2], taken=taken)
    assert groups == [GpuGroup("n0", (4, 5))]
    assert place_groups(PAIRS, [2, 2], taken=taken) is None
    groups = place_groups(PAIRS, [1, 2, 1, 1], taken=taken)
    assert groups is not None
    _check_valid(PAIRS, groups, [1, 2, 1, 1])
    assert all((g.node, x) not in taken for g in groups for x in g.gpus)
    with pytest.raises(ValueError, match="not in the cluster"):
        place_groups(PAIRS, [1], taken=frozenset({("n9", 0)}))


def test_place_groups_uses_best_fit_in_fragmented_islands() -> None:
    # Free runs of 3 GPUs (1-3) and 2 GPUs (4-5): best fit puts the first pair on 4-5, then the
    # second pair and the single GPU share 1-3.
    cluster = Cluster((Node("n0", "A100-80GB", 6, ((0, 1, 2, 3), (4, 5))),))
    taken = frozenset({("n0", 0)})
    groups = place_groups(cluster, [2, 2, 1], taken=taken)
    assert groups == [GpuGroup("n0", (4, 5)), GpuGroup("n0", (1, 2)), GpuGroup("n0", (3,))]
    assert place_groups(QUAD, [4], taken=frozenset({("n0", 2)})) is None
    assert place_groups(QUAD, [2, 1], taken=frozenset({("n0", 1)})) == [
        GpuGroup("n0", (2, 3)),
        GpuGroup("n0", (0,)),
    ]


def test_place_groups_is_deterministic_and_ordered_like_its_input() -> None:
    a = place_groups(QUAD, [1, 2, 1])
    assert a == place_groups(QUAD, [1, 2, 1])
    assert a is not None and [len(g.gpus) for g in a] == [1, 2, 1]
    assert place_groups(QUAD, []) == []
    with pytest.raises(ValueError):
        place_groups(QUAD, [0])
