"""Continuous-batching simulator with vLLM V1 scheduling semantics (and a vLLM 0.3.0 mode).

One :class:`ReplicaSim` is one engine replica. It reproduces the V1 scheduler's contract:

- running requests are scheduled first, in admission order, each with every token it still has
  to compute (capped by the step's token budget ``max_num_batched_tokens``); a decode is 1 token;
- KV blocks of ``block_size`` tokens are allocated for computed + scheduled tokens; when they run
  out the newest running request is preempted: its KV is freed, its generated tokens are kept,
  and it goes to the front of the waiting queue to be recomputed later as a longer prompt;
- waiting requests (FCFS by arrival) are admitted only when nothing was preempted in the step,
  while fewer than ``max_num_seqs`` run and budget remains, a long prompt being split into
  chunks (chunked prefill);
- a request whose known tokens are all computed samples one new token in that step;
- a request with ``after`` set arrives only when the request it waits on has finished (at the
  end of that step, or at its own ``arrival_s`` if later) and joins the waiting queue in FCFS
  order of that arrival, so it is schedulable from the next step on.

``mode="legacy030"`` replays vLLM 0.3.0 instead: a step is either prefill-only (a padded batch of
new prompts limited by padded tokens, ``max_num_seqs`` and a 1% free-block watermark) or
decode-only; the step features use the padded convention of :mod:`planning.io.profiles`.

Speed: the decode set is kept as aggregates (count, summed computed tokens, a heap of finish
steps). Runs of decode-only steps in which nothing but the context grows are advanced in O(1)
with :meth:`StepCostModel.decode_run_latency`. An exact per-request path is used only when KV
blocks are close enough to capacity that a preemption may happen.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from planning.cost_model import StepCost

Mode = Literal["v1", "legacy030"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Scheduler limits of one engine replica."""

    num_kv_blocks: int  # blocks; usable KV blocks of this replica
    max_model_len: int  # tokens; prompt + output limit
    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 8192  # tokens per step (padded tokens in legacy030)
    block_size: int = 16  # tokens per KV block
    mode: Mode = "v1"
    chunked_prefill: bool = True  # v1 only: split prompts longer than the budget left
    # v1 only: admit a waiting request only when blocks for all its known tokens are free,
    # not just its first chunk (vLLM's scheduler_reserve_full_isl, on by default since 0.2x).
    reserve_full_isl: bool = True
    watermark: float = 0.01  # legacy030: fraction of blocks kept free at admission

    def __post_init__(self) -> None:
        for name in ("num_kv_blocks", "max_model_len", "max_num_seqs", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("EngineConfig.max_num_batched_tokens must be >= max_num_seqs")
        if self.mode not in ("v1", "legacy030"):
            raise ValueError(f"EngineConfig.mode must be 'v1' or 'legacy030', not {self.mode!r}")
        whole = self.mode == "legacy030" or not self.chunked_prefill
        if whole and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "EngineConfig.max_num_batched_tokens must be >= max_model_len when prompts are "
                "not chunked (legacy030 or chunked_prefill=False), else long prompts never run"
            )


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request as the simulator sees it."""

    prompt_len: int  # tokens
    output_len: int  # tokens the request will generate (its true or sampled length)
    arrival_s: float = 0.0  # seconds; when it reaches the engine
    generated: int = 0  # tokens already generated elsewhere (continued after a preemption)
    # Index (in the same request sequence) of a request that must finish first: this one then
    # arrives at max(arrival_s, that request's finish time); -1 = none. Used for vertically
    # fused chains (the same model continuing a document after its previous chunk).
    after: int = -1
    # Already running on this replica at time 0: the KV of its prompt and of its generated
    # tokens but the last is computed, so it decodes from the first step without a prefill
    # (the sim engine re-simulating after a new request joined). Needs generated >= 1.
    resident: bool = False


@dataclass(frozen=True, slots=True)
class StepLog:
    """Per-step composition and latency; all arrays have one entry per step."""

    prefill_tokens: NDArray[np.int64]  # tokens of prompts (or recomputation) scheduled
    decode_seqs: NDArray[np.int64]  # sequences decoding one token
    num_seqs: NDArray[np.int64]  # sequences in the step
    context_tokens: NDArray[np.int64]  # KV tokens attended after the step
    attn_pairs: NDArray[np.float64]  # prefill query-key pairs
    preempted: NDArray[np.int64]  # requests preempted while scheduling the step
    latency_s: NDArray[np.float64]  # seconds
    end_s: NDArray[np.float64]  # seconds; clock at the end of the step
    kv_blocks: NDArray[np.int64]  # blocks held during the step


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State of a simulation at one instant."""

    time_s: float  # seconds
    finished: NDArray[np.bool_]  # per request (input order)
    generated: NDArray[np.int64]  # tokens generated so far per request (input order)


