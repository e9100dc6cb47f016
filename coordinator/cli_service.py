"""``samullm coordinator|worker|submit|status|results``: the deployed services and their clients.

``samullm worker`` sets ``CUDA_VISIBLE_DEVICES`` and replaces this process with
``python -m workers.main`` (the coordinator package never imports ``workers``), so nothing that
could initialise CUDA runs before the group's devices are fixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from apps.cluster_spec import SpecError
from coordinator.messages import JobOptions

BROKER_ENV = "SAMULLM_BROKER_URL"


def _broker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=os.environ.get(BROKER_ENV),
                   help=f"redis://[:password@]host:port/db (default: ${BROKER_ENV})")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the service commands."""
    p = sub.add_parser("coordinator", help="run the coordinator service")
    _broker(p)
    p.set_defaults(func=run_coordinator)
    p = sub.add_parser("worker", help="run a worker pinned to one GPU group")
    p.add_argument("--gpus", required=True, help="GPU indices of the group, e.g. 0,1")
    p.add_argument("--node", help="node name (default: the host name)")
    p.add_argument("--engine", choices=("sim", "vllm"), default="sim")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="sim engine: real seconds per simulated second")  # fmt: skip
    p.add_argument("--truth", help="sim engine: truth file (docs/runtime.md)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="vllm engine: CUDA GPUs, or CPU cores as devices (docs/real-vllm.md)")
    p.add_argument("--cores-per-device", type=int, default=1, help="vllm on cpu: cores each")
    p.add_argument("--loglevel", default="INFO")
    _broker(p)
    p.set_defaults(func=run_worker)
    p = sub.add_parser("submit", help="submit an application to a running samullm")
    p.add_argument("app", type=Path)
    p.add_argument("--cluster", type=Path, required=True)
    p.add_argument("--profiles", type=Path, help="profile file (default: the shipped A100 set)")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="samullm",
                   choices=("samullm", "sequential", "naive", "muxserve", "static"))  # fmt: skip
    p.add_argument("--no-adjust", action="store_true", help="no run-time re-planning")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish")
    _broker(p)
    p.set_defaults(func=run_submit)
    p = sub.add_parser("status", help="a job's status, progress and planned vs actual makespan")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    _broker(p)
    p.set_defaults(func=run_status)
    p = sub.add_parser("results", help="export a job's outputs (JSONL, Parquet or OpenAI Batch)")
    p.add_argument("job")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=("jsonl", "parquet", "openai"),
                   help="default: by suffix (.parquet as Parquet, else JSONL); openai = "
                        "an OpenAI Batch output file (sink nodes, errors included)")  # fmt: skip
    _broker(p)
    p.set_defaults(func=run_results)


def _need_broker(args: argparse.Namespace) -> str:
    if not args.broker:
        print(f"samullm {args.command}: give --broker or set {BROKER_ENV}", file=sys.stderr)
        raise SystemExit(2)
    return str(args.broker)


def run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.service import Coordinator
    from coordinator.settings import load_settings

    logging.getLogger().setLevel(logging.INFO)
    Coordinator(_need_broker(args), load_settings().default_lengths).serve()
    return 0


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The ``python -m workers.main`` command line of ``samullm worker``."""
    argv = [sys.executable, "-m", "workers.main", "--gpus", args.gpus, "--engine", args.engine,
            "--broker", _need_broker(args), "--time-scale", str(args.time_scale),
            "--loglevel", args.loglevel, "--device", args.device,
            "--cores-per-device", str(args.cores_per_device)]  # fmt: skip
    if args.node:
        argv += ["--node", args.node]
    if args.truth:
        argv += ["--truth", args.truth]
    return argv


def visible_devices(gpus: str, nvidia_visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker of ``gpus``: the host indices, except in a
    container that exposes exactly those GPUs (``NVIDIA_VISIBLE_DEVICES``), where they are
    renumbered from 0."""
    if nvidia_visible is not None and nvidia_visible.replace(" ", "") == gpus.replace(" ", ""):
        return ",".join(str(i) for i in range(len(gpus.split(","))))
    return gpus


def run_worker(args: argparse.Namespace) -> int:
    argv = worker_argv(args)
    if args.engine == "vllm":  # before any process of this worker can import CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(
            args.gpus, os.environ.get("NVIDIA_VISIBLE_DEVICES")
        )
    os.execv(sys.executable, argv)
    return 0  # not reached


def run_submit(args: argparse.Namespace) -> int:
    from coordinator.client import Client, JobFailed

    opts = JobOptions(draws=args.draws, seed=args.seed, method=args.method,
                      adjust=not args.no_adjust)
    try:
        job = Client(_need_broker(args)).submit(
            args.app, cluster=args.cluster, options=opts, profiles=args.profiles
        )
    except SpecError as e:
        print(f"samullm submit: {e}", file=sys.stderr)
        return 2
    print(job.id)
    if args.wait:
        try:
            st = job.wait()
        except JobFailed as e:
            print(str(e), file=sys.stderr)
            return 1
        print(json.dumps(st))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from coordinator.accuracy import adjust_lines, calibration_line, format_table, replan_line
    from coordinator.client import Client

    try:
        job = Client(_need_broker(args)).job(args.job)
    except KeyError as e:
        print(f"samullm status: {e.args[0]}", file=sys.stderr)
        return 2
    st, prog = job.status(), job.progress()
    if args.json:
        print(json.dumps({"job_id": job.id, **st, "units": prog}))
        return 0
    print(f"job {job.id} ({st.get('name', '')}): {st.get('status')}")
    for key in ("planned_makespan_s", "planned_p90_s", "actual_makespan_s", "eta_s", "eta_p90_s"):
        if key in st:
            print(f"  {key}: {float(st[key]):.1f}")
    print(f"  outputs: {st.get('outputs_committed', 0)}/{st.get('requests_total', '?')}")
    for name, u in prog.items():
        print(f"  {name:<30} {u['done']:>6}/{u['total']:<6} {u['tokens_per_s']:>9.0f} tok/s"
              f"  eta {u['eta_s']:.0f} s")  # fmt: skip
    notes = adjust_lines({**st, "stats": job.stats()})
    for line in (replan_line(st), calibration_line(st), *notes):
        if line is not None:
            print(line)
    pva = st.get("planned_vs_actual")
    if isinstance(pva, dict):
        print("\n".join(format_table(pva)))
    if st.get("error"):
        print(f"  error: {st['error']}")
    return 0


def run_results(args: argparse.Namespace) -> int:
    from coordinator.client import Client

    try:
        job = Client(_need_broker(args)).job(args.job)
        n = job.export(args.out, fmt=args.format)
    except KeyError as e:
        print(f"samullm results: {e.args[0]}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"samullm results: {args.out}: {e}", file=sys.stderr)
        return 1
    what = "lines" if args.format == "openai" else "outputs"
    print(f"{n} {what} -> {args.out}")
    return 0
