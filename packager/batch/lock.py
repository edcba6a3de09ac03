"""One writer per output: an exclusive ``flock`` on ``.OUT.lock`` beside the output, held for a whole run.

Two ``packager run`` jobs writing to one output would share its ``.OUT.parts/`` journal: one
could delete the other's shards, or both could finish with the rows of both inputs mixed in
one file. The lock makes the second writer fail up front (exit 2), naming the holder.

The lock file records the holder's host and PID as JSON, for that message only: the lock
itself is the kernel's ``flock``, which is released when its holder dies however it dies
(SIGKILL included), so a lock file left by a killed run is simply taken over by the next one.
The holder deletes the file (while still holding the lock) when its run ends; a contender
that locked the file just as it was deleted notices that the path no longer names the file
it holds and tries again, so two runs can never both believe they hold the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from packager.errors import UsageError


def lock_path(output: Path) -> Path:
    """The lock file of an output: ``.NAME.lock`` in the output's folder."""
    return output.parent / f".{output.name}.lock"


class OutputLock:
    """An exclusive, non-blocking lock on one output path.

    Attributes:
        path: The lock file.
        previous: Holder record found in the file when it was taken over (a killed run), else None.
        supported: False when the file system does not support ``flock`` (then nothing is locked).
    """

    def __init__(self, output: Path, *, what: str = "") -> None:
        self.output = output
        self.path = lock_path(output)
        self.what = what
        self.previous: dict[str, Any] | None = None
        self.supported = True
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        """Take the lock, or raise :class:`UsageError` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise self._refusal(holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    self.supported = False  # e.g. some network file systems: run unlocked
                    return self
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder deleted the file just before we locked it: try again
                os.close(fd)
                continue
            self.previous = _read(fd)
            record = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "output": str(self.output)}
            if self.what:
                record["what"] = self.what
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise UsageError(str(self.output), f"its lock file {self.path} keeps being replaced",
                         fix="make sure only one 'packager run' writes to this output")  # pragma: no cover

    def _refusal(self, holder: dict[str, Any] | None) -> UsageError:
        if holder:
            who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            if holder.get("started"):
                who += f", started {holder['started']}"
        else:
            who = "a process that has not recorded itself yet"
        return UsageError(
            str(self.output), f"is being written by another 'packager run' ({who}; lock file {self.path})",
            fix="wait for that run to finish (or stop it; a stopped run resumes when started again with the same "
            "arguments), or write to another --output; two runs into one output would mix their rows")

    def release(self) -> None:
        """Delete the lock file and drop the lock (in that order; see the module docstring)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
