"""Cluster files (YAML or JSON), validated with pydantic and converted to planning's ``Cluster``.

A cluster file lists nodes; each names its GPU type (one of ``planning.profile.KNOWN_GPUS``), its
GPU count and its NVLink islands, either explicitly or as a uniform island size::

    nodes:
      - {name: n0, gpu: A100-80GB, num_gpus: 8, nvlink_islands: [[0, 1], [2, 3], [4, 5], [6, 7]]}
      - {name: n1, gpu: A100-80GB, num_gpus: 4, island_size: 4}

Every error is a :class:`SpecError` whose message names the file and the field path, e.g.
``examples/clusters/x.yaml: nodes[0].num_gpus: Input should be greater than 0``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from planning.cluster import Cluster, Node
from planning.profile import KNOWN_GPUS


class SpecError(ValueError):
    """An application or cluster file is invalid; the message names the file and field."""


class NodeSpec(BaseModel):
    """One node of a cluster file."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(min_length=1)
    gpu: str  # a key of KNOWN_GPUS
    num_gpus: int = Field(gt=0)
    nvlink_islands: list[list[int]] | None = None  # local GPU indices per island
    island_size: int | None = Field(default=None, gt=0)  # uniform contiguous islands

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        if v not in KNOWN_GPUS:
            raise ValueError(f"unknown GPU type {v!r} (known: {', '.join(sorted(KNOWN_GPUS))})")
        return v

    @field_validator("nvlink_islands")
    @classmethod
    def _islands_cover(cls, v: list[list[int]] | None, info: ValidationInfo) -> Any:
        n = info.data.get("num_gpus")
        if v is None or n is None:
            return v
        flat = [i for island in v for i in island]
        if any(not island for island in v):
            raise ValueError("empty island")
        if sorted(flat) != list(range(n)):
            dup = sorted({i for i in flat if flat.count(i) > 1})
            missing = sorted(set(range(n)) - set(flat))
            extra = sorted({i for i in flat if not 0 <= i < n})
            raise ValueError(
                f"islands must cover GPUs 0..{n - 1} exactly once "
                f"(missing {missing}, repeated {dup}, out of range {extra})"
            )
        return v

    @field_validator("island_size")
    @classmethod
    def _size_divides(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("num_gpus")
        if v is not None and n is not None and n % v:
            raise ValueError(f"island_size {v} does not divide num_gpus {n}")
        return v

    def islands(self) -> tuple[tuple[int, ...], ...]:
        """Islands as planning wants them."""
        if self.nvlink_islands is not None:
            return tuple(tuple(i) for i in self.nvlink_islands)
        size = self.island_size if self.island_size is not None else self.num_gpus
        return tuple(tuple(range(s, s + size)) for s in range(0, self.num_gpus, size))


class ClusterSpec(BaseModel):
    """A cluster file."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    nodes: list[NodeSpec] = Field(min_length=1)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def spec_error(e: ValidationError, where: str) -> SpecError:
    """One error naming ``where`` and the field path of every pydantic problem."""
    msgs = []
    for err in e.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        msgs.append(f"{where}: {_loc(tuple(err['loc']))}: {msg}")
    return SpecError("; ".join(msgs))


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{path}: invalid YAML{at}: {problem}") from None


def parse_cluster(doc: Any, where: str) -> Cluster:
    """Validate a parsed cluster document; ``where`` names the file in errors.

    Raises:
        SpecError: naming ``where`` and the field path of each problem.
    """
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: expected a mapping with a 'nodes' list at the top level")
    try:
        spec = ClusterSpec.model_validate(doc)
    except ValidationError as e:
        raise spec_error(e, where) from None
    seen: dict[str, int] = {}
    for i, node in enumerate(spec.nodes):
        if node.nvlink_islands is not None and node.island_size is not None:
            raise SpecError(f"{where}: nodes[{i}]: give nvlink_islands or island_size, not both")
        if node.nvlink_islands is None and node.island_size is None:
            raise SpecError(f"{where}: nodes[{i}]: give nvlink_islands or island_size")
        if node.name in seen:
            raise SpecError(
                f"{where}: nodes[{i}].name: duplicate node name {node.name!r} "
                f"(also nodes[{seen[node.name]}])"
            )
        seen[node.name] = i
    try:
        return Cluster(tuple(Node(n.name, n.gpu, n.num_gpus, n.islands()) for n in spec.nodes))
    except ValueError as e:  # checked above; kept so no raw error escapes
        raise SpecError(f"{where}: {e}") from None


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster file (``.json`` as JSON, anything else as YAML).

    Raises:
        SpecError: missing or unreadable file, bad YAML/JSON, or an invalid field (the message
            names the file and the field path).
    """
    p = Path(path)
    return parse_cluster(_read(p), str(p))
