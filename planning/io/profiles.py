"""Loaders and writers for step records, model sizes, load times, profile runs, Hugging Face
configs and profile files.

This is the edge of :mod:`planning`: the only place that opens files. Everything returned is a
plain value of the pure core (:class:`~planning.cost_model.StepRecords`,
:class:`~planning.profile.ProfileSet`, ...). Every problem with an input raises
:class:`ProfileError` naming the file and the field or column, and the line where there is one.

Step-feature conventions
------------------------
Canonical step records (CSV, JSON list or JSONL; columns :data:`CANONICAL_COLUMNS`) carry the
features of :class:`~planning.cost_model.StepCostModel` directly, in vLLM V1 semantics (mixed
prefill/decode steps, no padding; attn_pairs = sum over prefill chunks of chunk tokens x
context after the chunk).

The shared vLLM 0.3.0 latency file (``a100_vllm030_iteration_latency.csv.gz``) is converted
with **vLLM 0.3.0 semantics**, the convention the simulator's legacy 0.3.0 mode emits:

* prefill step of B prompts padded to the longest, s tokens:
  prefill_tokens = B*s, decode_seqs = 0, num_seqs = B, context_tokens = B*s,
  attn_pairs = B*s*s;
* decode step of B sequences: prefill_tokens = 0, decode_seqs = B, num_seqs = B,
  context_tokens = sum of the context lengths, attn_pairs = 0.

``init_profile_run`` and ``warmup`` rows are dropped, and (as the authors do) only the faster
row of each nearly identical pair ``(log_file, source_block, pair_id)`` is kept; the pair's
group id is returned so callers can split train/test by pair.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from planning.cost_model import RECORD_FIELDS, StepCostModel, StepRecords
from planning.io.files import atomic_write_text, open_text
from planning.profile import (
    ACTIVATION_TERMS,
    CALIB_STEP_TERMS,
    ZERO_ACTIVATION,
    AnalyticCalib,
    GpuSpec,
    ModelArch,
    ModelProfile,
    ProfileRun,
    ProfileSet,
)

FORMAT_TAG = "samullm.profiles/1"
CANONICAL_COLUMNS: tuple[str, ...] = ("model", "tp", "gpu", *RECORD_FIELDS)
VLLM030_GPU = "A100-80GB"
DEFAULT_PROFILE_RESOURCE = "profiles/a100_80gb.json"
_VLLM030_COLUMNS = (
    "model", "tp", "phase", "batch_size", "padded_tokens", "max_seq_len",
    "sum_context_tokens", "latency_s", "source_block", "pair_id", "log_file",
)  # fmt: skip
_VLLM030_DROPPED = ("init_profile_run", "warmup")
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

StepKey = tuple[str, int, str]  # (model, tp, gpu)


class ProfileError(ValueError):
    """Bad profile or record input; the message names the file and the field or column."""


# --------------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------------


def _open_text(path: Path) -> Any:
    if not path.is_file():
        raise ProfileError(f"{path}: no such file")
    return open_text(path)


def _csv_reader(handle: Any, path: Path, required: Sequence[str]) -> csv.DictReader[str]:
    """A CSV reader over ``handle`` whose header has every ``required`` column."""
    reader = csv.DictReader(handle)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise ProfileError(f"{path}: missing column {missing[0]!r}")
    return reader


def _number(value: Any, where: str, *, integer: bool = False, allow_none: bool = False) -> Any:
    """``value`` as a finite, non-negative float (or int); ProfileError naming ``where``."""
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ProfileError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ProfileError(f"{where}: not a finite number ({value!r})")
    if number < 0:
        raise ProfileError(f"{where}: negative value {value!r}")
    if integer:
        if number != int(number):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    return number


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ProfileError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise ProfileError(f"{where}: missing field {key!r}")
    return obj[key]


def _text(obj: Any, key: str, where: str) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Canonical step records.
# --------------------------------------------------------------------------------------------


def _canonical_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, row) pairs of a canonical CSV, JSON (list) or JSONL file."""
    name = path.name.removesuffix(".gz")
    with _open_text(path) as handle:
        if name.endswith(".csv"):
            reader = _csv_reader(handle, path, CANONICAL_COLUMNS)
            for row in reader:
                yield reader.line_num, row
        elif name.endswith(".jsonl"):
            for line, text in enumerate(handle, start=1):
                if text.strip():
                    yield line, _json_loads(text, f"{path}:{line}")
        elif name.endswith(".json"):
            data = _json_loads(handle.read(), str(path))
            rows = data.get("records") if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise ProfileError(f"{path}: expected a list of records or {{'records': [...]}}")
            yield from ((i, row) for i, row in enumerate(rows, start=1))
        else:
            raise ProfileError(f"{path}: unknown record format (use .csv, .json or .jsonl)")


