"""``samullm plan``: the stage plan of an application on a cluster, with P50/P90 makespan.

Loads and validates the application and cluster files (exit 2 naming the file and field on a
bad one), searches a plan, and prints the stage table. ``--compare`` adds every baseline's
estimate under the same length draws, the lower bound and our speedup over each; ``--json``
prints one object (the runtime consumes the same plan).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from apps.app_spec import LoadedApp, load_app
from apps.cluster_spec import SpecError, load_cluster
from coordinator.settings import load_settings
from planning.estimate import ServingConfig
from planning.io.lengths import load_authors_pdfs
from planning.io.profiles import load_default_profiles, read_profiles
from planning.plan import assignment_to_dict
from planning.planner import (
    DEFAULT_DRAWS,
    DEFAULT_EVAL_BUDGET,
    DEFAULT_SEARCH_BUDGET,
    PlanEstimate,
    PlannerConfig,
    PlanReport,
    plan_app,
)


def register(sub: Any) -> None:
    """Add the ``plan`` sub-command."""
    p = sub.add_parser("plan", help="stage plan of an application on a cluster (P50/P90)")
    p.add_argument("app", type=Path, help="application file (YAML or JSON)")
    p.add_argument("--cluster", type=Path, required=True, help="cluster file (YAML or JSON)")
    p.add_argument("--compare", action="store_true", help="also estimate every baseline")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="length samples (P50/P90)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profiles", type=Path, help="profile file (default: shipped A100 set)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="simulate every request (slower; default scales runs above "
        f"{DEFAULT_EVAL_BUDGET} requests, {DEFAULT_SEARCH_BUDGET} while searching)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``samullm plan``; returns the exit code."""
    if args.draws < 1:
        print("samullm plan: error: --draws must be >= 1", file=sys.stderr)
        return 2
    try:
        app = _load(args)
    except (SpecError, ValueError, OSError) as exc:
        print(f"samullm plan: error: {exc}", file=sys.stderr)
        return 2
    cfg = PlannerConfig(
        draws=args.draws,
        seed=args.seed,
        search_budget=None if args.exact else DEFAULT_SEARCH_BUDGET,
        eval_budget=None if args.exact else DEFAULT_EVAL_BUDGET,
    )
    began = time.perf_counter()
    report = plan_app(app.graph, app.cluster, config=cfg, compare=args.compare)
    took = time.perf_counter() - began
    doc = plan_document(app.loaded, report, took, args)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(_table(doc))
    return 0


class _App:
    def __init__(self, loaded: LoadedApp, cluster: Any) -> None:
        self.loaded, self.graph, self.cluster = loaded, loaded.graph, cluster


def _load(args: argparse.Namespace) -> _App:
    cluster = load_cluster(args.cluster)
    profiles = read_profiles(args.profiles) if args.profiles else load_default_profiles()
    pdf_path = load_settings().default_lengths
    if not pdf_path.exists():
        raise SpecError(
            f"{pdf_path}: output-length distributions not found (set SAMULLM_SHARED_DIR to the "
            "folder holding data/output_length_pdfs.json)"
        )
    pdfs = load_authors_pdfs(pdf_path)
    loaded = load_app(
        args.app, cluster=cluster, profiles=profiles, authors_pdfs=pdfs, serving=ServingConfig()
    )
    return _App(loaded, cluster)


def _estimate_doc(est: PlanEstimate) -> dict[str, Any]:
    return {"p50_s": est.p50, "p90_s": est.p90, "mean_s": est.mean, "draws_s": list(est.makespans)}


def _stages(est: PlanEstimate) -> list[dict[str, Any]]:
    plan, tl, units = est.plan, est.timeline, est.ctx.units
    calls = est.ctx.graph.calls
    stages: list[dict[str, Any]] = []
    for s in range(plan.num_stages):
        rows = []
        for i, a in enumerate(plan.assignments):
            if a.stage != s:
                continue
            unit = units[a.unit]
            row = assignment_to_dict(a)
            row.update(
                unit=unit.name,
                calls=[calls[c].name for c in unit.calls],
                model=unit.model,
                requests=unit.num_requests,
                start_s=_num(tl.start[i]),
                ready_s=_num(tl.ready[i]),
                end_s=_num(tl.end[i]),
            )
            rows.append(row)
        first, last = tl.stage_span(plan, s)
        stages.append(
            {"stage": s, "start_s": _num(first), "end_s": _num(last), "assignments": rows}
        )
    return stages


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def plan_document(
    loaded: LoadedApp, report: PlanReport, seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    """The JSON form of a plan report."""
    best = report.best
    doc: dict[str, Any] = {
        "app": str(args.app),
        "cluster": str(args.cluster),
        "makespan_p50": best.p50,
        "makespan_p90": best.p90,
        "makespan_mean": best.mean,
        "draws": args.draws,
        "seed": args.seed,
        "chosen_from": report.chosen_from,
        "plan_seconds": round(seconds, 3),
        "lower_bound": report.lower_bound,
        "baselines": {k: v.p50 for k, v in report.baselines.items()},
        "baseline_details": {k: _estimate_doc(v) for k, v in report.baselines.items()},
        "searched": _estimate_doc(report.searched),
        "stages": _stages(best),
        "rejected": [
            {"node": r.node, "request_id": r.request_id, "reason": r.reason}
            for r in loaded.rejected
        ],
        "models": dict(loaded.notes),
    }
    return doc


def _table(doc: dict[str, Any]) -> str:
    lines = [
        f"plan for {doc['app']} on {doc['cluster']} ({doc['draws']} draws, seed {doc['seed']})"
    ]
    head = f"{'stage':>5} {'unit':<28} {'tp':>2} {'dp':>2}  {'start s':>9} {'end s':>9}  GPUs"
    lines.append(head)
    for st in doc["stages"]:
        for a in st["assignments"]:
            gpus = " ".join(g["queue"].removeprefix("samullm.") for g in a["gpu_groups"])
            start = "-" if a["start_s"] is None else f"{a['start_s']:9.1f}"
            end = "-" if a["end_s"] is None else f"{a['end_s']:9.1f}"
            lines.append(
                f"{st['stage']:>5} {a['unit'][:28]:<28} {a['tp']:>2} {a['dp']:>2}  "
                f"{start:>9} {end:>9}  {gpus}"
            )
    lines.append(
        f"makespan P50 {doc['makespan_p50']:.1f} s, P90 {doc['makespan_p90']:.1f} s "
        f"(plan from: {doc['chosen_from']}; planned in {doc['plan_seconds']:.2f} s)"
    )
    if doc["rejected"]:
        lines.append(f"rejected requests: {len(doc['rejected'])} (see --json for ids)")
    if doc["baselines"]:
        lines.append(f"{'baseline':<12} {'P50 s':>9} {'speedup':>8}")
        for name, p50 in doc["baselines"].items():
            lines.append(f"{name:<12} {p50:9.1f} {p50 / doc['makespan_p50']:7.2f}x")
        lb = doc["lower_bound"]
        lines.append(f"lower bound {lb:9.1f} s (ours / bound = {doc['makespan_p50'] / lb:.2f})")
    return "\n".join(lines)
