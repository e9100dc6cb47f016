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
from planning.cluster import Cluster
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
    p.add_argument("--format", choices=("jsonl", "parquet", "openai"), dest="out_format",
                   help="results format; openai: OpenAI Batch output lines of the final nodes "
                        "(default: by the suffix of --out)")
    p.add_argument("--broker", help=f"submit to running services at this Redis URL "
                                    f"(or set {BROKER_ENV}); default: start a local stack")
    p.add_argument("--draws", type=int, default=5, help="length draws for P50/P90")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="samullm",
                   choices=("samullm", "sequential", "naive", "muxserve", "static"),
                   help="run our plan or a baseline's")
    p.add_argument("--scheduler", choices=("v1", "legacy030"), default="v1",
                   help="engine batching the planner simulates: vLLM V1 or vLLM 0.3.0 (the "
                        "measured A100 world: --truth examples/paper/truth_a100.yaml)")
    p.add_argument("--gantt", type=Path, metavar="FILE.png",
                   help="draw the plan vs what ran, per GPU, to this PNG (needs matplotlib)")
    p.add_argument("--no-adjust", action="store_true",
                   help="run the plan as made: no run-time re-planning (docs/replanning.md)")
    p.add_argument("--json", action="store_true", help="end with one JSON object, no bars")
    p.add_argument("--log-dir", type=Path, help="keep coordinator and worker logs here")
    p.add_argument("--truth", type=Path,
                   help="sim workers: truth file (lengths and step latencies the planner does "
                        "not see, e.g. a model 1.3x slower; docs/runtime.md)")
    p.add_argument("--profiles", type=Path,
                   help="profile file (samullm profile); default: the shipped A100 set")
    p.add_argument("--engine", choices=("auto", "sim", "vllm"), default="auto",
                   help="local workers: sim (virtual GPUs) or vllm (real engines); auto: vllm "
                        "when the cluster's devices are CPU, else sim")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Validate, run, export, summarise."""
    from coordinator.local import RunRequest

    if args.time_scale <= 0:
        print("samullm run: --time-scale: must be > 0", file=sys.stderr)
        return 2
    try:
        cluster = validate(args.app, args.cluster, args.profiles)
    except SpecError as e:
        print(f"samullm run: {e}", file=sys.stderr)
        return 2
    engine = pick_engine(args.engine, cluster)
    req = RunRequest(
        app=args.app, cluster=args.cluster,
        options=JobOptions(draws=args.draws, seed=args.seed, method=args.method,
                           scheduler=args.scheduler, adjust=not args.no_adjust),
        time_scale=args.time_scale, out=args.out, broker=args.broker, live=not args.json
        and sys.stderr.isatty(), log_dir=args.log_dir, profiles=args.profiles, engine=engine,
        out_format=args.out_format, truth=args.truth, gantt=args.gantt,
    )  # fmt: skip
    summary = execute(req)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0 if summary["status"] == "done" else 1


def validate(app: Path, cluster: Path, profiles: Path | None) -> Cluster:
    """Check the application against the cluster and profiles; the cluster.

    Raises:
        SpecError: the application, cluster or profile file is invalid (nothing was started).
    """
    from coordinator.client import load_profiles_doc

    _, ps = load_profiles_doc(profiles)
    cl = load_cluster(cluster)
    pdfs = load_authors_pdfs(load_settings().default_lengths)
    load_app(app, cluster=cl, profiles=ps, authors_pdfs=pdfs, serving=serving_for(ps.gpu.name))
    return cl


def pick_engine(engine: str, cluster: Cluster) -> str:
    """``auto``: vllm when the cluster's devices are CPU cores, else sim."""
    if engine != "auto":
        return engine
    return "vllm" if {n.gpu for n in cluster.nodes} == {"CPU"} else "sim"


def execute(req: Any) -> dict[str, Any]:
    """Run a :class:`coordinator.local.RunRequest` (local stack, or ``req.broker``); summary."""
    from coordinator.client import Client, JobFailed
    from coordinator.local import follow, local_stack, start_sim_workers, start_workers

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
        try:
            if req.engine == "sim":  # up before the job, so its clock counts no start-up
                start_sim_workers(procs, url, req, PLAN_TIMEOUT_S)
        except TimeoutError as e:
            return {"status": "failed", "error": str(e)}
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
    out = req.out or Path(f"samullm-results/{job.id}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = job.export(out, fmt=req.out_format)
    n = len(job.results()) if req.out_format == "openai" else lines
    return {
        "job_id": job.id, "status": st.get("status"), "name": st.get("name"),
        "planned_makespan_s": st.get("planned_makespan_s"),
        "planned_p90_s": st.get("planned_p90_s"), "actual_makespan_s": st.get("actual_makespan_s"),
        "requests_total": st.get("requests_total"), "outputs_committed": n,
        "requests_failed": st.get("requests_failed", 0), "rejected": st.get("rejected", 0),
        "routed_away": st.get("routed_away", 0), "plan_seconds": st.get("plan_seconds"),
        "time_scale": st.get("time_scale"),
        "wall_s": wall, "results": str(out), "units": job.progress(), "plan": job.plan(),
        "planned_vs_actual": job.planned_vs_actual(), "replan": st.get("replan"),
        "replanned_p50_s": st.get("replanned_p50_s"), "replanned_p90_s": st.get("replanned_p90_s"),
        "calibration": st.get("calibration"), "adjust": st.get("adjust"),
        "switches": st.get("switches") or [], "stats": job.stats(),
        "gantt": _gantt(job, gantt, st.get("name", "")) if (gantt := getattr(req, "gantt", None))
        else None,
    }  # fmt: skip


def _gantt(job: Any, path: Path, name: str) -> str | None:
    """Draw the job's Gantt chart; the file, or None (the reason goes to stderr: the results
    are written already, so a missing matplotlib does not fail the run)."""
    from coordinator.gantt import draw, job_spans

    try:
        planned, actual = job_spans(job)
        return str(draw(planned, actual, path, f"job {job.id} ({name})"))
    except (RuntimeError, OSError) as e:
        print(f"samullm run: --gantt: {e}", file=sys.stderr)
        return None


def _print_summary(s: dict[str, Any]) -> None:
    from coordinator.accuracy import adjust_lines, calibration_line, format_table, replan_line

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
          f"{s['requests_failed']} failed, {s['rejected']} rejected at load"
          + (f", {s['routed_away']} router candidates not chosen" if s["routed_away"] else "")
          + f" -> {s['results']}")
    for line in (replan_line(s), calibration_line(s), *adjust_lines(s)):
        if line is not None:
            print(line)
    if s.get("gantt"):
        print(f"  Gantt chart (plan vs actual per GPU): {s['gantt']}")
    for name, u in s["units"].items():
        print(f"  {name:<32} {u['model']:<40} {u['done']:>6}/{u['total']:<6}"
              f" {u['tokens_per_s']:>8.0f} tok/s")  # fmt: skip
    if s.get("planned_vs_actual"):
        print("\n".join(format_table(s["planned_vs_actual"])))
