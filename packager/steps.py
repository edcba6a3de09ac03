"""Steps of long work (export, verify), reported as they finish.

The library only announces steps: :func:`step` logs a record on the ``packager.steps`` logger
when a step starts and when it ends (with its elapsed seconds), and costs nothing when nobody
listens. The CLI listens (:class:`StepReporter`): a live status line on a terminal, one JSON
line per finished step otherwise, like ``run``'s progress log; nothing with ``--quiet``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

log = logging.getLogger("packager.steps")


@contextmanager
def step(command: str, name: str, **fields: Any) -> Iterator[None]:
    """Announce step ``name`` of ``command`` ("export", "verify"); ``fields`` go in its records."""
    started = time.perf_counter()
    log.info("%s: %s", command, name, extra={"packager_step": {"command": command, "step": name,
                                                                  "status": "start", **fields}})
    yield
    elapsed = round(time.perf_counter() - started, 3)
    log.info("%s: %s done in %.1f s", command, name, elapsed,
             extra={"packager_step": {"command": command, "step": name, "status": "done", "elapsed_s": elapsed,
                                      **fields}})


class StepReporter(logging.Handler):
    """Shows step records: a rich status on a terminal, JSON lines on ``stream`` otherwise.

    Use as a context manager around the command; it attaches itself to ``packager.steps``.
    """

    def __init__(self, stream: TextIO | None = None, terminal: bool | None = None) -> None:
        super().__init__(logging.INFO)
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._status: Any = None
        self._started = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        data = getattr(record, "packager_step", None)
        if data is None:
            return
        if not self.terminal:
            if data["status"] == "done":
                since = round(time.perf_counter() - self._started, 3)
                self.stream.write(json.dumps({"event": "step", **data, "since_start_s": since}) + "\n")
                self.stream.flush()
            return
        from rich.text import Text

        if self._status is None:
            from rich.console import Console
            from rich.status import Status

            self._status = Status("", console=Console(file=self.stream, highlight=False))
            self._status.start()
        if data["status"] == "start":
            self._status.update(Text(f"{data['command']}: {data['step']} ..."))
        else:
            self._status.console.print(Text(f"  {data['command']}: {data['step']} ({data['elapsed_s']:.1f} s)",
                                            style="dim"))

    def __enter__(self) -> "StepReporter":
        log.addHandler(self)
        log.setLevel(logging.INFO)
        log.propagate = False  # shown here once, not again by a root handler a framework installed
        return self

    def __exit__(self, *exc: Any) -> None:
        log.removeHandler(self)
        log.setLevel(logging.NOTSET)
        log.propagate = True
        if self._status is not None:
            self._status.stop()
            self._status = None
