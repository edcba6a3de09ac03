"""Progress reporting: a rich bar on a terminal, JSON lines for logs, nothing with ``--quiet``.

The JSON-lines log holds ``progress`` records while a run goes on and exactly one last record:
``done`` once the final output is in place, ``failed`` (with ``error`` and ``exit_code``) or
``interrupted`` (Ctrl-C; the run resumes when started again with the same arguments).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class Progress:
    """Tracks rows done and reports them.

    Args:
        total: Rows in the dataset.
        done: Rows already done (a resumed run).
        bar: Show a rich progress bar on stderr (terminals).
        log: JSON-lines destination: a path, ``"-"`` for stderr, or None.
        interval: Seconds between JSON-lines records.
    """

    def __init__(self, total: int, done: int = 0, *, bar: bool = False, log: str | Path | None = None,
                 interval: float = 2.0) -> None:
        self.total = total
        self.done = done
        self.first = done
        self.rejected = 0
        self.interval = interval
        self.start = time.perf_counter()
        self._last_log = 0.0
        self._bar: Any = None
        self._task: Any = None
        self._log: TextIO | None = None
        self._own_log = False
        if log is not None:
            if str(log) == "-":
                self._log = sys.stderr
            else:
                self._log = open(log, "a", encoding="utf-8")
                self._own_log = True
        if bar:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("[bold]packager run"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("rows  {task.fields[rate]} rows/s"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                                     console=_stderr_console())
            self._task = self._bar.add_task("run", total=total, completed=done, rate="-")
            self._bar.start()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.done - self.first) / elapsed if elapsed > 0 else 0.0

    def update(self, rows: int, rejected: int = 0) -> None:
        """Count ``rows`` more rows (``rejected`` of them rejected)."""
        self.done += rows
        self.rejected += rejected
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate:,.0f}")
        now = time.perf_counter()
        if self._log is not None and now - self._last_log >= self.interval:
            self._last_log = now
            self._emit("progress")

    def _emit(self, event: str, **extra: Any) -> None:
        if self._log is None:
            return
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else None
        record = {"event": event, "rows": self.done, "total": self.total, "rejected": self.rejected,
                  "rows_per_s": round(rate, 1), "eta_s": None if eta is None else round(eta, 1),
                  "elapsed_s": round(time.perf_counter() - self.start, 3), **extra}
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def close(self, event: str = "done", extra: dict[str, Any] | None = None, **summary: Any) -> None:
        """Stop the bar and write the final record, once (later calls do nothing).

        Args:
            event: ``done`` (the output is in place), ``failed`` (with the error) or ``interrupted``.
            extra: More fields for the record (e.g. ``{"error": ..., "exit_code": ...}``).
        """
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._emit(event, **(extra or {}), **summary)
        if self._own_log and self._log is not None:
            self._log.close()
        self._log = None


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
