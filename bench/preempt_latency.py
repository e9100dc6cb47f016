"""Preemption latency: control key written -> the task's ``result`` event (status stopped).

A private Redis, the coordinator in this process (a thread) and one ``samullm worker --engine
sim`` subprocess per GPU group run examples/runtime/three_models.yaml at a small time scale.
While the job runs, a running task is preempted through the coordinator's own
``JobRun.preempt`` (which writes the task's durable control key); the latency is from just before
that call to the Redis timestamp of the task's ``result`` event in the job's event stream (same
host clock). The coordinator moves the task's unfinished requests to a new task (recovery), and
the next preemption targets a task that is running again, until ``--n`` are done.

Goal (issue): within one engine step + 200 ms. A sim engine step call lasts about ``tick_s`` =
20 ms of real time (several simulated iterations), so the bound is ~220 ms.

Usage: python bench/preempt_latency.py [--n 5] [--time-scale 0.2]. Last line
``preempt_p50_ms=<x>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.client import Client  # noqa: E402
from coordinator.redis_server import RedisServer  # noqa: E402
from coordinator.service import Coordinator  # noqa: E402
from coordinator.settings import load_settings  # noqa: E402
from coordinator.store import JobKeys, decode  # noqa: E402

APP = ROOT / "examples/runtime/three_models.yaml"
CLUSTER = ROOT / "examples/clusters/a100x2.yaml"


def result_at(r, events: str, task_id: str, timeout: float) -> tuple[float, str] | None:  # type: ignore[no-untyped-def]
    """(unix s of the task's result event, its status), polling the event stream."""
    end = time.time() + timeout
    last = "0"
    while time.time() < end:
        for entry_id, f in r.xrange(events, min=f"({last}" if last != "0" else "-"):
            last = decode(entry_id)
            if decode(f.get(b"type", b"")) == "result" and decode(f.get(b"task", b"")) == task_id:
                status = json.loads(f[b"data"])["status"]
                return int(last.split("-")[0]) / 1000.0, status
        time.sleep(0.002)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--time-scale", type=float, default=0.2)
    p.add_argument("--gap", type=float, default=0.3, help="s the new task runs before the next")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lat_ms: list[float] = []
    statuses: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer.start() as rs:
        url = rs.url
        coord = Coordinator(url, load_settings().default_lengths)
        stop = threading.Event()
        th = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
        th.start()
        job = Client(url).submit(APP, cluster=CLUSTER)
        while job.plan() is None:
            time.sleep(0.05)
        plan = job.plan() or {}
        groups = sorted({(g["node"], tuple(g["gpus"])) for a in plan["assignments"]
                         for g in a["gpu_groups"]})  # fmt: skip
        procs = []
        for node, gpus in groups:
            g = ",".join(map(str, gpus))
            log = open(Path(tmp) / f"w{g}.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli", "worker", "--gpus", g, "--node", node,
                 "--engine", "sim", "--time-scale", str(args.time_scale), "--broker", url,
                 "--loglevel", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            ))  # fmt: skip
        events = JobKeys(job.id).events
        try:
            deadline = time.time() + 300
            while len(lat_ms) < args.n and time.time() < deadline:
                run = coord.runs.get(job.id)
                if run is None:
                    break  # job finished
                # a task that has run a while (engine loaded and stepping)
                cands = [t for t in list(run.tasks.values()) if t.status == "running"
                         and t.task_id in run.live]  # fmt: skip
                if not cands:
                    time.sleep(0.02)
                    continue
                rec = cands[0]
                time.sleep(args.gap)
                if rec.status != "running":
                    continue
                t_sig = time.time()
                run.preempt(rec.task_id, "bench")
                got = result_at(coord.r, events, rec.task_id, timeout=30)
                if got is None:
                    print(f"task {rec.task_id}: no result in 30 s")
                    continue
                lat_ms.append((got[0] - t_sig) * 1000.0)
                statuses.append(got[1])
                print(f"preempt {len(lat_ms)}: task {rec.task_id} on {rec.queue}: "
                      f"{lat_ms[-1]:.1f} ms ({got[1]})", flush=True)  # fmt: skip
            st = job.wait(timeout=300)
            print(f"job {st['status']}: {st.get('outputs_committed')} outputs, actual "
                  f"{float(st.get('actual_makespan_s', 0)):.2f} s (planned "
                  f"{float(st['planned_makespan_s']):.2f} s) at time scale {args.time_scale}")
        finally:
            stop.set()
            th.join(5)
            for pr in procs:
                os.killpg(pr.pid, signal.SIGTERM)
            for pr in procs:
                try:
                    pr.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(pr.pid, signal.SIGKILL)
    if not lat_ms:
        print("preempt_p50_ms=nan")
        return
    print(f"n={len(lat_ms)} statuses={sorted(set(statuses))} p50={statistics.median(lat_ms):.1f} "
          f"ms max={max(lat_ms):.1f} ms (goal: one engine step ~20 ms real + 200 ms)")
    print(f"preempt_p50_ms={statistics.median(lat_ms):.1f}")


if __name__ == "__main__":
    main()
