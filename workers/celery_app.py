"""The workers' Celery app and its one thin task, ``samullm.run_stage``.

A worker process serves exactly one GPU group (one queue). :func:`configure` is called once by
:mod:`workers.main` before the Celery worker starts; the task validates its message and hands it
to :func:`workers.runner.run_stage`. The Celery settings come from
:func:`coordinator.messages.celery_config`, shared with the coordinator that sends the tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from pydantic import ValidationError

from coordinator.messages import TASK_RUN_STAGE, StageTask
from coordinator.store import Ledger, connect
from workers.engines.cache import EngineCache
from workers.runner import run_stage
from workers.truth import TruthWorld

log = logging.getLogger(__name__)
app = Celery("samullm-worker")


@dataclass(slots=True)
class WorkerState:
    """What the task needs in this process (set by :func:`configure`)."""

    queue: str
    broker_url: str
    engines: EngineCache
    truth: TruthWorld | None = None  # sim workers only


_state: WorkerState | None = None


def configure(state: WorkerState, config: dict[str, Any]) -> None:
    """Bind this process to its group and apply the shared Celery settings."""
    global _state
    _state = state
    app.conf.update(config)


@app.task(name=TASK_RUN_STAGE, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_stage_task(self: Any, message: dict[str, Any]) -> dict[str, Any] | None:
    """Validate the stage task and run it; the result goes to the ledger, not to Celery."""
    if _state is None:
        raise RuntimeError("worker not configured (start it with `samullm worker`)")
    try:
        task = StageTask.model_validate(message)
    except ValidationError as e:
        log.error("refusing a malformed stage task: %s", e)
        return None
    if _state.truth is not None and task.lengths_like:
        _state.truth.register_like(task.engine.model, task.lengths_like)
    ledger = Ledger(connect(_state.broker_url), task.job_id)
    if task.group.queue != _state.queue:
        log.error("task %s is for %s, not %s", task.task_id, task.group.queue, _state.queue)
    res = run_stage(task, _state.engines, ledger, queue=_state.queue)
    log.info("task %s %s: %d committed", task.task_id, res.status, res.committed)
    return None
