"""The Ray Data engine of ``packager run`` (``--engine ray``): the same output, row for row.

The driver cuts the input shards into work units (file, first row, last row) of about 16 MB
that start on the same batch boundaries as the local engine. ``ray.data.from_items`` turns
them into a dataset, ``map_batches`` runs a callable class that loads the package once per
actor (``num_gpus=1`` actors for ``cuda``), reads its units with the local engine's streaming
readers and runs them through :class:`~packager.batch.core.ChunkRunner` (row checks, padding,
bad-row isolation). Results stream back to the driver, which puts them in row order by their
row index and feeds the local engine's journalled shard writer, so resume, rejects and the
atomic final output behave identically.

Why units rather than ``ray.data.read_parquet``: with ``preserve_order`` set, Ray Data 2.60
still returned row groups of a Parquet file out of order once files were large enough to be
split across read tasks (24 files of 1M rows: 13 breaks). Units carry their row index, so
order never depends on Ray, a resumed run starts at its exact row, and ``.npz`` works too.

Without ``--address`` a local Ray instance is started; with it the driver joins an existing
cluster (``ray://HEAD:10001`` or ``HEAD:6379``), whose nodes must see the package and the input
at the same paths (shared storage) and have packager installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from packager import errors as _errors
from packager.batch.core import ChunkResult, ChunkRunner
from packager.batch.io import Chunk, Dataset, _pa, arrow_table_to_arrays, row_nbytes, to_arrow_table
from packager.errors import DeviceError, InputError, PackagerError, UsageError, require
from packager.signature import Signature, TensorSpec

_ERROR_TAG = "packager-error:"


class Predictor:
    """Ray Data callable class: loads the artifact once per actor and runs work units.

    Args:
        package: Package folder or artifact (a path every node can read).
        format: Artifact format.
        runtime: Runtime name.
        device: ``cpu`` or ``cuda[:N]`` (a GPU actor sees its GPU as ``cuda:0``).
        cast: Dtype policy.
        allow_nan: Accept NaN/inf in float inputs.
        kind: Input kind (``npy``, ``npz``, ``parquet``).
        id_column: Column carried through.
        verify: Check the package's checksums on load.
        threads: ONNX Runtime intra-op threads per actor (one per reserved CPU).
        batch_size: Rows per runtime call.
    """

    def __init__(self, package: str, format: str, runtime: str, device: str, cast: str, allow_nan: bool,
                 kind: str, id_column: str | None, verify: bool, threads: int, batch_size: int) -> None:
        import runtimes

        options: dict[str, Any] = {}
        if runtime == "onnxruntime":
            options["intra_op_num_threads"] = threads  # actors share the node: no oversubscription
        try:
            self.runner = runtimes.load(package, format=format, device=device, runtime=runtime, cast=cast,
                                        verify=verify, **options)
        except PackagerError as exc:
            raise RuntimeError(_encode(exc)) from None
        # Rows are flagged rather than raised, so a failure names its global row on the driver.
        self.chunks = ChunkRunner(self.runner, "skip", allow_nan)
        self.kind = kind
        self.id_column = id_column
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        try:
            parts = [self._unit(str(path), int(lo), int(hi), int(first))
                     for path, lo, hi, first in zip(batch["path"], batch["lo"], batch["hi"], batch["first"])]
        except PackagerError as exc:
            raise RuntimeError(_encode(exc)) from None
        return parts[0] if len(parts) == 1 else _pa().concat_tables(parts)

    def _unit(self, path: str, lo: int, hi: int, first: int) -> Any:
        """Rows [lo, hi) of one file (``first``: the global index of row ``lo``)."""
        from packager.batch.io import Dataset, open_dataset

        dataset: Dataset = open_dataset(path, self.runner.signature, self.id_column)
        n = hi - lo
        ok = np.ones(n, dtype=bool)
        codes = np.zeros(n, dtype=np.int32)  # index into `texts`; 0: no reject
        texts = [""]
        pieces: dict[str, list[np.ndarray]] = {}
        ids: list[np.ndarray] = []
        for chunk in dataset.iter_chunks(lo, self.batch_size, self.runner.signature):
            if chunk.start >= hi:
                break
            if chunk.start + chunk.rows > hi:  # the unit ends inside this chunk
                keep = hi - chunk.start
                chunk = Chunk(chunk.start, {k: v[:keep] for k, v in chunk.arrays.items()},
                              None if chunk.ids is None else chunk.ids[:keep],
                              {r: why for r, why in chunk.bad.items() if r < keep})
            if chunk.ids is not None:
                ids.append(np.asarray(chunk.ids))
            result = self.chunks.run_chunk(chunk)
            for row, reason in result.rejects:
                ok[row - lo] = False
                codes[row - lo] = len(texts)
                texts.append(reason)
            for name, arr in result.outputs.items():
                pieces.setdefault(name, []).append(arr)
        out: dict[str, np.ndarray] = {}
        for name, parts in pieces.items():
            kept = [p for p in parts if p.shape[0]] or parts[:1]
            arr = kept[0] if len(kept) == 1 else np.concatenate(kept)
            full = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
            full[ok] = arr
            out[name] = full
        out["__row"] = np.arange(first, first + n, dtype=np.int64)
        out["__ok"] = ok
        if ids:
            out["__id"] = np.concatenate(ids)
        # Reasons as a dictionary column: a string per row would cost more than the inference
        # (0.2 s per 262k rows to convert), while rejects are rare.
        pa = _pa()
        table = to_arrow_table(out)
        return table.append_column("__reason", pa.DictionaryArray.from_arrays(pa.array(codes),
                                                                             pa.array(texts, pa.string())))


def _encode(exc: PackagerError) -> str:
    # PackagerError's keyword-only constructor does not survive pickling through Ray: send its fields.
    return _ERROR_TAG + json.dumps({**exc.to_dict(), "error": type(exc).__name__})


def _decode(exc: BaseException) -> PackagerError | None:
    text = str(exc)
    at = text.find(_ERROR_TAG)
    if at < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(text[at + len(_ERROR_TAG):])
    except json.JSONDecodeError:
        return None
    cls = getattr(_errors, data.get("error", ""), PackagerError)
    if not (isinstance(cls, type) and issubclass(cls, PackagerError)):
        cls = PackagerError
    return cls(data["subject"], data["problem"], expected=data.get("expected"), got=data.get("got"),
               fix=data.get("fix"))


def worker_setup() -> None:
    """Ray worker set-up hook (``runtime_env={"worker_process_setup_hook": ...}``).

    Ray Data probes fsspec's HTTP filesystem from several threads at once. Without aiohttp
    that import fails half-way, and a racing thread then gets an ImportError that Ray does not
    handle (only ModuleNotFoundError). Making the import fail the same way every time avoids it;
    the HTTP filesystem is unusable without aiohttp anyway.
    """
    import importlib.util
    import sys

    if "fsspec.implementations.http" not in sys.modules and importlib.util.find_spec("aiohttp") is None:
        sys.modules["fsspec.implementations.http"] = None  # type: ignore[assignment]


#: runtime_env every packager Ray job uses (also for a Ray instance started by hand, see docs/batch.md).
RUNTIME_ENV = {"worker_process_setup_hook": "packager.batch.ray_engine.worker_setup"}


def init_ray(address: str | None) -> Any:
    """Connect to ``address`` or start a local Ray instance (reusing one already running here)."""
    ray = require("ray", purpose="run with --engine ray")
    worker_setup()  # the driver lists files too
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address and address != "auto":
        _probe(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR", runtime_env=RUNTIME_ENV)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", runtime_env=RUNTIME_ENV)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--address {address}" if address else "local Ray instance",
                         f"cannot be reached or started ({exc})",
                         fix="check the address (ray://HEAD:10001 or HEAD:6379) and that 'ray status' works there"
                         if address else "check 'ray start --head' works on this host") from None
    return ray


def _probe(address: str) -> None:
    """Fail fast on an unreachable HOST:PORT (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}", "is not HOST:PORT", expected="HEAD:6379 or ray://HEAD:10001",
                         got=address)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UsageError(f"--address {address}", f"cannot be reached ({exc})",
                         fix="check the head node's address and port ('ray status' on the head shows it), and that "
                         "this host can reach it") from None


