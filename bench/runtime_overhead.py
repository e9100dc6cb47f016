"""Runtime overhead: the same plan through Redis + Celery worker processes vs in one process.

Both modes run the same in-process :class:`coordinator.service.Coordinator` against the same
private Redis (the ledger, the event and progress streams), the sim engine with the default
truth, and the same time scale (default 1, i.e. real time):

- ``celery``: one ``samullm worker --engine sim`` subprocess per GPU group of the plan; stage
  tasks go through the Celery broker (Redis lists) to the workers' solo pools.
- ``inproc``: the coordinator's Celery is replaced by a fake whose ``send_task`` puts the task on
  a per-queue FIFO served by one thread per queue, each with its own EngineCache + SimEngine and
  TruthWorld (what a worker process holds), calling :func:`workers.runner.run_stage` directly.
  Heartbeats are written to ``samullm:workers`` like the real workers do.

The actual makespan (simulated s) is the coordinator's: first task start to last commit, divided
by the time scale. Overhead = celery / inproc - 1.

Usage: python bench/runtime_overhead.py [--repeats 1] [--time-scale 1]. Last line:
``overhead_pct=<x>`` (mean over repeats).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue as queue_mod
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.client import Client, Job  # noqa: E402
from coordinator.messages import StageTask, WorkerInfo  # noqa: E402
from coordinator.redis_server import RedisServer  # noqa: E402
from coordinator.service import Coordinator  # noqa: E402
from coordinator.settings import load_settings  # noqa: E402
from coordinator.store import WORKERS, Ledger, connect  # noqa: E402
from workers.engines.cache import EngineCache  # noqa: E402
from workers.engines.sim_engine import SimEngine  # noqa: E402
from workers.runner import run_stage  # noqa: E402
from workers.truth import TruthWorld, load_truth  # noqa: E402

APP = ROOT / "examples/runtime/three_models.yaml"
CLUSTER = ROOT / "examples/clusters/a100x2.yaml"


def wait_plan(job: Job, timeout: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        plan = job.plan()
        if plan is not None:
            return plan
        time.sleep(0.05)
    raise TimeoutError("no plan")


def plan_groups(plan: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return sorted(
        {(g["node"], tuple(g["gpus"])) for a in plan["assignments"] for g in a["gpu_groups"]}
    )


class FakeCelery:
    """``send_task`` -> a FIFO per queue, served by one thread per queue (one task at a time)."""

    def __init__(self, url: str, time_scale: float) -> None:
        self.url, self.time_scale = url, time_scale
        self.queues: dict[str, queue_mod.Queue[dict[str, Any] | None]] = {}
        self.threads: list[threading.Thread] = []

    def send_task(self, name: str, args: list[Any], queue: str, task_id: str) -> None:
        del name, task_id
        self.queues[queue].put(args[0])

    def add_queue(self, q: str) -> None:
        self.queues[q] = queue_mod.Queue()
        th = threading.Thread(target=self._serve, args=(q,), daemon=True)
        th.start()
        self.threads.append(th)

    def _serve(self, q: str) -> None:
        truth = TruthWorld(load_truth(None))
        engines = EngineCache(lambda key: SimEngine(key, truth, self.time_scale))
        r = connect(self.url)
        while True:
            msg = self.queues[q].get()
            if msg is None:
                engines.release()
                return
            task = StageTask.model_validate(msg)
            if task.lengths_like:
                truth.register_like(task.engine.model, task.lengths_like)
            run_stage(task, engines, Ledger(r, task.job_id), queue=q)

    def stop(self) -> None:
        for q in self.queues.values():
            q.put(None)


def heartbeats(url: str, infos: list[WorkerInfo], stop: threading.Event) -> None:
    r = connect(url)
    while not stop.is_set():
        for w in infos:
            r.hset(WORKERS, w.queue, w.model_copy(update={"heartbeat_at": time.time()}).to_json())
        stop.wait(1.0)
    for w in infos:
        r.hdel(WORKERS, w.queue)


def run_once(mode: str, time_scale: float, log_dir: Path) -> dict[str, float]:
    """One job in ``mode`` ("celery" or "inproc") on a fresh Redis; its makespans and wall."""
    with RedisServer.start() as rs:
        url = rs.url
        coord = Coordinator(url, load_settings().default_lengths)
        fake = FakeCelery(url, time_scale) if mode == "inproc" else None
        if fake is not None:
            coord.celery = fake
        stop = threading.Event()
        th = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
        th.start()
        job = Client(url).submit(APP, cluster=CLUSTER)
        groups = plan_groups(wait_plan(job))
        procs: list[subprocess.Popen[bytes]] = []
        hb_stop = threading.Event()
        if fake is None:
            for node, gpus in groups:
                g = ",".join(map(str, gpus))
                log = open(log_dir / f"worker-{mode}-{g}.log", "wb")  # noqa: SIM115
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "coordinator.cli", "worker", "--gpus", g, "--node",
                     node, "--engine", "sim", "--time-scale", str(time_scale), "--broker", url,
                     "--loglevel", "WARNING"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                ))  # fmt: skip
        else:
            from planning.cluster import GpuGroup

            infos = []
            for node, gpus in groups:
                q = GpuGroup(node, gpus).queue_name
                fake.add_queue(q)
                infos.append(WorkerInfo(
                    queue=q, node=node, gpus=gpus, engine="sim", host=socket.gethostname(),
                    pid=os.getpid(), started_at=time.time(), heartbeat_at=time.time(),
                    time_scale=time_scale,
                ))  # fmt: skip
            threading.Thread(target=heartbeats, args=(url, infos, hb_stop), daemon=True).start()
        t0 = time.monotonic()
        try:
            st = job.wait(timeout=600)
        finally:
            wall = time.monotonic() - t0
            stop.set()
            hb_stop.set()
            th.join(5)
            if fake is not None:
                fake.stop()
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        return {
            "planned": float(st["planned_makespan_s"]),
            "actual": float(st["actual_makespan_s"]),
            "wall": wall,
            "outputs": float(st.get("outputs_committed", 0)),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--time-scale", type=float, default=1.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: list[tuple[int, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode in ("celery", "inproc"):
                rows.append((i, mode, run_once(mode, args.time_scale, Path(tmp))))
    print(f"app {APP.relative_to(ROOT)} on {CLUSTER.relative_to(ROOT)}, "
          f"time scale {args.time_scale}")  # fmt: skip
    print(f"{'rep':>3} {'mode':<7} {'planned_s':>9} {'actual_s':>9} {'wall_s':>7} {'outputs':>7}")
    for i, mode, m in rows:
        print(f"{i:>3} {mode:<7} {m['planned']:>9.3f} {m['actual']:>9.3f} {m['wall']:>7.2f} "
              f"{m['outputs']:>7.0f}")  # fmt: skip
    pcts = []
    for i in range(args.repeats):
        a = next(m for j, mode, m in rows if j == i and mode == "celery")
        b = next(m for j, mode, m in rows if j == i and mode == "inproc")
        pcts.append((a["actual"] / b["actual"] - 1.0) * 100.0)
        print(f"rep {i}: overhead (celery/inproc - 1) = {pcts[-1]:+.2f} %")
    print(f"overhead_pct={statistics.mean(pcts):.2f}")


if __name__ == "__main__":
    main()