def _json_loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{where}: invalid JSON ({exc.msg}, line {exc.lineno})") from None


def read_step_records(path: str | Path) -> dict[StepKey, StepRecords]:
    """Canonical step records grouped by (model, tp, gpu).

    Raises:
        ProfileError: missing file or column, non-numeric, NaN or negative value, bad format.
    """
    path = Path(path)
    columns: dict[StepKey, list[list[float]]] = {}
    for line, row in _canonical_rows(path):
        where = f"{path}:{line}"
        for col in CANONICAL_COLUMNS:
            if not isinstance(row, dict) or row.get(col) in (None, ""):
                raise ProfileError(f"{where}: missing column {col!r}")
        key = (str(row["model"]), _number(row["tp"], f"{where}: column 'tp'", integer=True),
               str(row["gpu"]))  # fmt: skip
        values = [_number(row[c], f"{where}: column {c!r}") for c in RECORD_FIELDS]
        columns.setdefault(key, []).append(values)
    if not columns:
        raise ProfileError(f"{path}: no records")
    return {k: StepRecords(*np.array(v, dtype=np.float64).T) for k, v in columns.items()}


def write_step_records(path: str | Path, records: dict[StepKey, StepRecords]) -> None:
    """Write canonical CSV records (atomically)."""
    lines = [",".join(CANONICAL_COLUMNS)]
    for (model, tp, gpu), rec in records.items():
        table = np.column_stack([getattr(rec, f) for f in RECORD_FIELDS])
        lines += [f"{model},{tp},{gpu}," + ",".join(repr(float(v)) for v in row) for row in table]
    _write(Path(path), "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# The shared vLLM 0.3.0 latency file.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LegacyRecords:
    """Steps of one (model, tp) from the vLLM 0.3.0 file, in 0.3.0 feature semantics."""

    records: StepRecords  # features and latency per kept row
    pair_group: np.ndarray  # int id of the row's (log_file, source_block, pair_id)
    is_prefill: np.ndarray  # bool per row


def _vllm030_row(row: dict[str, str], where: str) -> tuple[list[float], bool]:
    """Features + latency of one raw row (see the module docstring)."""
    b = _number(row["batch_size"], f"{where}: column 'batch_size'")
    s = _number(row["max_seq_len"], f"{where}: column 'max_seq_len'")
    lat = _number(row["latency_s"], f"{where}: column 'latency_s'")
    if row["phase"] == "prefill":
        padded = _number(row["padded_tokens"], f"{where}: column 'padded_tokens'")
        return [padded, 0.0, b, padded, b * s * s, lat], True
    if row["phase"] == "decode":
        ctx = _number(row["sum_context_tokens"], f"{where}: column 'sum_context_tokens'")
        return [0.0, b, b, ctx, 0.0, lat], False
    raise ProfileError(f"{where}: column 'phase': expected prefill or decode, got {row['phase']!r}")


def read_vllm030_latency(
    path: str | Path, *, min_of_pairs: bool = True
) -> dict[tuple[str, int], LegacyRecords]:
    """The shared A100 vLLM 0.3.0 latency file as step records per (model, tp).

    Args:
        path: ``a100_vllm030_iteration_latency.csv.gz`` (or an uncompressed copy).
        min_of_pairs: keep only the faster row of each nearly identical pair (the authors'
            rule); with False every grid row is kept.
    """
    path = Path(path)
    found: dict[tuple[str, int], dict[tuple[str, str, int], list[tuple[list[float], bool]]]] = {}
    with _open_text(path) as handle:
        reader = _csv_reader(handle, path, _VLLM030_COLUMNS)
        for row in reader:
            if row["source_block"] in _VLLM030_DROPPED:
                continue
            where = f"{path}:{reader.line_num}"
            tp = _number(row["tp"], f"{where}: column 'tp'", integer=True)
            pair = _number(row["pair_id"], f"{where}: column 'pair_id'", integer=True)
            group = (row["log_file"], row["source_block"], pair)
            found.setdefault((row["model"], tp), {}).setdefault(group, []).append(
                _vllm030_row(row, where)
            )
    if not found:
        raise ProfileError(f"{path}: no measured rows")
    return {key: _legacy(groups, min_of_pairs) for key, groups in found.items()}


def _legacy(
    groups: dict[tuple[str, str, int], list[tuple[list[float], bool]]], min_of_pairs: bool
) -> LegacyRecords:
    """Stack the rows of one (model, tp); groups numbered in sorted order."""
    feats: list[list[float]] = []
    prefill: list[bool] = []
    ids: list[int] = []
    for gid, key in enumerate(sorted(groups)):
        rows = groups[key]
        if min_of_pairs:
            rows = [min(rows, key=lambda r: r[0][5])]
        for values, is_prefill in rows:
            feats.append(values)
            prefill.append(is_prefill)
            ids.append(gid)
    return LegacyRecords(
        records=StepRecords(*np.array(feats, dtype=np.float64).T),
        pair_group=np.array(ids, dtype=np.int64),
        is_prefill=np.array(prefill, dtype=bool),
    )


# --------------------------------------------------------------------------------------------
# model_sizes.json and a100_model_load_time.json.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSizes:
    """One model of ``model_sizes.json``: its shape and the memory logged per tp."""

    arch: ModelArch  # shape from the HF config
    weight_bytes_per_gpu: dict[int, int]  # tp -> B of parameters per GPU (logged or database)
    kv_bytes_per_token_per_gpu: dict[int, int]  # tp -> B of KV cache per token per GPU (logged)


def _arch_from_config(cfg: Any, where: str, default_max_model_len: int | None) -> ModelArch:
    def num(key: str, default: int | None = None) -> int:
        if key not in cfg and default is not None:
            return default
        return int(_number(_field(cfg, key, where), f"{where}.{key}", integer=True))

    dtype = cfg.get("dtype", cfg.get("torch_dtype", "float16"))
    if dtype not in _DTYPE_BYTES:
        raise ProfileError(f"{where}.dtype: unknown dtype {dtype!r}")
    max_len = cfg.get("max_model_len", default_max_model_len)
    if max_len is None:
        raise ProfileError(f"{where}: missing field 'max_model_len' (and no default given)")
    try:
        return ModelArch(
            layers=num("num_layers"), hidden=num("hidden_size"),
            heads=num("num_attention_heads"), kv_heads=num("num_kv_heads"),
            intermediate=num("intermediate_size"), vocab=num("vocab_size"),
            mlp=_text(cfg, "mlp", where), num_experts=num("num_local_experts", 1),
            experts_per_tok=num("num_experts_per_tok", 1), dtype_bytes=_DTYPE_BYTES[dtype],
            max_model_len=int(_number(max_len, f"{where}.max_model_len", integer=True)),
        )  # fmt: skip
    except ValueError as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"{where}: {exc}") from None


