"""Package boundaries: planning is pure, the coordinator never imports workers, vllm stays in
one module. Checked both in a fresh interpreter (what importing pulls in) and by reading the
source (what a module could pull in on some code path)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("celery", "redis", "vllm", "torch", "pydantic", "matplotlib", "yaml", "kombu")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _core_planning_files() -> list[Path]:
    return [p for p in (ROOT / "planning").glob("*.py")]


def test_importing_planning_pulls_in_nothing_heavy() -> None:
    mods = [f"planning.{p.stem}" for p in _core_planning_files() if p.stem != "__init__"]
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not [m for m in HEAVY if m in loaded]
    assert "planning.io" not in loaded  # the core never reaches for its file edge


@pytest.mark.parametrize("path", _core_planning_files(), ids=lambda p: p.name)
def test_planning_core_is_stdlib_and_numpy_only(path: Path) -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "planning"}
    for name in _imports(path):
        top = name.split(".")[0]
        assert top in allowed, f"{path.name} imports {name}"
        assert not name.startswith("planning.io"), f"{path.name} imports the I/O edge"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("open", "print", "input"), f"{path.name}: {node.func.id}"
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            raise AssertionError(f"{path.name} uses .{node.attr} (no env reads)")
        if isinstance(node, ast.Attribute) and node.attr == "seed" and _is_random(node.value):
            raise AssertionError(f"{path.name} seeds a global generator")


def _is_random(node: ast.expr) -> bool:
    """``random`` or ``<x>.random`` (``random.seed``, ``np.random.seed``)."""
    return (isinstance(node, ast.Name) and node.id == "random") or (
        isinstance(node, ast.Attribute) and node.attr == "random"
    )


def test_coordinator_never_imports_workers_and_only_one_module_imports_vllm() -> None:
    for path in ROOT.glob("coordinator/**/*.py"):
        assert not any(n.split(".")[0] == "workers" for n in _imports(path)), path
    vllm_users = [p.relative_to(ROOT).as_posix() for pkg in ("coordinator", "workers", "planning",
                                                             "apps")
                  for p in ROOT.glob(f"{pkg}/**/*.py")
                  if any(n.split(".")[0] == "vllm" for n in _imports(p))]
    assert vllm_users in ([], ["workers/engines/vllm_engine.py"])


def test_coordinator_and_apps_import_no_torch_or_vllm() -> None:
    """The coordinator (service, client, CLI) and apps run where torch and vllm are absent."""
    mods = ["coordinator.cli", "coordinator.service", "coordinator.client", "coordinator.local",
            "apps.app_spec"]
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not {"torch", "vllm", "workers"} & {m.split(".")[0] for m in loaded}


def test_workers_import_only_messages_and_store_from_the_coordinator() -> None:
    """Workers share the wire schemas and the ledger, nothing else of the coordinator."""
    allowed = {"coordinator.messages", "coordinator.store", "coordinator.settings"}
    for path in ROOT.glob("workers/**/*.py"):
        used = {n for n in _imports(path) if n.split(".")[0] == "coordinator"}
        assert used <= allowed, f"{path.relative_to(ROOT)} imports {sorted(used - allowed)}"
