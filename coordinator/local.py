"""``samullm run``: the whole stack on one machine, or a job submitted to running services.

Without ``--broker`` it starts a private ``redis-server`` on a free loopback port, the
coordinator, and, once the plan is known, workers: vLLM engines on CPU devices for each group
the plan uses, or sim engines on virtual GPUs for every aligned group of each NVLink island;
then it follows the job, writes the results and tears everything down; if ``samullm run`` itself
is killed, the kernel kills the coordinator and the workers with it (``PR_SET_PDEATHSIG``), so
no worker keeps retrying a Redis that is gone. With ``--broker`` it submits to the services
already running there. Either way it shows live progress (a bar per unit with tokens/s and the
revised ETA) and ends with planned vs actual makespan.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.cluster_spec import load_cluster
from coordinator.client import Job
from coordinator.messages import JobOptions
from coordinator.redis_server import RedisServer
from coordinator.service import read_workers
from coordinator.store import connect
from planning.cluster import Cluster, GpuGroup

STOP_WAIT_S = 3.0  # s a process gets to exit after SIGTERM
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def _die_with_parent() -> None:
    """``preexec_fn`` of the stack's children: SIGKILL them when ``samullm run`` dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What ``samullm run`` was asked."""

    app: Path
    cluster: Path
    options: JobOptions
    time_scale: float  # real s per simulated s on the sim workers
    out: Path | None  # results file (JSONL, or Parquet by suffix)
    broker: str | None  # submit to running services instead of starting them
    live: bool  # draw the progress bars
    log_dir: Path | None  # where worker and coordinator logs go (a temp folder if None)
    profiles: Path | None = None  # profile file; None = the shipped A100 set
    engine: str = "sim"  # local workers' engine: sim | vllm
    out_format: str | None = None  # jsonl | parquet | openai; None = by the suffix of ``out``
    truth: Path | None = None  # sim workers' truth file (docs/runtime.md); None = the default
    gantt: Path | None = None  # PNG: plan vs actual per GPU (coordinator/gantt.py)