def _logged_memory(model: Any, layers: int, where: str) -> tuple[dict[int, int], dict[int, int]]:
    weights: dict[int, int] = {}
    kv: dict[int, int] = {}
    for tp_text, entry in (model.get("per_tp") or {}).items():
        if not entry:
            continue
        w = f"{where}.per_tp.{tp_text}"
        tp = int(_number(tp_text, w, integer=True))
        logged = entry.get("param_bytes_per_gpu_logged")
        per_layer = entry.get("per_layer_param_bytes_per_gpu")
        other = entry.get("non_layer_param_bytes_per_gpu")
        if logged is not None:
            weights[tp] = _number(logged, f"{w}.param_bytes_per_gpu_logged", integer=True)
        elif per_layer is not None and other is not None:
            weights[tp] = layers * _number(per_layer, f"{w}.per_layer", integer=True) + _number(
                other, f"{w}.non_layer_param_bytes_per_gpu", integer=True
            )
        if entry.get("kv_cache_bytes_per_token_per_gpu") is not None:
            kv[tp] = _number(entry["kv_cache_bytes_per_token_per_gpu"],
                             f"{w}.kv_cache_bytes_per_token_per_gpu", integer=True)  # fmt: skip
    return weights, kv


def read_model_sizes(
    path: str | Path, *, default_max_model_len: int | None = None
) -> dict[str, ModelSizes]:
    """``model_sizes.json``: architecture and logged memory per model.

    Weight bytes per GPU are the logged total where there is one, else the database's
    per-layer x layers + non-layer bytes; tps where the model did not fit are absent.
    dtype defaults to 2 bytes where the config gives none (every such checkpoint is fp16/bf16).
    """
    path = Path(path)
    with _open_text(path) as handle:
        data = _json_loads(handle.read(), str(path))
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected an object keyed by model id")
    out: dict[str, ModelSizes] = {}
    for model, entry in data.items():
        if model.startswith("_"):
            continue
        where = f"{path}: {model}"
        arch = _arch_from_config(_field(entry, "config", where), f"{where}.config",
                                 default_max_model_len)  # fmt: skip
        weights, kv = _logged_memory(entry, arch.layers, where)
        out[model] = ModelSizes(arch, weights, kv)
    return out


