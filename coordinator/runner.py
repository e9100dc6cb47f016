"""One job's run: launch planned assignments, feed ready requests, fold events, recover work.

A :class:`JobRun` is driven by :mod:`coordinator.service`. Its state is rebuilt from Redis by
:meth:`JobRun.load` (committed outputs, task records, ownership, partial prefixes, launched
assignments), so a restarted coordinator resumes where the last one stopped.

- **Launch** (method.md §6.2, plan.py's rule): assignment ``k`` launches when every earlier
  assignment sharing one of its GPUs has ended (those of the same unit are stopped first, and
  their unfinished requests move to ``k`` with their prefixes), the earlier assignments of its
  unit have launched, and every unit it consumes from has started. Its requests are split over
  its ``dp`` groups (chains kept together): ready ones go in the task, the rest are fed to the
  task's feed list as their inputs commit (model-level pipelining).
- **Recovery**: requests of a started unit that no live task owns (their task stopped, failed or
  lost its worker) go to a new task on a free live group, the same group first.
- **Fencing**: moving a request bumps its epoch, so a late commit of the old task is refused.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from coordinator.job import JobModel
from coordinator.messages import (
    TASK_RUN_STAGE,
    Control,
    GroupRef,
    Partial,
    ProgressEvent,
    RequestItem,
    RequestOutput,
    SkipItem,
    StageResult,
    StageTask,
    WorkerInfo,
)
from coordinator.store import Ledger, decode
from planning.cluster import GpuGroup

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # failed tasks a request may be part of before it is failed (reliability P7)
DEAD_AFTER_S = 5.0  # s without a heartbeat: the worker is gone and its task is moved
TASK_DEADLINE_S = 5 * 3600.0  # s; a task stops (as preempted) after this


@dataclass(slots=True)
class TaskRec:
    """A dispatched task, as the coordinator persists it."""

    task_id: str
    assignment: int  # plan index, -1 = recovery
    unit: int
    node: str
    gpus: list[int]
    queue: str
    keys: list[str]  # every request the task ends with
    status: str = "created"  # created | sent | running | stopping | ended
    sent_at: float = 0.0  # unix s
    ended_at: float = 0.0  # unix s

    @property
    def group(self) -> GpuGroup:
        return GpuGroup(self.node, tuple(self.gpus))

    @property
    def live(self) -> bool:
        return self.status != "ended"


@dataclass(slots=True)
class TaskLive:
    """Folded progress of a running task."""

    tokens: dict[str, int] = field(default_factory=dict)  # key -> tokens generated
    engine_s: float = 0.0  # engine clock, s
    steps: int = 0
    step_latency_s: float = 0.0  # s, latest mean
    seq: int = -1


class JobRun:
    """Runtime state and decisions of one job (see module docstring)."""

    def __init__(self, r: redis.Redis, celery: Any, job: JobModel, *, now: Any = time.time):
        self.r, self.celery, self.job, self.now = r, celery, job, now
        self.ledger = Ledger(r, job.job_id)
        self.k = self.ledger.keys
        self.done: dict[str, int] = {}  # key -> output tokens
        self.failed: dict[str, str] = {}  # key -> error
        self.tasks: dict[str, TaskRec] = {}
        self.owner: dict[str, str] = {}  # key -> live task id
        self.sent: set[str] = set()  # keys sent to their current owner
        self.partial: dict[str, Partial] = {}  # key -> prefix to continue from
        self.epoch: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.launched: set[int] = set()
        self.started_units: set[int] = set()
        self.live: dict[str, TaskLive] = {}
        self.dispatched: set[str] = set()  # keys some task was given (moving them fences)
        self.t_start = 0.0  # unix s; dispatch began
        self.t_last_commit = 0.0  # unix s
        self.time_scale: float | None = None  # real s per engine s of the job's workers

    # ------------------------------------------------------------------ state
    def load(self) -> None:
        """Rebuild the state from Redis (a fresh job has none)."""
        for key, raw in self.r.hgetall(self.k.out).items():
            self.done[decode(key)] = json.loads(raw)["output_tokens"]
        self.failed = {decode(k): decode(v) for k, v in self.r.hgetall(self.k.failed).items()}
        self.epoch = {decode(k): int(v) for k, v in self.r.hgetall(self.k.epoch).items()}
        for raw in self.r.hvals(self.k.tasks):
            rec = TaskRec(**json.loads(raw))
            self.tasks[rec.task_id] = rec
            if rec.assignment >= 0:
                self.launched.add(rec.assignment)
            self.started_units.add(rec.unit)
            self.dispatched.update(rec.keys)
            if rec.live:
                for key in rec.keys:
                    self.owner[key] = rec.task_id
        for raw in self.r.hvals(self.k.partial_key):
            p = Partial.model_validate_json(raw)
            self.partial[p.key] = p
        self.sent = {decode(k) for k in self.r.hkeys(self.k.sent_key)}
        self.launched |= {int(x) for x in self.r.smembers(self.k.skipped_key)}
        st = self.r.hgetall(self.k.state)
        self.t_start = float(st.get(b"started_at", 0) or 0)
        self.t_last_commit = float(st.get(b"last_commit_at", 0) or 0)
        if st.get(b"time_scale"):
            self.time_scale = float(st[b"time_scale"])
        for rec in self.tasks.values():
            if rec.status == "created":
                self._send(rec)
        # Inputs committed while no coordinator ran (or before it applied them) fed nothing:
        # feed every owned request that is ready now and was never sent.
        for key in list(self.owner):
            self._maybe_feed(key)

    def _save(self, rec: TaskRec) -> None:
        self.r.hset(self.k.tasks, rec.task_id, json.dumps(asdict(rec)))

    # ------------------------------------------------------------------ events
    def on_event(self, fields: dict[bytes, bytes]) -> None:
        """Apply one entry of the job's event stream (idempotent)."""
        kind = decode(fields.get(b"type", b""))
        if kind == "commit":
            out = RequestOutput.model_validate_json(fields[b"data"])
            self._on_commit(out.key, out.output_tokens)
        elif kind == "result":
            self._on_result(StageResult.model_validate_json(fields[b"data"]))
        elif kind == "started":
            if not self.t_start:  # the job's clock starts when its first task does
                self.t_start = float(fields.get(b"at", b"0")) or self.now()
                self.r.hset(self.k.state, "started_at", self.t_start)
            rec = self.tasks.get(decode(fields[b"data"]))
            if rec is not None and rec.status in ("created", "sent"):
                rec.status = "running"
                self._save(rec)

    def on_progress(self, fields: dict[bytes, bytes]) -> None:
        """Fold one progress event into the task's live view."""
        ev = ProgressEvent.model_validate_json(fields[b"data"])
        live = self.live.setdefault(ev.task_id, TaskLive())
        if ev.seq <= live.seq:
            return
        live.seq, live.engine_s, live.steps = ev.seq, ev.engine_s, ev.steps
        live.step_latency_s = ev.step_latency_s or live.step_latency_s
        for key, n in ev.tokens.items():
            live.tokens[key] = max(n, live.tokens.get(key, 0))
        for key in ev.finished:
            live.tokens.pop(key, None)

    def _on_commit(self, key: str, tokens: int) -> None:
        if key in self.done:
            return
        self.done[key] = tokens
        self.t_last_commit = self.now()
        self.r.hset(self.k.state, "last_commit_at", self.t_last_commit)
        self.partial.pop(key, None)
        for d in self.job.downstream.get(key, ()):
            self._maybe_feed(d)

    def _on_result(self, res: StageResult) -> None:
        rec = self.tasks.get(res.task_id)
        if rec is None or not rec.live:
            return
        prefixes = {p.key: p for p in res.unfinished if p.generated_tokens > 0}
        if res.status == "failed":
            log.warning("task %s on %s failed: %s", rec.task_id, rec.queue, res.error)
        self._end_task(rec, prefixes, failed=res.error if res.status == "failed" else None)

    def _end_task(self, rec: TaskRec, prefixes: dict[str, Partial], failed: str | None) -> None:
        """Release a task's keys: unfinished ones become orphans (with their prefixes)."""
        rec.status, rec.ended_at = "ended", self.now()
        self._save(rec)
        self.live.pop(rec.task_id, None)
        for key in rec.keys:
            if self.owner.get(key) != rec.task_id:
                continue
            del self.owner[key]
            self.sent.discard(key)
            self.r.hdel(self.k.sent_key, key)
            if key in self.done or key in self.failed:
                continue
            if key in prefixes:
                self.partial[key] = prefixes[key]
                self.r.hset(self.k.partial_key, key, prefixes[key].to_json())
            if failed is not None:
                self.attempts[key] = self.attempts.get(key, 0) + 1
                if self.attempts[key] >= MAX_ATTEMPTS:
                    self._fail(key, f"{failed} ({MAX_ATTEMPTS} attempts)")

    def _fail(self, key: str, error: str) -> None:
        """A request that will never run; what consumes it fails too."""
        if key in self.failed or key in self.done:
            return
        self.failed[key] = error
        self.r.hset(self.k.failed, key, error)
        owner = self.owner.get(key)
        if owner is not None and key not in self.sent:
            item = SkipItem(key=key, reason=error)
            self.r.rpush(self.k.feed(owner), item.to_json())
            self.sent.add(key)
        for d in self.job.downstream.get(key, ()):
            self._fail(d, f"input {key} failed")

    # ------------------------------------------------------------------ workers
    def check_workers(self, workers: dict[str, WorkerInfo]) -> None:
        """Tasks whose worker stopped beating: cancel them and move their requests."""
        t = self.now()
        for rec in list(self.tasks.values()):
            if rec.status not in ("sent", "running", "stopping"):
                continue
            w = workers.get(rec.queue)
            gone = w is None and rec.status in ("running", "stopping")
            stale = w is not None and t - w.heartbeat_at > DEAD_AFTER_S
            if (gone or stale) and self.ledger.cancel_task(rec.task_id):
                log.warning("worker of %s lost: moving task %s", rec.queue, rec.task_id)
                self.ledger.bump_stat("tasks_lost")
                self._end_task(rec, {}, failed="worker lost")

    # ------------------------------------------------------------------ launching
    def advance(self, workers: dict[str, WorkerInfo]) -> None:
        """Launch every planned assignment whose turn has come, then recover orphans."""
        if not self.tasks and not self._workers_ready(workers):
            return
        plan = self.job.plan.assignments
        for k in range(len(plan)):
            if k not in self.launched and self._may_launch(k):
                self._launch(k)
        self._recover(workers)

    def _workers_ready(self, workers: dict[str, WorkerInfo]) -> bool:
        """A job starts once every queue its plan uses has a live worker (else it waits)."""
        t = self.now()
        queues = {g.queue_name for a in self.job.plan.assignments for g in a.groups}
        missing = sorted(
            q for q in queues if q not in workers or t - workers[q].heartbeat_at > DEAD_AFTER_S
        )
        self.r.hset(self.k.state, "waiting_for", " ".join(missing))
        return not missing

    def _may_launch(self, k: int) -> bool:
        plan = self.job.plan.assignments
        a = plan[k]
        mine = set(a.gpu_ids())
        for j in range(k):
            b = plan[j]
            if b.unit == a.unit and j not in self.launched:
                return False
            shared = mine & set(b.gpu_ids()) and b.unit != a.unit
            if shared and (j not in self.launched or self._running(j)):
                return False
        if any(u not in self.started_units for u in self.job.units[a.unit].upstream):
            return False
        return not self._stop_unit(a.unit, k)

    def _running(self, k: int) -> bool:
        return any(t.assignment == k and t.live for t in self.tasks.values())

    def _stop_unit(self, unit: int, k: int) -> bool:
        """Ask the unit's live tasks to stop before ``k`` replaces them; True while any runs."""
        busy = False
        for rec in self.tasks.values():
            if rec.unit == unit and rec.live:
                busy = True
                if rec.status != "stopping":
                    self.preempt(rec.task_id, f"replaced by assignment {k}")
        return busy

    def preempt(self, task_id: str, reason: str, target_queue: str | None = None) -> None:
        """Tell a running task to stop between two steps (durable control key)."""
        rec = self.tasks[task_id]
        ctl = Control(kind="preempt", task_id=task_id, reason=reason, target_queue=target_queue)
        self.r.set(self.k.ctl(task_id), ctl.to_json())
        rec.status = "stopping"
        self._save(rec)

    def _open_keys(self, unit: int) -> list[str]:
        """Requests of ``unit`` neither done, failed nor owned by a live task."""
        return [
            key for key in self.job.unit_keys[unit]
            if key not in self.done and key not in self.failed and key not in self.owner
        ]  # fmt: skip

    def _launch(self, k: int) -> None:
        a = self.job.plan.assignments[k]
        self.launched.add(k)
        keys = self._open_keys(a.unit)
        self.started_units.add(a.unit)
        if not keys:
            self.r.sadd(self.k.skipped_key, k)
            return
        for group, part in zip(a.groups, self.job.split(keys, a.dp), strict=True):
            if part:
                self._dispatch(k, a.unit, group, part, self.job.keep_loaded(k, group))

    def _recover(self, workers: dict[str, WorkerInfo]) -> None:
        """Give orphaned requests of started units a task on a free live group."""
        for unit in sorted(self.started_units):
            if self._pending_launch(unit):
                continue
            keys = self._open_keys(unit)
            if not keys:
                continue
            group = self._free_group(unit, workers)
            if group is not None:
                self._dispatch(-1, unit, group, keys, False)

    def _pending_launch(self, unit: int) -> bool:
        """Whether a planned assignment of ``unit`` is still to launch (it takes the orphans)."""
        return any(
            a.unit == unit and k not in self.launched
            for k, a in enumerate(self.job.plan.assignments)
        )

    def _free_group(self, unit: int, workers: dict[str, WorkerInfo]) -> GpuGroup | None:
        """A live worker's group that overlaps no live task, preferring the unit's last group."""
        busy = [t.group for t in self.tasks.values() if t.live]
        tps = set(self.job.tps(unit))
        t = self.now()
        last = [r.queue for r in self.tasks.values() if r.unit == unit]
        cands = []
        for w in workers.values():
            g = GpuGroup(w.node, tuple(w.gpus))
            if t - w.heartbeat_at > DEAD_AFTER_S or len(g.gpus) not in tps:
                continue
            if any(g.overlaps(other) for other in busy):
                continue
            cands.append((w.queue not in last[-1:], len(g.gpus), w.queue, g))
        return min(cands)[3] if cands else None

    def _dispatch(self, k: int, unit: int, group: GpuGroup, keys: list[str], keep: bool) -> None:
        rec = TaskRec(
            task_id=f"{self.job.job_id}-{uuid.uuid4().hex[:12]}", assignment=k, unit=unit,
            node=group.node, gpus=list(group.gpus), queue=group.queue_name, keys=keys,
        )  # fmt: skip
        moved = [key for key in keys if key in self.dispatched]
        self.dispatched.update(keys)
        for key in moved:  # fence earlier owners
            self.epoch[key] = self.epoch.get(key, 0) + 1
        if moved:
            self.r.hset(self.k.epoch, mapping={key: self.epoch[key] for key in moved})
        for key in keys:
            self.owner[key] = rec.task_id
        self.tasks[rec.task_id] = rec
        self._save(rec)
        self._send(rec, keep)

    def _send(self, rec: TaskRec, keep: bool = False) -> None:
        ready = [key for key in rec.keys if self._ready(key) and key not in self.failed]
        items = [self._item(key) for key in ready]
        task = StageTask(
            job_id=self.job.job_id, task_id=rec.task_id, assignment=rec.assignment,
            unit=self.job.units[rec.unit].name,
            group=GroupRef(node=rec.node, gpus=tuple(rec.gpus), queue=rec.queue),
            engine=self.job.engine(rec.unit, len(rec.gpus)), requests=tuple(items),
            expected=len(rec.keys), keep_loaded=keep, deadline_s=TASK_DEADLINE_S,
            lengths_like=self.job.lengths_like.get(self.job.model(rec.unit)),
        )  # fmt: skip
        self._mark_sent(ready, rec.task_id)
        self.celery.send_task(TASK_RUN_STAGE, args=[task.to_wire()], queue=rec.queue,
                              task_id=rec.task_id)  # fmt: skip
        rec.status, rec.sent_at = "sent", self.now()
        self._save(rec)
        for key in rec.keys:
            if key in self.failed:
                self._skip(key, rec.task_id)

    def _skip(self, key: str, task_id: str) -> None:
        self.r.rpush(self.k.feed(task_id), SkipItem(key=key, reason=self.failed[key]).to_json())
        self._mark_sent([key], task_id)

    def _mark_sent(self, keys: list[str], task_id: str) -> None:
        if keys:
            self.sent.update(keys)
            self.r.hset(self.k.sent_key, mapping={key: task_id for key in keys})

    def _ready(self, key: str) -> bool:
        return all(d in self.done for d in self.job.reqs[key].deps)

    def _maybe_feed(self, key: str) -> None:
        owner = self.owner.get(key)
        if owner is None or key in self.sent or key in self.failed or not self._ready(key):
            return
        self.r.rpush(self.k.feed(owner), self._item(key).to_json())
        self._mark_sent([key], owner)

    def _item(self, key: str) -> RequestItem:
        """The request as a worker gets it: its prompt with its inputs' outputs appended."""
        req = self.job.reqs[key]
        texts: list[str] = []
        if req.deps:
            raw = self.r.hmget(self.k.out, list(req.deps))
            texts = [json.loads(x)["text"] for x in raw if x is not None]
        p = self.partial.get(key)
        return RequestItem(
            key=key, node=req.node, request_id=req.request_id, prompt="\n\n".join(texts),
            prompt_tokens=req.base_tokens + sum(self.done[d] for d in req.deps),
            sampling=self.job.sampling[req.node],
            generated_text=p.generated_text if p else "",
            generated_tokens=p.generated_tokens if p else 0, epoch=self.epoch.get(key, 0),
        )  # fmt: skip

    # ------------------------------------------------------------------ status
    @property
    def total(self) -> int:
        return len(self.job.reqs)

    def finished(self) -> bool:
        """Every request committed or failed, and no task still running."""
        return len(self.done) + len(self.failed) >= self.total and not any(
            t.live for t in self.tasks.values()
        )