# A run of ``steps`` steps starting at step index ``step0`` and clock ``t0`` (seconds): the end
# of its j-th step (1-based) is ``t0 + first * j + growth * j * (j - 1) / 2`` (seconds). ``ds0``
# is the decode clock (decode steps done) at its start; each of its steps advances that clock
# by ``dstep`` (0 for a vLLM 0.3.0 prefill-only step, else 1).
# Fields: (step0, steps, t0, first, growth, ds0, dstep). Plain tuples: many are made per plan.
_Segment = tuple[int, int, float, float, float, int, int]

# Emission history of one request, used for snapshots: ("p", step, tokens after that step) for
# a prompt completed at a step index; ("d", ds, tokens before, n) for n decode steps from decode
# clock ds on. Stored as 4-tuples (kind, a, b, n) with kind 0 = "p", 1 = "d".
_Phase = tuple[int, int, int, int]


@dataclass(slots=True)
class SimResult:
    """Outcome of simulating one replica (or the slowest of several, see :func:`simulate_dp`)."""

    total_s: float  # seconds; clock when the last request finished
    finish_s: NDArray[np.float64]  # seconds per request, input order
    num_steps: int  # engine steps
    num_preemptions: int  # preemption events
    steps: StepLog | None  # only with record_steps=True
    _segments: list[_Segment] = field(repr=False)
    _phases: list[list[_Phase]] = field(repr=False)
    _generated0: list[int] = field(repr=False)
    _starts: list[float] = field(default_factory=list, repr=False)  # s; segment start times

    def steps_done_at(self, t: float) -> tuple[int, int]:
        """(steps, decode steps) completed by time ``t`` (seconds)."""
        if len(self._starts) != len(self._segments):  # built on the first query
            self._starts = [seg[2] for seg in self._segments]
        i = bisect_right(self._starts, t) - 1
        if i < 0:
            return 0, 0
        step0, steps, t0, first, growth, ds0, dstep = self._segments[i]
        lo, hi = 0, steps  # largest j in [0, steps] with end(j) <= t
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if t0 + first * mid + growth * mid * (mid - 1) / 2.0 <= t + 1e-12:
                lo = mid
            else:
                hi = mid - 1
        return step0 + lo, ds0 + dstep * lo

    def snapshot(self, t: float) -> Snapshot:
        """Finished requests and tokens generated by each request at time ``t`` (seconds)."""
        done, ds_done = self.steps_done_at(t)
        gen = np.zeros(len(self._phases), dtype=np.int64)
        for i, phases in enumerate(self._phases):
            g = self._generated0[i]
            for kind, a, b, n in phases:
                if kind == 0:
                    if a >= done:
                        break
                    g = b
                else:
                    if a >= ds_done:
                        break
                    g = b + min(ds_done - a, n)
            gen[i] = g
        return Snapshot(time_s=t, finished=self.finish_s <= t, generated=gen)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _StepLogBuilder:
    """Collects per-step rows; bulk decode runs are expanded with numpy."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, ...]] = []
        self.chunks: list[NDArray[np.float64]] = []

    def add(self, row: tuple[float, ...]) -> None:
        self.rows.append(row)

    def add_run(
        self, n: int, context0: int, seg: _Segment, kv: list[int], preempted: int = 0
    ) -> None:
        self._flush()
        k = seg[1]
        j = np.arange(k, dtype=np.float64)
        lat = seg[3] + seg[4] * j
        block = np.empty((k, 9), dtype=np.float64)
        block[:, 0] = 0
        block[:, 1] = n
        block[:, 2] = n
        block[:, 3] = context0 + n * j
        block[:, 4] = 0.0
        block[:, 5] = 0
        block[0, 5] = preempted
        block[:, 6] = lat
        block[:, 7] = seg[2] + np.cumsum(lat)
        block[:, 8] = kv
        self.chunks.append(block)

    def _flush(self) -> None:
        if self.rows:
            self.chunks.append(np.asarray(self.rows, dtype=np.float64).reshape(-1, 9))
            self.rows = []

    def build(self) -> StepLog:
        self._flush()
        a = np.concatenate(self.chunks) if self.chunks else np.zeros((0, 9))
        ints = a[:, [0, 1, 2, 3, 5, 8]].round().astype(np.int64)
        return StepLog(
            prefill_tokens=ints[:, 0],
            decode_seqs=ints[:, 1],
            num_seqs=ints[:, 2],
            context_tokens=ints[:, 3],
            attn_pairs=a[:, 4].copy(),
            preempted=ints[:, 4],
            latency_s=a[:, 6].copy(),
            end_s=a[:, 7].copy(),
            kv_blocks=ints[:, 5],
        )


class _DecodeSet:
    """Requests in their decode phase, kept as aggregates.

    A member's computed tokens at step boundary ``s`` are ``D + s``; its KV blocks are
    ``ceil((D + s) / bs)``. Writing ``D = bs * q + key`` gives the set's blocks at ``s`` as
    ``sum(q) + sum over keys of hist[key] * ceil((key + s) / bs)``, evaluated in O(bs).
    """

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.n = 0  # members
        self.sum_d = 0  # tokens; sum of D over members
        self.q_sum = 0  # blocks; sum of q over members
        self.hist = [0] * block_size  # members per key
        self.heap: list[tuple[int, int, int]] = []  # (finish step, request, epoch)
        self._memo: dict[int, int] = {}  # step -> blocks, valid until the next add/remove

    def add(self, d: int) -> None:
        self._memo = {}
        q, key = divmod(d, self.bs)
        self.n += 1
        self.sum_d += d
        self.q_sum += q
        self.hist[key] += 1

    def remove(self, d: int) -> None:
        self._memo = {}
        q, key = divmod(d, self.bs)
        self.n -= 1
        self.sum_d -= d
        self.q_sum -= q
        self.hist[key] -= 1

    def blocks(self, s: int) -> int:
        """Exact KV blocks held by the members at step boundary ``s``."""
        if self.n == 0:
            return 0
        got = self._memo.get(s)
        if got is not None:
            return got
        m, r = divmod(s, self.bs)
        extra = self.n - (self.hist[0] if r == 0 else 0)
        if r > 1:
            extra += sum(self.hist[self.bs - r + 1 :])
        got = self._memo[s] = self.q_sum + self.n * m + extra
        return got

    def computed(self, s: int) -> int:
        """Sum of computed tokens of the members at step boundary ``s``."""
        return self.sum_d + self.n * s

    def steps_within(self, s: int, cap: int) -> int:
        """Largest k >= 0 with ``blocks(s + k) <= cap`` (every member decoding k more steps).

        Each member gains exactly one block every ``bs`` steps, so
        ``blocks(s + m*bs + r) = blocks(s + r) + n*m``: whole periods first, then bisect r.
        """
        base = self.blocks(s)
        if base > cap or self.n == 0:
            return 0
        periods = (cap - base) // self.n
        room = cap - base - self.n * periods
        lo, hi = 0, self.bs - 1  # largest r with blocks(s + r) - base <= room
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.blocks(s + mid) - base <= room:
                lo = mid
            else:
                hi = mid - 1
        return periods * self.bs + lo


class ReplicaSim:
    """Simulates one engine replica over a fixed request list (see module docstring)."""

    def __init__(
        self,
        requests: Sequence[SimRequest],
        engine: EngineConfig,
        cost: StepCost,
        *,
        record_steps: bool = False,
        bulk: bool = True,
    ) -> None:
        self.cfg = engine
        self.bulk = bulk
        self._requests = requests
        self.cost = cost
        n = len(requests)
        self.prompt = [r.prompt_len for r in requests]
        self.target = _targets(requests, engine)
        self.arrival = [float(r.arrival_s) for r in requests]
        self.gen = [r.generated for r in requests]  # tokens generated (off the decode set)
        self.comp = [0] * n  # tokens computed (off the decode set)
        self.dval = [0] * n  # D of decode-set members
        self.epoch = [0] * n
        self.finish = [math.nan] * n
        self.phases: list[list[_Phase]] = [[] for _ in range(n)]
        self.kids = _dependants(requests)  # request -> requests waiting for it to finish
        if self.kids:
            order = sorted(
                (i for i in range(n) if requests[i].after < 0), key=lambda i: (self.arrival[i], i)
            )
        else:
            order = sorted(range(n), key=lambda i: (self.arrival[i], i))
        order = [i for i in order if not requests[i].resident]
        self.pending = deque(order)  # requests not arrived yet, by (arrival, index)
        self.released: list[tuple[float, int]] = []  # heap of (arrival, request) of dependants
        self.waiting: deque[int] = deque()
        self.running: dict[int, None] = {}  # admission order
        self.prefilling: list[int] = []  # running, not in the decode set, admission order
        self.pre_blocks = 0  # blocks held by prefilling requests
        self.dec = _DecodeSet(engine.block_size)
        self.in_dec = [False] * n
        self.s = 0  # steps done
        self.ds = 0  # decode steps done (the decode set's clock)
        self.t = 0.0  # seconds
        self.preemptions = 0
        self._finished_blocks = 0  # blocks of requests that ended in the last step's prefill
        self.segments: list[_Segment] = []
        self.log = _StepLogBuilder() if record_steps else None
        for i, r in enumerate(requests):
            if r.resident:
                self._seat(i)

    def _seat(self, r: int) -> None:
        """Put resident request r in the decode set, as right after its last token."""
        g = self.gen[r]
        after = self.comp[r] = self.prompt[r] + g - 1
        self.running[r] = None
        self.in_dec[r] = True
        d = self.dval[r] = after - self.ds
        self.dec.add(d)
        self.phases[r].append((1, self.ds, g, self.target[r] - g))
        heapq.heappush(self.dec.heap, (self.ds + self.target[r] - g - 1, r, self.epoch[r]))

    # ------------------------------------------------------------------ driver
    def run(self) -> SimResult:
        """Simulate until every request has finished."""
        while True:
            self._take_arrivals()
            if not self.running and not self.waiting:
                if not self.pending and not self.released:
                    break
                self.t = max(self.t, self._next_arrival())
                continue
            k = self._bulk_len()
            if k > 0:
                self._bulk(k, 0)
            elif self.cfg.mode == "v1" and self._preempt_into_bulk():
                pass
            elif self.cfg.mode == "v1":
                self._step_v1()
            else:
                self._step_legacy()
            self._pop_finished()
        return SimResult(
            total_s=self.t,
            finish_s=np.asarray(self.finish, dtype=np.float64),
            num_steps=self.s,
            num_preemptions=self.preemptions,
            steps=self.log.build() if self.log is not None else None,
            _segments=self.segments,
            _phases=self.phases,
            _generated0=[r.generated for r in self._requests],
        )

    def _take_arrivals(self) -> None:
        if self.released:
            self._take_arrivals_merged()
            return
        while self.pending and self.arrival[self.pending[0]] <= self.t:
            self.waiting.append(self.pending.popleft())

    def _take_arrivals_merged(self) -> None:
        """Arrivals from both the sorted roots and the released dependants, by (arrival, index)."""
        pending, released, arrival, t = self.pending, self.released, self.arrival, self.t
        while True:
            a = pending[0] if pending and arrival[pending[0]] <= t else -1
            if released and released[0][0] <= t and (a < 0 or released[0] < (arrival[a], a)):
                self.waiting.append(heapq.heappop(released)[1])
            elif a >= 0:
                self.waiting.append(pending.popleft())
            else:
                return

    def _next_arrival(self) -> float:
        """Arrival time (seconds) of the next request not yet arrived; inf when none is known."""
        when = self.arrival[self.pending[0]] if self.pending else math.inf
        if self.released and self.released[0][0] < when:
            when = self.released[0][0]
        return when

    def _release(self, r: int) -> None:
        """r has just finished (clock ``self.t``): the requests waiting for it arrive."""
        for c in self.kids[r]:
            a = self.arrival[c] = max(self.t, self.arrival[c])
            heapq.heappush(self.released, (a, c))

    def _known(self, r: int) -> int:
        return self.prompt[r] + self.gen[r]

    # -------------------------------------------------------------- bulk decode
    def _bulk_len(self) -> int:
        """Decode-only steps that can run before anything but the context changes (0: none)."""
        dec = self.dec
        if not self.bulk or dec.n == 0 or self.prefilling:
            return 0
        if self._can_admit(dec.blocks(self.ds + 1)):
            return 0
        while dec.heap and dec.heap[0][2] != self.epoch[dec.heap[0][1]]:
            heapq.heappop(dec.heap)
        k = dec.heap[0][0] - self.ds + 1  # through the next finish step
        if dec.blocks(self.ds + k) > self.cfg.num_kv_blocks:
            k = min(k, dec.steps_within(self.ds, self.cfg.num_kv_blocks))
        if k > 0 and (self.pending or self.released) and len(self.running) < self.cfg.max_num_seqs:
            k = min(k, self._steps_until(self._next_arrival(), k))
        return k

    def _run_segment(self, k: int) -> _Segment:
        n, ctx = self.dec.n, self.dec.computed(self.ds) + self.dec.n
        first = self.cost.step_latency(0, n, n, ctx, 0.0)
        growth = self.cost.context_slope(n) * n
        return (self.s, k, self.t, first, growth, self.ds, 1)

    def _steps_until(self, when: float, k_max: int) -> int:
        """Fewest decode steps (at most k_max) after which the clock reaches ``when``."""
        _, _, t0, first, growth, _, _ = self._run_segment(k_max)
        lo, hi = 1, k_max
        while lo < hi:
            mid = (lo + hi) // 2
            if t0 + first * mid + growth * mid * (mid - 1) / 2.0 >= when:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _preempt_into_bulk(self) -> bool:
        """A decode-only V1 step that must preempt, run as the first step of a bulk run.

        Only when no prompt is being prefilled: the step then preempts the newest requests
        until the rest fit and admits nobody (vLLM admits only in steps without preemption),
        so it is a plain decode step of the survivors; the run continues while
        :meth:`_bulk_len` would allow it. Returns False when this shortcut does not apply.
        """
        if not self.bulk or self.prefilling or self.dec.n == 0:
            return False
        if self.dec.blocks(self.ds + 1) <= self.cfg.num_kv_blocks:
            return False
        _, _, victims = self._schedule_with_preemption()
        if self.dec.n == 0:  # everything was preempted: nothing decodes this step
            self._execute([], victims)
            return True
        k = 1 if self._can_admit(self.dec.blocks(self.ds + 2)) else 0
        if k == 0:
            k = max(1, self._bulk_len_after_first())
        self._bulk(k, victims)
        return True

    def _bulk_len_after_first(self) -> int:
        """Run length when the first step is already fixed (see :meth:`_bulk_len`)."""
        dec = self.dec
        while dec.heap and dec.heap[0][2] != self.epoch[dec.heap[0][1]]:
            heapq.heappop(dec.heap)
        k = dec.heap[0][0] - self.ds + 1
        if dec.blocks(self.ds + k) > self.cfg.num_kv_blocks:
            k = min(k, dec.steps_within(self.ds, self.cfg.num_kv_blocks))
        if k > 1 and (self.pending or self.released) and len(self.running) < self.cfg.max_num_seqs:
            k = min(k, self._steps_until(self._next_arrival(), k))
        return k

    def _bulk(self, k: int, preempted: int) -> None:
        seg = self._run_segment(k)
        if self.log is not None:
            kv = [self.dec.blocks(self.ds + j + 1) for j in range(k)]
            ctx0 = self.dec.computed(self.ds) + self.dec.n
            self.log.add_run(self.dec.n, ctx0, seg, kv, preempted)
        self.segments.append(seg)
        self.t = seg[2] + seg[3] * k + seg[4] * k * (k - 1) / 2.0
        self.s += k
        self.ds += k

    def _can_admit(self, blocks_next: int) -> bool:
        """Whether the next step would admit the head of the waiting queue.

        ``blocks_next`` is the decode set's KV blocks after one more decode step.
        """
        if not self.waiting or len(self.running) >= self.cfg.max_num_seqs:
            return False
        r = self.waiting[0]
        need = self.prompt[r] + self.gen[r]
        if self.cfg.mode == "legacy030":  # admission is checked before the decode step
            free = self.cfg.num_kv_blocks - self.dec.blocks(self.ds)
            if need > self.cfg.max_num_batched_tokens:
                return False
            return free - _cdiv(need, self.cfg.block_size) >= self._watermark()
        free = self.cfg.num_kv_blocks - blocks_next - self.pre_blocks
        budget = self.cfg.max_num_batched_tokens - self.dec.n
        if budget <= 0 or (need > budget and not self.cfg.chunked_prefill):
            return False
        reserve = need if self.cfg.reserve_full_isl else min(need, budget)
        return _cdiv(reserve, self.cfg.block_size) <= free

    def _watermark(self) -> int:
        return int(self.cfg.watermark * self.cfg.num_kv_blocks)

    # ------------------------------------------------------------------ V1 step
    def _step_v1(self) -> None:
        items, budget, total = self._plan_running()  # items: (request, tokens) to prefill
        preempted = 0
        if total > self.cfg.num_kv_blocks:
            items, budget, preempted = self._schedule_with_preemption()
        else:
            budget = self._admit_v1(items, budget, self.cfg.num_kv_blocks - total)
        self._execute(items, preempted)

    def _admit_v1(self, items: list[tuple[int, int]], budget: int, free: int) -> int:
        cfg, waiting, running, prefilling = self.cfg, self.waiting, self.running, self.prefilling
        bs, max_seqs, chunked = cfg.block_size, cfg.max_num_seqs, cfg.chunked_prefill
        full = cfg.reserve_full_isl
        prompt, gen, comp = self.prompt, self.gen, self.comp
        while waiting and len(running) < max_seqs and budget > 0:
            r = waiting[0]
            total = prompt[r] + gen[r]
            if total > budget and not chunked:
                break
            n = total if total < budget else budget
            nb = -(-n // bs)
            if (-(-total // bs) if full else nb) > free:
                break
            waiting.popleft()
            running[r] = None
            prefilling.append(r)
            comp[r] = 0
            items.append((r, n))
            free -= nb
            budget -= n
        return budget

    def _schedule_with_preemption(self) -> tuple[list[tuple[int, int]], int, int]:
        """V1 running-queue pass when KV blocks run short; returns (items, budget, victims).

        vLLM allocates in admission order and, when a request cannot get its blocks, preempts
        the newest running request until it can. The survivors are therefore the longest
        prefix of the running order whose blocks after the step fit, so popping the newest
        request while the total does not fit gives the same set in O(victims x block_size).
        """
        victims = 0
        while True:
            items, budget, total = self._plan_running()
            if total <= self.cfg.num_kv_blocks or not self.running:
                return items, budget, victims
            newest = next(reversed(self.running))
            self._preempt(newest)
            victims += 1

    def _plan_running(self) -> tuple[list[tuple[int, int]], int, int]:
        """Chunks for prefilling requests, budget left, and KV blocks held after the step."""
        bs = self.cfg.block_size
        budget = self.cfg.max_num_batched_tokens - self.dec.n
        total = self.dec.blocks(self.ds + 1)
        items = []
        for r in self.prefilling:
            n = min(self._known(r) - self.comp[r], budget)
            total += _cdiv(self.comp[r] + n, bs)
            budget -= n
            items.append((r, n))
        return items, budget, total

    def _preempt(self, r: int) -> None:
        """Free r's KV, keep its generated tokens and put it at the front of waiting."""
        if self.in_dec[r]:
            d = self.dval[r]
            self.dec.remove(d)
            self.in_dec[r] = False
            self.gen[r] = d + self.ds - self.prompt[r] + 1
            self.epoch[r] += 1
        else:
            self.prefilling.remove(r)
            self.pre_blocks -= _cdiv(self.comp[r], self.cfg.block_size)
        self.comp[r] = 0
        del self.running[r]
        if self.phases[r] and self.phases[r][-1][0] == 1:
            _, start, g0, _ = self.phases[r][-1]
            self.phases[r][-1] = (1, start, g0, self.gen[r] - g0)
        self.waiting.appendleft(r)
        self.preemptions += 1

    # ------------------------------------------------------------ legacy step
    def _step_legacy(self) -> None:
        cfg = self.cfg
        batch: list[int] = []
        longest = 0
        free = cfg.num_kv_blocks - self.dec.blocks(self.ds)
        while self.waiting and len(self.running) + len(batch) < cfg.max_num_seqs:
            r = self.waiting[0]
            size = self._known(r)
            padded = max(longest, size) * (len(batch) + 1)
            nb = _cdiv(size, cfg.block_size)
            if padded > cfg.max_num_batched_tokens or free - nb < self._watermark():
                break
            self.waiting.popleft()
            batch.append(r)
            longest = max(longest, size)
            free -= nb
        if batch:
            self._execute_legacy_prefill(batch, longest)
            return
        self._step_legacy_decode()

    def _step_legacy_decode(self) -> None:
        ds, cap = self.ds, self.cfg.num_kv_blocks
        preempted = 0
        if self.dec.blocks(ds + 1) > cap:  # preempt the latest arrivals until the step fits
            order = sorted(self.running, key=lambda i: (self.arrival[i], i))
            while order and self.dec.blocks(ds + 1) > cap:
                self._preempt(order.pop())
                preempted += 1
        self._execute([], preempted)

    def _execute_legacy_prefill(self, batch: list[int], longest: int) -> None:
        b = len(batch)
        for r in batch:
            self.running[r] = None
            self.prefilling.append(r)
            self.comp[r] = 0
        padded = longest * b
        lat = self.cost.step_latency(padded, 0, b, padded, float(b) * longest * longest)
        self._advance(lat, decodes=False)
        # With padding the step computes every prompt completely.
        self._finish_items([(r, self._known(r)) for r in batch], self.s - 1)
        self._log_row((padded, 0, b, padded, float(b) * longest * longest, 0, lat))

    # ----------------------------------------------------------- step execution
    def _execute(self, items: list[tuple[int, int]], preempted: int) -> None:
        """Run one step: the decode set plus ``items`` (prefill/recompute chunks)."""
        s, n_dec = self.s, self.dec.n
        prefill = ctx = 0
        seqs = n_dec
        attn = 0.0
        comp = self.comp
        for r, n in items:
            if n > 0:
                after = comp[r] + n
                prefill += n
                ctx += after
                attn += float(n) * after
                seqs += 1
        ctx += self.dec.computed(self.ds + 1)
        lat = self.cost.step_latency(prefill, n_dec, seqs, ctx, attn)
        self.segments.append((s, 1, self.t, lat, 0.0, self.ds, 1))
        self.t += lat
        self.s += 1
        self.ds += 1
        if items:
            self._finish_items(items, s)
        self._log_row((prefill, n_dec, seqs, ctx, attn, preempted, lat))

    def _advance(self, lat: float, *, decodes: bool) -> None:
        dstep = 1 if decodes else 0
        self.segments.append((self.s, 1, self.t, lat, 0.0, self.ds, dstep))
        self.t += lat
        self.s += 1
        self.ds += dstep

    def _log_row(self, row: tuple[float, ...]) -> None:
        """Log the step just run; blocks counted before finished requests release theirs."""
        if self.log is not None:
            kv = self.dec.blocks(self.ds) + self.pre_blocks + self._finished_blocks
            self.log.add((*row, self.t, kv))
        self._finished_blocks = 0

    def _finish_items(self, items: list[tuple[int, int]], s: int) -> None:
        """Apply chunks computed in step ``s`` (already run); complete prompts emit a token."""
        bs, comp, gen, target = self.cfg.block_size, self.comp, self.gen, self.target
        for r, n in items:
            before = comp[r]
            after = comp[r] = before + n
            if after < self.prompt[r] + gen[r]:
                self.pre_blocks += _cdiv(after, bs) - _cdiv(before, bs)
                continue
            self.pre_blocks -= _cdiv(before, bs)
            g = gen[r] = gen[r] + 1
            self.phases[r].append((0, s, g, 0))
            self.prefilling.remove(r)
            if g >= target[r]:
                self.finish[r] = self.t
                self._finished_blocks += _cdiv(after, bs)
                del self.running[r]
                if r in self.kids:
                    self._release(r)
                continue
            self.in_dec[r] = True
            d = self.dval[r] = after - self.ds  # its first decode step is at clock self.ds
            self.dec.add(d)
            self.phases[r].append((1, self.ds, g, target[r] - g))
            heapq.heappush(self.dec.heap, (self.ds + target[r] - g - 1, r, self.epoch[r]))

    def _pop_finished(self) -> None:
        dec, last, kids = self.dec, self.ds - 1, self.kids
        while dec.heap and dec.heap[0][0] <= last:
            _, r, ep = heapq.heappop(dec.heap)
            if ep != self.epoch[r]:
                continue
            dec.remove(self.dval[r])
            self.in_dec[r] = False
            self.gen[r] = self.target[r]
            self.finish[r] = self.t
            del self.running[r]
            if kids and r in kids:
                self._release(r)


