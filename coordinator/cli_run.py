"""``samullm run APP --cluster CLUSTER``: plan and run a job, locally or on running services.

Exit codes: 0 done, 1 the job failed, 2 bad input (nothing was started or enqueued).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from apps.app_spec import load_app
from apps.cluster_spec import SpecError, load_cluster
from coordinator.cli_service import BROKER_ENV
from coordinator.messages import JobOptions
from coordinator.settings import load_settings
from planning.estimate import serving_for
from planning.io.lengths import load_authors_pdfs

PLAN_TIMEOUT_S = 300.0  # s to wait for the coordinator's plan


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``samullm run``."""
    p = sub.add_parser("run", help="plan and run an application (local stack by default)")
    p.add_argument("app", type=Path, help="application file (YAML or JSON)")
    p.add_argument("--cluster", type=Path, required=True, help="cluster file")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="real seconds per simulated second on sim workers (0.01: 100x faster)")
    p.add_argument("--out", type=Path, help="results file (.jsonl or .parquet)")
    p.add_argument("--broker", help=f"submit to running services at this Redis URL "
                                    f"(or set {BROKER_ENV}); default: start a local stack")
    p.add_argument("--draws", type=int, default=5, help="length draws for P50/P90")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="samullm",
                   choices=("samullm", "sequential", "naive", "muxserve", "static"),
                   help="run our plan or a baseline's")
    p.add_argument("--json", action="store_true", help="end with one JSON object, no bars")
    p.add_argument("--log-dir", type=Path, help="keep coordinator and worker logs here")
    p.add_argument("--profiles", type=Path,
                   help="profile file (samullm profile); default: the shipped A100 set")
    p.add_argument("--engine", choices=("auto", "sim", "vllm"), default="auto",
                   help="local workers: sim (virtual GPUs) or vllm (real engines); auto: vllm "
                        "when the cluster's devices are CPU, else sim")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Validate, run, export, summarise."""
    from coordinator.client import load_profiles_doc
    from coordinator.local import RunRequest

    if args.time_scale <= 0:
        print("samullm run: --time-scale: must be > 0", file=sys.stderr)
        return 2
    try:
        _, profiles = load_profiles_doc(args.profiles)
        cluster = load_cluster(args.cluster)
        pdfs = load_authors_pdfs(load_settings().default_lengths)
        load_app(args.app, cluster=cluster, profiles=profiles, authors_pdfs=pdfs,
                 serving=serving_for(profiles.gpu.name))  # fmt: skip
    except SpecError as e:
        print(f"samullm run: {e}", file=sys.stderr)
        return 2
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if {n.gpu for n in cluster.nodes} == {"CPU"} else "sim"
    req = RunRequest(
        app=args.app, cluster=args.cluster,
        options=JobOptions(draws=args.draws, seed=args.seed, method=args.method),
        time_scale=args.time_scale, out=args.out, broker=args.broker, live=not args.json
        and sys.stderr.isatty(), log_dir=args.log_dir, profiles=args.profiles, engine=engine,
    )  # fmt: skip
    summary = _execute(req)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0 if summary["status"] == "done" else 1


def _execute(req: Any) -> dict[str, Any]:
    from coordinator.client import Client, JobFailed
    from coordinator.local import follow, local_stack, start_workers

    t0 = time.monotonic()
    if req.broker:
        job = Client(req.broker).submit(
            req.app, cluster=req.cluster, options=req.options, profiles=req.profiles
        )
        try:
            st = follow(job, req.live)
        except JobFailed as e:
            return {"job_id": job.id, "status": "failed", "error": str(e)}
        return _summary(job, st, req, time.monotonic() - t0)
    with local_stack(req) as (url, procs):
        job = Client(url).submit(
            req.app, cluster=req.cluster, options=req.options, profiles=req.profiles
        )
        try:
            start_workers(job, procs, url, req, PLAN_TIMEOUT_S)
            st = follow(job, req.live)
        except (JobFailed, RuntimeError, TimeoutError) as e:
            return {"job_id": job.id, "status": "failed", "error": str(e)}
        return _summary(job, st, req, time.monotonic() - t0)


def _summary(job: Any, st: dict[str, Any], req: Any, wall: float) -> dict[str, Any]:
    from coordinator.results import export

    out = req.out or Path(f"samullm-results/{job.id}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    n = export(job.id, job.results(), out)
    return {
        "job_id": job.id, "status": st.get("status"), "name": st.get("name"),
        "planned_makespan_s": st.get("planned_makespan_s"),
        "planned_p90_s": st.get("planned_p90_s"), "actual_makespan_s": st.get("actual_makespan_s"),
        "requests_total": st.get("requests_total"), "outputs_committed": n,
        "requests_failed": st.get("requests_failed", 0), "rejected": st.get("rejected", 0),
        "plan_seconds": st.get("plan_seconds"), "time_scale": st.get("time_scale"),
        "wall_s": wall, "results": str(out), "units": job.progress(), "plan": job.plan(),
        "planned_vs_actual": job.planned_vs_actual(),
    }  # fmt: skip


def _print_summary(s: dict[str, Any]) -> None:
    from coordinator.accuracy import format_table

    if s["status"] != "done":
        print(f"job {s['job_id']} failed: {s.get('error')}", file=sys.stderr)
        return
    plan = s.get("plan") or {"assignments": [], "method": "?"}
    print(f"plan ({plan['method']}): stage, unit, tp x dp, worker queues, planned start-end s")
    for a in plan["assignments"]:
        queues = " ".join(g["queue"] for g in a["gpu_groups"])
        print(f"  {a['stage']:>3} {a['unit_name']:<30} {a['tp']}x{a['dp']}  {queues:<34}"
              f" {a['start_s']:8.1f} - {a['end_s']:.1f}")  # fmt: skip
    planned, actual = s["planned_makespan_s"], s["actual_makespan_s"]
    err = (planned - actual) / actual * 100 if actual else float("nan")
    print(f"job {s['job_id']} ({s['name']}) done in {s['wall_s']:.1f} s wall")
    print(f"  makespan: planned P50 {planned:.1f} s (P90 {s['planned_p90_s']:.1f} s), "
          f"actual {actual:.1f} s (simulated s; planned-vs-actual {err:+.1f} %)")  # fmt: skip
    print(f"  outputs: {s['outputs_committed']}/{s['requests_total']} committed, "
          f"{s['requests_failed']} failed, {s['rejected']} rejected at load -> {s['results']}")
    for name, u in s["units"].items():
        print(f"  {name:<32} {u['model']:<40} {u['done']:>6}/{u['total']:<6}"
              f" {u['tokens_per_s']:>8.0f} tok/s")  # fmt: skip
    if s.get("planned_vs_actual"):
        print("\n".join(format_table(s["planned_vs_actual"])))