class _Procs:
    """Child processes in their own process groups, stopped by pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.by_name: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        self.procs.append(proc)
        self.by_name[name] = proc

    def kill(self, name: str) -> None:
        """SIGKILL one process (a worker lost mid-run, for benchmarks and tests)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.by_name[name].pid, signal.SIGKILL)

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + STOP_WAIT_S
        for p in self.procs:
            try:
                p.wait(max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", *args]


@contextlib.contextmanager
def local_stack(req: RunRequest) -> Iterator[tuple[str, _Procs]]:
    """A private Redis and the coordinator; yields (broker URL, process set for workers)."""
    with contextlib.ExitStack() as stack:
        log_dir = req.log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        log_dir.mkdir(parents=True, exist_ok=True)
        redis = stack.enter_context(RedisServer.start())
        procs = _Procs(log_dir)
        stack.callback(procs.stop)
        procs.start("coordinator", _cli("coordinator", "--broker", redis.url))
        yield redis.url, procs


def start_workers(job: Job, procs: _Procs, url: str, req: RunRequest, timeout: float) -> int:
    """One worker per GPU group of the job's plan (``req.engine``); on the sim engine also one
    per other group a re-plan may use (every aligned power-of-two run of each NVLink island),
    since sim workers cost little. Groups with a worker already are skipped. Returns how many
    groups have one."""
    plan = _wait_plan(job, timeout)
    groups = {(g["node"], tuple(g["gpus"])) for a in plan["assignments"] for g in a["gpu_groups"]}
    if req.engine == "sim":
        groups |= island_groups(load_cluster(req.cluster))
    _start_groups(procs, url, req, groups)
    return len(groups)


def start_sim_workers(procs: _Procs, url: str, req: RunRequest, timeout: float) -> int:
    """Before any job: a sim worker per aligned island group of ``req.cluster``, waiting until
    each one's heartbeat says it consumes its queue, so no job's clock counts worker start-up.
    Returns how many.

    Raises:
        TimeoutError: a worker did not come up within ``timeout`` s (names them).
    """
    groups = island_groups(load_cluster(req.cluster))
    queues = _start_groups(procs, url, req, groups)
    r = connect(url)
    end = time.monotonic() + timeout
    while (missing := set(queues) - _consuming(r)) and time.monotonic() < end:
        time.sleep(0.1)
    if missing:
        raise TimeoutError(f"sim workers not up after {timeout:.0f} s: {sorted(missing)}")
    return len(groups)


def _consuming(r: Any) -> set[str]:
    return {q for q, w in read_workers(r).items() if w.consuming}


def _start_groups(
    procs: _Procs, url: str, req: RunRequest, groups: set[tuple[str, tuple[int, ...]]]
) -> list[str]:
    """Start a worker for each group without one; the queues of all of ``groups``."""
    queues = []
    for node, gpus in sorted(groups):
        queues.append(GpuGroup(node, gpus).queue_name)
        name = f"worker-{node}-gpu{'_'.join(map(str, gpus))}"
        if name in procs.by_name:
            continue
        procs.start(name, _cli("worker", "--gpus", ",".join(map(str, gpus)), "--node", node,
                               "--engine", req.engine, "--time-scale", str(req.time_scale),
                               "--broker", url, "--loglevel", "WARNING",
                               *(["--truth", str(req.truth)] if req.truth else [])))  # fmt: skip
    return queues


def island_groups(cluster: Cluster) -> set[tuple[str, tuple[int, ...]]]:
    """(node, GPUs) of every aligned run of 1, 2, 4, ... GPUs inside one NVLink island."""
    out = set()
    for n in cluster.nodes:
        for island in n.islands:
            size = 1
            while size <= len(island):
                for i in range(0, len(island) - size + 1, size):
                    out.add((n.name, tuple(sorted(island[i : i + size]))))
                size *= 2
    return out


def _wait_plan(job: Job, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = job.status()
        if st.get("status") == "failed":
            raise RuntimeError(f"job {job.id} failed: {st.get('error')}")
        plan = job.plan()
        if plan is not None:
            return plan
        time.sleep(0.05)
    raise TimeoutError(f"job {job.id}: no plan after {timeout:.0f} s (is the coordinator up?)")


def follow(job: Job, live: bool, poll_s: float = 0.25) -> dict[str, Any]:
    """Wait for the job, drawing progress bars when ``live``; its final status."""
    if not live:
        return job.wait(poll_s=poll_s)
    from coordinator.progress_view import ProgressView

    with ProgressView() as view:
        while True:
            st = job.status()
            view.update(st, job.progress())
            if st.get("status") in ("done", "failed"):
                break
            time.sleep(poll_s)
    return job.wait(poll_s=poll_s)


def run_app(
    app: str | Path,
    cluster: str | Path,
    *,
    time_scale: float = 0.01,
    engine: str = "auto",
    out: str | Path | None = None,
    out_format: str | None = None,
    profiles: str | Path | None = None,
    options: JobOptions | None = None,
    log_dir: str | Path | None = None,
    gantt: str | Path | None = None,
) -> dict[str, Any]:
    """Run an application file on the embedded default, as ``samullm run APP --json`` does: a
    private Redis, the coordinator and a worker per GPU group start and stop here. Returns the
    run's summary (``status``, ``job_id``, planned and actual makespan, ``results``: the file
    written, ...); a bad file raises :class:`apps.cluster_spec.SpecError` before anything starts.
    """
    from coordinator.cli_run import execute, pick_engine, validate

    cl = validate(Path(app), Path(cluster), Path(profiles) if profiles else None)
    req = RunRequest(
        app=Path(app), cluster=Path(cluster), options=options or JobOptions(),
        time_scale=time_scale, out=Path(out) if out else None, broker=None, live=False,
        log_dir=Path(log_dir) if log_dir else None, profiles=Path(profiles) if profiles else None,
        engine=pick_engine(engine, cl), out_format=out_format,
        gantt=Path(gantt) if gantt else None,
    )  # fmt: skip
    return execute(req)