def _dependants(requests: Sequence[SimRequest]) -> dict[int, list[int]]:
    """Requests waiting on each request (``after``), validated: in range and acyclic."""
    n = len(requests)
    after = [r.after for r in requests]
    kids: dict[int, list[int]] = {}
    for i, a in enumerate(after):
        if a == -1:
            continue
        if a == i:
            raise ValueError(f"request {i}: after={a} refers to the request itself")
        if not 0 <= a < n:
            raise ValueError(
                f"request {i}: after={a} must be -1 or the index of another request (0..{n - 1})"
            )
        kids.setdefault(a, []).append(i)
    if not kids:
        return kids
    state = [0] * n  # 0 unvisited, 1 on the path being followed, 2 known to reach a root
    for i in range(n):
        path = []
        j = i
        while j != -1 and state[j] == 0:
            state[j] = 1
            path.append(j)
            j = after[j]
        if j != -1 and state[j] == 1:
            cycle = " -> ".join(str(k) for k in [*path[path.index(j) :], j])
            raise ValueError(f"request {j}: its after chain forms a cycle ({cycle})")
        for j in path:
            state[j] = 2
    return kids


def _targets(requests: Sequence[SimRequest], engine: EngineConfig) -> list[int]:
    """Output lengths clipped to the context left; validates every request."""
    out = []
    for i, r in enumerate(requests):
        if r.prompt_len <= 0 or r.prompt_len >= engine.max_model_len:
            raise ValueError(
                f"request {i}: prompt_len {r.prompt_len} must be in [1, max_model_len="
                f"{engine.max_model_len})"
            )
        if r.output_len <= 0 or r.generated < 0 or r.generated >= r.output_len:
            raise ValueError(
                f"request {i}: need output_len > generated >= 0 "
                f"(output_len={r.output_len}, generated={r.generated})"
            )
        if r.resident and (r.generated < 1 or r.after >= 0):
            raise ValueError(f"request {i}: a resident request needs generated >= 1, no after")
        target = min(r.output_len, engine.max_model_len - r.prompt_len)
        reserve = int(engine.watermark * engine.num_kv_blocks) if engine.mode == "legacy030" else 0
        if _cdiv(r.prompt_len + target, engine.block_size) + reserve > engine.num_kv_blocks:
            raise ValueError(
                f"request {i}: {r.prompt_len + target} tokens do not fit in num_kv_blocks="
                f"{engine.num_kv_blocks} x block_size={engine.block_size} even alone"
            )
        out.append(target)
    return out