# NOTE(load-time): machine policy. The latency profiles come from the authors' 4-GPU server
# with all-to-all NVLink; the database entries without a machine label are the closest match.
# Per (model, tp) we take, in order: unlabelled database entries, zxcpu5 database entries, then
# the estimator's hard-coded values (weight_load_degree 2 only), and the minimum over repeats
# within the chosen group (the authors' own rule: min over runs, warm page cache).
_LOAD_SOURCE_RANK = (
    ("benchmarks/model_initcost_database.py", "unlabelled"),
    ("benchmarks/model_initcost_database.py", "zxcpu5"),
    ("benchmarks/my_per_iter_latency_estimator.py", ""),
)


@dataclass(frozen=True, slots=True)
class LoadTime:
    """Chosen load time of one (model, tp)."""

    seconds: float  # s to construct the engine
    machine: str  # machine label of the chosen entry
    source: str  # file in the authors' repository the value comes from


def read_load_entries(path: str | Path) -> dict[tuple[str, int], list[LoadTime]]:
    """``a100_model_load_time.json``: every weight_load_degree 2 record per (model, tp), in file
    order."""
    path = Path(path)
    with _open_text(path) as handle:
        data = _json_loads(handle.read(), str(path))
    if not isinstance(data, list):
        raise ProfileError(f"{path}: expected a list of entries")
    out: dict[tuple[str, int], list[LoadTime]] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if _number(_field(entry, "weight_load_degree", where), f"{where}.weight_load_degree") != 2:
            continue
        key = (_text(entry, "model", where), _number(_field(entry, "tp", where), f"{where}.tp",
                                                     integer=True))  # fmt: skip
        seconds = _number(_field(entry, "seconds", where), f"{where}.seconds")
        source, machine = _text(entry, "source", where), _text(entry, "machine", where)
        out.setdefault(key, []).append(LoadTime(seconds, machine, source))
    return out


def read_load_times(path: str | Path) -> dict[tuple[str, int], LoadTime]:
    """``a100_model_load_time.json``: one load time per (model, tp), weight_load_degree 2: the
    fastest record of the most preferred source (``_LOAD_SOURCE_RANK``)."""
    chosen: dict[tuple[str, int], tuple[int, LoadTime]] = {}
    for key, entries in read_load_entries(path).items():
        for e in entries:
            rank = next(
                (r for r, (src, mach) in enumerate(_LOAD_SOURCE_RANK)
                 if e.source == src and e.machine.startswith(mach)),
                len(_LOAD_SOURCE_RANK),
            )  # fmt: skip
            old = chosen.get(key)
            if old is None or (rank, e.seconds) < (old[0], old[1].seconds):
                chosen[key] = (rank, LoadTime(e.seconds, e.machine.split(" ")[0], e.source))
    return {k: v[1] for k, v in chosen.items()}


