"""A deliberately naive per-step, per-request scheduler used to cross-check the simulator.

It shares no code with ``planning.batching_sim`` beyond the value types and the cost model:
every step walks every request explicitly, so it is slow but easy to read against vLLM's
scheduler (V1: ``vllm/v1/core/sched/scheduler.py``; 0.3.0: ``vllm/core/scheduler.py``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from planning.batching_sim import EngineConfig, SimRequest
from planning.cost_model import StepCostModel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class RefOutcome:
    finish_s: list[float]
    num_steps: int
    preemptions: int
    tokens_computed: int  # all tokens run through the model (recomputation included)
    max_blocks: int
    clock: list[float] = field(default_factory=list)


class _Req:
    def __init__(self, r: SimRequest, target: int) -> None:
        self.prompt, self.target, self.arrival = r.prompt_len, target, r.arrival_s
        self.gen, self.comp, self.decoding = r.generated, 0, False

    @property
    def known(self) -> int:
        return self.prompt + self.gen


def run_reference(reqs: list[SimRequest], cfg: EngineConfig, cost: StepCostModel) -> RefOutcome:
    rs = [_Req(r, min(r.output_len, cfg.max_model_len - r.prompt_len)) for r in reqs]
    # A request with ``after`` is submitted when that request finishes (or at its own arrival).
    pending = deque(
        sorted((i for i in range(len(rs)) if reqs[i].after < 0), key=lambda i: (rs[i].arrival, i))
    )
    waiting: deque[int] = deque()
    running: list[int] = []
    out = RefOutcome([math.nan] * len(rs), 0, 0, 0, 0)
    t = 0.0
    while pending or waiting or running:
        while pending and rs[pending[0]].arrival <= t:
            waiting.append(pending.popleft())
        if not waiting and not running:
            t = max(t, rs[pending[0]].arrival)
            continue
        if cfg.mode == "v1":
            sched = _schedule_v1(rs, cfg, running, waiting, out)
        else:
            sched = _schedule_legacy(rs, cfg, running, waiting, out)
        t += _latency(rs, cfg, cost, sched)
        out.num_steps += 1
        out.clock.append(t)
        out.max_blocks = max(out.max_blocks, _blocks_after(rs, cfg, running, sched))
        released = False
        for i, n in sched:
            r = rs[i]
            r.comp += n
            out.tokens_computed += n
            if r.comp == r.known:
                r.gen += 1
                r.decoding = True
                if r.gen >= r.target:
                    out.finish_s[i] = t
                    running.remove(i)
                    for c, q in enumerate(reqs):
                        if q.after == i:
                            rs[c].arrival = max(t, rs[c].arrival)
                            pending.append(c)
                            released = True
        if released:
            pending = deque(sorted(pending, key=lambda i: (rs[i].arrival, i)))
    return out


def _blocks_after(rs: list[_Req], cfg: EngineConfig, running: list[int], sched) -> int:
    extra = dict(sched)
    return sum(_cdiv(rs[i].comp + extra.get(i, 0), cfg.block_size) for i in running)


def _free(rs: list[_Req], cfg: EngineConfig, running: list[int]) -> int:
    return cfg.num_kv_blocks - sum(_cdiv(rs[i].comp, cfg.block_size) for i in running)


def _preempt(rs: list[_Req], i: int, waiting: deque[int], out: RefOutcome) -> None:
    rs[i].comp = 0
    rs[i].decoding = False
    waiting.appendleft(i)
    out.preemptions += 1


def _schedule_v1(rs, cfg, running, waiting, out):
    bs, budget, free = cfg.block_size, cfg.max_num_batched_tokens, _free(rs, cfg, running)
    sched: list[tuple[int, int]] = []
    preempted = False
    k = 0
    while k < len(running) and budget > 0:
        i = running[k]
        n = min(rs[i].known - rs[i].comp, budget)
        nb = _cdiv(rs[i].comp + n, bs) - _cdiv(rs[i].comp, bs)
        while nb > free:
            v = running.pop()
            free += _cdiv(rs[v].comp, bs)
            _preempt(rs, v, waiting, out)
            preempted = True
            if v == i:
                break
        if i not in running:
            break
        free -= nb
        budget -= n
        sched.append((i, n))
        k += 1
    while not preempted and waiting and len(running) < cfg.max_num_seqs and budget > 0:
        i = waiting[0]
        if rs[i].known > budget and not cfg.chunked_prefill:
            break
        n = min(rs[i].known, budget)
        # vLLM's scheduler_reserve_full_isl: the whole known sequence must fit, not the chunk.
        if _cdiv(rs[i].known if cfg.reserve_full_isl else n, bs) > free:
            break
        waiting.popleft()
        running.append(i)
        sched.append((i, n))
        free -= _cdiv(n, bs)
        budget -= n
    return sched


def _schedule_legacy(rs, cfg, running, waiting, out):
    bs, free = cfg.block_size, _free(rs, cfg, running)
    watermark = int(cfg.watermark * cfg.num_kv_blocks)
    batch: list[int] = []
    longest = 0
    while waiting and len(running) + len(batch) < cfg.max_num_seqs:
        i = waiting[0]
        size = rs[i].known
        nb = _cdiv(size, bs)
        if max(longest, size) * (len(batch) + 1) > cfg.max_num_batched_tokens:
            break
        if free - nb < watermark:
            break
        waiting.popleft()
        batch.append(i)
        longest = max(longest, size)
        free -= nb
    if batch:
        running.extend(batch)
        return [(i, rs[i].known) for i in batch]
    order = sorted(running, key=lambda i: (rs[i].arrival, i))
    sched = []
    k = 0
    while k < len(order):
        i = order[k]
        nb = _cdiv(rs[i].comp + 1, bs) - _cdiv(rs[i].comp, bs)
        while nb > free:
            v = order.pop()
            running.remove(v)
            free += _cdiv(rs[v].comp, bs)
            _preempt(rs, v, waiting, out)
            if v == i:
                break
        if i not in running:
            break
        free -= nb
        sched.append((i, 1))
        k += 1
    return sched


def _latency(rs, cfg, cost, sched) -> float:
    if cfg.mode == "legacy030" and sched and not rs[sched[0][0]].decoding:
        b = len(sched)
        longest = max(n for _, n in sched)
        padded = b * longest
        return cost.step_latency(padded, 0, b, padded, float(b) * longest * longest)
    prefill = decode = ctx = 0
    attn = 0.0
    seqs = 0
    for i, n in sched:
        after = rs[i].comp + n
        ctx += after
        seqs += 1
        if rs[i].decoding:
            decode += 1
        else:
            prefill += n
            attn += float(n) * after
    return cost.step_latency(prefill, decode, seqs, ctx, attn)
