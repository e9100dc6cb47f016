"""Entry point of one worker process: ``python -m workers.main --gpus 0,1 ...``.

``samullm worker`` execs this module with ``CUDA_VISIBLE_DEVICES`` already set to the group's
GPUs, so nothing here (or in vLLM, imported lazily by the engine) can see other devices. The
process announces itself in ``samullm:workers`` from a forked heartbeat process, then runs a
Celery worker with the solo pool on exactly its group's queue (``samullm.<node>.gpu<range>``).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from coordinator.messages import WorkerInfo, celery_config
from coordinator.store import WORKERS, connect

DEFAULT_VISIBILITY_S = 6 * 3600.0  # s; above the longest stage the coordinator will send
HEARTBEAT_S = 1.0  # s between heartbeats


def queue_name(node: str, gpus: Sequence[int]) -> str:
    """``samullm.<node>.gpu<range>`` (the same rule as planning.cluster.GpuGroup.queue_name)."""
    from planning.cluster import GpuGroup

    return GpuGroup(node, tuple(gpus)).queue_name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options of one worker (see ``samullm worker --help``)."""
    p = argparse.ArgumentParser(prog="samullm worker")
    p.add_argument("--gpus", required=True, help="GPU indices of the group, e.g. 0,1")
    p.add_argument("--node", default=socket.gethostname().split(".")[0])
    p.add_argument("--engine", choices=("sim", "vllm"), default="sim")
    p.add_argument("--broker", required=True, help="redis://[:password@]host:port/db")
    p.add_argument("--time-scale", type=float, default=1.0, help="sim: real s per simulated s")
    p.add_argument("--truth", default=None, help="sim: truth file (docs/runtime.md)")
    p.add_argument("--visibility-timeout", type=float, default=DEFAULT_VISIBILITY_S)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="vllm: CUDA GPUs or CPU cores as devices (auto: cuda if a driver is there)")
    p.add_argument("--cores-per-device", type=int, default=1, help="vllm on cpu: cores per device")
    p.add_argument("--loglevel", default="INFO")
    args = p.parse_args(argv)
    try:
        args.gpus = tuple(int(g) for g in str(args.gpus).split(","))
    except ValueError:
        p.error(f"--gpus: expected comma-separated integers, got {args.gpus!r}")
    if len(set(args.gpus)) != len(args.gpus) or min(args.gpus) < 0:
        p.error(f"--gpus: indices must be distinct and >= 0, got {args.gpus}")
    return args


def _heartbeat(
    args: argparse.Namespace, queue: str, ready: Any, stop: Any, consuming: Any
) -> None:
    """Refresh the worker's :class:`WorkerInfo` every HEARTBEAT_S, from a forked child process.

    A process of its own, so a worker busy in Python (an engine load, a long step) never misses a
    beat for want of the GIL. It waits for ``ready`` (the worker is set up), says ``consuming``
    once Celery consumes the queue (a job's tasks then start at once), stops with
    ``stop`` (removing the entry) and exits on its own when the worker dies (the beat stops, the
    coordinator sees the worker lost).
    """
    worker_pid = os.getppid()
    r = connect(args.broker)
    while not ready.wait(HEARTBEAT_S):
        if os.getppid() != worker_pid:
            return
    started = time.time()
    while not stop.is_set():
        if os.getppid() != worker_pid:  # the worker died (SIGKILL): no goodbye
            return
        info = WorkerInfo(
            queue=queue, node=args.node, gpus=args.gpus, engine=args.engine,
            host=socket.gethostname(), pid=worker_pid, started_at=started,
            heartbeat_at=time.time(),
            time_scale=args.time_scale if args.engine == "sim" else None,
            consuming=consuming.is_set(),
        )  # fmt: skip
        try:
            r.hset(WORKERS, queue, info.to_json())
        except Exception:  # noqa: BLE001 - Redis down: retry at the next beat
            logging.getLogger(__name__).warning("heartbeat failed", exc_info=True)
        # the next beat at once when Celery starts consuming, else after HEARTBEAT_S
        if info.consuming:
            stop.wait(HEARTBEAT_S)
        else:
            consuming.wait(HEARTBEAT_S)
    r.hdel(WORKERS, queue)


def main(argv: Sequence[str] | None = None) -> None:
    """Start the heartbeat and the Celery worker of one GPU group."""
    args = parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(message)s")
    queue = queue_name(args.node, args.gpus)
    # Forked now, before torch or vLLM is imported (neither survives a fork well).
    ctx = multiprocessing.get_context("fork")
    ready, stop, consuming = ctx.Event(), ctx.Event(), ctx.Event()
    beat = ctx.Process(target=_heartbeat, args=(args, queue, ready, stop, consuming),
                       daemon=True)  # fmt: skip
    beat.start()
    if args.engine == "vllm":
        from workers import devices

        try:
            placement = devices.place(args.gpus, args.device, args.cores_per_device)
        except ValueError as e:
            raise SystemExit(f"samullm worker: {e}") from None
        devices.apply(placement)
        logging.getLogger(__name__).info("vLLM worker placement: %s", placement)
        # Import vLLM (5-7 s) before announcing the worker, so the first stage's time is the
        # engine load the planner expects, not the import.
        from workers.engines.vllm_engine import preload

        preload()
    from workers import celery_app
    from workers.engines.cache import EngineCache
    from workers.engines.factory import build_engine
    from workers.truth import TruthWorld, load_truth

    truth = TruthWorld(load_truth(args.truth)) if args.engine == "sim" else None
    if truth is not None:  # read the truth's files now, not inside the first task
        truth.preload()

    def builder(key):  # type: ignore[no-untyped-def]
        return build_engine(args.engine, key, truth=truth, time_scale=args.time_scale)

    state = celery_app.WorkerState(queue, args.broker, EngineCache(builder), truth)
    config = celery_config(args.broker, visibility_timeout_s=args.visibility_timeout)
    celery_app.configure(state, config)
    from celery.signals import worker_ready

    worker_ready.connect(lambda **_: consuming.set(), weak=False)
    ready.set()
    try:
        celery_app.app.worker_main([
            "worker", "-Q", queue, "-P", "solo", "-c", "1", "--prefetch-multiplier", "1",
            "-n", f"{queue}@%h", "--without-gossip", "--without-mingle", "-l", args.loglevel,
        ])  # fmt: skip
    finally:
        stop.set()
        beat.join(timeout=2 * HEARTBEAT_S)
        if beat.is_alive():
            beat.kill()


if __name__ == "__main__":
    main()
