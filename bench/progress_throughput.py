"""Progress-event throughput: how many ProgressEvents per second the coordinator folds.

A private Redis and a :class:`coordinator.service.Coordinator` (in this process) accept
examples/runtime/three_models.yaml with no workers, so the job is planned and its
:class:`~coordinator.runner.JobRun` exists but nothing is dispatched. Then ``--events``
synthetic ProgressEvents (``--keys`` running requests each, spread over 4 fake tasks with
increasing seq) are written with pipelined XADD to the job's progress stream, and the
coordinator's own loop body (``_read`` = XREADGROUP count 1000 over every stream + fold +
XACK, then ``_tick``) is timed until every event is folded. Writing is timed separately.

Usage: python bench/progress_throughput.py [--events 50000] [--keys 32]. Last line
``progress_events_per_s=<x>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.client import Client  # noqa: E402
from coordinator.messages import ProgressEvent  # noqa: E402
from coordinator.redis_server import RedisServer  # noqa: E402
from coordinator.service import Coordinator  # noqa: E402
from coordinator.settings import load_settings  # noqa: E402
from coordinator.store import JobKeys  # noqa: E402

APP = ROOT / "examples/runtime/three_models.yaml"
CLUSTER = ROOT / "examples/clusters/a100x2.yaml"
TASKS = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--keys", type=int, default=32, help="running requests per event")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with RedisServer.start() as rs:
        coord = Coordinator(rs.url, load_settings().default_lengths)
        stop = threading.Event()
        th = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
        th.start()
        job = Client(rs.url).submit(APP, cluster=CLUSTER)
        end = time.time() + 60
        while job.id not in coord.runs and time.time() < end:
            time.sleep(0.02)
        stop.set()
        th.join(5)  # the loop is driven below, in this thread
        run = coord.runs[job.id]
        keys = [k for ks in run.job.unit_keys for k in ks][: args.keys]
        folded = 0
        orig = run.on_progress

        def counting(fields):  # type: ignore[no-untyped-def]
            nonlocal folded
            folded += 1
            orig(fields)

        run.on_progress = counting  # type: ignore[method-assign]
        stream = JobKeys(job.id).progress
        t0 = time.perf_counter()
        pipe = coord.r.pipeline(transaction=False)
        for i in range(args.events):
            ev = ProgressEvent(
                job_id=job.id, task_id=f"t{i % TASKS}", queue="samullm.n0.gpu0", seq=i // TASKS,
                engine_s=i * 0.01, steps=i, step_latency_s=0.02,
                tokens={k: i // TASKS for k in keys}, finished=(),
            )  # fmt: skip
            pipe.xadd(stream, {"data": ev.to_json()})
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while folded < args.events:
            coord._read(pending=False)
            coord._tick()
        fold_s = time.perf_counter() - t0
        ok = all(run.live[f"t{t}"].seq == (args.events - 1 - t) // TASKS for t in range(TASKS)
                 if (args.events - 1 - t) >= 0)  # fmt: skip
    print(f"events={args.events} keys/event={args.keys} tasks={TASKS}")
    print(f"write (pipelined XADD, 1 client): {write_s:.2f} s = {args.events / write_s:,.0f} ev/s")
    print(f"coordinator read+fold+ack+tick:   {fold_s:.2f} s = {args.events / fold_s:,.0f} ev/s"
          f" (final seq per task correct: {ok})")  # fmt: skip
    print(f"progress_events_per_s={args.events / fold_s:.0f}")


if __name__ == "__main__":
    main()
