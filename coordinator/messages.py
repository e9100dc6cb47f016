"""Every message that crosses a process boundary: one pydantic v2 module, versioned and frozen.

Producers build these models and send ``model_dump(mode="json")`` (Celery serialises it with
msgpack; JSON is accepted; pickle never). Consumers validate with ``Model.model_validate``:
``extra="forbid"`` rejects unknown fields, and ``v`` rejects a message from an incompatible
version. The Redis layout that carries them is in :mod:`coordinator.store`.

| Message | From -> to | Carried by |
|---|---|---|
| :class:`JobSubmission` | client -> coordinator | ``samullm:submissions`` stream |
| :class:`StageTask` | coordinator -> worker | Celery task ``samullm.run_stage``, group's queue |
| :class:`RequestItem` | coordinator -> worker | inside a task, or fed later on its feed list |
| :class:`RequestOutput` | worker -> ledger | the commit script (exactly once per request) |
| :class:`ProgressEvent` | worker -> coordinator | the job's progress stream |
| :class:`StageResult` | worker -> coordinator | the job's event stream |
| :class:`Control` | coordinator -> worker | the task's control key (durable, checked every step) |
| :class:`WorkerInfo` | worker -> coordinator | the workers hash (heartbeat) |
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Message(BaseModel):
    """Base of every wire message: frozen, no unknown fields, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = SCHEMA_VERSION

    def to_wire(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what Celery and Redis carry)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """Compact JSON text (what Redis keys and streams hold)."""
        return self.model_dump_json()


class SamplingParams(Message):
    """Sampling settings of one request."""

    max_tokens: int = Field(ge=1)  # tokens, output cap
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    ignore_eos: bool = False


class ChatMessage(Message):
    """One chat message (OpenAI Batch rows with ``messages``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class RequestItem(Message):
    """One request as a worker receives it; ``generated_*`` is a prefix made elsewhere."""

    key: str = Field(min_length=1)  # "<node>/<request id>": the ledger key
    node: str = Field(min_length=1)  # call name
    request_id: str = Field(min_length=1)
    prompt: str = ""  # text (empty for length-only datasets on the sim engine)
    messages: tuple[ChatMessage, ...] = ()  # chat requests: sent as messages, not ``prompt``
    choices: tuple[str, ...] = ()  # a router's labels: its output should name one
    completion: bool = False  # an OpenAI /v1/completions row: the prompt as it is, no chat template
    prompt_tokens: int = Field(ge=1)  # tokens of the prompt, without the generated prefix
    sampling: SamplingParams
    generated_text: str = ""  # output produced before a preemption
    generated_tokens: int = Field(default=0, ge=0)  # tokens of generated_text
    epoch: int = Field(default=0, ge=0)  # ledger fence: only this epoch may commit


class SkipItem(Message):
    """Fed instead of a request whose input failed: the task stops waiting for it."""

    key: str
    reason: str


class EngineSpec(Message):
    """Engine configuration of a stage task (the same config may stay loaded across tasks)."""

    model: str = Field(min_length=1)  # the application's model id (profiles, lengths, truth)
    tp: int = Field(ge=1)  # GPUs of the group (tensor parallel)
    path: str | None = None  # what vLLM loads (local folder or HF id); None = ``model``
    max_num_seqs: int = Field(default=256, ge=1)  # sequences per step
    max_num_batched_tokens: int = Field(default=8192, ge=1)  # tokens per step
    max_model_len: int | None = Field(default=None, ge=1)  # tokens; None = the model's
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # fraction
    dtype: str = "auto"
    block_size: int = Field(default=16, ge=1)  # tokens per KV block
    num_kv_blocks: int | None = Field(default=None, ge=2)  # KV pool (CPU devices); None = vLLM's
    trust_remote_code: bool = False  # only when the application allows it for this model
    chat_template: Literal["auto", "required", "off"] = "auto"
    seed: int = Field(default=0, ge=0)  # sampling seed of the engine


class GroupRef(Message):
    """A GPU group: a node name and GPU indices."""

    node: str = Field(min_length=1)
    gpus: tuple[int, ...] = Field(min_length=1)
    queue: str = Field(min_length=1)  # samullm.<node>.gpu<range>


class StageTask(Message):
    """Run one replica of one planned assignment on one GPU group."""

    job_id: str = Field(min_length=1)
    task_id: str = Field(min_length=1)  # unique per dispatch; the control and feed keys use it
    assignment: int = Field(ge=-1)  # plan index; -1 = a reassignment outside the plan
    unit: str  # unit name (call, or fused chain)
    group: GroupRef
    engine: EngineSpec
    requests: tuple[RequestItem, ...]  # ready now
    expected: int = Field(ge=0)  # requests this task ends with (ready now + fed later)
    keep_loaded: bool = False  # the next task on this group uses the same engine
    lengths_like: str | None = None  # sim truth: the app's stand-in pmf model (lengths: like:X)
    progress_every_steps: int = Field(default=16, ge=1)  # steps between progress events
    progress_every_ms: int = Field(default=250, ge=1)  # ms between progress events
    deadline_s: float = Field(gt=0)  # wall seconds; the task stops (as preempted) after it


class RequestOutput(Message):
    """A finished request, committed once to the ledger."""

    key: str
    node: str
    request_id: str
    text: str
    prompt_tokens: int = Field(ge=0)  # tokens
    output_tokens: int = Field(ge=0)  # tokens generated in total (prefix included)
    finish_reason: Literal["stop", "length"]
    epoch: int = Field(ge=0)
    task_id: str
    queue: str


class Partial(Message):
    """An unfinished request returned by a stopped task."""

    key: str
    generated_text: str
    generated_tokens: int = Field(ge=0)  # tokens


class StageResult(Message):
    """How a stage task ended."""

    job_id: str
    task_id: str
    queue: str
    status: Literal["done", "stopped", "failed", "cancelled"]
    committed: int = Field(ge=0)  # outputs this task committed
    duplicates: int = Field(default=0, ge=0)  # commits refused: already committed
    fenced: int = Field(default=0, ge=0)  # commits refused: stale epoch
    unfinished: tuple[Partial, ...] = ()  # status "stopped": what is left, with prefixes
    error: str | None = None  # status "failed": why
    engine_s: float = Field(default=0.0, ge=0)  # engine clock (simulated s on sim workers)
    load_s: float = Field(default=0.0, ge=0)  # engine clock this task spent loading (0: reused)
    wall_s: float = Field(default=0.0, ge=0)  # real seconds
    reason: str | None = None  # status "stopped": the control's reason or "deadline"


class ProgressEvent(Message):
    """Token progress of a running task since its previous event."""

    job_id: str
    task_id: str
    queue: str
    seq: int = Field(ge=0)  # per task, increasing
    engine_s: float = Field(ge=0)  # engine clock now (simulated s on sim workers)
    steps: int = Field(ge=0)  # engine steps since the task started
    step_latency_s: float = Field(ge=0)  # mean step latency since the previous event
    tokens: dict[str, int]  # key -> tokens generated so far (running requests)
    finished: tuple[str, ...] = ()  # keys finished since the previous event


class Control(Message):
    """An order to a running task, written to its control key."""

    kind: Literal["preempt", "release"]
    task_id: str
    reason: str = ""
    target_queue: str | None = None  # where the coordinator will move the work (information)


class WorkerInfo(Message):
    """What a worker announces about itself (refreshed with every heartbeat)."""

    queue: str
    node: str
    gpus: tuple[int, ...]
    engine: Literal["sim", "vllm"]
    host: str
    pid: int
    started_at: float  # unix s
    heartbeat_at: float  # unix s
    time_scale: float | None = None  # sim workers: real s per simulated s
    task_id: str | None = None  # the task it runs now
    consuming: bool = False  # Celery consumes the worker's queue (takes tasks right away)


class BeliefScale(Message):
    """How one model's real lengths and step latencies differ from its pdf and profile."""

    length_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # x believed lengths
    latency_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # x profiled steps