def simulate(
    requests: Sequence[SimRequest],
    engine: EngineConfig,
    cost: StepCost,
    *,
    record_steps: bool = False,
    bulk: bool = True,
) -> SimResult:
    """Simulate one replica serving ``requests`` (see :class:`ReplicaSim`).

    ``bulk=False`` steps token by token (for tests: it must give exactly the same result).
    """
    return ReplicaSim(requests, engine, cost, record_steps=record_steps, bulk=bulk).run()


DpPolicy = Literal["round_robin", "balanced"]


@dataclass(slots=True)
class DpResult:
    """Outcome of a model served by ``dp`` replicas: its time is its slowest replica's."""

    total_s: float  # seconds; slowest replica
    finish_s: NDArray[np.float64]  # seconds per request, input order
    replicas: list[SimResult]
    assignment: list[list[int]]  # request indices (input order) of each replica

    def snapshot(self, t: float) -> Snapshot:
        """Merged snapshot over the replicas at time ``t`` (seconds)."""
        n = len(self.finish_s)
        gen = np.zeros(n, dtype=np.int64)
        for res, idx in zip(self.replicas, self.assignment, strict=True):
            if idx:
                gen[np.asarray(idx)] = res.snapshot(t).generated
        return Snapshot(time_s=t, finished=self.finish_s <= t, generated=gen)