_PROFILE_RUN_COLUMNS = (
    "model", "tp", "num_gpu_blocks", "kv_cache_bytes_per_block", "block_size_tokens",
    "total_gpu_memory_bytes", "profiled_peak_memory_bytes", "gpu_memory_utilization",
)  # fmt: skip


def read_profile_runs(path: str | Path) -> dict[tuple[str, int], ProfileRun]:
    """``a100_vllm030_profile_runs.csv``: the memory lines of each engine start per (model, tp).

    Raises:
        ProfileError: missing file or column, a bad number, a duplicate (model, tp).
    """
    path = Path(path)
    out: dict[tuple[str, int], ProfileRun] = {}
    with _open_text(path) as handle:
        reader = _csv_reader(handle, path, _PROFILE_RUN_COLUMNS)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            num = {c: _number(row[c], f"{where}: column {c!r}", integer=True)
                   for c in _PROFILE_RUN_COLUMNS[1:-1]}  # fmt: skip
            util = _number(row["gpu_memory_utilization"], f"{where}: column "
                           "'gpu_memory_utilization'")  # fmt: skip
            key = (row["model"], num["tp"])
            if key in out:
                raise ProfileError(f"{where}: duplicate ({key[0]!r}, tp={key[1]})")
            out[key] = ProfileRun(
                num["total_gpu_memory_bytes"], util, num["profiled_peak_memory_bytes"],
                num["num_gpu_blocks"], num["kv_cache_bytes_per_block"], num["block_size_tokens"],
            )  # fmt: skip
    if not out:
        raise ProfileError(f"{path}: no rows")
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face config.json (the analytic fallback for any model).
# --------------------------------------------------------------------------------------------

# Alternative spellings of each field across model families, first found wins.
_HF_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head", "n_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "intermediate": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    # padded_vocab_size first: it is the embedding's real size where both exist (chatglm)
    "vocab": ("padded_vocab_size", "vocab_size"),
    "max_model_len": ("max_position_embeddings", "seq_length", "max_sequence_length",
                      "n_positions", "max_seq_len"),
}  # fmt: skip
# Families with a two-matrix (up, down) MLP, and families with a gated (gate, up, down) one.
_HF_PLAIN_TYPES = frozenset({"gpt_neox", "gptj", "gpt2", "gpt_bigcode", "mpt", "opt", "bloom",
                             "falcon", "phi", "starcoder2", "codegen"})  # fmt: skip
_HF_GATED_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen", "qwen2", "baichuan", "yi",
                             "chatglm", "internlm", "internlm2", "gemma", "gemma2"})  # fmt: skip
_HF_GATED_ACTS = frozenset({"silu", "swiglu", "swish"})
# NOTE(profile): vLLM's dtype "auto" serves float32 checkpoints (and configs without a
# torch_dtype) in float16, so every accepted dtype is 2 bytes on the GPU.
_HF_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 2}


