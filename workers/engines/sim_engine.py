"""The sim engine: a virtual GPU that serves requests on the batching simulator's clock.

It wraps the same :func:`planning.batching_sim.simulate` the planner uses, but with the
*truth* (:class:`workers.truth.TruthWorld`): real output lengths drawn per request key and the
real (possibly distorted) step cost model. Time is simulated and paced against the wall:
``time_scale`` real seconds pass per simulated second (0 = as fast as possible).

How it runs. Whenever the request set changes (add or abort) the unfinished requests are
simulated afresh from the current engine clock, each continuing from the tokens it already has
(``SimRequest.generated``); each :meth:`SimEngine.step` then consumes whole simulated steps of
that schedule, at least one and as many as end within ``tick_s / time_scale`` simulated seconds
(plus any lag behind the wall), sleeps until the wall catches up with the engine clock, and
reports the requests whose token count changed (from
:meth:`~planning.batching_sim.SimResult.snapshot` differences).

Outputs are placeholder text, ``"tok "`` per token (one token for
:func:`apps.tokens.estimate_tokens`), appended to a preempted request's prefix. A router
request (``choices`` set) answers one of its labels first, picked from a hash of its key, so
routes decided by a router node spread evenly over the labels on the sim engine.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from planning.batching_sim import EngineConfig, Mode, SimRequest, SimResult, Snapshot, simulate
from planning.estimate import ServingConfig, engine_for
from planning.profile import ModelProfile
from workers.engines.base import Aborted, EngineKey, EngineRequest, StepUpdate
from workers.truth import TruthWorld

TOKEN_TEXT = "tok "  # placeholder text of one generated token (4 bytes = 1 estimated token)

FinishReason = Literal["stop", "length"]


@dataclass(slots=True)
class _Live:
    """An added, not yet finished (nor aborted) request."""

    request: EngineRequest
    target: int  # tokens; truth total output, prefix included
    reason: FinishReason  # why it stops at ``target``
    tokens: int  # tokens generated so far, prefix included

    def text(self) -> str:
        """Prefix text plus one placeholder per token generated here (a router's first token
        is one of its labels)."""
        new = max(0, self.tokens - self.request.generated_tokens)
        req = self.request
        if req.choices and not req.generated_tokens and new:
            return f"{_choice(req)} " + TOKEN_TEXT * (new - 1)
        return req.generated_text + TOKEN_TEXT * new


def _choice(req: EngineRequest) -> str:
    """The label a simulated router answers: fixed per request key, spread evenly."""
    digest = hashlib.sha256(req.key.encode()).digest()
    return req.choices[int.from_bytes(digest[:8], "little") % len(req.choices)]


@dataclass(slots=True)
class _Run:
    """The schedule of the unfinished requests, simulated from engine clock ``t0``."""

    result: SimResult
    keys: list[str]  # request keys in simulation order
    ends: NDArray[np.float64]  # s after t0; end of each simulated step
    t0: float  # s; engine clock at the start of the simulation
    done: int = 0  # steps of this schedule already consumed


class SimEngine:
    """An :class:`~workers.engines.base.Engine` on a virtual GPU (see the module docstring).

    Args:
        key: the engine configuration (model, tp and scheduler limits).
        truth: the world's real lengths and profiles.
        time_scale: real seconds per simulated second (0 = do not sleep).
        tick_s: real seconds one :meth:`step` call should last, about (>= one simulated step).
        sleep: ``time.sleep``-like, injected for tests.
        now: ``time.monotonic``-like, injected for tests.

    Construction is the engine load: it sleeps the truth load time x ``time_scale``.

    Raises:
        TruthError: the truth has no profile for ``key.model`` at ``key.tp``.
        ValueError: bad ``time_scale``/``tick_s``, or the model leaves no room for KV cache.
    """

    def __init__(
        self,
        key: EngineKey,
        truth: TruthWorld,
        time_scale: float,
        *,
        tick_s: float = 0.02,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(time_scale) and time_scale >= 0):
            raise ValueError(f"time_scale must be a finite number >= 0, got {time_scale}")
        if not tick_s > 0:
            raise ValueError(f"tick_s must be > 0, got {tick_s}")
        self.key = key
        self._truth = truth
        self._time_scale = time_scale  # real s per simulated s
        self._tick_s = tick_s  # real s per step call
        self._sleep, self._now = sleep, now
        self.profile: ModelProfile = truth.profile(key.model, key.tp)
        self.engine_config: EngineConfig = engine_for(
            self.profile, truth.gpu, _serving(key, truth.truth.scheduler)
        )
        self._cost = truth.step_cost(key.model, key.tp)  # the truth's step latencies
        self._live: dict[str, _Live] = {}  # unfinished requests, in order added
        self._run: _Run | None = None
        self._dirty = False  # the request set changed since the schedule was simulated
        self._closed = False
        self._clock = 0.0  # s; engine clock
        self._last_step = 0.0  # s; mean simulated latency of the last step call
        self._steps = 0  # simulated iterations so far
        self._anchor = (self._now(), 0.0)  # (wall s, engine clock s) pacing is measured from
        self._load = truth.load_time(key.model, key.tp)  # s
        self._clock = self._load
        self._pace()
        self._idle = True  # no work since the load: re-anchor pacing on the next busy step

    # ------------------------------------------------------------------ Engine protocol
    def add_request(self, request: EngineRequest) -> None:
        """Queue ``request``; its truth length is fixed now, and it runs from the next step.

        Raises:
            ValueError: a duplicate key, or a prompt outside ``[1, max_model_len)`` tokens.
        """
        self._check_open()
        if request.key in self._live:
            raise ValueError(f"request {request.key!r} is already in the engine")
        limit = self.engine_config.max_model_len
        if not 1 <= request.prompt_tokens < limit:
            raise ValueError(
                f"request {request.key!r}: prompt of {request.prompt_tokens} tokens must be in "
                f"[1, max_model_len={limit})"
            )
        target, reason = self._target(request)
        tokens = request.generated_tokens
        if tokens >= target:  # the prefix already reaches the truth: it stops there
            target, reason = tokens, self._reason_at(request, tokens)
        self._live[request.key] = _Live(request, target, reason, tokens)
        self._dirty = True

    def step(self) -> list[StepUpdate]:
        """Consume about ``tick_s`` real seconds of simulated steps (at least one).

        Returns:
            One update per request whose token count changed; finished requests once, with
            their whole text and finish reason, and are then forgotten.
        """
        self._check_open()
        updates = self._finish_prefixed()
        if self._dirty:
            self._resimulate()
        if self._run is not None:
            if self._idle:
                self._anchor, self._idle = (self._now(), self._clock), False
            updates += self._advance(self._run)
        if not self._live:
            self._idle = True
        return updates

    def abort_request(self, key: str) -> Aborted:
        """Remove unfinished request ``key``; returns its text and tokens so far.

        Raises:
            KeyError: ``key`` is not an unfinished request of this engine.
        """
        self._check_open()
        live = self._live.pop(key, None)
        if live is None:
            raise KeyError(f"no unfinished request {key!r} in this engine")
        self._dirty = True
        if not self._live:
            self._run, self._idle = None, True
        return Aborted(key=key, text=live.text(), tokens=live.tokens)

    def has_unfinished_requests(self) -> bool:
        """Whether any added request is neither finished nor aborted."""
        return bool(self._live)

    @property
    def clock_s(self) -> float:
        """Engine clock (simulated seconds since the load began)."""
        return self._clock

    @property
    def last_step_s(self) -> float:
        """Mean simulated latency (s) of the iterations run by the last step call."""
        return self._last_step

    @property
    def load_s(self) -> float:
        """Simulated seconds the load took (truth load time, latency scale included)."""
        return self._load

    @property
    def steps_done(self) -> int:
        """Simulated engine iterations run so far."""
        return self._steps

    def close(self) -> None:
        """Drop every request and the schedule; the engine cannot be used afterwards."""
        self._live.clear()
        self._run = None
        self._closed = True

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the sim engine for {self.key.model!r} is closed")

    def _cap(self, request: EngineRequest) -> int:
        """Tokens of output allowed by max_tokens and the context left (at least 1)."""
        room = self.engine_config.max_model_len - request.prompt_tokens
        return max(1, min(request.max_tokens, room))

    def _reason_at(self, request: EngineRequest, tokens: int) -> FinishReason:
        """vLLM checks the length cap before EOS: at the cap the reason is "length"."""
        return "length" if request.ignore_eos or tokens >= self._cap(request) else "stop"

    def _target(self, request: EngineRequest) -> tuple[int, FinishReason]:
        total = self._truth.length(
            self.key.model,
            request.key,
            request.prompt_tokens,
            request.max_tokens,
            self.engine_config.max_model_len,
            request.ignore_eos,
        )
        return total, self._reason_at(request, total)

    def _finish_prefixed(self) -> list[StepUpdate]:
        """Requests whose prefix already reached their truth length finish now, at no cost."""
        done = [live for live in self._live.values() if live.tokens >= live.target]
        for live in done:
            del self._live[live.request.key]
        return [_finished(live) for live in done]

    def _resimulate(self) -> None:
        """Simulate every unfinished request from the current clock and tokens."""
        self._dirty = False
        keys = list(self._live)
        if not keys:
            self._run = None
            return
        # NOTE(sim-engine): a request that generated tokens here is running: its KV stays, so
        # it goes on decoding (resident) instead of recomputing its prompt, as it would if
        # every new request preempted the batch (a chain fed one request at a time ran 4x
        # slower). One that the truth's schedule preempted is taken as running too (rare:
        # only near KV capacity). A prefix brought from another worker is recomputed.
        requests = [
            SimRequest(prompt_len=live.request.prompt_tokens, output_len=live.target,
                       generated=live.tokens,
                       resident=live.tokens > live.request.generated_tokens)
            for live in self._live.values()
        ]  # fmt: skip
        result = simulate(requests, self.engine_config, self._cost, record_steps=True)
        assert result.steps is not None  # record_steps=True
        self._run = _Run(result, keys, result.steps.end_s, self._clock)

    def _advance(self, run: _Run) -> list[StepUpdate]:
        """Consume the next steps of ``run``, pace, and report what changed."""
        n, i = len(run.ends), run.done
        start = float(run.ends[i - 1]) if i else 0.0  # s after t0
        j = int(np.searchsorted(run.ends, start + self._horizon(), side="right"))
        j = min(max(j, i + 1), n)
        run.done = j
        last = j == n
        end = run.result.total_s if last else float(run.ends[j - 1])
        # NOTE(sim-engine): snapshot between step boundaries (or past the end): the step log's
        # cumulative end times and the snapshot's closed-form segment times may differ in the
        # last bits, and a probe exactly on a boundary could miss the step just run.
        probe = end + 1.0 if last else (end + float(run.ends[j])) / 2.0
        self._last_step = (end - start) / (j - i)
        self._steps += j - i
        self._clock = run.t0 + end
        if last:
            self._run = None
        self._pace()
        return self._collect(run.keys, run.result.snapshot(probe))

    def _collect(self, keys: list[str], snap: Snapshot) -> list[StepUpdate]:
        """Updates for the requests whose tokens changed; finished ones are forgotten."""
        updates = []
        for idx, key in enumerate(keys):
            live = self._live.get(key)
            tokens = int(snap.generated[idx])
            if live is None or (tokens == live.tokens and not snap.finished[idx]):
                continue
            live.tokens = tokens
            if snap.finished[idx]:
                del self._live[key]
                updates.append(_finished(live))
            else:
                updates.append(StepUpdate(key=key, tokens=tokens, finished=False))
        return updates

    def _horizon(self) -> float:
        """Simulated seconds this step call may consume: one tick, plus any lag behind the wall.

        NOTE(sim-engine): on schedule this is ``tick_s / time_scale``; when the caller was slow
        (progress writes, a busy host) the lag is consumed too, so the engine clock keeps up
        with ``time_scale`` instead of falling further behind with every call.
        """
        if self._time_scale == 0:
            return math.inf
        wall0, clock0 = self._anchor
        lag = (self._now() - wall0) / self._time_scale - (self._clock - clock0)
        return self._tick_s / self._time_scale + max(0.0, lag)

    def _pace(self) -> None:
        """Sleep until the wall reaches the engine clock (absolute, so no drift builds up)."""
        wall0, clock0 = self._anchor
        delay = wall0 + (self._clock - clock0) * self._time_scale - self._now()
        if delay > 0:
            self._sleep(delay)


def _finished(live: _Live) -> StepUpdate:
    return StepUpdate(
        key=live.request.key,
        tokens=live.tokens,
        finished=True,
        text=live.text(),
        finish_reason=live.reason,
    )


def _serving(key: EngineKey, mode: Mode) -> ServingConfig:
    """The user's engine settings of ``key`` (None max_model_len = the model's own), batched
    with ``mode``'s semantics."""
    return ServingConfig(
        mode=mode,
        gpu_memory_utilization=key.gpu_memory_utilization,
        max_num_seqs=key.max_num_seqs,
        max_num_batched_tokens=key.max_num_batched_tokens,
        max_model_len=key.max_model_len,
    )
