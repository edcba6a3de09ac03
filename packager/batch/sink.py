"""Output side of a run: buffer chunk results into journalled shards, then assemble the output.

Shards are written atomically, then journalled (see :mod:`packager.batch.journal`). When all
rows are covered, :meth:`OutputSink.finalize` streams the shards into the final file (one shard
in memory at a time) or renames the shard folder into place, writes the rejects file, and
only then removes the journal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from packager.atomic import atomic_path, commit_file, fsync_path
from packager.batch.core import ChunkResult
from packager.batch.io import StreamingNpzWriter, _pq, read_arrays, to_arrow_table, write_arrays
from packager.batch.journal import Journal, ShardEntry
from packager.errors import ExistsError, UsageError

OUTPUT_FORMATS = ("npz", "parquet", "npy")
#: Output bytes buffered before a shard is cut (the resume granularity).
SHARD_BYTES = 32 << 20
#: Seconds of work buffered before a shard is cut, whatever its size: a classifier's output
#: (a few bytes a row) would otherwise reach SHARD_BYTES only after millions of rows, and a
#: kill would lose all of them.
SHARD_SECONDS = 30.0


@dataclass
class OutputSpec:
    """Where and how the output is written."""

    path: Path
    fmt: str  # npz | parquet | npy
    is_dir: bool
    rejects: Path | None  # None unless --on-error skip

    @property
    def shard_fmt(self) -> str:
        return "parquet" if self.fmt == "parquet" else "npz"


def resolve_output(path: Path, fmt: str | None, input_kind: str, on_error: str,
                   rejects: Path | None = None) -> OutputSpec:
    """Decide the output format: from the suffix, or a folder of shards (``dir/`` or no suffix).

    Raises:
        UsageError: The suffix and ``--output-format`` disagree, or the format is unknown.
    """
    text = str(path)
    suffix = path.suffix.lower()
    is_dir = text.endswith(("/", os.sep)) or path.is_dir() or suffix not in (".npz", ".parquet", ".npy")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise UsageError("--output-format", "is unknown", expected=", ".join(OUTPUT_FORMATS), got=fmt)
    if is_dir:
        fmt = fmt or ("parquet" if input_kind == "parquet" else "npz")
        if fmt == "npy":
            raise UsageError("--output-format npy", "cannot hold a folder of shards", expected="npz or parquet",
                             got="npy", fix="use --output-format npz")
    else:
        own = suffix[1:]
        if fmt is not None and fmt != own:
            raise UsageError(f"--output {path}", "suffix disagrees with --output-format", expected=fmt, got=own,
                             fix="drop --output-format or change the suffix")
        fmt = own
    path = Path(text.rstrip("/" + os.sep)) if text not in ("/",) else path
    if on_error == "skip":
        rejects = rejects or path.with_name(path.name + ".rejects.jsonl")
    else:
        rejects = None
    return OutputSpec(path.absolute(), fmt, is_dir, rejects.absolute() if rejects else None)


class OutputSink:
    """Collects :class:`ChunkResult` objects in row order and writes journalled shards.

    Args:
        out: The output's spec.
        journal: An opened journal (resume state included).
        shard_rows: Input rows per shard (None: cut at :data:`SHARD_BYTES` of output or
            :data:`SHARD_SECONDS` of work, whichever comes first).
        id_column: Name of the carried id column, if any.
        shard_seconds: Seconds of work after which a shard is cut when ``shard_rows`` is None.
        clock: Monotonic clock in seconds (a parameter so tests can drive it).
    """

    def __init__(self, out: OutputSpec, journal: Journal, shard_rows: int | None = None,
                 id_column: str | None = None, shard_seconds: float = SHARD_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.journal = journal
        self.shard_rows = shard_rows
        self.id_column = id_column
        self.shard_seconds = shard_seconds
        self._clock = clock
        self._since = clock()
        self._buf: list[ChunkResult] = []
        self._buf_rows = 0
        self._buf_bytes = 0
        self.next_row = journal.resume_row
        # A single .npy output is written in place (no shards to copy at the end): rows are
        # appended to DIRECT_NAME after a reserved header, and each journal entry records the
        # file's length, so a resumed run truncates the file back to its last journalled shard.
        self.direct = out.fmt == "npy" and not out.is_dir
        self._direct_fh: Any = None
        if self.direct:
            path = journal.data_dir / DIRECT_NAME
            size = journal.entries[-1].size if journal.entries else NPY_HEADER
            mode = "r+b" if path.exists() else "w+b"
            self._direct_fh = open(path, mode)
            self._direct_fh.truncate(size)
            if size == NPY_HEADER:
                self._direct_fh.seek(0)
                self._direct_fh.write(b"\0" * NPY_HEADER)
            self._direct_fh.seek(size)

    def add(self, result: ChunkResult) -> None:
        """Buffer one result (results must arrive in row order, without gaps)."""
        if result.start != self.next_row:  # pragma: no cover - the engines keep order
            raise RuntimeError(f"chunk at row {result.start} arrived, expected row {self.next_row}")
        self.next_row += result.rows
        self._buf.append(result)
        self._buf_rows += result.rows
        self._buf_bytes += sum(a.nbytes for a in result.outputs.values())
        if self.shard_rows:
            due = self._buf_rows >= self.shard_rows
        else:
            due = self._buf_bytes >= SHARD_BYTES or self._clock() - self._since >= self.shard_seconds
        if due:
            self.flush()

    def flush(self) -> None:
        """Write buffered results as one shard and journal it."""
        if not self._buf:
            return
        buf, self._buf, self._buf_rows, self._buf_bytes = self._buf, [], 0, 0
        self._since = self._clock()
        index = self.journal.next_index
        arrays = _concat([r.outputs for r in buf])
        if self.id_column is not None:
            ids = [r.ids for r in buf if r.ids is not None]
            arrays = {self.id_column: np.concatenate(ids) if ids else np.zeros(0), **arrays}
        name = f"part-{index:06d}.{self.out.shard_fmt}"
        size = None
        if self.direct:
            (value,) = arrays.values()
            _write_rows(self._direct_fh, value)
            self._direct_fh.flush()
            os.fsync(self._direct_fh.fileno())
            name, size = DIRECT_NAME, self._direct_fh.tell()
        else:
            # Shards of a single-file output are read back once: skip compressing them.
            write_arrays(self.journal.data_dir / name, arrays, self.out.shard_fmt, compress=self.out.is_dir)
        rejects = [(row, reason, rid) for r in buf for (row, reason), rid in
                   zip(r.rejects, r.reject_ids or [None] * len(r.rejects))]
        if self.out.rejects is not None:
            _write_rejects(self.journal.rejects_dir / f"part-{index:06d}.jsonl", rejects, self.id_column)
        kept = sum(r.kept for r in buf)
        outputs = {k: {"dtype": v.dtype.str, "shape": list(v.shape[1:])} for k, v in arrays.items()}
        self.journal.record(ShardEntry(index, buf[0].start, buf[-1].start + buf[-1].rows, kept, len(rejects), name,
                                       outputs, size))

    def close(self) -> None:
        """Release the direct output's file handle (after a failure; finalize closes it too)."""
        if self._direct_fh is not None:
            self._direct_fh.close()
            self._direct_fh = None

    # ----------------------------------------------------------------- final output
    def finalize(self) -> None:
        """Flush, assemble the final output atomically, write rejects, drop the journal."""
        self.flush()
        out = self.out
        entries = self.journal.entries
        if out.rejects is not None:
            _assemble_rejects(self.journal, out.rejects)
        if out.is_dir:
            _place_dir(self.journal.data_dir, out.path)
        elif self.direct:
            fh, self._direct_fh = self._direct_fh, None
            (dtype, shape), = _output_layout(entries).values()
            fh.seek(0)
            fh.write(_npy_header(dtype, (sum(e.rows for e in entries), *shape)))
            fh.close()
            commit_file(self.journal.data_dir / DIRECT_NAME, out.path)
        else:
            # The temp file lives in the parts folder: a kill mid-assembly leaves nothing beside the output.
            tmp = atomic_path(out.path, self.journal.parts)
            try:
                if out.fmt == "npz":
                    _assemble_npz(tmp, self.journal, entries)
                else:
                    _assemble_parquet(tmp, self.journal, entries)
                commit_file(tmp, out.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.journal.mark_done()
        self.journal.remove()


DIRECT_NAME = "output.npy"
#: Bytes reserved for the .npy header of a direct output (a multiple of 64, as numpy aligns).
NPY_HEADER = 256


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header padded with spaces to exactly :data:`NPY_HEADER` bytes."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(d) for d in shape)})
    body = text.encode("latin1")
    pad = NPY_HEADER - 10 - len(body) - 1
    if pad < 0:  # pragma: no cover - only for absurdly high-rank outputs
        raise RuntimeError(f".npy header for shape {shape} does not fit in {NPY_HEADER} bytes")
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


def _write_rows(fh: Any, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    if value.size:
        fh.write(memoryview(value.reshape(-1)).cast("B"))


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    keys = parts[0].keys()
    out = {}
    for k in keys:
        # Zero-row pieces (every row rejected) may carry placeholder dims: leave them out.
        pieces = [p[k] for p in parts if p[k].shape[0]] or [parts[0][k]]
        out[k] = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    return out


def _write_rejects(path: Path, rejects: list[tuple[int, str, Any]], id_column: str | None) -> None:
    tmp = atomic_path(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        for row, reason, rid in rejects:
            record: dict[str, Any] = {"row": row}
            if id_column is not None:
                record["id"] = rid
            record["reason"] = reason
            fh.write(json.dumps(record) + "\n")
    commit_file(tmp, path)


def _assemble_rejects(journal: Journal, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    same_fs = os.stat(journal.parts).st_dev == os.stat(target.parent).st_dev
    tmp = atomic_path(target, journal.parts if same_fs else None)
    with open(tmp, "wb") as dst:
        for entry in journal.entries:
            part = journal.rejects_dir / f"part-{entry.index:06d}.jsonl"
            if part.is_file():
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst)
    commit_file(tmp, target)


def _output_layout(entries: list[ShardEntry]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each array's dtype and row shape, from the first shard that kept rows."""
    layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for entry in sorted(entries, key=lambda e: e.rows == 0):
        for name, info in entry.outputs.items():
            layout.setdefault(name, (np.dtype(info["dtype"]), tuple(info["shape"])))
    return layout


def _blocks(journal: Journal, entries: list[ShardEntry], name: str) -> Iterator[np.ndarray]:
    for entry in entries:
        if entry.rows == 0:
            continue
        with np.load(journal.data_dir / entry.file, allow_pickle=False) as data:
            yield data[name]


def _assemble_npz(tmp: Path, journal: Journal, entries: list[ShardEntry]) -> None:
    total = sum(e.rows for e in entries)
    writer = StreamingNpzWriter(tmp)
    try:
        for name, (dtype, shape) in _output_layout(entries).items():
            writer.write_member(name, total, shape, dtype, _blocks(journal, entries, name))
    finally:
        writer.close()


def _assemble_parquet(tmp: Path, journal: Journal, entries: list[ShardEntry]) -> None:
    pq = _pq()
    writer = None
    try:
        for entry in entries:
            table = pq.read_table(journal.data_dir / entry.file)
            if entry.rows == 0 and writer is not None:
                continue
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            if entry.rows:
                writer.write_table(table.cast(writer.schema) if table.schema != writer.schema else table)
        if writer is None:  # no shard at all: an empty dataset
            pq.write_table(to_arrow_table({}), tmp)
    finally:
        if writer is not None:
            writer.close()


def _place_dir(data_dir: Path, target: Path) -> None:
    """Rename the shard folder onto ``target``; an existing target (``--overwrite``) is swapped out."""
    for entry in data_dir.iterdir():  # temp files of killed shard writes never reach the final folder
        if entry.name.startswith(".") and ".tmp-" in entry.name and entry.is_file():
            entry.unlink(missing_ok=True)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "out")
    os.rename(data_dir, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


#: What a folder output may hold and still be replaced by --overwrite: shards, and the temp files
#: of shard writes that older versions could leave there after a kill.
_SHARD_NAME = re.compile(r"^(?:.+\.(?:npz|parquet)|\.part-\d+\.(?:npz|parquet)\.tmp-[A-Za-z0-9_]+)$")


def check_output(out: OutputSpec, overwrite: bool, resuming: bool = False) -> None:
    """Refuse to replace an existing output (or rejects file) without ``--overwrite``.

    A resumed run may find its own rejects file already placed (a kill during finalize).
    """
    for target in (out.path, None if resuming else out.rejects):
        if target is not None and target.exists() and not overwrite:
            raise ExistsError(str(target), "already exists", fix="pass --overwrite to replace it, or choose "
                              "another --output")
    if out.path.exists() and out.is_dir != out.path.is_dir():
        raise ExistsError(str(out.path), "exists and is a " + ("file" if out.is_dir else "folder"),
                          fix="choose another --output")
    if out.path.is_dir() and overwrite and any(out.path.iterdir()):
        if any(not _SHARD_NAME.match(p.name) for p in out.path.iterdir()):
            raise ExistsError(str(out.path), "holds files that are not output shards; refusing to replace it",
                              fix="choose another --output")
    out.path.parent.mkdir(parents=True, exist_ok=True)


__all__ = ["OutputSpec", "OutputSink", "resolve_output", "check_output", "read_arrays", "OUTPUT_FORMATS"]