class JobOptions(Message):
    """Planner and runtime knobs of one job."""

    draws: int = Field(default=5, ge=1)
    seed: int = Field(default=0, ge=0)
    time_scale: float | None = Field(default=None, gt=0)  # sim workers: real s per simulated s
    method: Literal["samullm", "sequential", "naive", "muxserve", "static"] = "samullm"
    # re-plan the rest while the job runs and switch when it pays (docs/replanning.md)
    adjust: bool = True
    # what the planner is told instead of its profiles and length pdfs, per model id: an
    # ``oracle`` run of a benchmark gives it the truth's distortions
    belief: dict[str, BeliefScale] = Field(default_factory=dict)
    # how the engines batch, as the planner simulates it: vLLM V1 (chunked prefill, mixed
    # steps) or vLLM 0.3.0 (padded prefill-only or decode-only steps; the measured A100 world)
    scheduler: Literal["v1", "legacy030"] = "v1"


class JobSubmission(Message):
    """A validated application, self-contained (datasets inlined, paths absolute)."""

    job_id: str = Field(min_length=1)
    name: str
    app: dict[str, Any]  # the application document (docs/app-spec.md) with inline records
    cluster: dict[str, Any]  # the cluster document
    # A profile file's document (planning.io.profiles format); None = the shipped A100 set
    profiles: dict[str, Any] | None = None
    options: JobOptions = JobOptions()
    submitted_at: float  # unix s


TASK_RUN_STAGE = "samullm.run_stage"  # the one Celery task name; sent by name, never imported


def celery_config(broker_url: str, *, visibility_timeout_s: float) -> dict[str, Any]:
    """Celery settings shared by the coordinator (sender) and the workers (reliability.md §4).

    msgpack on the wire, JSON accepted, pickle refused; acks late and reject on worker lost so
    a killed worker's task is redelivered; prefetch 1; no result backend (results live in the
    ledger); a visibility timeout above the longest stage.
    """
    return {
        "broker_url": broker_url,
        "task_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 10,
            # Restore a dead worker's unacked task within a few seconds of the timeout
            # (kombu >= 5.6.3; older kombu ignores these and sweeps about every 100 s).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
    }
