"""Redis layout of samullm and the few atomic operations on it (the ledger).

The broker is not the source of truth (reliability.md §1): Celery carries stage tasks, and
everything a restarted coordinator or a redelivered task needs lives in these keys.

| Key | Type | Holds |
|---|---|---|
| ``samullm:submissions`` | stream | submitted jobs (consumer group ``coordinator``) |
| ``samullm:jobs`` | zset | job id -> submission time |
| ``samullm:workers`` | hash | worker queue -> :class:`WorkerInfo` JSON (heartbeat) |
| ``samullm:job:{J}:spec`` | string | :class:`JobSubmission` JSON |
| ``samullm:job:{J}:state`` | hash | status, times, planned/actual makespan, counts, error |
| ``samullm:job:{J}:plan`` | string | the plan the coordinator runs (JSON) |
| ``samullm:job:{J}:out`` | hash | request key -> :class:`RequestOutput` JSON (committed once) |
| ``samullm:job:{J}:failed`` | hash | request key -> error text |
| ``samullm:job:{J}:routed`` | hash | router candidate key not chosen -> why |
| ``samullm:job:{J}:epoch`` | hash | request key -> epoch allowed to commit (fence) |
| ``samullm:job:{J}:tasks`` | hash | task id -> task record JSON (coordinator-owned) |
| ``samullm:job:{J}:task:{T}`` | hash | task state seen by the worker: ``state``, ``deliveries`` |
| ``samullm:job:{J}:feed:{T}`` | list | requests fed to a running task (RequestItem/SkipItem) |
| ``samullm:job:{J}:ctl:{T}`` | string | :class:`Control` JSON (durable stop order) |
| ``samullm:job:{J}:events`` | stream | ``commit``, ``started``, ``result`` and ``job`` events |
| ``samullm:job:{J}:progress`` | stream | :class:`ProgressEvent` (trimmed, MAXLEN ~) |
| ``samullm:job:{J}:stats`` | hash | counters: duplicate commits refused, fenced writes, ... |
| ``samullm:job:{J}:sent`` | hash | request key -> task it was sent or fed to |
| ``samullm:job:{J}:partial`` | hash | request key -> prefix (:class:`Partial`) to continue from |
| ``samullm:job:{J}:skipped`` | set | plan assignments that found nothing left to run |
| ``samullm:job:{J}:units`` | hash | unit -> live progress (done, total, tokens/s, ETA) |
| ``samullm:job:{J}:switches`` | list | run-time re-plans applied, in order (adjust.py) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from coordinator.messages import RequestOutput

PREFIX = "samullm"
SUBMISSIONS = f"{PREFIX}:submissions"
JOBS = f"{PREFIX}:jobs"
WORKERS = f"{PREFIX}:workers"
COORDINATOR_GROUP = "coordinator"
PROGRESS_MAXLEN = 100_000  # entries kept per job's progress stream (approximate trim)


@dataclass(frozen=True, slots=True)
class JobKeys:
    """Every key of one job."""

    job_id: str

    def _k(self, name: str) -> str:
        return f"{PREFIX}:job:{self.job_id}:{name}"

    @property
    def spec(self) -> str:
        return self._k("spec")

    @property
    def state(self) -> str:
        return self._k("state")

    @property
    def plan(self) -> str:
        return self._k("plan")

    @property
    def out(self) -> str:
        return self._k("out")

    @property
    def failed(self) -> str:
        return self._k("failed")

    @property
    def routed(self) -> str:
        """Router candidates not chosen: request key -> the label chosen instead."""
        return self._k("routed")

    @property
    def epoch(self) -> str:
        return self._k("epoch")

    @property
    def tasks(self) -> str:
        return self._k("tasks")

    @property
    def events(self) -> str:
        return self._k("events")

    @property
    def progress(self) -> str:
        return self._k("progress")

    @property
    def stats(self) -> str:
        return self._k("stats")

    @property
    def sent_key(self) -> str:
        """Hash: request key -> task it was sent or fed to."""
        return self._k("sent")

    @property
    def partial_key(self) -> str:
        """Hash: request key -> :class:`Partial` prefix to continue from."""
        return self._k("partial")

    @property
    def skipped_key(self) -> str:
        """Set: plan assignments that had nothing left to run when their turn came."""
        return self._k("skipped")

    @property
    def switches(self) -> str:
        """List: the run-time re-plan documents applied, in order."""
        return self._k("switches")

    @property
    def units(self) -> str:
        """Hash: unit name -> live progress JSON (done, total, tokens/s, ETA)."""
        return self._k("units")

    def task(self, task_id: str) -> str:
        return self._k(f"task:{task_id}")

    def feed(self, task_id: str) -> str:
        return self._k(f"feed:{task_id}")

    def ctl(self, task_id: str) -> str:
        return self._k(f"ctl:{task_id}")

    def pattern(self) -> str:
        """Glob of every key of the job."""
        return self._k("*")


# Commit an output once, and only from the epoch the ledger allows.
# KEYS: out, epoch, events, stats.  ARGV: request key, epoch, output JSON.
# Returns 1 = committed, 0 = already committed (duplicate), -1 = stale epoch (fenced).
_COMMIT_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[4], 'duplicate_commits_refused', 1)
  return 0
end
local e = redis.call('HGET', KEYS[2], ARGV[1])
if e and e ~= ARGV[2] then
  redis.call('HINCRBY', KEYS[4], 'fenced_writes', 1)
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[3], '*', 'type', 'commit', 'key', ARGV[1], 'data', ARGV[3])
return 1
"""

