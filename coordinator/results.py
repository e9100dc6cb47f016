"""Export a job's committed outputs: JSONL (one object per line) or Parquet.

Rows are in the application's request order; failed requests are left out (``samullm status``
and :meth:`coordinator.client.Job.failed` list them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from coordinator.messages import RequestOutput

COLUMNS = ("job_id", "key", "node", "request_id", "text", "prompt_tokens", "output_tokens",
           "finish_reason")  # fmt: skip


def rows(job_id: str, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
    """Plain rows, one per output."""
    return [
        {"job_id": job_id, "key": o.key, "node": o.node, "request_id": o.request_id,
         "text": o.text, "prompt_tokens": o.prompt_tokens, "output_tokens": o.output_tokens,
         "finish_reason": o.finish_reason}
        for o in outputs
    ]  # fmt: skip


def export(job_id: str, outputs: list[RequestOutput], path: str | Path) -> int:
    """Write ``outputs`` to ``path`` (``.parquet`` as Parquet, else JSONL); rows written.

    The file appears whole or not at all (written to a temporary name, then renamed).

    Raises:
        RuntimeError: Parquet asked for and pyarrow is not installed.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".part")
    data = rows(job_id, outputs)
    if p.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            msg = "Parquet export needs pyarrow: pip install 'samullm[parquet]'"
            raise RuntimeError(msg) from e
        table = pa.table({c: [r[c] for r in data] for c in COLUMNS})
        pq.write_table(table, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in data:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return len(data)
