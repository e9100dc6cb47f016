"""Fixtures for worker tests: a tiny local Llama for the ``vllm_cpu`` tests.

``vllm_cpu`` tests are skipped with a reason when ``import vllm`` fails, so the default test run
works without the CPU vLLM environment (docs: cpu-vllm.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# NOTE(check): one OpenMP thread, set before torch is imported. vLLM's CPU backend otherwise
# uses every core, and on a small shared machine its steps slow down 2-10x whenever another
# process runs, which makes timing tests flaky.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `tests.tiny_model` and `bench` are not installed packages
    sys.path.insert(0, str(REPO_ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``vllm_cpu`` tests when vLLM is not installed (cheap: no import at collection)."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vllm is not installed (CPU vLLM environment, cpu-vllm.md)")
    for item in items:
        if item.get_closest_marker("vllm_cpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_ready() -> None:
    """Skip the requesting test when ``import vllm`` fails (e.g. a CUDA-linked torchvision)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
        pytest.skip(f"import vllm failed: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny random Llama and tokenizer built once per test session (a few seconds)."""
    from tests.tiny_model import build

    yield str(build(tmp_path_factory.mktemp("tiny-llama"), "tiny"))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The ~13 M-parameter "small" random Llama: step times dominated by model work, not by
    Python overhead, so timing checks are steadier than with the tiny one."""
    from tests.tiny_model import build

    yield str(build(tmp_path_factory.mktemp("small-llama"), "small"))
