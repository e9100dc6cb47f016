"""The simulated world's ground truth: real output lengths and real step latencies.

The planner predicts serving times from *sampled* output lengths and *profiled* step costs. On
virtual GPUs the sim engine needs the outcome the planner could not know: what each request
really generates and how long each engine step really takes. :class:`Truth` says where that
comes from (its own seed, length pmfs and profile set, and per-model distortions), and
:class:`TruthWorld` answers the sim engine's questions, loading the files once per process.

Independence from the planner is by construction: a truth length is drawn from a generator
seeded with ``sha256(f"{seed}|{model}|{key}")`` (one stream per request key), while the
planner samples whole length vectors from one generator seeded with the planner's seed.

A truth file (YAML, or JSON by suffix) looks like::

    seed: 7                      # default 20261123
    lengths: pdfs.json           # default: the shared authors' pdfs
    profiles: my_profiles.json   # default: the shipped profile set
    steps: measured              # default profile: the profile set's step model
    iterations: latencies.csv.gz # steps: measured; default: the shared A100 iteration records
    load: measured               # default profile: the profile's load time
    load_times: loads.json       # load: measured; default: the shared A100 load-time records
    scheduler: legacy030         # default v1: how the virtual engine batches (vLLM 0.3.0 or V1)
    models:
      lmsys/vicuna-13b-v1.5: {length_scale: 2.0, latency_scale: 1.3}

Relative paths are taken from the truth file's folder.

``steps: measured`` answers every step from the raw A100 measurements
(:mod:`workers.measured_steps`) instead of the fitted model the planner uses; ``load:
measured`` takes one of the recorded load times of the (model, tp), picked by the truth's seed
(the planner takes the fastest record of the preferred source); ``scheduler: legacy030`` replays
vLLM 0.3.0's batching (what the measurements were taken on). :data:`A100_MEASURED` is that
world: what ``bench/paper_repro.py`` runs.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apps.cluster_spec import SpecError, _read, spec_error
from coordinator.settings import load_settings
from planning.batching_sim import Mode
from planning.cost_model import StepCost
from planning.io.lengths import AuthorsPdfs, load_authors_pdfs
from planning.io.profiles import (
    LoadTime,
    ProfileError,
    load_default_profiles,
    read_load_entries,
    read_profiles,
)
from planning.length_dist import LengthDistribution
from planning.profile import (
    GpuSpec,
    ModelProfile,
    ProfileSet,
    UnknownModelError,
    scaled_profile,
)
from workers.measured_steps import Measured, MeasuredSteps, MeasuredStepsError, read_measured

DEFAULT_TRUTH_SEED = 20261123  # deliberately not the planner's seed (0)


class TruthError(ValueError):
    """The truth cannot answer for a model (no length pmf, no profile at this tp)."""


def _default_lengths() -> Path:
    return load_settings().default_lengths


@dataclass(frozen=True, slots=True)
class Truth:
    """Where the simulated world's outcomes come from (see the module docstring)."""

    seed: int = DEFAULT_TRUTH_SEED  # seeds every per-request length stream
    lengths_path: Path = field(default_factory=_default_lengths)  # authors-format pmfs (JSON)
    length_scale: Mapping[str, float] = field(default_factory=dict)  # model id -> x (default 1)
    latency_scale: Mapping[str, float] = field(default_factory=dict)  # model id -> x (default 1)
    profiles_path: Path | None = None  # samullm profile set; None = the shipped default
    steps: Literal["profile", "measured"] = "profile"  # step latency source
    iterations_path: Path | None = None  # raw iteration records; None = the shared A100 file
    load: Literal["profile", "measured"] = "profile"  # load time source
    load_times_path: Path | None = None  # load-time records; None = the shared A100 file
    scheduler: Mode = "v1"  # the virtual engine's batching semantics


# ------------------------------------------------------------------ truth file
class _ModelTruth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    length_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    latency_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)


class _TruthFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    seed: int = Field(default=DEFAULT_TRUTH_SEED, ge=0)
    lengths: str | None = Field(default=None, min_length=1)
    profiles: str | None = Field(default=None, min_length=1)
    models: dict[str, _ModelTruth] = Field(default_factory=dict)
    steps: Literal["profile", "measured"] = "profile"
    iterations: str | None = Field(default=None, min_length=1)
    load: Literal["profile", "measured"] = "profile"
    load_times: str | None = Field(default=None, min_length=1)
    scheduler: Literal["v1", "legacy030"] = "v1"


def load_truth(path: str | Path | None) -> Truth:
    """The truth described by ``path`` (YAML or JSON), or the default truth for None.

    Raises:
        SpecError: "<file>: <field>: <problem>" for an unreadable or invalid file, or a
            ``lengths``/``profiles`` path that does not exist.
    """
    if path is None:
        return Truth()
    path = Path(path)
    doc = _read_doc(path)
    try:
        spec = _TruthFile.model_validate({} if doc is None else doc)
    except ValidationError as e:
        raise spec_error(e, str(path)) from None
    base = path.parent
    return Truth(
        seed=spec.seed,
        lengths_path=_existing(base, spec.lengths, path, "lengths") or _default_lengths(),
        length_scale={m: t.length_scale for m, t in spec.models.items()},
        latency_scale={m: t.latency_scale for m, t in spec.models.items()},
        profiles_path=_existing(base, spec.profiles, path, "profiles"),
        steps=spec.steps, iterations_path=_existing(base, spec.iterations, path, "iterations"),
        load=spec.load, load_times_path=_existing(base, spec.load_times, path, "load_times"),
        scheduler=spec.scheduler,
    )  # fmt: skip