def read_hf_config(path: str | Path, *, max_model_len: int | None = None) -> ModelArch:
    """The :class:`ModelArch` of a Hugging Face ``config.json`` (or a folder holding one).

    Field spellings are in :data:`_HF_KEYS`; intermediate defaults to ``expansion_ratio x
    hidden`` (MPT) else 4 x hidden, KV heads to chatglm's ``multi_query_group_num`` (with
    ``multi_query_attention``) else the attention heads. MLP kind: ``moe`` when
    ``num_local_experts`` > 1; else ``plain`` for two-matrix families (``model_type`` in
    gpt_neox, gptj, gpt2, mpt, opt, bloom, falcon, ...), ``gated`` for gated families (llama,
    mistral, mixtral, qwen, baichuan, chatglm, ...); any other type is gated when its
    ``hidden_act`` / ``activation_function`` is silu/swiglu/swish, else plain.
    ``max_model_len`` (tokens) overrides the config's context length.

    Raises:
        ProfileError: missing file, invalid JSON, a missing or bad key (naming the file and
            the keys tried), or a shape :class:`ModelArch` rejects.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    with _open_text(path) as handle:
        cfg = _json_loads(handle.read(), str(path))
    where = str(path)
    if not isinstance(cfg, dict):
        raise ProfileError(f"{where}: expected a JSON object")
    ints = {k: _hf_int(cfg, k, where) for k in ("layers", "hidden", "heads", "vocab")}
    experts = _hf_int(cfg, "num_local_experts", where, default=1, keys=("num_local_experts",))
    try:
        return ModelArch(
            **ints, kv_heads=_hf_kv_heads(cfg, ints["heads"], where),
            intermediate=_hf_intermediate(cfg, ints["hidden"], where),
            mlp=_hf_mlp(cfg, experts), num_experts=experts,
            experts_per_tok=_hf_int(cfg, "num_experts_per_tok", where,
                                    default=1 if experts == 1 else None,
                                    keys=("num_experts_per_tok",)),
            dtype_bytes=_hf_dtype_bytes(cfg, where),
            max_model_len=max_model_len or _hf_int(cfg, "max_model_len", where),
        )  # fmt: skip
    except ProfileError:
        raise
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def _hf_int(
    cfg: dict[str, Any], name: str, where: str, *, default: int | None = None,
    keys: tuple[str, ...] | None = None,
) -> int:  # fmt: skip
    """The first present (non-null) key of ``keys`` (default ``_HF_KEYS[name]``) as an int."""
    tried = _HF_KEYS[name] if keys is None else keys
    for key in tried:
        if cfg.get(key) is not None:
            return int(_number(cfg[key], f"{where}: field {key!r}", integer=True))
    if default is not None:
        return default
    spelled = " / ".join(repr(k) for k in tried)
    raise ProfileError(f"{where}: missing key {spelled}")


def _hf_kv_heads(cfg: dict[str, Any], heads: int, where: str) -> int:
    """KV heads: explicit key, chatglm's multi-query groups, else the attention heads."""
    if cfg.get("multi_query_attention") and cfg.get("multi_query_group_num") is not None:
        return _hf_int(cfg, "kv", where, keys=("multi_query_group_num",))
    return _hf_int(cfg, "kv_heads", where, default=heads)


def _hf_intermediate(cfg: dict[str, Any], hidden: int, where: str) -> int:
    """MLP width: explicit key, MPT's expansion_ratio x hidden, else 4 x hidden."""
    ratio = cfg.get("expansion_ratio")
    default = 4 * hidden
    if ratio is not None:
        default = int(_number(ratio, f"{where}: field 'expansion_ratio'") * hidden)
    return _hf_int(cfg, "intermediate", where, default=default)


def _hf_mlp(cfg: dict[str, Any], experts: int) -> str:
    """``moe``, ``plain`` or ``gated`` by the rule of :func:`read_hf_config`."""
    if experts > 1:
        return "moe"
    kind = str(cfg.get("model_type", "")).lower()
    if kind in _HF_PLAIN_TYPES:
        return "plain"
    if kind in _HF_GATED_TYPES:
        return "gated"
    act = str(cfg.get("hidden_act", cfg.get("activation_function", ""))).lower()
    return "gated" if act in _HF_GATED_ACTS else "plain"


def _hf_dtype_bytes(cfg: dict[str, Any], where: str) -> int:
    """B per element on the GPU from ``torch_dtype`` (see the NOTE on :data:`_HF_DTYPES`)."""
    dtype = cfg.get("torch_dtype") or "float32"
    if not isinstance(dtype, str) or dtype not in _HF_DTYPES:
        raise ProfileError(f"{where}: field 'torch_dtype': unsupported dtype {dtype!r}")
    return _HF_DTYPES[dtype]


# --------------------------------------------------------------------------------------------
# Profile files (format samullm.profiles/1).
# --------------------------------------------------------------------------------------------

