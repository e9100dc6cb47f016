"""Planning wall time: ensembles of 1k/5k/10k prompts on 4, 8 and 16 A100s.

Belief: the shipped A100 profiles and the authors' length pdfs; the apps are the LLM-Blender
ensemble presets (examples/paper/ensemble_10k.yaml, its first 1k/5k prompts per model).
Clusters: examples/clusters/a100x4.yaml (one NVLink island of 4), a100x8_nvlink_pairs.yaml, and
two such 8-GPU nodes. Each figure is the wall time of ``plan_app`` with the CLI's defaults
(search on one draw with scaled runs, P50/P90 over 5 draws), the least of ``--repeats`` runs.
Last line: ``plan_seconds=<s>`` for ensemble_10k on 8 GPUs.

Usage: python bench/plan_speed.py [--repeats 1] [--sizes 1000,5000,10000]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.app_spec import load_app  # noqa: E402
from apps.cluster_spec import load_cluster  # noqa: E402
from coordinator.settings import load_settings  # noqa: E402
from planning.cluster import Cluster  # noqa: E402
from planning.graph import AppGraph, LlmCall  # noqa: E402
from planning.io.lengths import load_authors_pdfs  # noqa: E402
from planning.io.profiles import load_default_profiles  # noqa: E402
from planning.planner import PlannerConfig, plan_app  # noqa: E402


def clusters() -> dict[int, Cluster]:
    four = load_cluster(ROOT / "examples/clusters/a100x4.yaml")
    eight = load_cluster(ROOT / "examples/clusters/a100x8_nvlink_pairs.yaml")
    node = eight.nodes[0]
    two = Cluster((node, dataclasses.replace(node, name="n1")))
    return {4: four, 8: eight, 16: two}


def head(graph: AppGraph, n: int) -> AppGraph:
    """The first ``n`` requests of every call (the ensemble has no dependencies)."""
    calls = tuple(
        LlmCall(c.name, c.model, c.base_prompt_len[:n], c.max_tokens[:n], (), c.request_ids[:n])
        for c in graph.calls
    )
    return AppGraph(calls, graph.models, graph.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sizes", default="1000,5000,10000")
    args = ap.parse_args()
    profiles = load_default_profiles()
    pdfs = load_authors_pdfs(load_settings().default_lengths)
    by_gpus = clusters()
    graphs = {
        g: load_app(
            ROOT / "examples/paper/ensemble_10k.yaml",
            cluster=c,
            profiles=profiles,
            authors_pdfs=pdfs,
        ).graph
        for g, c in by_gpus.items()
    }
    print(f"{'prompts':>8} {'GPUs':>5} {'plan s':>8} {'P50 s':>9} {'stages':>6}")
    main_case = float("nan")
    for n in (int(x) for x in args.sizes.split(",")):
        for gpus, cluster in by_gpus.items():
            graph = head(graphs[gpus], n)
            best = float("inf")
            for _ in range(args.repeats):
                began = time.perf_counter()
                rep = plan_app(graph, cluster, config=PlannerConfig())
                best = min(best, time.perf_counter() - began)
            print(f"{n:>8} {gpus:>5} {best:8.2f} {rep.best.p50:9.1f} {rep.best.plan.num_stages:>6}")
            if n == 10_000 and gpus == 8:
                main_case = best
    print(f"plan_seconds={main_case:.2f}")


if __name__ == "__main__":
    main()
