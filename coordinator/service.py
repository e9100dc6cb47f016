"""The coordinator service (``samullm coordinator``): accept jobs, plan them, run them.

One loop reads, with a Redis consumer group, the submission stream and every active job's event
and progress streams (pending entries first after a restart, then new ones), applies each entry
to its :class:`~coordinator.runner.JobRun` and acknowledges it. Between reads it checks worker
heartbeats, launches what the plan allows, refreshes the live per-unit progress and ETA, and
finishes jobs whose every request is committed or failed. Jobs left ``planning`` or ``running``
by a previous coordinator are resumed at start (re-planned with the same seed, which gives the
same plan, and their state rebuilt from Redis).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import Celery
from pydantic import ValidationError

from apps.cluster_spec import SpecError
from apps.requests import node_of
from coordinator.accuracy import Marks, PlannedSlot, planned_vs_actual
from coordinator.calibration import Seen
from coordinator.eta import MIN_EXACT_LENGTHS, Pending, unit_remaining_s
from coordinator.job import JobModel, build_job, plan_doc
from coordinator.messages import JobSubmission, WorkerInfo, celery_config
from coordinator.runner import JobRun
from coordinator.store import COORDINATOR_GROUP, JOBS, SUBMISSIONS, WORKERS, JobKeys, decode

log = logging.getLogger(__name__)
BLOCK_MS = 50  # ms a read waits for new entries
SUMMARY_EVERY_S = 0.5  # s between progress summaries, at least
SUMMARY_DUTY = 4.0  # a summary waits this many times its own cost before the next one
VISIBILITY_S = 6 * 3600.0  # s; above TASK_DEADLINE_S


def read_workers(r: redis.Redis) -> dict[str, WorkerInfo]:
    """Announced workers by queue (malformed entries are skipped)."""
    out = {}
    for q, raw in r.hgetall(WORKERS).items():
        try:
            out[decode(q)] = WorkerInfo.model_validate_json(raw)
        except ValidationError:
            log.warning("ignoring a malformed worker entry %s", decode(q))
    return out


def ensure_group(r: redis.Redis, stream: str) -> None:
    """Create the coordinator's consumer group on ``stream`` (and the stream) if missing."""
    try:
        r.xgroup_create(stream, COORDINATOR_GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


class Coordinator:
    """The service loop (see module docstring)."""

    def __init__(self, url: str, shared_lengths: Path, *, name: str = "coordinator-1") -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                      health_check_interval=10)  # fmt: skip
        self.celery = Celery("samullm-coordinator")
        self.celery.conf.update(celery_config(url, visibility_timeout_s=VISIBILITY_S))
        self.shared_lengths = shared_lengths
        self.name = name
        self.runs: dict[str, JobRun] = {}
        self.marks: dict[str, dict[str, Marks]] = {}  # job -> model -> first start, last commit
        self._dirty: set[str] = set()  # jobs whose marks are not stored yet
        self.rng = np.random.default_rng(0)
        self._last_summary = 0.0
        self._summary_gap = SUMMARY_EVERY_S  # s; grows with what a summary costs

    # ------------------------------------------------------------------ loop
    def serve(self, stop: threading.Event | None = None) -> None:
        """Run until ``stop`` is set."""
        ensure_group(self.r, SUBMISSIONS)
        self._resume()
        self._read(pending=True)
        while stop is None or not stop.is_set():
            self._read(pending=False)
            self._tick()

    def _streams(self) -> list[str]:
        out = [SUBMISSIONS]
        for job_id in self.runs:
            k = JobKeys(job_id)
            out += [k.events, k.progress]
        return out

    def _read(self, *, pending: bool) -> None:
        ids = "0" if pending else ">"
        streams = {s: ids for s in self._streams()}
        got = self.r.xreadgroup(COORDINATOR_GROUP, self.name, streams, count=1000,
                                block=None if pending else BLOCK_MS)  # fmt: skip
        for stream, entries in got or []:
            name = decode(stream)
            for entry_id, fields in entries:
                if fields:  # a pending entry already deleted by MAXLEN reads as empty
                    self._apply(name, fields, entry_id)
            if entries:  # acknowledged once applied (a crash before this replays them)
                self._store_marks()
                self.r.xack(name, COORDINATOR_GROUP, *[entry_id for entry_id, _ in entries])

    def _apply(self, stream: str, fields: dict[bytes, bytes], entry_id: bytes | str) -> None:
        if stream == SUBMISSIONS:
            self._accept(decode(fields[b"job_id"]))
            return
        job_id = stream.split(":")[2]
        run = self.runs.get(job_id)
        if run is None:
            return
        if stream.endswith(":progress"):
            run.on_progress(fields)
        else:
            fields = _stamped(entry_id, fields)
            n_done = len(run.done)
            run.on_event(fields)
            self._mark(run, fields, fresh_commit=len(run.done) > n_done)

    def _tick(self) -> None:
        workers = read_workers(self.r)
        for job_id, run in list(self.runs.items()):
            run.check_workers(workers)
            run.advance(workers)
            if run.finished():
                self._finish(run, workers)
                del self.runs[job_id]
        if time.time() - self._last_summary >= self._summary_gap:
            t0 = time.perf_counter()
            for run in self.runs.values():
                self._summarise(run, workers)
                self.r.hset(run.k.state, "planned_vs_actual",
                            json.dumps(self._accuracy(run, workers, None)))  # fmt: skip
            self._last_summary = time.time()
            # the per-unit ETAs re-simulate every open request: on a big job that costs more
            # than the loop that dispatches and reads commits may give up
            self._summary_gap = max(SUMMARY_EVERY_S, SUMMARY_DUTY * (time.perf_counter() - t0))

    # ------------------------------------------------------------------ jobs
    def _accept(self, job_id: str) -> None:
        """Plan a submitted job and start it; a bad job is marked failed with the reason."""
        k = JobKeys(job_id)
        if job_id in self.runs or decode(self.r.hget(k.state, "status") or b"") not in (
            "queued", "planning"
        ):  # fmt: skip
            return
        self.r.hset(k.state, "status", "planning")
        try:
            sub = JobSubmission.model_validate_json(self.r.get(k.spec) or b"")
            job = build_job(sub, self.shared_lengths)
        except (SpecError, ValidationError, ValueError) as e:
            log.error("job %s rejected: %s", job_id, e)
            self.r.hset(k.state, mapping={"status": "failed", "error": str(e),
                                          "finished_at": time.time()})  # fmt: skip
            self.r.xadd(k.events, {"type": "job", "data": "failed"})
            return
        self._store_plan(job)
        self._start(job)

    def _store_plan(self, job: JobModel) -> None:
        k = JobKeys(job.job_id)
        self.r.set(k.plan, json.dumps(plan_doc(job)))
        self.r.hset(k.state, mapping={
            "status": "running", "planned_makespan_s": job.estimate.p50,
            "planned_p90_s": job.estimate.p90, "plan_seconds": job.plan_seconds,
            "lower_bound_s": job.lower_bound_s,
            "requests_total": len(job.reqs), "rejected": len(job.loaded.rejected),
            "export_meta": json.dumps(export_meta(job)),
        })  # fmt: skip

    def _start(self, job: JobModel) -> None:
        k = JobKeys(job.job_id)
        ensure_group(self.r, k.events)
        ensure_group(self.r, k.progress)
        run = JobRun(self.r, self.celery, job)
        run.load()
        raw = json.loads(self.r.hget(k.state, "model_marks") or b"{}")
        self.marks[job.job_id] = {m: Marks(*v) for m, v in raw.items()}
        self.runs[job.job_id] = run
        self._read_job_pending(k)

    def _read_job_pending(self, k: JobKeys) -> None:
        got = self.r.xreadgroup(COORDINATOR_GROUP, self.name, {k.events: "0", k.progress: "0"})
        for stream, entries in got or []:
            for entry_id, fields in entries:
                if fields:
                    self._apply(decode(stream), fields, entry_id)
                self._store_marks()
                self.r.xack(decode(stream), COORDINATOR_GROUP, entry_id)

    def _resume(self) -> None:
        """Pick up jobs a previous coordinator left unfinished."""
        for raw in self.r.zrange(JOBS, 0, -1):
            job_id = decode(raw)
            status = decode(self.r.hget(JobKeys(job_id).state, "status") or b"")
            if status == "running":
                sub = JobSubmission.model_validate_json(self.r.get(JobKeys(job_id).spec) or b"")
                log.info("resuming job %s", job_id)
                self._start(build_job(sub, self.shared_lengths))
            elif status == "planning":
                self.r.hset(JobKeys(job_id).state, "status", "queued")
                self._accept(job_id)

    def _finish(self, run: JobRun, workers: dict[str, WorkerInfo]) -> None:
        k = run.k
        scale = _time_scale(run, workers)
        actual = (run.t_last_commit - run.t_start) / scale if run.t_last_commit else 0.0
        stats = {decode(a): int(b) for a, b in self.r.hgetall(k.stats).items()}
        self.r.hset(k.state, mapping={
            "status": "done", "finished_at": time.time(), "actual_makespan_s": actual,
            "time_scale": scale, "outputs_committed": len(run.done),
            "requests_failed": len(run.failed), "stats": json.dumps(stats),
            "planned_vs_actual": json.dumps(self._accuracy(run, workers, actual)),
            # router candidates not chosen never run: they leave the total
            "requests_total": len(run.job.reqs) - len(run.routed), "routed_away": len(run.routed),
        })  # fmt: skip
        self.marks.pop(run.job.job_id, None)
        self._summarise(run, workers)
        self.r.xadd(k.events, {"type": "job", "data": "done"})
        log.info("job %s done: %d outputs, %.1f s", run.job.job_id, len(run.done), actual)

    # ------------------------------------------------------------------ planned vs actual
    def _mark(self, run: JobRun, fields: dict[bytes, bytes], *, fresh_commit: bool) -> None:
        """Note a model's first task start or a new commit, on the job makespan's clock."""
        kind = decode(fields.get(b"type", b""))
        if kind == "commit" and fresh_commit:
            unit = run.job.reqs[json.loads(fields[b"data"])["key"]].unit
        elif kind == "started" and (rec := run.tasks.get(decode(fields[b"data"]))) is not None:
            unit = rec.unit
        else:
            return
        marks = self.marks.setdefault(run.job.job_id, {})
        model = run.job.model(unit)
        old = marks.get(model, Marks())
        if kind == "commit":  # when Redis took the commit, not when it was read
            marks[model] = Marks(old.start_at, max(old.end_at, run.stamp(fields)))
        else:  # the earliest start, taken as JobRun takes t_start
            at = run.stamp(fields)
            if old.start_at and old.start_at <= at:
                return
            marks[model] = Marks(at, old.end_at)
        self._dirty.add(run.job.job_id)

    def _store_marks(self) -> None:
        """Persist changed marks and the last commit time before the entries that changed them
        are acknowledged."""
        for job_id in self._dirty:
            if job_id not in self.marks:  # finished meanwhile: its final record is stored
                continue
            doc = {m: [v.start_at, v.end_at] for m, v in self.marks[job_id].items()}
            state: dict[str, Any] = {"model_marks": json.dumps(doc)}
            if (run := self.runs.get(job_id)) is not None and run.t_last_commit:
                state["last_commit_at"] = run.t_last_commit
            self.r.hset(JobKeys(job_id).state, mapping=state)
        self._dirty.clear()

    def _accuracy(
        self, run: JobRun, workers: dict[str, WorkerInfo], actual: float | None
    ) -> dict[str, Any]:
        """The ``planned_vs_actual`` document (coordinator/accuracy.py) of ``run``."""
        job = run.job
        timeline = job.estimate.timeline
        slots = [
            PlannedSlot(job.model(a.unit), timeline.start[i], timeline.end[i])
            for i, a in enumerate(job.plan.assignments)
            if math.isfinite(timeline.start[i]) and math.isfinite(timeline.end[i])
        ]  # skipped or dropped by a re-plan: never ran  # fmt: skip
        finished = {job.model(u) for u in range(len(job.units))}
        for u, keys in enumerate(job.unit_keys):
            if any(key not in run.done and not run.closed(key) for key in keys):
                finished.discard(job.model(u))
        rec = planned_vs_actual(
            slots, self.marks.get(job.job_id, {}), finished, t0=run.t_start,
            scale=_time_scale(run, workers), p50=job.estimate.p50, p90=job.estimate.p90,
            actual=actual,
        )  # fmt: skip
        return rec.to_dict()

    def _summarise(self, run: JobRun, workers: dict[str, WorkerInfo]) -> None:
        """Per-unit progress and ETA (engine seconds) for clients."""
        job = run.job
        scale = _time_scale(run, workers)
        elapsed = max(time.time() - run.t_start, 1e-9) / scale if run.t_start else 0.0
        out: dict[str, Any] = {}
        eta_job = 0.0
        seen = run.seen()
        for u, unit in enumerate(job.units):
            keys = job.unit_keys[u]
            done = sum(1 for key in keys if key in run.done)
            live = [t for t in run.tasks.values() if t.unit == u and t.live]
            gen = sum(run.done.get(key, 0) for key in keys)
            running = {key: n for t in live for key, n in _tokens(run, t.task_id).items()}
            gen += sum(running.values())
            eta = _unit_eta(run, u, live, running, seen, self.rng) if live else 0.0
            eta_job = max(eta_job, eta)
            routed = sum(1 for key in keys if key in run.routed)
            out[unit.name] = {
                "model": unit.model, "done": done, "total": len(keys) - routed,
                "failed": sum(1 for key in keys if key in run.failed),
                "tokens": gen, "tokens_per_s": gen / elapsed if elapsed else 0.0,
                "running": bool(live), "eta_s": eta,
            }  # fmt: skip
        planned_left = max(job.estimate.p50 - elapsed, 0.0)
        if out:
            self.r.hset(run.k.units, mapping={n: json.dumps(v) for n, v in out.items()})
        eta = max(eta_job, planned_left) if run.done or run.tasks else job.estimate.p50
        look = run.adjuster.last
        if look.get("remaining_p50_s") is not None:  # the last look re-simulated the whole rest
            since = max(elapsed - look["at_s"], 0.0)
            eta = max(look["remaining_p50_s"] - since, eta_job)
            p90 = max((look.get("remaining_p90_s") or 0.0) - since, eta)
            self.r.hset(run.k.state, "eta_p90_s", p90)
        self.r.hset(run.k.state, mapping={
            "elapsed_s": elapsed, "eta_s": eta, "outputs_committed": len(run.done),
            "calibration": json.dumps(run.estimates.to_dict(seen)),
        })  # fmt: skip