def assign_replicas(
    requests: Sequence[SimRequest], dp: int, policy: DpPolicy = "round_robin"
) -> list[list[int]]:
    """Split request indices over ``dp`` replicas.

    ``round_robin`` deals requests sorted by (arrival, index) in turn, as SamuLLM does;
    ``balanced`` gives each request (same order) to the replica with the fewest tokens so far.

    A request with ``after`` must run on the replica of the request it waits on, so each chain
    (a request without ``after`` and every request waiting on it, transitively) is dealt as
    one unit in its first request's (arrival, index) order and weighs its summed tokens in
    ``balanced``; each replica's indices are then listed in ascending order, so that ties
    between simultaneous arrivals break as they would in one replica.
    """
    if dp <= 0:
        raise ValueError("dp must be positive")
    if policy not in ("round_robin", "balanced"):
        raise ValueError(f"unknown dp policy {policy!r}")
    if any(r.after != -1 for r in requests):
        return _assign_chains(requests, dp, policy)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    out: list[list[int]] = [[] for _ in range(dp)]
    if policy == "round_robin":
        for k, i in enumerate(order):
            out[k % dp].append(i)
        return out
    heap = [(0, d) for d in range(dp)]
    for i in order:
        load, d = heapq.heappop(heap)
        out[d].append(i)
        r = requests[i]
        heapq.heappush(heap, (load + r.prompt_len + r.output_len, d))
    return out


