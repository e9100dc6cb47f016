"""Client API for scripts: submit applications to a running samullm and follow their jobs.

```python
from coordinator.client import Client
job = Client("redis://127.0.0.1:6379/0").submit("app.yaml", cluster="cluster.yaml")
job.wait()
for out in job.results():
    print(out.key, out.output_tokens)
```

:meth:`Client.submit` validates the application on the client first (every error names the file
and field, and nothing is written to Redis), then writes a self-contained submission (datasets
inlined) that the coordinator plans and runs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from apps.app_spec import load_app, self_contained
from apps.cluster_spec import SpecError, _read, load_cluster
from coordinator.messages import JobOptions, JobSubmission, RequestOutput
from coordinator.results import ExportMeta, export, meta_from_doc
from coordinator.settings import load_settings
from coordinator.store import JOBS, SUBMISSIONS, JobKeys, connect, decode
from planning.estimate import serving_for
from planning.io.lengths import load_authors_pdfs
from planning.io.profiles import ProfileError, load_default_profiles, profiles_from_json
from planning.profile import ProfileSet

TERMINAL = ("done", "failed")


class JobFailed(RuntimeError):
    """The coordinator refused or failed the job."""


class Job:
    """A submitted job."""

    def __init__(self, r: redis.Redis, job_id: str) -> None:
        self.r, self.id, self.keys = r, job_id, JobKeys(job_id)

    def status(self) -> dict[str, Any]:
        """The job's state hash: status, planned/actual makespan, counts, ETA, error."""
        raw = self.r.hgetall(self.keys.state)
        out: dict[str, Any] = {}
        for k, v in raw.items():
            text = decode(v)
            try:
                out[decode(k)] = json.loads(text)
            except json.JSONDecodeError:
                out[decode(k)] = text
        return out

    def progress(self) -> dict[str, dict[str, Any]]:
        """Per unit: model, done, total, failed, tokens, tokens_per_s, running, eta_s."""
        return {decode(k): json.loads(v) for k, v in self.r.hgetall(self.keys.units).items()}

    def stats(self) -> dict[str, int]:
        """The job's counters: preemptions, prefix_tokens (recomputed), lost_tokens,
        tasks_lost, duplicate commits refused, fenced writes, ..."""
        return {decode(k): int(v) for k, v in self.r.hgetall(self.keys.stats).items()}

    def tasks(self) -> list[dict[str, Any]]:
        """The coordinator's task records (``task_id``, ``unit``, ``node``, ``gpus``,
        ``queue``, ``status``, ``sent_at``, ``ended_at`` in unix s, ``keys``)."""
        return [json.loads(v) for v in self.r.hvals(self.keys.tasks)]

    def preempted(self, tasks: list[dict[str, Any]]) -> set[str]:
        """Ids of the tasks among ``tasks`` that were told to stop (a control key exists)."""
        pipe = self.r.pipeline()
        for t in tasks:
            pipe.exists(self.keys.ctl(t["task_id"]))
        return {t["task_id"] for t, n in zip(tasks, pipe.execute(), strict=True) if n}

    def plan(self) -> dict[str, Any] | None:
        """The plan the coordinator runs (None until planned)."""
        raw = self.r.get(self.keys.plan)
        return json.loads(raw) if raw else None

    def planned_vs_actual(self) -> dict[str, Any] | None:
        """Planned vs actual times, per model and for the job (None until the job runs).

        The document of :meth:`coordinator.accuracy.PlannedVsActual.to_dict`: ``final``
        (false while the job runs: actual so far), ``time_scale``, ``job`` (``planned_p50_s``,
        ``planned_p90_s``, ``actual_s``, ``error_pct``, ``error_p90_pct``) and ``models`` (per
        model: ``planned_start_s``, ``planned_end_s``, ``actual_start_s``, ``actual_end_s``,
        ``finished``, ``error_pct``); docs/runtime.md, "Planned vs actual".
        """
        raw = self.r.hget(self.keys.state, "planned_vs_actual")
        return json.loads(raw) if raw else None

    def wait(self, timeout: float | None = None, poll_s: float = 0.2) -> dict[str, Any]:
        """Block until the job is done; its final status.

        Raises:
            JobFailed: the job failed (the message holds the coordinator's reason).
            TimeoutError: not done within ``timeout`` seconds.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st.get("status") == "failed":
                raise JobFailed(f"job {self.id} failed: {st.get('error', 'unknown error')}")
            if st.get("status") == "done":
                return st
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {self.id} not done after {timeout} s ({st.get('status')})")
            time.sleep(poll_s)

    def results(self) -> list[RequestOutput]:
        """Every committed output, in commit order."""
        return list(self.stream_results(follow=False))

    def failed(self) -> dict[str, str]:
        """Requests that failed: key -> error."""
        return {decode(k): decode(v) for k, v in self.r.hgetall(self.keys.failed).items()}

    def export_meta(self) -> ExportMeta:
        """What an OpenAI export needs: the coordinator's ``export_meta`` state field (calls,
        completion ids, sinks, rejections; empty when absent) plus :meth:`failed`.

        Raises:
            ValueError: the stored field is not a valid document (names the job).
        """
        raw = self.r.hget(self.keys.state, "export_meta")
        try:
            doc = json.loads(raw) if raw else {}
            if not isinstance(doc, dict):
                raise ValueError(f"expected an object, got {type(doc).__name__}")
            return meta_from_doc(doc, self.failed())
        except ValueError as e:
            raise ValueError(f"job {self.id}: state field export_meta: {e}") from None

    def export(self, path: str | Path, fmt: str | None = None) -> int:
        """Write the committed outputs to ``path`` (:func:`coordinator.results.export`);
        ``fmt`` is ``jsonl``, ``parquet``, ``openai`` or None (by suffix). Rows or lines written.
        """
        return export(self.id, self.results(), path, fmt=fmt, meta=self.export_meta())

    def stream_results(
        self, *, follow: bool = True, block_ms: int = 500
    ) -> Iterator[RequestOutput]:
        """Outputs as they are committed; with ``follow``, until the job ends."""
        last = "0"
        while True:
            got = self.r.xread({self.keys.events: last}, count=1000,
                               block=block_ms if follow else None)  # fmt: skip
            entries = got[0][1] if got else []
            for entry_id, fields in entries:
                last = decode(entry_id)
                kind = decode(fields.get(b"type", b""))
                if kind == "commit":
                    yield RequestOutput.model_validate_json(fields[b"data"])
                elif kind == "job" and follow:
                    return
            if not entries and not follow:
                return


def load_profiles_doc(path: str | Path | None) -> tuple[dict[str, Any] | None, ProfileSet]:
    """A profile file's document (what a submission carries) and its profile set; the shipped
    A100 set when ``path`` is None.

    Raises:
        SpecError: the file cannot be read or is not a valid profile file (names the file).
    """
    if path is None:
        return None, load_default_profiles()
    try:
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text), profiles_from_json(text, str(path))
    except (ProfileError, OSError, ValueError) as e:
        raise SpecError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


class Client:
    """Connection to a samullm deployment (its Redis)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.r = connect(url)

    def submit(
        self,
        app: str | Path,
        *,
        cluster: str | Path,
        options: JobOptions | None = None,
        profiles: str | Path | None = None,
    ) -> Job:
        """Validate ``app`` on ``cluster`` here, then submit it.

        ``profiles`` is a profile file (``samullm profile`` / ``fit-profile``) that replaces the
        shipped A100 set, e.g. for CPU devices.

        Raises:
            apps.cluster_spec.SpecError: a bad application, cluster or profile file (nothing
                submitted).
        """
        doc_profiles, ps = load_profiles_doc(profiles)
        cl = load_cluster(cluster)
        pdfs = load_authors_pdfs(load_settings().default_lengths)
        load_app(app, cluster=cl, profiles=ps, authors_pdfs=pdfs, serving=serving_for(ps.gpu.name))
        doc = self_contained(app)
        sub = JobSubmission(
            job_id=uuid.uuid4().hex[:12], name=str(doc.get("name") or Path(app).stem), app=doc,
            cluster=_read(Path(cluster)), profiles=doc_profiles, options=options or JobOptions(),
            submitted_at=time.time(),
        )  # fmt: skip
        return self.submit_document(sub)

    def submit_document(self, sub: JobSubmission) -> Job:
        """Submit an already built submission (no client-side validation)."""
        k = JobKeys(sub.job_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(k.spec, sub.to_json())
        pipe.hset(k.state, mapping={"status": "queued", "name": sub.name,
                                    "submitted_at": sub.submitted_at})  # fmt: skip
        pipe.zadd(JOBS, {sub.job_id: sub.submitted_at})
        pipe.xadd(SUBMISSIONS, {"job_id": sub.job_id})
        pipe.execute()
        return Job(self.r, sub.job_id)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job.

        Raises:
            KeyError: no such job.
        """
        if not self.r.exists(JobKeys(job_id).state):
            raise KeyError(f"no job {job_id!r} in {self.url}")
        return Job(self.r, job_id)
