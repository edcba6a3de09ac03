"""The resume journal: which output shards are complete, so a killed run continues.

Layout, beside the output (``OUT``)::

    .OUT.parts/
        journal.jsonl        header line (fingerprint of the run's arguments), then one line per shard
        data/part-000000.npz (or .parquet) outputs of rows [start, end) that passed
        rejects/part-000000.jsonl  rows of that range that were rejected (--on-error skip)

A shard is written to a temp file and renamed, and only then journalled (append + fsync), so
a journalled shard is always complete; a shard file without a journal line is rewritten. A
torn last line (kill during the append) is ignored. The journal's ``end`` of the last shard
is where a restarted run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.errors import UsageError

JOURNAL_VERSION = 1


@dataclass
class ShardEntry:
    """One complete shard."""

    index: int
    start: int
    end: int
    rows: int  # rows written (end - start minus rejects)
    rejects: int
    file: str
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> {"dtype": str, "shape": [row dims]}
    size: int | None = None  # direct .npy output: the data file's length once this shard is in

    def to_json(self) -> str:
        return json.dumps({"shard": self.index, "start": self.start, "end": self.end, "rows": self.rows,
                           "rejects": self.rejects, "file": self.file, "outputs": self.outputs, "size": self.size})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardEntry":
        return cls(data["shard"], data["start"], data["end"], data["rows"], data["rejects"], data["file"],
                   data.get("outputs", {}), data.get("size"))

    def present(self, data_dir: Path) -> bool:
        """Whether the shard's data is on disk (for a direct output: enough bytes of it)."""
        path = data_dir / self.file
        return path.is_file() and (self.size is None or path.stat().st_size >= self.size)


class Journal:
    """Append-only record of finished shards for one output.

    Args:
        output: The final output path (file or folder).
        fingerprint: JSON-able description of everything that determines the output; a
            journal written with another fingerprint is never resumed.
    """

    def __init__(self, output: Path, fingerprint: dict[str, Any]) -> None:
        self.output = output
        self.parts = output.parent / f".{output.name}.parts"
        self.path = self.parts / "journal.jsonl"
        self.data_dir = self.parts / "data"
        self.rejects_dir = self.parts / "rejects"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.entries: list[ShardEntry] = []
        self.done = False
        self._fh: Any = None

    # ------------------------------------------------------------------ state
    def exists(self) -> bool:
        return self.path.is_file()

    def matches(self) -> bool:
        """Whether the journal on disk was written by a run with the same fingerprint."""
        header, _ = self._read()
        return header is not None and header.get("fingerprint") == self.fingerprint

    def _read(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None, []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill mid-append: everything after it is void
        if not records or records[0].get("journal") != JOURNAL_VERSION:
            return None, []
        return records[0], records[1:]

    def open(self, overwrite: bool) -> None:
        """Load a matching journal (resume) or start a fresh one.

        Raises:
            UsageError: A journal from a run with other arguments exists and ``overwrite`` is off.
        """
        if self.parts.exists() and not self.matches():
            _, records = self._read()
            # A stale journal with no finished shard has nothing worth keeping: replace it quietly.
            if not overwrite and any("shard" in r for r in records):
                raise UsageError(str(self.parts), "holds an unfinished run with different arguments or input",
                                 fix="re-run with the same arguments to resume it, or pass --overwrite to discard "
                                 "it and start over")
            shutil.rmtree(self.parts)
        if self.exists():
            _, records = self._read()
            for rec in records:
                if rec.get("done"):
                    self.done = True
                elif "shard" in rec:
                    entry = ShardEntry.from_dict(rec)
                    expected_start = self.entries[-1].end if self.entries else 0
                    if entry.start != expected_start or not entry.present(self.data_dir):
                        break  # a gap or a lost shard: resume from the last contiguous one
                    self.entries.append(entry)
            self._rewrite()
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.rejects_dir.mkdir(parents=True, exist_ok=True)
            self._rewrite()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.rejects_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_temp()
        self._fh = open(self.path, "a", encoding="utf-8")

    def sweep_temp(self) -> list[Path]:
        """Delete half-written temp files (``.part-*.tmp-*``) a killed run left in the parts folder.

        Only called by the holder of the output's lock (:mod:`packager.batch.lock`), so no other
        writer can be using them. Without this, a folder output would carry them into the final
        folder when the shard folder is renamed into place.
        """
        removed = []
        for folder in (self.parts, self.data_dir, self.rejects_dir):
            for entry in folder.iterdir() if folder.is_dir() else ():
                if entry.name.startswith(".") and ".tmp-" in entry.name and entry.is_file():
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
        return removed

    def _rewrite(self) -> None:
        # Rewritten atomically so that a torn line or a dropped shard never stays behind.
        self.parts.mkdir(parents=True, exist_ok=True)
        tmp = self.parts / "journal.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"journal": JOURNAL_VERSION, "fingerprint": self.fingerprint}) + "\n")
            for entry in self.entries:
                fh.write(entry.to_json() + "\n")
            if self.done:
                fh.write(json.dumps({"done": True}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    @property
    def resume_row(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def next_index(self) -> int:
        return self.entries[-1].index + 1 if self.entries else 0

    def _append(self, line: str) -> None:
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def record(self, entry: ShardEntry) -> None:
        """Journal a shard whose files are already renamed into place."""
        self._append(entry.to_json())
        self.entries.append(entry)

    def mark_done(self) -> None:
        self._append(json.dumps({"done": True}))
        self.done = True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Delete the parts folder (after the final output is in place).

        The journal goes last: a kill during the clean-up leaves a journal marked done, which
        the next run recognises and finishes, instead of an output it cannot vouch for.
        """
        self.close()
        for child in self.parts.iterdir() if self.parts.is_dir() else ():
            if child == self.path:
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        try:
            self.parts.rmdir()
        except OSError:
            shutil.rmtree(self.parts, ignore_errors=True)
