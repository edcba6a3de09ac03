"""Per-chunk inference shared by the local and Ray engines: row checks, padding, bad rows.

:class:`ChunkRunner` wraps a runner. Given a :class:`~packager.batch.io.Chunk` it rejects rows
that fail validation (NaN/inf where the input must be finite, integers outside the declared
range, rows that could not be read), runs the others — padding the last batch for artifacts
with a fixed batch size — and, when a batch fails inside the runtime, bisects it so one bad row
never takes its neighbours down with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from packager.errors import InputError, RuntimeLoadError, UsageError
from packager.signature import Signature, TensorSpec

ON_ERROR = ("fail", "skip")
#: Input bytes per batch the default batch size aims at (fits in L2/L3 while amortising calls).
TARGET_BATCH_BYTES = 1 << 20
MAX_DEFAULT_BATCH = 4096


@dataclass
class ChunkResult:
    """What one chunk produced.

    Attributes:
        start: Global index of the chunk's first row.
        rows: Rows in the chunk (kept + rejected).
        outputs: Output name to batch-first array of the kept rows, in input order.
        ids: Id-column values of the kept rows.
        rejects: ``(global row, reason)`` of every rejected row, ascending.
        reject_ids: Id-column values of the rejected rows (same order), if any.
    """

    start: int
    rows: int
    outputs: dict[str, np.ndarray]
    ids: np.ndarray | None = None
    rejects: list[tuple[int, str]] = field(default_factory=list)
    reject_ids: list[Any] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.rows - len(self.rejects)


def fixed_batch_size(signature: Signature) -> int | None:
    """The batch size an artifact is fixed to (no ``batch`` axis, an integer axis 0), else None."""
    sizes = {s.shape[0] for s in signature.inputs if s.batch_axis is None and s.shape and isinstance(s.shape[0], int)}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise UsageError("signature", "inputs have different fixed batch sizes", got=sorted(sizes))
    return int(sizes.pop())


def default_batch_size(signature: Signature, model_bytes: int = 0) -> int:
    """Rows per runtime call when ``--batch-size`` is not given.

    About 1 MiB of input per call: large enough that per-call overhead vanishes, small enough
    to stay in cache and keep peak memory low. Inputs with dynamic non-batch axes (sequences)
    and large models get smaller batches, since activations grow with both.
    """
    fixed = fixed_batch_size(signature)
    if fixed is not None:
        return fixed
    row_bytes = 0
    dynamic = False
    for spec in signature.inputs:
        size = 1
        for i, dim in enumerate(spec.shape):
            if i == spec.batch_axis:
                continue
            if isinstance(dim, str):
                dynamic = True
                info = signature.dim(dim)
                size *= info.max or info.example_size(dim)
            else:
                size *= dim
        row_bytes += size * (2 if spec.dtype == "bfloat16" else np.dtype(spec.dtype).itemsize)
    limit = 512 if dynamic else MAX_DEFAULT_BATCH
    if model_bytes > 200 << 20:
        limit = min(limit, 32)
    elif model_bytes > 50 << 20:
        limit = min(limit, 128)
    rows = TARGET_BATCH_BYTES // max(row_bytes, 1)
    return int(max(1, min(limit, 2 ** int(math.log2(max(rows, 1))))))


class ChunkRunner:
    """Runs chunks through a runner with row-level validation and failure isolation.

    Args:
        runner: A loaded :class:`runtimes.base.Runner`.
        on_error: ``"fail"`` (first bad row stops the run) or ``"skip"`` (bad rows are rejected).
        allow_nan: Accept NaN/inf in floating-point inputs.
    """

    def __init__(self, runner: Any, on_error: str = "fail", allow_nan: bool = False) -> None:
        if on_error not in ON_ERROR:
            raise UsageError("--on-error", "is unknown", expected=" or ".join(ON_ERROR), got=on_error)
        self.runner = runner
        self.on_error = on_error
        self.allow_nan = allow_nan
        self.signature: Signature = runner.signature
        self.fixed = fixed_batch_size(self.signature)
        self.in_axes = {s.name: (s.batch_axis if s.batch_axis is not None else 0) for s in self.signature.inputs}
        self.out_axes = {s.name: (s.batch_axis if s.batch_axis is not None else 0) for s in self.signature.outputs}
        self.specs: dict[str, TensorSpec] = {s.name: s for s in self.signature.inputs}

    # ----------------------------------------------------------------- validation
    def check_rows(self, arrays: dict[str, np.ndarray], bad: dict[int, str]) -> None:
        """Add rows with non-finite floats or out-of-range integers to ``bad``."""
        for name, arr in arrays.items():
            spec = self.specs.get(name)
            if spec is None or arr.shape[0] == 0:
                continue
            flat = arr.reshape(arr.shape[0], -1)
            if arr.dtype.kind in "fc" and not self.allow_nan:
                # One vectorised pass over the batch; per-row work only when something is wrong.
                if not np.isfinite(flat).all():
                    for r in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
                        bad.setdefault(int(r), f"input {name!r} holds NaN or infinity (pass --allow-nan to "
                                       "accept it)")
            elif arr.dtype.kind in "iu" and spec.value_range is not None:
                low, high = spec.value_range
                if flat.size and (flat.min() < low or flat.max() >= high):
                    out = ((flat < low) | (flat >= high)).any(axis=1)
                    for r in np.flatnonzero(out):
                        bad.setdefault(int(r), f"input {name!r} holds a value outside its declared range "
                                       f"[{low:g}, {high:g})")

    # ----------------------------------------------------------------- running
    def _call(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, arr in arrays.items():
            axis = self.in_axes.get(name, 0)
            feeds[name] = np.ascontiguousarray(np.moveaxis(arr, 0, axis) if axis else arr)
        outputs = self.runner.run(feeds)
        result = {}
        for name, arr in outputs.items():
            axis = self.out_axes.get(name, 0)
            result[name] = np.moveaxis(arr, axis, 0) if axis else arr
        return result

    def run_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run batch-first arrays, padding to the artifact's fixed batch size where it has one."""
        n = next(iter(arrays.values())).shape[0]
        if self.fixed is None:
            return self._call(arrays)
        parts: dict[str, list[np.ndarray]] = {}
        for lo in range(0, n, self.fixed):
            piece = {k: v[lo:lo + self.fixed] for k, v in arrays.items()}
            m = next(iter(piece.values())).shape[0]
            if m < self.fixed:
                # Repeat the last real row: padding with real values cannot trip value checks in the graph.
                piece = {k: np.concatenate([v, np.repeat(v[-1:], self.fixed - m, axis=0)]) for k, v in piece.items()}
            for name, out in self._call(piece).items():
                parts.setdefault(name, []).append(out[:m])
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}

    def _isolate(self, arrays: dict[str, np.ndarray], rows: np.ndarray
                 ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray], list[tuple[int, str]]]:
        """Run ``rows``; on a runtime failure, bisect to find the failing rows.

        Returns:
            Output pieces, the local row indices each piece covers, and ``(local row, reason)`` failures.
        """
        try:
            return [self.run_arrays(arrays)], [rows], []
        except RuntimeLoadError as exc:
            if self.on_error == "fail":
                raise
            if len(rows) == 1:
                return [], [], [(int(rows[0]), f"inference failed: {exc.problem}")]
        half = len(rows) // 2
        a = self._isolate({k: v[:half] for k, v in arrays.items()}, rows[:half])
        b = self._isolate({k: v[half:] for k, v in arrays.items()}, rows[half:])
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    def run_chunk(self, chunk: Any) -> ChunkResult:
        """Validate and run one chunk.

        Raises:
            InputError: A row is bad and ``on_error`` is ``"fail"`` (naming the row and why).
            FeedError: The dataset does not fit the signature at all (dtype, rank): not a row problem.
        """
        n = chunk.rows
        bad = dict(chunk.bad)
        self.check_rows(chunk.arrays, bad)
        if bad and self.on_error == "fail":
            row = min(bad)
            raise InputError(f"row {chunk.start + row}", bad[row], fix="fix the record, or pass --on-error skip "
                             "to write bad rows to the rejects file and go on")
        rows = np.arange(n)
        arrays = chunk.arrays
        if bad:
            rows = np.setdiff1d(rows, np.fromiter(bad, dtype=np.int64))
            arrays = {k: v[rows] for k, v in arrays.items()}
        if len(rows):
            try:
                pieces, covered, failed = self._isolate(arrays, rows)
            except RuntimeLoadError as exc:
                raise RuntimeLoadError(f"rows {chunk.start}..{chunk.start + n - 1}", f"inference failed: "
                                       f"{exc.problem}", fix="pass --on-error skip to reject the failing rows and "
                                       "go on") from exc
        else:
            pieces, covered, failed = [], [], []
        for r, reason in failed:
            bad[r] = reason
        kept = np.concatenate(covered) if covered else np.zeros(0, dtype=np.int64)
        if len(pieces) == 1:
            outputs = pieces[0]
        elif pieces:
            outputs = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        else:
            outputs = self.empty_outputs()
        ids = None
        reject_ids: list[Any] = []
        order = sorted(bad)
        if chunk.ids is not None:
            ids = np.asarray(chunk.ids)[kept]
            reject_ids = [_jsonable(chunk.ids[r]) for r in order]
        return ChunkResult(chunk.start, n, outputs, ids, [(chunk.start + r, bad[r]) for r in order], reject_ids)

    def empty_outputs(self) -> dict[str, np.ndarray]:
        """Zero-row outputs (for chunks whose every row was rejected)."""
        out = {}
        for spec in self.signature.outputs:
            dims = [d if isinstance(d, int) else 0 for i, d in enumerate(spec.shape) if i != self.out_axes[spec.name]]
            out[spec.name] = np.zeros((0, *dims), dtype=spec.dtype if spec.dtype != "bfloat16" else np.float32)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value

