"""SHA-256 digests of package files: whole, and per chunk on every core for large files.

One SHA-256 stream runs on one core (about 2 GB/s with SHA extensions), so checking a 4 GB
model takes two seconds whatever the host. Large files therefore also carry the digest of
each fixed-size chunk; chunks are hashed by a thread pool (``hashlib`` releases the GIL while
it hashes), which makes the check about as many times faster as there are cores.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

#: Read size of streamed hashing.
_PIECE = 1 << 20
#: Files of at least twice this size get per-chunk digests; chunks are multiples of it.
CHUNK_MIN = 512 << 10
#: At most this many chunks per file (the manifest stays small: 64 digests are 4 KB).
CHUNKS_MAX = 64

#: Below this many bytes in all, digests are computed on the calling thread alone.
_INLINE_BYTES = 1 << 20
#: Hashing threads (the calling thread is one of them): the CPUs this process may run on.
WORKERS = min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a whole file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while piece := fh.read(_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def chunk_size(size: int) -> int | None:
    """Bytes per chunk for a file of ``size`` bytes, or None when one stream is fast enough."""
    if size < 2 * CHUNK_MIN:
        return None
    per_chunk = -(-size // CHUNKS_MAX)
    return -(-per_chunk // CHUNK_MIN) * CHUNK_MIN


def _hash_pool() -> ThreadPoolExecutor:
    # One pool per process: a forked child (batch workers) must not inherit its parent's
    # pool object, whose threads did not survive the fork.
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=max(1, WORKERS - 1), thread_name_prefix="sha256")
            _pool_pid = os.getpid()
        return _pool


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, end)`` of a file, or of its content already in memory. With ``into``
    (a buffer as large as the file), the file's bytes are read there, by the thread that hashes
    them: reading and hashing both run on every core, and the caller keeps what was hashed."""

    source: Path | memoryview
    start: int
    end: int
    into: memoryview | None = None


def _digest(span: Span) -> str:
    if isinstance(span.source, memoryview):
        return hashlib.sha256(span.source[span.start:span.end]).hexdigest()  # no copy
    digest, start = hashlib.sha256(), span.start
    fd = os.open(span.source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if span.into is not None:
            view = span.into[span.start:span.end]
            done = 0
            while done < len(view):
                count = os.preadv(fd, [view[done:]], span.start + done)
                if not count:  # the file shrank: the digest will not match
                    break
                done += count
            return hashlib.sha256(view[:done]).hexdigest()
        while start < span.end:
            piece = os.pread(fd, min(_PIECE, span.end - start), start)
            if not piece:  # the file shrank: the digest will not match
                break
            digest.update(piece)
            start += len(piece)
    finally:
        os.close(fd)
    return digest.hexdigest()


def digest_spans(spans: list[Span]) -> list[str]:
    """Hex SHA-256 of every span, in order, spread over every core.

    The spans are dealt into one batch per core, largest first, so that a few large chunks and
    many small files balance; the calling thread hashes one batch itself.
    """
    if sum(span.end - span.start for span in spans) < _INLINE_BYTES:
        return [_digest(span) for span in spans]  # handing work to threads would cost more
    pool = _hash_pool()
    batches: list[list[int]] = [[] for _ in range(max(1, min(WORKERS, len(spans))))]
    loads = [0] * len(batches)
    for i in sorted(range(len(spans)), key=lambda i: spans[i].start - spans[i].end):
        lightest = loads.index(min(loads))
        batches[lightest].append(i)
        loads[lightest] += spans[i].end - spans[i].start
    digests: list[str] = [""] * len(spans)

    def run(batch: list[int]) -> None:
        for i in batch:
            digests[i] = _digest(spans[i])

    futures = [pool.submit(run, batch) for batch in batches[1:]]
    run(batches[0])
    for future in futures:
        future.result()
    return digests


def spans_of(source: str | Path | bytes | memoryview, size: int, chunk: int | None,
             into: memoryview | None = None) -> list[Span]:
    """The spans covering ``size`` bytes of ``source``: one, or one per ``chunk`` bytes (read
    into ``into`` when given, see :class:`Span`)."""
    src = memoryview(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    step = chunk or max(size, 1)
    return [Span(src, start, min(start + step, size), into) for start in range(0, max(size, 1), step)]


def chunk_digests(source: str | Path | bytes, size: int, chunk: int) -> list[str]:
    """Hex SHA-256 of each ``chunk``-byte piece of ``source`` (a file, or its bytes), in parallel."""
    return digest_spans(spans_of(source, size, chunk))