def _assign_chains(requests: Sequence[SimRequest], dp: int, policy: DpPolicy) -> list[list[int]]:
    """:func:`assign_replicas` when some requests wait for others: whole chains per replica."""
    kids = _dependants(requests)  # validates (in range, acyclic)
    roots = sorted(
        (i for i, r in enumerate(requests) if r.after == -1),
        key=lambda i: (requests[i].arrival_s, i),
    )
    out: list[list[int]] = [[] for _ in range(dp)]
    heap = [(0, d) for d in range(dp)]
    for k, root in enumerate(roots):
        members = [root]
        for i in members:  # grows while iterated: the whole tree below root
            members.extend(kids.get(i, ()))
        if policy == "round_robin":
            out[k % dp].extend(members)
            continue
        load, d = heapq.heappop(heap)
        out[d].extend(members)
        tokens = sum(requests[i].prompt_len + requests[i].output_len for i in members)
        heapq.heappush(heap, (load + tokens, d))
    for part in out:
        part.sort()
    return out


def simulate_dp(
    requests: Sequence[SimRequest],
    engine: EngineConfig,
    cost: StepCost,
    dp: int,
    *,
    policy: DpPolicy = "round_robin",
    record_steps: bool = False,
) -> DpResult:
    """Simulate ``dp`` independent replicas, each with ``engine``'s limits."""
    assignment = assign_replicas(requests, dp, policy)
    finish = np.zeros(len(requests), dtype=np.float64)
    results = []
    for idx in assignment:
        res = simulate(_localize(requests, idx), engine, cost, record_steps=record_steps)
        if idx:
            finish[np.asarray(idx)] = res.finish_s
        results.append(res)
    total = max((r.total_s for r in results), default=0.0)
    return DpResult(total_s=total, finish_s=finish, replicas=results, assignment=assignment)


def _localize(requests: Sequence[SimRequest], idx: list[int]) -> list[SimRequest]:
    """The requests ``idx`` of one replica, their ``after`` remapped to positions in ``idx``."""
    sub = [requests[i] for i in idx]
    if all(r.after == -1 for r in sub):
        return sub
    pos = {g: k for k, g in enumerate(idx)}
    out = []
    for g, r in zip(idx, sub, strict=True):
        if r.after != -1:
            if r.after not in pos:
                raise ValueError(f"request {g}: waits on request {r.after}, on another replica")
            r = replace(r, after=pos[r.after])
        out.append(r)
    return out