def ray_results(package: str | Path, dataset: Dataset, start: int, batch_size: int, *, format: str, runtime: str,
                device: str, cast: str, config: Any, signature: Signature, verify: bool = True
                ) -> Iterator[ChunkResult]:
    """Run the dataset on Ray from global row ``start``; yield results in row order."""
    from runtimes.device import parse_device

    ray = init_ray(config.address)
    import ray.data

    dev = parse_device(device)
    resources = ray.cluster_resources()
    if dev.is_cuda and resources.get("GPU", 0) < 1:
        raise DeviceError(f"device {dev}", "the Ray cluster has no GPU", expected="at least one GPU in "
                          "'ray status'", got=f"{resources.get('GPU', 0):g} GPUs",
                          fix="use --device cpu, or add GPU nodes to the cluster")
    workers = config.num_workers or max(1, int(resources.get("GPU" if dev.is_cuda else "CPU", 1)))
    if workers < 1:
        raise UsageError("--num-workers", "must be at least 1", got=workers)
    units = _units(dataset, start, batch_size, max(1, row_nbytes(signature)))
    if not units:
        return
    import logging
    import warnings

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # fewer rows to hold back; order is restored below anyway
    # Per-execution INFO lines and Ray's own bars would interleave with packager's progress.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    ctx.enable_progress_bars = False
    if dev.is_cuda:
        kwargs: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
    else:
        # Actors that reserve every CPU starve Ray Data's own tasks (a deadlock on a small instance):
        # keep one CPU's worth of reservations free when the pool would otherwise fill the cluster.
        cpus = float(resources.get("CPU", 1))
        kwargs = {"num_cpus": 1 if workers + 1 <= cpus else max(0.1, (cpus - 1) / workers)}
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        Predictor, batch_size=None, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"package": str(Path(package).absolute()), "format": format, "runtime": runtime,
                               "device": "cuda:0" if dev.is_cuda else "cpu", "cast": cast,
                               "allow_nan": config.allow_nan, "kind": dataset.kind, "id_column": dataset.id_column,
                               "verify": verify, "threads": 1, "batch_size": batch_size},
        **kwargs)
    row = start
    outputs = signature.outputs
    held: dict[int, dict[str, np.ndarray]] = {}  # blocks that arrived early, by first row
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            rows = block.column("__row").to_numpy()
            if len(rows) and np.any(np.diff(rows) != 1):
                raise RuntimeError("Ray returned a block whose rows are not contiguous")
            if len(rows):
                held[int(rows[0])] = block
            while row in held:
                result = _result(held.pop(row), row, outputs, config.on_error)
                row += result.rows
                yield result
    except Exception as exc:
        if isinstance(exc, PackagerError):
            raise
        decoded = _decode(exc)
        if decoded is not None:
            raise decoded from None
        raise
    if row != dataset.rows or held:  # pragma: no cover - never write output Ray lost rows from
        raise RuntimeError(f"Ray returned rows up to {row} of {dataset.rows} ({len(held)} blocks out of place)")


