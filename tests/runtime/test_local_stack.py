"""A killed ``samullm run`` takes its coordinator and workers with it (no orphan keeps running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.runtime.conftest import APP, CLUSTER, ROOT, wait_until

pytestmark = pytest.mark.chaos


def _role(cmd: str) -> str:
    """coordinator, worker (before or after `samullm worker` execs workers.main), or ""."""
    if "workers.main" in cmd or "coordinator.cli worker" in cmd:
        return "worker"
    return "coordinator" if "coordinator.cli coordinator" in cmd else ""


def test_sigkilled_run_leaves_no_coordinator_or_worker(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "coordinator.cli", "run", str(APP), "--cluster", str(CLUSTER),
            "--time-scale", "1", "--json", "--out", str(tmp_path / "r.jsonl")]  # fmt: skip
    run = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(run.pid)

    def stack() -> list[psutil.Process]:
        """The coordinator and the workers, once all run: on sim workers one per aligned group
        of the 2-GPU island (gpu0, gpu1, gpu0-1; a re-plan may use any of them)."""
        roles = {}
        for k in parent.children():
            try:
                roles[k] = _role(" ".join(k.cmdline()))
            except psutil.Error:  # a child that just exited (a zombie until reaped)
                continue
        kids = [k for k, role in roles.items() if role]
        found = list(roles.values())
        return kids if found.count("worker") == 3 and "coordinator" in found else []

    try:
        python_kids = wait_until(stack, 60, "the coordinator and the workers")
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        gone, alive = psutil.wait_procs(python_kids, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        assert len(gone) >= 4  # the coordinator and three workers
    finally:
        for k in psutil.Process().children(recursive=True):
            k.kill()
        time.sleep(0.1)