def _tokens(run: JobRun, task_id: str) -> dict[str, int]:
    live = run.live.get(task_id)
    return live.tokens if live is not None else {}


def _unit_eta(
    run: JobRun, u: int, live: list[Any], running: dict[str, int], seen: Seen,
    rng: np.random.Generator,
) -> float:  # fmt: skip
    """Engine seconds left for unit ``u`` (conditional re-simulation of its open requests)."""
    job = run.job
    pend = []
    for key in job.unit_keys[u]:
        if key in run.done or run.closed(key):
            continue
        prompt = run.prompt_tokens(key)
        pend.append(Pending(prompt, running.get(key, 0), job.reqs[key].max_tokens))
    tp = len(live[0].gpus)
    model = job.model(u)
    fit = run.estimates.length_fit(model, seen)
    stretch = fit.scale if fit.finished >= MIN_EXACT_LENGTHS else 1.0
    try:
        return unit_remaining_s(job, u, tp, len(live), pend, rng,
                                run.estimates.latency_scale(model), stretch)  # fmt: skip
    except (ValueError, KeyError):
        return 0.0


def _stamped(entry_id: bytes | str, fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """``fields`` with ``at`` = the entry's Redis time (unix s, ms resolution) unless the writer
    stamped it: a commit's time is when Redis took it, however late the coordinator reads it."""
    if b"at" in fields:
        return fields
    ms = decode(entry_id).split("-", 1)[0]
    return {**fields, b"at": str(int(ms) / 1000).encode()}


def _time_scale(run: JobRun, workers: dict[str, WorkerInfo]) -> float:
    """Real seconds per engine second of the job's workers (1 for real engines)."""
    if run.time_scale is None:
        for rec in run.tasks.values():
            w = workers.get(rec.queue)
            if w is not None:
                run.time_scale = w.time_scale or 1.0
                run.r.hset(run.k.state, "time_scale", run.time_scale)
                break
    return run.time_scale or 1.0


def export_meta(job: JobModel) -> dict[str, Any]:
    """What ``Job.export`` needs beyond the outputs (coordinator/results.py)."""
    loaded = job.loaded
    return {
        "calls": {c.name: {"node": node_of(c.name), "model": c.model} for c in loaded.runs.calls},
        "completion_ids": sorted(
            {
                cp.requests[r].fields.get("id", "")
                for cp in loaded.prompts.values()
                for r in range(len(cp.requests))
                if cp.requests[r].completion
            }
        ),  # fmt: skip
        "sinks": sorted(loaded.sinks),
        "rejected": [
            {"node": r.node, "request_id": r.request_id, "reason": r.reason}
            for r in loaded.rejected
        ],
    }
