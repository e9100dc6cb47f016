"""Builds the engine a worker runs: the sim engine on virtual GPUs, vLLM on real ones.

vLLM is never imported here: ``kind="vllm"`` imports :mod:`workers.engines.vllm_engine` only
when called, and that module imports vllm inside its functions.
"""

from __future__ import annotations

import importlib
from typing import Literal

from workers.engines.base import Engine, EngineKey
from workers.engines.sim_engine import SimEngine
from workers.truth import TruthWorld

EngineKind = Literal["sim", "vllm"]


def build_engine(
    kind: EngineKind, key: EngineKey, *, truth: TruthWorld | None, time_scale: float
) -> Engine:
    """Load an engine for ``key``; called when the worker's cache holds no engine for it.

    Args:
        kind: "sim" (virtual GPU, needs ``truth``) or "vllm" (real GPUs).
        key: the engine configuration.
        truth: the simulated world (sim only).
        time_scale: real seconds per simulated second (sim only; 0 = no sleeping).

    Raises:
        ValueError: unknown ``kind``, or "sim" without ``truth``.
        workers.engines.vllm_engine.ModelFolderError: "vllm" with a local model path that is
            missing or not a causal LM (checked before vLLM is imported).
    """
    if kind == "sim":
        if truth is None:
            raise ValueError("the sim engine needs a truth (TruthWorld)")
        return SimEngine(key, truth, time_scale)
    if kind == "vllm":
        return _vllm_engine(key)
    raise ValueError(f"unknown engine kind {kind!r}; expected 'sim' or 'vllm'")


def _vllm_engine(key: EngineKey) -> Engine:
    module = importlib.import_module("workers.engines.vllm_engine")
    engine: Engine = module.VllmEngine(key)
    return engine
