"""``packager run``: streaming, resumable batch inference with the local or the Ray engine.

The local engine overlaps the three stages with bounded queues, so memory stays flat and the
runtime never waits on I/O::

    reader thread --(prefetch queue)--> inference (1..N threads) --(write queue)--> writer thread

The reader streams chunks (memory-mapped ``.npy``, sequential ``.npz`` members, Parquet row
groups); the writer cuts journalled shards; the final output appears with one rename.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from packager.batch.core import ChunkResult, ChunkRunner, default_batch_size, fixed_batch_size
from packager.batch.io import Dataset, open_dataset
from packager.batch.journal import Journal
from packager.batch.lock import OutputLock
from packager.batch.progress import Progress
from packager.batch.sink import OutputSink, check_output, resolve_output
from packager.errors import ExitCode, PackagerError, UsageError

ENGINES = ("local", "ray")
_END = object()


@dataclass
class RunConfig:
    """Options of a run (the CLI's flags).

    Attributes:
        batch_size: Rows per runtime call (None: chosen from the signature and model size).
        on_error: ``fail`` or ``skip`` (bad rows go to the rejects file).
        allow_nan: Accept NaN/inf in float inputs.
        id_column: Input column carried through to the output.
        output_format: ``npz``/``parquet``/``npy``; default from the output's suffix.
        rejects: Rejects file (default ``OUTPUT.rejects.jsonl``; only with ``on_error="skip"``).
        overwrite: Replace an existing output.
        shard_rows: Input rows per output shard (resume granularity; default by size).
        threads: Inference threads (None: one per CPU, up to 4, for thread-safe runners; else 1).
        prefetch: Chunks read ahead of inference.
        progress_bar: Show a rich progress bar on stderr.
        progress_log: JSON-lines progress log: a path or ``"-"`` (stderr).
        engine: ``local`` or ``ray``.
        address: Ray cluster address (``ray`` engine; default: start a local instance).
        num_workers: Ray actors (default: one per CPU, or per GPU with ``cuda``).
    """

    batch_size: int | None = None
    on_error: str = "fail"
    allow_nan: bool = False
    id_column: str | None = None
    output_format: str | None = None
    rejects: Path | None = None
    overwrite: bool = False
    shard_rows: int | None = None
    threads: int | None = None
    prefetch: int = 4
    progress_bar: bool = False
    progress_log: str | None = None
    engine: str = "local"
    address: str | None = None
    num_workers: int | None = None


@dataclass
class RunSummary:
    """What a run did."""

    output: str
    rows: int
    written: int
    rejected: int
    resumed_from: int
    seconds: float
    batch_size: int
    format: str
    runtime: str
    device: str
    engine: str
    rejects: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return (self.rows - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}


def run_dataset(package: str | Path, input_path: str | Path, output: str | Path, *, format: str | None = None,
                runtime: str | None = None, device: str = "cpu", cast: str = "strict",
                config: RunConfig | None = None, verify: bool = True) -> RunSummary:
    """Apply a package (or bare artifact) to a dataset and write the outputs.

    Restarting with the same arguments after a kill resumes from the last journalled shard.
    One run at a time may write to an output (an exclusive lock on ``.OUT.lock``).

    Args:
        package: Package folder, ``.tar.gz`` from ``packager pack``, or artifact.
        input_path: ``.npy``/``.npz``/``.parquet`` file or a folder of shards.
        output: ``.npz``/``.parquet``/``.npy`` file, or a folder (``dir/``) of shards.
        format: Artifact format (default: ONNX if present).
        runtime: Runtime name, or ``"auto"`` for the fastest one ``packager bench`` recorded.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        cast: ``strict`` or ``safe`` dtype policy.
        config: Everything else (:class:`RunConfig`).
        verify: Check the package's checksums before loading it.

    Raises:
        PackagerError: Bad arguments, inputs, or a failing runtime; nothing is left half-written.
    """
    config = config or RunConfig()
    state: dict[str, Any] = {"progress": None}
    try:
        return _run(package, input_path, output, format, runtime, device, cast, config, verify, state)
    except BaseException as exc:
        # The JSON-lines log always ends with one terminal event: done, failed or interrupted.
        progress = state["progress"]
        if progress is None and config.progress_log is not None:
            try:
                progress = Progress(0, log=config.progress_log)
            except OSError:
                progress = None
        summary = state.get("summary")
        interrupted = isinstance(exc, KeyboardInterrupt) and summary is not None
        if progress is not None:
            event, fields = _final_event(exc)
            progress.close(event, **fields, **({"saved": summary.written} if interrupted else {}))
        if interrupted:
            raise RunInterrupted(summary.written, summary.rows, summary.output) from exc
        raise


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what the journal kept: ``saved`` of ``rows`` input rows are in
    finished shards, and the same command resumes from there."""

    def __init__(self, saved: int, rows: int, output: str) -> None:
        super().__init__(f"{saved} of {rows} rows saved for {output}")
        self.saved, self.rows, self.output = saved, rows, output


def _final_event(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """The progress event (and its fields) for a run that ended with ``exc``."""
    if isinstance(exc, PackagerError):
        return "failed", {"error": exc.message, "error_type": type(exc).__name__, "exit_code": int(exc.exit_code)}
    if isinstance(exc, Exception):
        return "failed", {"error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__,
                          "exit_code": int(ExitCode.INTERNAL)}
    return "interrupted", {"error_type": type(exc).__name__}  # KeyboardInterrupt (Ctrl-C), SystemExit


def _run(package: str | Path, input_path: str | Path, output: str | Path, format: str | None, runtime: str | None,
         device: str, cast: str, config: RunConfig, verify: bool, state: dict[str, Any]) -> RunSummary:
    from packager.archive import is_archive

    unpacked: Path | None = None
    try:
        if is_archive(package):
            # A .tar.gz from 'packager pack': unpacked once (bounded, checked) into a temp folder named
            # with this host and PID, deleted when the run ends; a killed run's copy is swept next time.
            package, unpacked = unpack_for_run(package)
        return _run_package(package, input_path, output, format, runtime, device, cast, config, verify, state)
    finally:
        if unpacked is not None:
            shutil.rmtree(unpacked, ignore_errors=True)


def _run_package(package: str | Path, input_path: str | Path, output: str | Path, format: str | None,
                 runtime: str | None, device: str, cast: str, config: RunConfig, verify: bool,
                 state: dict[str, Any]) -> RunSummary:
    import runtimes
    from runtimes.device import parse_device

    if config.engine not in ENGINES:
        raise UsageError("--engine", "is unknown", expected=" or ".join(ENGINES), got=config.engine)
    if config.batch_size is not None and config.batch_size < 1:
        raise UsageError("--batch-size", "must be at least 1", got=config.batch_size)
    if config.threads is not None and config.threads < 1:
        raise UsageError("--threads", "must be at least 1", got=config.threads)
    started = time.perf_counter()
    notes: list[str] = []
    dev = parse_device(device)
    if runtime == "auto":
        from packager.bench import auto_choice

        format, runtime, note = auto_choice(package, format, str(dev))
        notes.append(note)
    # One choice of artifact, runtime and options, read from the manifest once for the whole run.
    selection = runtimes.select(package, format=format, runtime=runtime, verify=verify)
    threads, options = _parallelism(selection, config.threads, config.engine)
    if config.engine == "ray" and selection.signature is not None:
        # The driver needs only the signature, which the manifest holds: actors load the artifact.
        runner: Any = _Unloaded(selection)
    else:  # a bare artifact's signature comes from loading it (on the CPU for the Ray driver)
        runner = selection.open("cpu" if config.engine == "ray" else dev, cast, **options)
    lock: OutputLock | None = None
    try:
        format_used = selection.format
        signature = runner.signature
        if config.id_column and config.id_column in signature.output_names + signature.input_names:
            raise UsageError("--id-column", "has the name of a model input or output", got=config.id_column,
                             fix="rename the id column")
        dataset = open_dataset(input_path, signature, config.id_column)
        out = resolve_output(Path(output), config.output_format, dataset.kind, config.on_error, config.rejects)
        check_paths(Path(input_path), out)
        if out.fmt == "npy" and (len(signature.outputs) != 1 or config.id_column):
            raise UsageError(f"--output {out.path}", "a .npy holds one array, but the run writes several",
                             expected="one output and no --id-column", got=signature.output_names +
                             ([config.id_column] if config.id_column else []), fix="write .npz or .parquet")
        # From here on this run is the only writer of the output, its journal and its rejects file.
        lock = OutputLock(out.path, what=f"packager run -i {input_path}").acquire()
        if lock.previous and lock.previous.get("pid") != os.getpid():
            prev = lock.previous
            notes.append(f"took over the lock of a run that is gone (pid {prev.get('pid')} on host "
                         f"{prev.get('host')})")
        batch_size = config.batch_size or default_batch_size(signature, _model_bytes(selection))
        fixed = fixed_batch_size(signature)
        if fixed is not None and batch_size % fixed:
            batch_size = -(-batch_size // fixed) * fixed  # whole fixed-size batches; the last one is padded
            notes.append(f"batch size rounded up to {batch_size}, a multiple of the artifact's fixed batch {fixed}")
        fingerprint = {"model": _model_identity(selection), "format": format_used, "runtime": runner.runtime,
                       "device": str(dev), "cast": cast, "input": dataset.identity(), "batch_size": batch_size,
                       "on_error": config.on_error, "allow_nan": config.allow_nan, "id_column": config.id_column,
                       "output_format": out.fmt, "shard_rows": config.shard_rows}
        # Engine and thread counts are left out on purpose: they change how rows are scheduled, not
        # which rows form a batch, so a run may resume on another engine or with other --threads.
        journal = Journal(out.path, fingerprint)
        summary = state["summary"] = RunSummary(str(out.path), dataset.rows, 0, 0, 0, 0.0, batch_size, format_used, runner.runtime,
                             str(dev), config.engine, str(out.rejects) if out.rejects else None, notes)
        if _finish_if_already_placed(journal, out, dataset.rows, config.overwrite):
            summary.resumed_from = dataset.rows
            summary.written = sum(e.rows for e in journal.entries)
            summary.rejected = sum(e.rejects for e in journal.entries)
            summary.notes.append("the output was already complete; cleaned up the journal")
            summary.seconds = time.perf_counter() - started
            progress = state["progress"] = Progress(dataset.rows, dataset.rows, log=config.progress_log)
            progress.close("done", written=summary.written, output=str(out.path))
            return summary
        resumable = journal.exists() and journal.matches()
        check_output(out, config.overwrite, resuming=resumable)
        journal.open(config.overwrite)
        start = journal.resume_row
        summary.resumed_from = start
        sink = OutputSink(out, journal, config.shard_rows, config.id_column)
        chunk_runner = ChunkRunner(runner, config.on_error, config.allow_nan)
        progress = state["progress"] = Progress(dataset.rows, start, bar=config.progress_bar,
                                                log=config.progress_log)
        try:
            if config.engine == "ray":
                from packager.batch.ray_engine import ray_results

                runner.close()  # the driver's copy is not needed while the actors run
                results = ray_results(package, dataset, start, batch_size, format=format_used,
                                      runtime=summary.runtime, device=str(dev), cast=cast, config=config,
                                      signature=signature, verify=verify)
            else:
                results = local_results(chunk_runner, dataset, start, batch_size, threads, config.prefetch)
            if dataset.rows == 0:
                results = iter([ChunkResult(0, 0, chunk_runner.empty_outputs())])
            _drive(results, sink, progress)
            sink.finalize()
        finally:
            sink.close()
            journal.close()
            summary.written = sum(e.rows for e in journal.entries)
            summary.rejected = sum(e.rejects for e in journal.entries)
            summary.seconds = time.perf_counter() - started
        # Only now is the output in place (renamed) and the journal gone: the run is done.
        progress.close("done", written=summary.written, output=str(out.path))
        return summary
    finally:
        if lock is not None:
            lock.release()
        runner.close()


#: Name prefix of the temporary folders archives are unpacked into (then HOST-PID-random).
UNPACK_PREFIX = "packager-unpacked-"


def unpack_for_run(archive: str | Path) -> tuple[Path, Path]:
    """Unpack a package archive for one run; returns (package root, temp folder to delete afterwards).

    The folder is ``$TMPDIR/packager-unpacked-HOST-PID-XXXXXXXX``, so that the copies of killed
    runs can be told apart from those of live ones: each start deletes the copies of processes
    of this host that no longer run (:func:`sweep_unpacked`).
    """
    from packager.archive import extract

    sweep_unpacked()
    folder = Path(tempfile.mkdtemp(prefix=f"{UNPACK_PREFIX}{socket.gethostname()}-{os.getpid()}-"))
    try:
        return extract(archive, folder), folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def sweep_unpacked(tmp_dir: str | Path | None = None) -> list[Path]:
    """Delete unpacked archive copies left in the temp folder by killed runs of this host."""
    from packager.atomic import pid_alive

    host = socket.gethostname()
    pattern = re.compile(rf"^{re.escape(UNPACK_PREFIX + host)}-(\d+)-[A-Za-z0-9_]{{8}}$")
    removed = []
    root = Path(tmp_dir or tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(input_path: Path, out: Any) -> None:
    """Refuse outputs that would overwrite or feed back into the input, and rejects that clash.

    Raises:
        UsageError: The output is the input, lies inside the input folder, or holds the input;
            the rejects file is the output, lies inside an output folder, or is (inside) the input.
    """
    inp = Path(os.path.realpath(input_path))
    dst = Path(os.path.realpath(out.path))
    if _inside(dst, inp) or _inside(inp, dst):
        what = ("is the input" if dst == inp else "lies inside the input folder" if _inside(dst, inp)
                else "holds the input")
        raise UsageError(f"--output {out.path}", f"{what} ({input_path}); writing it would replace or mix "
                         "with the input's data", fix="write the output outside the input (and the input "
                         "outside the output)")
    if out.rejects is not None:
        rej = Path(os.path.realpath(out.rejects))
        if rej == dst or (out.is_dir and _inside(rej, dst)):
            raise UsageError(f"--rejects {out.rejects}", "is the output" if rej == dst else
                             "lies inside the output folder", fix="choose a rejects file beside the output "
                             "(the default is OUTPUT.rejects.jsonl)")
        if _inside(rej, inp):
            raise UsageError(f"--rejects {out.rejects}", "is the input" if rej == inp else
                             "lies inside the input folder", fix="choose a rejects file outside the input")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parallelism(selection: Any, threads: int | None, engine: str) -> tuple[int, dict[str, Any]]:
    """Inference threads and runner options for the local engine.

    Batch inference parallelises best across batches: each thread runs its own batch with a
    single-threaded ONNX Runtime session, instead of one batch at a time split across cores
    (whose per-operator synchronisation dominates for small and medium models and suffers
    badly when other processes share the cores). Runners that are not thread-safe get one
    thread and their own defaults.
    """
    if engine != "local":
        return 1, {}
    name = selection.runtime.name
    safe = selection.runtime.thread_safe
    cpus = _cpus()
    if threads is None:
        threads = min(cpus, 4) if safe else 1
    options: dict[str, Any] = {}
    if name == "onnxruntime":
        options["intra_op_num_threads"] = max(1, cpus // threads)
    return threads, options


def _finish_if_already_placed(journal: Journal, out: Any, rows: int, overwrite: bool) -> bool:
    """A run killed after its final rename but before dropping the journal: finish the cleanup."""
    if overwrite or not out.path.exists() or not journal.exists() or not journal.matches():
        return False
    _, records = journal._read()
    shards = [r for r in records if "shard" in r]
    if not shards or shards[-1]["end"] != rows:
        return False
    if out.is_dir and journal.data_dir.exists():
        return False  # the shard folder was never renamed: not finished
    from packager.batch.journal import ShardEntry

    journal.entries = [ShardEntry.from_dict(r) for r in shards]
    journal.remove()
    return True


def local_results(chunk_runner: ChunkRunner, dataset: Dataset, start: int, batch_size: int, threads: int = 1,
                  prefetch: int = 4) -> Iterator[ChunkResult]:
    """Results in row order, reading ahead on a thread and inferring on ``threads`` threads."""
    chunks: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def reader() -> None:
        try:
            for chunk in dataset.iter_chunks(start, batch_size, chunk_runner.signature):
                while not stop.is_set():
                    try:
                        chunks.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            chunks.put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            chunks.put(_Failure(exc))

    thread = threading.Thread(target=reader, name="packager-reader", daemon=True)
    thread.start()

    def items() -> Iterator[Any]:
        while True:
            item = chunks.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    try:
        if threads == 1:
            for chunk in items():
                yield chunk_runner.run_chunk(chunk)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="packager-infer") as pool:
                pending: deque[Any] = deque()
                for chunk in items():
                    pending.append(pool.submit(chunk_runner.run_chunk, chunk))
                    if len(pending) >= threads + 1:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
    finally:
        stop.set()
        while thread.is_alive():
            try:
                chunks.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _drive(results: Iterator[ChunkResult], sink: OutputSink, progress: Progress) -> None:
    """Feed results to the sink on a writer thread, so writing overlaps inference."""
    pending: queue.Queue[Any] = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def writer() -> None:
        while True:
            item = pending.get()
            if item is _END:
                return
            if failure:
                continue  # keep draining so the producer never blocks
            try:
                sink.add(item)
                progress.update(item.rows, len(item.rejects))
            except BaseException as exc:
                failure.append(exc)

    thread = threading.Thread(target=writer, name="packager-writer", daemon=True)
    thread.start()
    try:
        for result in results:
            if failure:
                break
            pending.put(result)
    finally:
        pending.put(_END)
        thread.join()
    if failure:
        raise failure[0]


def _model_bytes(selection: Any) -> int:
    """The largest artifact of the package (the default batch size must not depend on which runs)."""
    if selection.manifest is None:
        return selection.model_bytes
    return max((sum(f.size for f in a.files) for a in selection.manifest.artifacts), default=0)


class _Unloaded:
    """What the Ray driver keeps of a package's artifact: its signature (the actors load it)."""

    def __init__(self, selection: Any) -> None:
        self.signature, self.runtime, self.path = selection.signature, selection.runtime.name, selection.path

    def close(self) -> None:
        pass


def _model_identity(selection: Any) -> str:
    """SHA-256 of the manifest (packages) or path, size and mtime of a bare artifact."""
    from packager.manifest import MANIFEST_NAME

    if selection.package is not None:
        return hashlib.sha256(Path(selection.package.root, MANIFEST_NAME).read_bytes()).hexdigest()
    st = Path(selection.path).stat()
    return f"{Path(selection.path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