# Claim a delivery of a task: refuse when the coordinator cancelled it (moved its work).
# KEYS: task hash.  Returns the new delivery count, or -1 when cancelled.
_START_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return -1 end
redis.call('HSET', KEYS[1], 'state', 'running')
return redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
"""

# Cancel a task unless it already ended. KEYS: task hash. Returns 1 if cancelled now.
_CANCEL_LUA = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'ended' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
return 1
"""

COMMITTED, DUPLICATE, STALE = 1, 0, -1


class Ledger:
    """Atomic operations on one job's keys, shared by the coordinator and the workers."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.r = client
        self.keys = JobKeys(job_id)
        self._commit = client.register_script(_COMMIT_LUA)
        self._start = client.register_script(_START_LUA)
        self._cancel = client.register_script(_CANCEL_LUA)

    def commit(self, out: RequestOutput) -> int:
        """Commit ``out``; returns COMMITTED, DUPLICATE or STALE."""
        k = self.keys
        return int(
            self._commit(keys=[k.out, k.epoch, k.events, k.stats],
                         args=[out.key, str(out.epoch), out.to_json()])
        )  # fmt: skip

    def commit_many(self, outs: list[RequestOutput]) -> list[int]:
        """Commit each of ``outs`` (each atomic on its own) in one round trip; their verdicts."""
        if not outs:
            return []
        k = self.keys
        pipe = self.r.pipeline(transaction=False)
        for out in outs:
            self._commit(keys=[k.out, k.epoch, k.events, k.stats],
                         args=[out.key, str(out.epoch), out.to_json()], client=pipe)  # fmt: skip
        return [int(v) for v in pipe.execute()]

    def claim_task(self, task_id: str) -> int:
        """Record a delivery of ``task_id``: its count, or -1 when the task was cancelled."""
        return int(self._start(keys=[self.keys.task(task_id)]))

    def cancel_task(self, task_id: str) -> bool:
        """Mark a task cancelled (a later delivery is dropped); False if it already ended."""
        return bool(self._cancel(keys=[self.keys.task(task_id)]))

    def committed(self, keys: list[str]) -> list[bool]:
        """Whether each request key is committed."""
        if not keys:
            return []
        return [bool(x) for x in self.r.hmget(self.keys.out, keys)]

    def event(self, kind: str, data: str, **fields: str) -> None:
        """Append an event (``started``, ``result``, ``job``) to the job's event stream."""
        self.r.xadd(self.keys.events, {"type": kind, "data": data, **fields})

    def bump_stat(self, name: str, by: int = 1) -> None:
        """Increment a job counter."""
        self.r.hincrby(self.keys.stats, name, by)


def decode(value: Any) -> str:
    """Redis bytes -> str (clients are built without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(url: str) -> redis.Redis:
    """A Redis client with the timeouts of reliability.md §4."""
    return redis.Redis.from_url(
        url,
        socket_timeout=10,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=10,
    )
