"""Live progress of a job in the terminal (rich): a bar per unit and a job line with its ETA."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn


class ProgressView:
    """Context manager; call :meth:`update` with the job's status and per-unit progress."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10}"),
            TextColumn("{task.fields[eta]:>12}"),
            console=Console(stderr=True),
        )
        self.rows: dict[str, TaskID] = {}
        self.job_row: TaskID | None = None

    def __enter__(self) -> ProgressView:
        self.progress.start()
        self.job_row = self.progress.add_task("job (planning)", total=None, rate="", eta="")
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def update(self, status: dict[str, Any], units: dict[str, dict[str, Any]]) -> None:
        """Redraw from the coordinator's latest summary (engine seconds for times)."""
        for name, u in units.items():
            if name not in self.rows:
                self.rows[name] = self.progress.add_task(name, total=u["total"], rate="", eta="")
            eta = f"eta {u['eta_s']:.0f} s" if u.get("running") else ""
            self.progress.update(self.rows[name], completed=u["done"],
                                 rate=f"{u['tokens_per_s']:.0f} tok/s", eta=eta)  # fmt: skip
        if self.job_row is not None:
            total = status.get("requests_total")
            label = f"job {status.get('status', '?')}"
            eta = f"eta {float(status['eta_s']):.0f} s" if "eta_s" in status else ""
            if "eta_p90_s" in status:
                eta += f" (P90 {float(status['eta_p90_s']):.0f} s)"
            self.progress.update(self.job_row, description=label, total=total,
                                 completed=status.get("outputs_committed", 0), eta=eta)  # fmt: skip