def _read_doc(path: Path) -> Any:
    """The truth file's document (YAML or JSON, read like every spec file); a mapping or None."""
    doc = _read(path)
    if doc is not None and not isinstance(doc, dict):
        raise SpecError(f"{path}: top level: expected a mapping, got {type(doc).__name__}")
    return doc


def _existing(base: Path, value: str | None, where: Path, name: str) -> Path | None:
    if value is None:
        return None
    found = base / value
    if not found.is_file():
        raise SpecError(f"{where}: {name}: file not found: {found}")
    return found


# ------------------------------------------------------------------ the world
class TruthWorld:
    """Answers the sim engine's questions from one :class:`Truth`; build one per process.

    Length pmfs and the profile set are loaded on first use and kept; profiles are cached
    per (model, tp).
    """

    def __init__(self, truth: Truth) -> None:
        self.truth = truth
        self._pdfs: AuthorsPdfs | None = None
        self._profile_set: ProfileSet | None = None
        self._profiles: dict[tuple[str, int], ModelProfile] = {}
        self._like: dict[str, str] = {}  # model -> model whose pmf stands in for it
        self._measured: dict[tuple[str, int], Measured] | None = None
        self._steps: dict[tuple[str, int], StepCost] = {}
        self._loads: dict[tuple[str, int], list[LoadTime]] | None = None

    # -------------------------------------------------------------- lengths
    def length(
        self,
        model: str,
        key: str,
        prompt_tokens: int,
        max_tokens: int,
        max_model_len: int,
        ignore_eos: bool,
    ) -> int:
        """Tokens request ``key`` of ``model`` really generates in total (prefix included).

        Deterministic per (seed, model, key). The natural length (drawn, times the model's
        length scale, rounded) is clipped to ``[1, min(max_tokens, max_model_len -
        prompt_tokens)]``; with ``ignore_eos`` the request runs to that cap.

        Raises:
            TruthError: no length pmf for ``model`` (not needed with ``ignore_eos``).
        """
        cap = max(1, min(max_tokens, max_model_len - prompt_tokens))
        if ignore_eos:
            return cap
        return min(self.natural_length(model, key, prompt_tokens), cap)

    def natural_length(self, model: str, key: str, prompt_tokens: int) -> int:
        """Tokens the request would generate without any cap (at least 1)."""
        dist = self.distribution(model)
        digest = hashlib.sha256(f"{self.truth.seed}|{model}|{key}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        drawn = int(dist.sample(rng, 1, prompt_len=max(prompt_tokens, 0))[0])
        return max(1, round(drawn * self.truth.length_scale.get(model, 1.0)))

    def register_like(self, model: str, like: str) -> None:
        """Use ``like``'s pmf for ``model`` when the truth has none of its own (what the job's
        application declared with ``lengths: like:<model>``; the draws stay the truth's own)."""
        self._like[model] = like

    def distribution(self, model: str) -> LengthDistribution:
        """The model's output-length pmf, by id or short name (the last path component), else
        that of the model registered with :meth:`register_like`.

        Raises:
            TruthError: no (usable) pmf; the message says how to provide one.
        """
        pdfs = self._lengths()
        short = model.rstrip("/").rsplit("/", 1)[-1]
        for name in (model, short):
            if name in pdfs:
                return pdfs[name]
        if model in self._like and self._like[model] != model:
            return self.distribution(self._like[model])
        skipped = pdfs.skipped.get(model) or pdfs.skipped.get(short)
        close = difflib.get_close_matches(short, list(pdfs), n=3)
        hint = f": {skipped}" if skipped else (f" (close: {', '.join(close)})" if close else "")
        raise TruthError(
            f"truth: no output-length pdf for model {model!r} in {self.truth.lengths_path}{hint}; "
            "add it to that file or point the truth file's `lengths:` at one that has it"
        )

    def _lengths(self) -> AuthorsPdfs:
        if self._pdfs is None:
            self._pdfs = load_authors_pdfs(self.truth.lengths_path)
        return self._pdfs

    # -------------------------------------------------------------- profiles
    @property
    def profile_set(self) -> ProfileSet:
        """The truth's profile set (loaded on first use)."""
        if self._profile_set is None:
            path = self.truth.profiles_path
            self._profile_set = load_default_profiles() if path is None else read_profiles(path)
        return self._profile_set

    @property
    def gpu(self) -> GpuSpec:
        """The GPU type every truth profile was made for."""
        return self.profile_set.gpu

    def profile(self, model: str, tp: int) -> ModelProfile:
        """The real profile of ``model`` at ``tp``, its latencies times the latency scale.

        Stored profile, else the analytic one from the set's architecture of the model.

        Raises:
            TruthError: neither is known, or vLLM would refuse ``tp`` for the model.
        """
        got = self._profiles.get((model, tp))
        if got is None:
            scale = self.truth.latency_scale.get(model, 1.0)
            got = self._profiles[(model, tp)] = scaled_profile(self._resolve(model, tp), scale)
        return got

    def _resolve(self, model: str, tp: int) -> ModelProfile:
        ps = self.profile_set
        try:
            return ps.resolve(model, tp)
        except (UnknownModelError, ValueError) as e:
            where = self.truth.profiles_path or "the shipped default profile set"
            raise TruthError(
                f"truth: no profile for model {model!r} at tp={tp} in {where}: {e}; give the "
                "truth file a `profiles:` set with a profile or an architecture for it"
            ) from None

    def preload(self) -> None:
        """Read every file this truth needs (pdfs, profiles, records) once, up front.

        Raises:
            TruthError, ProfileError: a file is unreadable (as the first task would).
        """
        self._lengths()
        _ = self.profile_set
        if self.truth.steps == "measured":
            self._records()
        if self.truth.load == "measured":
            self._load_records()

    # -------------------------------------------------------------- measured world
    def step_cost(self, model: str, tp: int) -> StepCost:
        """What one engine step of ``model`` at ``tp`` really costs: the profile's step model,
        or with ``steps: measured`` the records (a proxy's, scaled, when ``model`` has none).

        Raises:
            TruthError: no profile (see :meth:`profile`), or unreadable records.
        """
        got = self._steps.get((model, tp))
        if got is None:
            got = self._steps[(model, tp)] = self._step_cost(model, tp)
        return got

    def _step_cost(self, model: str, tp: int) -> StepCost:
        if self.truth.steps == "profile":
            return self.profile(model, tp).step
        measured = self._records()
        scale = self.truth.latency_scale.get(model, 1.0)
        own = measured.get((model, tp))
        if own is not None:
            return MeasuredSteps(own, scale=scale)
        proxy = self._proxy(model, tp, measured)
        ratio = (self._resolve(model, tp).step, self._resolve(proxy.model, tp).step)
        return MeasuredSteps(proxy, ratio=ratio, scale=scale)

    def _records(self) -> dict[tuple[str, int], Measured]:
        if self._measured is None:
            path = self.truth.iterations_path or _shared("a100_vllm030_iteration_latency.csv.gz")
            try:
                self._measured = read_measured(path)
            except MeasuredStepsError as e:
                raise TruthError(f"truth: steps: measured: {e}") from None
        return self._measured

    def _proxy(self, model: str, tp: int, measured: dict[tuple[str, int], Measured]) -> Measured:
        """The measured model at ``tp`` most like ``model``: the same MLP kind, then the
        closest weight bytes per GPU (by the profile set)."""
        me = self._resolve(model, tp)
        kind = self._mlp(model)
        cands = [m for (name, t), m in measured.items() if t == tp and self._known(name, tp)]
        if not cands:
            raise TruthError(f"truth: steps: measured: no measured model at tp={tp} to stand "
                             f"in for {model!r}")  # fmt: skip
        return min(cands, key=lambda m: (
            self._mlp(m.model) != kind,
            abs(self._resolve(m.model, tp).weight_bytes_per_gpu - me.weight_bytes_per_gpu),
            m.model,
        ))  # fmt: skip

    def _known(self, model: str, tp: int) -> bool:
        try:
            self._resolve(model, tp)
        except TruthError:
            return False
        return True

    def _mlp(self, model: str) -> str:
        arch = self.profile_set.archs.get(model)
        return arch.mlp if arch is not None else ""

    def load_time(self, model: str, tp: int) -> float:
        """Simulated seconds an engine load of ``model`` at ``tp`` takes (latency scale
        included): the profile's, or with ``load: measured`` one recorded load time of the
        (model, tp) picked by the seed (the profile's when it has no record)."""
        scale = self.truth.latency_scale.get(model, 1.0)
        if self.truth.load == "measured":
            records = self._load_records().get((model, tp))
            if records:
                digest = hashlib.sha256(f"{self.truth.seed}|load|{model}|{tp}".encode()).digest()
                pick = records[int.from_bytes(digest[:8], "big") % len(records)]
                return pick.seconds * scale
        return self._resolve(model, tp).load_time_s * scale

    def _load_records(self) -> dict[tuple[str, int], list[LoadTime]]:
        if self._loads is None:
            path = self.truth.load_times_path or _shared("a100_model_load_time.json")
            try:
                self._loads = read_load_entries(path)
            except (ProfileError, OSError) as e:
                raise TruthError(f"truth: load: measured: {e}") from None
        return self._loads


def _shared(name: str) -> Path:
    return load_settings().shared_dir / "data" / name


A100_MEASURED = Truth(steps="measured", load="measured", scheduler="legacy030")
"""The measured A100 world (raw step records, recorded load times, vLLM 0.3.0 batching)."""
