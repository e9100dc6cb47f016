"""Fixtures of the runtime chaos tests: a private Redis, sim workers and a coordinator per test.

Everything is real (reliability.md §2): ``redis-server`` on loopback (a fresh one per test, so
jobs never mix), ``samullm worker`` subprocesses on the sim engine, each in its own process group
with its own log file, and the coordinator either in a thread of the test process (when the test
needs its :class:`~coordinator.runner.JobRun`) or as a subprocess (when the test kills it).
Every process a test starts is stopped by its own PID (group) at teardown: SIGTERM, a short wait,
then SIGKILL (Celery's warm shutdown would wait for the running stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.client import Client, Job
from coordinator.redis_server import RedisServer
from coordinator.service import Coordinator
from coordinator.settings import load_settings
from coordinator.store import WORKERS, JobKeys, decode
from workers.main import queue_name

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "runtime" / "three_models.yaml"
CLUSTER = ROOT / "examples" / "clusters" / "a100x2.yaml"
QUESTIONS = ROOT / "examples" / "runtime" / "data" / "questions.jsonl"
LENGTHS = load_settings().default_lengths
TERM_WAIT_S = 3.0  # s between SIGTERM and SIGKILL at teardown
ANNOUNCE_TIMEOUT_S = 30.0  # s for a worker to appear in the workers hash


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); fail after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@dataclass
class Proc:
    """A subprocess in its own process group, logging to ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group this test started (pgid == pid)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group and reap the leader."""
        self.signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, wait up to TERM_WAIT_S, then SIGKILL."""
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=TERM_WAIT_S)
        self.signal_group(signal.SIGKILL)  # stragglers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class InProcessCoordinator:
    """A :class:`Coordinator` serving in a thread; :meth:`call` runs code inside its loop."""

    coord: Coordinator
    thread: threading.Thread
    stop_event: threading.Event
    calls: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = field(
        default_factory=queue.Queue
    )

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the coordinator's thread between two ticks (no data race); its value."""
        reply: queue.Queue[Any] = queue.Queue()
        self.calls.put((fn, reply))
        ok, value = reply.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)


class Stack:
    """One test's Redis, workers and coordinator (see the module docstring)."""

    def __init__(self, server: RedisServer, tmp: Path) -> None:
        self.server = server
        self.url = server.url
        self.tmp = tmp
        self.r = redis.Redis.from_url(self.url, socket_timeout=10)
        self.procs: list[Proc] = []
        self.coordinators: list[InProcessCoordinator] = []

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log = self.tmp / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def worker(
        self, gpus: str, *, time_scale: float, node: str = "n0", truth: Path | None = None
    ) -> Proc:
        """Start ``samullm worker --gpus GPUS --node NODE`` on the sim engine (``truth``: a
        truth file, e.g. a model's steps slower than believed)."""
        argv = [sys.executable, "-m", "coordinator.cli", "worker", "--gpus", gpus,
                "--node", node, "--broker", self.url, "--time-scale", str(time_scale),
                "--loglevel", "INFO"] + (["--truth", str(truth)] if truth else [])  # fmt: skip
        return self._spawn(f"worker-{node}-gpu{gpus.replace(',', '-')}", argv)

    def coordinator_process(self) -> Proc:
        """Start ``samullm coordinator`` as a subprocess."""
        n = sum(1 for p in self.procs if p.name.startswith("coordinator"))
        argv = [sys.executable, "-m", "coordinator.cli", "coordinator", "--broker", self.url]
        return self._spawn(f"coordinator-{n}", argv)

    def coordinator_thread(self) -> InProcessCoordinator:
        """Start a :class:`Coordinator` serving in a thread of the test process."""
        coord = Coordinator(self.url, LENGTHS)
        stop = threading.Event()
        holder: dict[str, InProcessCoordinator] = {}
        tick = coord._tick

        def tick_with_calls() -> None:
            calls = holder["c"].calls
            while not calls.empty():
                fn, reply = calls.get_nowait()
                try:
                    reply.put((True, fn()))
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    reply.put((False, e))
            tick()

        coord._tick = tick_with_calls  # type: ignore[method-assign]
        thread = threading.Thread(target=coord.serve, args=(stop,), daemon=True,
                                  name="coordinator")  # fmt: skip
        ipc = InProcessCoordinator(coord, thread, stop)
        holder["c"] = ipc
        thread.start()
        self.coordinators.append(ipc)
        return ipc

    def wait_workers(self, *gpu_groups: str, node: str = "n0") -> None:
        """Block until every group's worker announced itself in ``samullm:workers``."""
        queues = {queue_name(node, [int(g) for g in gs.split(",")]) for gs in gpu_groups}

        def announced() -> bool:
            dead = [p for p in self.procs if p.popen.poll() is not None]
            if dead:
                pytest.fail(f"{dead[0].name} exited early:\n{dead[0].text()[-3000:]}")
            return queues <= {decode(q) for q in self.r.hkeys(WORKERS)}

        wait_until(announced, ANNOUNCE_TIMEOUT_S, f"workers {sorted(queues)}", every=0.1)

    def close(self) -> None:
        for c in self.coordinators:
            c.stop()
        for p in self.procs:
            p.stop()

    # ------------------------------------------------------------------ jobs
    def submit(self, app: Path = APP, cluster: Path = CLUSTER) -> Job:
        return Client(self.url).submit(app, cluster=cluster)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``samullm ARGS --broker URL`` as a subprocess."""
        argv = [sys.executable, "-m", "coordinator.cli", *args, "--broker", self.url]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def events(self, job_id: str) -> list[tuple[str, dict[str, str]]]:
        """The job's event stream: (entry id, decoded fields)."""
        return [
            (decode(i), {decode(k): decode(v) for k, v in f.items()})
            for i, f in self.r.xrange(JobKeys(job_id).events)
        ]

    def commits(self, job_id: str) -> list[str]:
        """Request keys of the ``commit`` events, in stream order (duplicates kept)."""
        return [f["key"] for _, f in self.events(job_id) if f.get("type") == "commit"]

    def stats(self, job_id: str) -> dict[str, int]:
        raw = self.r.hgetall(JobKeys(job_id).stats)
        return {decode(k): int(v) for k, v in raw.items()}

    def outputs(self, job_id: str) -> dict[str, dict[str, Any]]:
        """The ``out`` hash: request key -> RequestOutput as a dict."""
        raw = self.r.hgetall(JobKeys(job_id).out)
        return {decode(k): json.loads(v) for k, v in raw.items()}

    def logs(self) -> str:
        """Every subprocess log, for failure messages."""
        return "\n".join(f"==== {p.name}\n{p.text()[-4000:]}" for p in self.procs)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A fresh Redis for this test plus the process bookkeeping; everything stopped after it."""
    with RedisServer.start() as server:
        s = Stack(server, tmp_path)
        try:
            yield s
        finally:
            s.close()