_STEP_KEYS = ("c_const", "c_tokens", "c_knee", "c_seqs", "c_context", "c_attn", "knee_tokens")
_ARCH_INT_KEYS = ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab",
                  "num_experts", "experts_per_tok", "dtype_bytes", "max_model_len")  # fmt: skip
_LOAD_KEYS = ("load_base_s", "load_per_extra_gpu_s", "load_s_per_byte")


def profiles_to_json(profiles: ProfileSet, *, notes: dict[str, Any] | None = None) -> str:
    """The JSON text of ``profiles`` (keys sorted, entries by model then tp).

    Raises:
        ProfileError: a value is NaN or infinite.
    """
    gpu = profiles.gpu
    calib = profiles.calib
    doc: dict[str, Any] = {
        "format": FORMAT_TAG,
        "gpu": {"name": gpu.name, "memory_bytes": gpu.memory_bytes,
                "peak_flops": gpu.peak_flops, "mem_bandwidth": gpu.mem_bandwidth},
        "calibration": None if calib is None else {
            "step": dict(zip(CALIB_STEP_TERMS, calib.step, strict=True)),
            "knee_ridge_mult": calib.knee_ridge_mult,
            "activation": dict(zip(ACTIVATION_TERMS, calib.activation, strict=True)),
            **{k: getattr(calib, k) for k in _LOAD_KEYS},
        },
        "archs": {m: {k: getattr(a, k) for k in (*_ARCH_INT_KEYS, "mlp")}
                  for m, a in sorted(profiles.archs.items())},
        "entries": [_entry_to_json(profiles.profiles[k]) for k in sorted(profiles.profiles)],
        "notes": notes or {},
    }  # fmt: skip
    try:
        return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as exc:
        raise ProfileError(f"profile set: cannot serialise ({exc})") from None


def _entry_to_json(p: ModelProfile) -> dict[str, Any]:
    return {
        "model": p.model, "tp": p.tp, "gpu": p.gpu,
        "step": {k: getattr(p.step, k) for k in _STEP_KEYS},
        "load_time_s": p.load_time_s, "weight_bytes_per_gpu": p.weight_bytes_per_gpu,
        "kv_bytes_per_token_per_gpu": p.kv_bytes_per_token_per_gpu,
        "max_model_len": p.max_model_len, "source": p.source, "fit_mape": p.fit_mape,
        "activation_bytes_per_gpu": p.activation_bytes_per_gpu,
    }  # fmt: skip


def write_profiles(
    path: str | Path, profiles: ProfileSet, *, notes: dict[str, Any] | None = None
) -> None:
    """Write ``profiles`` atomically (temporary file in the same folder, then os.replace)."""
    _write(Path(path), profiles_to_json(profiles, notes=notes))


def _write(path: Path, text: str) -> None:
    if not path.parent.is_dir():
        raise ProfileError(f"{path}: folder {path.parent} does not exist")
    atomic_write_text(path, text)


def read_profiles(path: str | Path) -> ProfileSet:
    """Read a profile file written by :func:`write_profiles`.

    Raises:
        ProfileError: missing file, invalid JSON, unknown format, or a bad field.
    """
    path = Path(path)
    with _open_text(path) as handle:
        return profiles_from_json(handle.read(), str(path))


def load_default_profiles() -> ProfileSet:
    """The A100-80GB profile set shipped in ``planning/profiles/a100_80gb.json``."""
    resource = resources.files("planning").joinpath(DEFAULT_PROFILE_RESOURCE)
    return profiles_from_json(resource.read_text(encoding="utf-8"), str(resource))


