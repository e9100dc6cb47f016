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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis

from apps.requests import RequestText, node_of, render
from coordinator.adjust import Adjuster
from coordinator.calibration import ModelEstimates, Seen, Window
from coordinator.job import JobModel, Req, plan_doc
from coordinator.messages import (
    TASK_RUN_STAGE,
    ChatMessage,
    Control,
    GroupRef,
    Partial,
    ProgressEvent,
    RequestItem,
    RequestOutput,
    SamplingParams,
    SkipItem,
    StageResult,
    StageTask,
    WorkerInfo,
)
from coordinator.replan import ReplanSkip, apply_replan, planner_config, replan
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
        self.routed: dict[str, str] = {}  # router candidate not chosen -> why
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
        self.replan: dict[str, Any] | None = None  # re-plan once routes were known (or why not)
        self.stopped: set[str] = set()  # committed keys that ended on their own (not at a cap)
        self.estimates = ModelEstimates(job)  # measured latency and lengths vs belief, per model
        self.adjuster = Adjuster()  # run-time re-planning (coordinator/adjust.py)

    # ------------------------------------------------------------------ state
    def load(self) -> None:
        """Rebuild the state from Redis (a fresh job has none)."""
        for key, raw in self.r.hgetall(self.k.out).items():
            out = json.loads(raw)
            self.done[decode(key)] = out["output_tokens"]
            if out.get("finish_reason") == "stop":
                self.stopped.add(decode(key))
        self.failed = {decode(k): decode(v) for k, v in self.r.hgetall(self.k.failed).items()}
        self.routed = {decode(k): decode(v) for k, v in self.r.hgetall(self.k.routed).items()}
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
        docs = [json.loads(raw) for raw in self.r.lrange(self.k.switches, 0, -1)]
        self.adjuster.switches = len(docs)
        if st.get(b"switches"):  # what status shows; the next switch appends to it
            self.adjuster.history = json.loads(st[b"switches"])
        if st.get(b"replan"):
            self.replan = json.loads(st[b"replan"])
            if "assignments" in self.replan:
                docs.append(self.replan)
        for doc in sorted(docs, key=lambda d: d.get("plan_len", -1)):
            self.job = apply_replan(self.job, doc)  # in the order they were made
        for rec in self.tasks.values():
            if rec.status == "created":
                self._send(rec)
        for key in self.job.routes:  # a router output committed while no coordinator ran
            if key in self.done:
                self._route(key)
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
            if out.finish_reason == "stop":
                self.stopped.add(out.key)
            self._on_commit(out.key, out.output_tokens, self.stamp(fields))
        elif kind == "result":
            self._on_result(StageResult.model_validate_json(fields[b"data"]))
        elif kind == "started":
            # the job's clock starts when its first task does; two workers may append their
            # "started" out of the order of their clocks, so the earliest stamp wins
            at = self.stamp(fields)
            if not self.t_start or at < self.t_start:
                self.t_start = at
                self.r.hset(self.k.state, "started_at", self.t_start)
            rec = self.tasks.get(decode(fields[b"data"]))
            if rec is not None and rec.status in ("created", "sent"):
                rec.status = "running"
                self._save(rec)

    def stamp(self, fields: dict[bytes, bytes]) -> float:
        """The unix time of an event: its ``at`` (the worker's stamp, else the stream entry's
        time, coordinator/service.py), else now."""
        return float(fields.get(b"at", b"0")) or self.now()

    def on_progress(self, fields: dict[bytes, bytes]) -> None:
        """Fold one progress event into the task's live view."""
        ev = ProgressEvent.model_validate_json(fields[b"data"])
        live = self.live.setdefault(ev.task_id, TaskLive())
        if ev.seq <= live.seq:
            return
        self._calibrate(ev, live)
        live.seq, live.engine_s, live.steps = ev.seq, ev.engine_s, ev.steps
        live.step_latency_s = ev.step_latency_s or live.step_latency_s
        for key, n in ev.tokens.items():
            live.tokens[key] = max(n, live.tokens.get(key, 0))
        for key in ev.finished:
            live.tokens.pop(key, None)

    def _calibrate(self, ev: ProgressEvent, live: TaskLive) -> None:
        """One latency observation for the task's model from this window (coordinator/
        calibration.py); requests seen for the first time were prefilled in it."""
        rec = self.tasks.get(ev.task_id)
        if rec is None or live.seq < 0:
            return
        ctx = {k: self.prompt_tokens(k) + n for k, n in ev.tokens.items()}
        ended = {k: self.prompt_tokens(k) + live.tokens[k] for k in ev.finished
                 if k in live.tokens}  # fmt: skip
        joined = {k: self.prompt_tokens(k) + (p.generated_tokens if (p := self.partial.get(k))
                  else 0) for k in ev.tokens if k not in live.tokens}  # fmt: skip
        window = Window(ev.step_latency_s, ev.steps - live.steps, ctx, ended, joined)
        self.estimates.observe(self.job.model(rec.unit), len(rec.gpus), window)

    def prompt_tokens(self, key: str) -> int:
        """Tokens of a request's prompt: its own, plus the outputs it consumes so far."""
        req = self.job.reqs[key]
        return req.base_tokens + sum(self.done.get(d, 0) for d in req.deps)

    def seen(self) -> Seen:
        """The lengths seen so far: committed outputs and running requests' tokens."""
        running = {k: n for t in self.live.values() for k, n in t.tokens.items()}
        return Seen(self.done, self.stopped, running, self.prompt_tokens)

    def _on_commit(self, key: str, tokens: int, at: float) -> None:
        """``at``: when the commit happened (unix s), not when the coordinator reads it."""
        if key in self.done:
            return
        self.done[key] = tokens
        # stored with the model marks, once per batch of events (Coordinator._store_marks)
        self.t_last_commit = max(self.t_last_commit, at)
        self.partial.pop(key, None)
        if key in self.job.routes:
            self._route(key)
        for d in self.job.downstream.get(key, ()):
            self._maybe_feed(d)

    def _route(self, key: str) -> None:
        """A router's output is in: keep the candidate it names, close the others."""
        cands = self.job.routes[key]
        raw = self.r.hget(self.k.out, key)
        text = json.loads(raw)["text"] if raw else ""
        info = self.job.loaded.prompts[self.job.reqs[cands[0]].node].route
        assert info is not None
        label = info.choose(text)
        chosen = [c for c in cands if self._label(c) == label]
        for c in cands:
            if c in chosen:
                continue
            if label is None:
                self._fail(c, f"router {key}: its output names none of {', '.join(info.labels)}: "
                              f"{text[:120]!r}")  # fmt: skip
            elif not chosen:
                self._fail(c, f"router {key} chose {label!r}, whose request was rejected at load")
            else:
                self._close(c, f"routed to {label!r} by {key}")

    def _label(self, key: str) -> str | None:
        info = self.job.loaded.prompts[self.job.reqs[key].node].route
        return info.label if info is not None else None

    def _close(self, key: str, why: str) -> None:
        """A candidate the router did not choose: not run, not an error, consumers go on."""
        if self.closed(key) or key in self.done:
            return
        self.routed[key] = why
        self.r.hset(self.k.routed, key, why)
        self._skip_if_owned(key, why)
        for d in self.job.downstream.get(key, ()):
            self._maybe_feed(d)

    def closed(self, key: str) -> bool:
        """Failed, or a candidate not chosen: it will never commit."""
        return key in self.failed or key in self.routed

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
        live = self.live.pop(rec.task_id, None)
        if prefixes:  # generated tokens the next run recomputes as prompt
            tokens = sum(p.generated_tokens for p in prefixes.values())
            self.ledger.bump_stat("prefix_tokens", tokens)
        if failed is not None and live is not None and live.tokens:  # generated, then lost
            self.ledger.bump_stat("lost_tokens", sum(live.tokens.values()))
        for key in rec.keys:
            if self.owner.get(key) != rec.task_id:
                continue
            del self.owner[key]
            self.sent.discard(key)
            self.r.hdel(self.k.sent_key, key)
            if key in self.done or self.closed(key):
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
        self._skip_if_owned(key, error)
        for d in self.job.downstream.get(key, ()):
            self._fail(d, f"input {key} failed")

    def _skip_if_owned(self, key: str, why: str) -> None:
        owner = self.owner.get(key)
        if owner is not None and key not in self.sent:
            self.r.rpush(self.k.feed(owner), SkipItem(key=key, reason=why).to_json())
            self.sent.add(key)

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
                self.adjuster.alarm = f"worker of {rec.queue} lost"
                self._end_task(rec, {}, failed="worker lost")

    # ------------------------------------------------------------------ launching
    def advance(self, workers: dict[str, WorkerInfo]) -> None:
        """Launch every planned assignment whose turn has come, then recover orphans."""
        if not self.tasks and not self._workers_ready(workers):
            return
        self._maybe_replan(workers)
        self._launch_due(workers)
        # after the launches (a look must not hold up a launch whose GPUs just freed), before
        # recovery (a lost worker's requests go where the re-plan puts them)
        if self._maybe_adjust(workers):
            self._launch_due(workers)
        self._recover(workers)

    def _launch_due(self, workers: dict[str, WorkerInfo]) -> None:
        plan = self.job.plan.assignments
        dead = self.dead_queues(workers) if self.job.adjust else set()
        for k in range(len(plan)):
            if k in self.launched or any(g.queue_name in dead for g in plan[k].groups):
                continue  # a group whose worker is gone waits for the re-plan its loss starts
            if self._may_launch(k):
                self._launch(k)

    def drop_dead_assignments(self, workers: dict[str, WorkerInfo]) -> None:
        """Skip the assignments not launched that use a group whose worker is gone (their
        unit's open requests then go to a free live group, ``_recover``)."""
        dead = self.dead_queues(workers)
        plan = self.job.plan.assignments
        gone = [k for k, a in enumerate(plan)
                if k not in self.launched and any(g.queue_name in dead for g in a.groups)]
        if gone:
            self.launched.update(gone)
            self.r.sadd(self.k.skipped_key, *gone)
            log.warning("job %s: assignments %s wait on lost workers: skipped", self.job.job_id,
                        gone)  # fmt: skip

    def dead_queues(self, workers: dict[str, WorkerInfo]) -> set[str]:
        """Queues whose worker stopped beating (it was seen, so it is not merely starting)."""
        t = self.now()
        return {q for q, w in workers.items() if t - w.heartbeat_at > DEAD_AFTER_S}

    def _maybe_replan(self, workers: dict[str, WorkerInfo]) -> None:
        """Once every router has answered, plan the units not launched afresh, if the job is
        between stages (coordinator/replan.py); else record why the plan runs on."""
        if self.replan is not None or not self.job.routes:
            return
        if any(k not in self.done and k not in self.failed for k in self.job.routes):
            return
        cands = {self.job.reqs[c].unit for cs in self.job.routes.values() for c in cs}
        if cands & {self.job.plan.assignments[k].unit for k in self.launched}:
            return self._keep_plan("a routed model started before every route was known")
        if any(rec.live and any(not self._gone(key) for key in rec.keys)
               for rec in self.tasks.values()):  # fmt: skip
            return self._keep_plan("other work was running when the routes were known")
        closed: dict[str, int | None] = {**dict.fromkeys(self.failed), **self.done}
        closed.update(dict.fromkeys(self.routed))
        t_now = self.engine_now()
        try:
            doc = replan(self.job, closed, self.launched, t_now, planner_config(self.job))
        except ReplanSkip as e:
            return self._keep_plan(str(e))
        need = {GpuGroup(g["node"], tuple(g["gpus"])).queue_name
                for a in doc["assignments"] for g in a["gpu_groups"]}  # fmt: skip
        if need - set(workers):
            missing = ", ".join(sorted(need - set(workers)))
            return self._keep_plan(f"the re-plan needs worker queues that are not up: {missing}")
        doc["plan_len"] = len(self.job.plan.assignments)
        self.job = apply_replan(self.job, doc)
        self.replan = doc
        dropped = doc["dropped"]
        self.launched.update(dropped)
        pipe = self.r.pipeline()  # one MULTI: a restart sees the re-plan whole or not at all
        if dropped:
            pipe.sadd(self.k.skipped_key, *dropped)
        pipe.set(self.k.plan, json.dumps(plan_doc(self.job)))
        pipe.hset(self.k.state, mapping={
            "replan": json.dumps(doc), "replanned_p50_s": self.job.estimate.p50,
            "replanned_p90_s": self.job.estimate.p90,
        })  # fmt: skip
        pipe.execute()
        log.info("job %s re-planned once the routes were known: %d assignments dropped, %d added",
                 self.job.job_id, len(dropped), len(doc["assignments"]))  # fmt: skip

    def _maybe_adjust(self, workers: dict[str, WorkerInfo]) -> bool:
        """Look at the running job and switch plans when it pays (coordinator/adjust.py);
        whether the plan changed."""
        if not self.job.adjust or not self.t_start or self.finished():
            return False
        t_now = self.engine_now()
        switched = False
        try:
            switched = self.adjuster.poll(self, workers)
            busy = self.adjuster.busy()
            why = "" if busy else self.adjuster.due(self, workers, t_now)
            if why:
                self.adjuster.look(self, workers, t_now, why)
        except Exception:  # a fault in adjustment must not stop the job: run the plan as it is
            log.exception("job %s: run-time adjustment failed; it is off for this job",
                          self.job.job_id)  # fmt: skip
            self.job = replace(self.job, adjust=False)
        return switched

    def engine_now(self) -> float:
        """Engine seconds since the job's first task started."""
        return (self.now() - self.t_start) / (self.time_scale or 1.0) if self.t_start else 0.0

    def apply_switch(self, doc: dict[str, Any], stopped: tuple[int, ...],
                     entry: dict[str, Any]) -> None:  # fmt: skip
        """Run the re-planned rest: persist it whole (one MULTI), then stop what it moves."""
        doc["plan_len"] = len(self.job.plan.assignments)
        self.job = apply_replan(self.job, doc)
        dropped = doc["dropped"]
        self.launched.update(dropped)
        pipe = self.r.pipeline()
        if dropped:
            pipe.sadd(self.k.skipped_key, *dropped)
        pipe.rpush(self.k.switches, json.dumps(doc))
        pipe.set(self.k.plan, json.dumps(plan_doc(self.job)))
        pipe.hset(self.k.state, mapping={"switches": json.dumps(self.adjuster.history)})
        pipe.execute()
        for rec in list(self.tasks.values()):
            if rec.unit in stopped and rec.live and rec.status != "stopping":
                self.preempt(rec.task_id, "re-planned: " + entry.get("chose", ""))

    def _gone(self, key: str) -> bool:
        return key in self.done or self.closed(key)

    def _keep_plan(self, why: str) -> None:
        self.replan = {"skipped": why}
        self.r.hset(self.k.state, "replan", json.dumps(self.replan))
        log.info("job %s keeps its plan: %s", self.job.job_id, why)

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
        if any(t.live and t.unit != a.unit and any(g.overlaps(t.group) for g in a.groups)
               for t in self.tasks.values()):  # fmt: skip
            return False  # a task outside the plan (recovery, a re-planned run) holds the GPUs
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
        self.ledger.bump_stat("preemptions")

    def open_keys(self, unit: int) -> list[str]:
        """Requests of ``unit`` neither done, failed nor owned by a live task."""
        return [
            key for key in self.job.unit_keys[unit]
            if key not in self.done and not self.closed(key) and key not in self.owner
        ]  # fmt: skip

    def _launch(self, k: int) -> None:
        a = self.job.plan.assignments[k]
        self.launched.add(k)
        keys = self.open_keys(a.unit)
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
            if self.pending_launch(unit):
                continue
            keys = self.open_keys(unit)
            if not keys:
                continue
            group = self._free_group(unit, workers)
            if group is not None:
                self._dispatch(-1, unit, group, keys, False)

    def pending_launch(self, unit: int) -> bool:
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
        ready = [key for key in rec.keys if self._ready(key) and not self.closed(key)]
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
            if self.closed(key):
                self._skip(key, rec.task_id)

    def _skip(self, key: str, task_id: str) -> None:
        why = self.failed.get(key) or self.routed[key]
        self.r.rpush(self.k.feed(task_id), SkipItem(key=key, reason=why).to_json())
        self._mark_sent([key], task_id)

    def _mark_sent(self, keys: list[str], task_id: str) -> None:
        if keys:
            self.sent.update(keys)
            self.r.hset(self.k.sent_key, mapping={key: task_id for key in keys})

    def _ready(self, key: str) -> bool:
        return all(d in self.done or d in self.routed for d in self.job.reqs[key].deps)

    def _maybe_feed(self, key: str) -> None:
        owner = self.owner.get(key)
        if owner is None or key in self.sent or self.closed(key) or not self._ready(key):
            return
        self.r.rpush(self.k.feed(owner), self._item(key).to_json())
        self._mark_sent([key], owner)

    def _item(self, key: str) -> RequestItem:
        """The request as a worker gets it: its prompt built from its row, template and inputs."""
        req = self.job.reqs[key]
        ups: list[tuple[str, str]] = []
        if req.deps:
            raw = self.r.hmget(self.k.out, list(req.deps))
            ups = [(node_of(d.split("/", 1)[0]), json.loads(x)["text"])
                   for d, x in zip(req.deps, raw, strict=True) if x is not None]  # fmt: skip
        cp = self.job.loaded.prompts.get(req.node)
        text = cp.requests[req.index] if cp is not None else None
        chat = (
            text.messages if text is not None and cp and cp.template is None and not ups else None
        )
        p = self.partial.get(key)
        return RequestItem(
            key=key, node=req.node, request_id=req.request_id,
            prompt=render(cp, req.index, ups) if cp else "\n\n".join(t for _, t in ups),
            messages=tuple(ChatMessage.model_validate({"role": r, "content": c})
                           for r, c in chat or ()),
            prompt_tokens=self.prompt_tokens(key),
            sampling=self._sampling(req, text), choices=self._choices(key),
            completion=text is not None and text.completion,
            generated_text=p.generated_text if p else "",
            generated_tokens=p.generated_tokens if p else 0, epoch=self.epoch.get(key, 0),
        )  # fmt: skip

    def _sampling(self, req: Req, text: RequestText | None) -> SamplingParams:
        """The node's sampling with the request's own max_tokens (and a row's own settings)."""
        over: dict[str, Any] = {"max_tokens": req.max_tokens}
        if text is not None and text.temperature is not None:
            over["temperature"] = text.temperature
        if text is not None and text.top_p is not None:
            over["top_p"] = text.top_p
        return self.job.sampling[req.node].model_copy(update=over)

    def _choices(self, key: str) -> tuple[str, ...]:
        """The labels a router request's output should name (the sim engine picks one)."""
        cands = self.job.routes.get(key)
        if not cands:
            return ()
        info = self.job.loaded.prompts[self.job.reqs[cands[0]].node].route
        return info.labels if info is not None else ()

    # ------------------------------------------------------------------ status
    @property
    def total(self) -> int:
        return len(self.job.reqs)

    def finished(self) -> bool:
        """Every request committed or failed, and no task still running."""
        closed = len(self.failed) + len(self.routed)
        return len(self.done) + closed >= self.total and not any(
            t.live for t in self.tasks.values()
        )