def _result(block: Any, row: int, outputs: list[TensorSpec], on_error: str) -> ChunkResult:
    """A ChunkResult from one Arrow block returned by the actors."""
    arrays = arrow_table_to_arrays(block.drop_columns(["__reason"]))
    ok = arrays["__ok"].astype(bool)
    bad = np.flatnonzero(~ok)
    reasons: list[str] = []
    if len(bad):
        column = block.column("__reason").combine_chunks()
        codes = column.indices.to_numpy(zero_copy_only=False)
        texts = column.dictionary.to_pylist()
        reasons = [texts[codes[r]] for r in bad]
    ids = arrays.get("__id")
    if len(bad) and on_error == "fail":
        raise InputError(f"row {row + int(bad[0])}", reasons[0],
                         fix="fix the record, or pass --on-error skip to write bad rows to the rejects file and go on")
    values = {}
    for spec in outputs:
        arr = arrays[spec.name]
        dims = [d for i, d in enumerate(spec.shape) if i != (spec.batch_axis if spec.batch_axis is not None else 0)]
        if arr.ndim != len(dims) + 1 and all(isinstance(d, int) for d in dims):
            arr = arr.reshape((len(arr), *dims))  # Ray dropped the shape metadata: the signature knows it
        values[spec.name] = arr[ok]
    return ChunkResult(row, len(ok), values, None if ids is None else ids[ok],
                       [(row + int(r), why) for r, why in zip(bad, reasons)],
                       [] if ids is None else [_item(ids[r]) for r in bad])


def _units(dataset: Dataset, start: int, batch_size: int, row_bytes: int) -> list[dict[str, Any]]:
    """Work units of about 16 MB of input, on the local engine's batch boundaries within each file."""
    unit = batch_size * max(1, (16 << 20) // (batch_size * row_bytes))
    units: list[dict[str, Any]] = []
    offset = 0
    for source in dataset.sources:
        lo = max(0, start - offset)
        while lo < source.rows:
            # The local engine's chunks restart at `lo` of the first file it resumes in: keep its grid.
            hi = min(source.rows, lo + unit)
            # Absolute: a Ray worker (on this or another node) does not share the driver's cwd.
            units.append({"path": str(Path(source.path).absolute()), "lo": lo, "hi": hi, "first": offset + lo})
            lo = hi
        offset += source.rows
    return units


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def shutdown() -> None:
    """Disconnect from Ray (tests and long-lived processes)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