def profiles_from_json(text: str, where: str) -> ProfileSet:
    """Parse profile-file text; ``where`` names the file in error messages."""
    doc = _json_loads(text, where)
    tag = _field(doc, "format", where)
    if tag != FORMAT_TAG:
        raise ProfileError(f"{where}: field 'format': unknown format {tag!r} (want {FORMAT_TAG})")
    g = _field(doc, "gpu", where)
    try:
        gpu = GpuSpec(
            _text(g, "name", f"{where}: gpu"),
            _number(_field(g, "memory_bytes", f"{where}: gpu"), f"{where}: gpu.memory_bytes",
                    integer=True),
            _number(_field(g, "peak_flops", f"{where}: gpu"), f"{where}: gpu.peak_flops"),
            _number(_field(g, "mem_bandwidth", f"{where}: gpu"), f"{where}: gpu.mem_bandwidth"),
        )  # fmt: skip
    except ProfileError:
        raise
    except ValueError as exc:
        raise ProfileError(f"{where}: gpu: {exc}") from None
    archs = _field(doc, "archs", where)
    if not isinstance(archs, dict):
        raise ProfileError(f"{where}: field 'archs': expected an object")
    entries = _field(doc, "entries", where)
    if not isinstance(entries, list):
        raise ProfileError(f"{where}: field 'entries': expected a list")
    profiles: dict[tuple[str, int], ModelProfile] = {}
    for i, entry in enumerate(entries):
        p = _entry_from_json(entry, f"{where}: entries[{i}]", gpu.name)
        if (p.model, p.tp) in profiles:
            raise ProfileError(f"{where}: entries[{i}]: duplicate ({p.model!r}, tp={p.tp})")
        profiles[(p.model, p.tp)] = p
    return ProfileSet(
        gpu=gpu,
        profiles=profiles,
        archs={m: _arch_from_json(a, f"{where}: archs[{m!r}]") for m, a in archs.items()},
        calib=_calib_from_json(_field(doc, "calibration", where), f"{where}: calibration"),
    )


def _entry_from_json(e: Any, where: str, gpu: str) -> ModelProfile:
    step = _field(e, "step", where)
    c = [_number(_field(step, k, f"{where}.step"), f"{where}.step.{k}") for k in _STEP_KEYS]
    if _text(e, "gpu", where) != gpu:
        raise ProfileError(f"{where}.gpu: {e['gpu']!r} differs from the file's gpu {gpu!r}")
    try:
        return ModelProfile(
            model=_text(e, "model", where),
            tp=_number(_field(e, "tp", where), f"{where}.tp", integer=True),
            gpu=gpu,
            step=StepCostModel(*c),
            **{k: _number(_field(e, k, where), f"{where}.{k}", integer=True) for k in
               ("weight_bytes_per_gpu", "kv_bytes_per_token_per_gpu", "max_model_len")},
            load_time_s=_number(_field(e, "load_time_s", where), f"{where}.load_time_s"),
            source=_text(e, "source", where),
            fit_mape=_number(_field(e, "fit_mape", where), f"{where}.fit_mape", allow_none=True),
            # NOTE(profile): absent in files written before the field existed: 0 B.
            activation_bytes_per_gpu=_number(e.get("activation_bytes_per_gpu", 0),
                                             f"{where}.activation_bytes_per_gpu", integer=True),
        )  # fmt: skip
    except ProfileError:
        raise
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def _arch_from_json(a: Any, where: str) -> ModelArch:
    ints = {k: _number(_field(a, k, where), f"{where}.{k}", integer=True) for k in _ARCH_INT_KEYS}
    try:
        return ModelArch(mlp=_text(a, "mlp", where), **ints)
    except ProfileError:
        raise
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def _calib_from_json(c: Any, where: str) -> AnalyticCalib | None:
    if c is None:
        return None
    step = _field(c, "step", where)
    act = c.get("activation")  # absent in older files: no activation estimate
    return AnalyticCalib(
        step=tuple(_number(_field(step, t, f"{where}.step"), f"{where}.step.{t}")
                   for t in CALIB_STEP_TERMS),
        knee_ridge_mult=_number(_field(c, "knee_ridge_mult", where), f"{where}.knee_ridge_mult"),
        **{k: _number(_field(c, k, where), f"{where}.{k}") for k in _LOAD_KEYS},
        activation=ZERO_ACTIVATION if act is None else tuple(
            _number(_field(act, t, f"{where}.activation"), f"{where}.activation.{t}")
            for t in ACTIVATION_TERMS),
    )  # fmt: skip
