"""Step recorder for a real in-process vLLM V1 engine (the only module that imports vllm).

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

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

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
