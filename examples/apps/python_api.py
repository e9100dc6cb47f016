"""Build an application in Python with :mod:`apps.builders`, write it, run it, print results.

    .venv/bin/python examples/apps/python_api.py

Eight questions of ``data/questions.jsonl`` are answered by two models and the answers fused
by a third call (``builders.ensemble``). The document carries its rows inline, so the written
file needs no data folder. It is run with :func:`coordinator.local.run_app`, what ``samullm run``
does (a private Redis, the coordinator and sim workers on this machine, 100x faster than
simulated time), and the fused answers are read from the results file. Sim workers write
placeholder text: run on real engines for real answers.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from apps import builders
from coordinator.local import run_app

HERE = Path(__file__).resolve().parent
CLUSTER = HERE.parents[1] / "examples" / "clusters" / "a100x2.yaml"


def build() -> dict[str, Any]:
    lines = (HERE / "data" / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:8]]
    return builders.ensemble(
        ["lmsys/vicuna-13b-v1.5", "NousResearch/Llama-2-7b-chat-hf"],
        rows,
        fuser="mistralai/Mistral-7B-Instruct-v0.2",
        max_tokens=128,
        name="python_api",
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = builders.write(build(), Path(tmp) / "python_api.yaml")
        print(f"wrote {app} ({len(app.read_text().splitlines())} lines of YAML)")
        summary = run_app(app, CLUSTER, time_scale=0.01, out=Path(tmp) / "results.jsonl")
        print(f"job {summary['job_id']}: {summary['status']}, "
              f"{summary['outputs_committed']}/{summary['requests_total']} outputs, "
              f"makespan {summary.get('actual_makespan_s') or 0:.1f} simulated s")  # fmt: skip
        if summary["status"] != "done":
            sys.exit(f"error: {summary.get('error')}")
        results = [json.loads(line) for line in Path(summary["results"]).read_text().splitlines()]
    for r in sorted((r for r in results if r["node"] == "fuse"), key=lambda r: r["request_id"]):
        print(f"  fuse/{r['request_id']}: {r['output_tokens']} tokens: {r['text'][:40]!r}...")


if __name__ == "__main__":
    main()
