"""Estimated makespans of every paper preset: our plan, each baseline, the lower bound.

Truth and belief are the same object here (the planner's simulator, shipped A100 profiles and
the authors' length pdfs): these are *estimated* speedups, the planner's view, not measured
ones; issue 8 measures plans under a separate truth. Every method is replayed under the same
``--draws`` length draws (seed 0). Usage: python bench/plan_presets.py [--draws 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.app_spec import load_app  # noqa: E402
from apps.cluster_spec import load_cluster  # noqa: E402
from coordinator.settings import load_settings  # noqa: E402
from planning.io.lengths import load_authors_pdfs  # noqa: E402
from planning.io.profiles import load_default_profiles  # noqa: E402
from planning.planner import PlannerConfig, plan_app  # noqa: E402

PRESETS = ("ensemble_1k", "ensemble_10k", "routing_10k", "chain_summary_100docs", "mixed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--cluster", default="examples/clusters/a100x8_nvlink_pairs.yaml")
    args = ap.parse_args()
    cluster = load_cluster(ROOT / args.cluster)
    profiles = load_default_profiles()
    pdfs = load_authors_pdfs(load_settings().default_lengths)
    names = ("sequential", "naive", "muxserve", "static")
    print(f"cluster {args.cluster}, {args.draws} draws, seed 0; speedup = baseline P50 / ours P50")
    print(
        f"{'preset':<22} {'ours P50':>9} {'P90':>8} {'from':>8} "
        + " ".join(f"{n:>11}" for n in names)
        + f" {'ours/LB':>8} {'greedy':>7} {'plan s':>7}"
    )
    for p in PRESETS:
        app = load_app(
            ROOT / f"examples/paper/{p}.yaml", cluster=cluster, profiles=profiles, authors_pdfs=pdfs
        )
        began = time.perf_counter()
        rep = plan_app(app.graph, cluster, config=PlannerConfig(draws=args.draws), compare=True)
        took = time.perf_counter() - began
        ours = rep.best.p50
        cells = " ".join(f"{rep.baselines[n].p50 / ours:10.2f}x" for n in names)
        lb = rep.lower_bound or float("nan")
        greedy = rep.searched.p50 / ours
        print(
            f"{p:<22} {ours:9.1f} {rep.best.p90:8.1f} {rep.chosen_from:>8} {cells} "
            f"{ours / lb:8.2f} {greedy:7.2f} {took:7.1f}"
        )


if __name__ == "__main__":
    main()
