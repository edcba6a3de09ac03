"""Batch inference: streaming, resumable ``packager run`` with a local or a Ray engine.

``run_dataset`` is the full pipeline behind ``packager run``. ``read_inputs`` and
``run_batches`` are the small in-memory helpers for arrays already in memory (the demo uses
them). Submodules: :mod:`~packager.batch.io` (readers/writers), :mod:`~packager.batch.core`
(per-chunk validation and inference), :mod:`~packager.batch.journal` (resume),
:mod:`~packager.batch.sink` (shards and final output), :mod:`~packager.batch.pipeline` (local
engine), :mod:`~packager.batch.ray_engine` (Ray Data engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from packager.errors import InputError
from packager.package import load_npz
from packager.signature import Signature

__all__ = ["read_inputs", "run_batches", "run_dataset", "RunConfig", "RunSummary"]


def __getattr__(name: str) -> Any:
    # The pipeline pulls in threads, rich and (for Parquet) pyarrow: import it only when used.
    if name in ("run_dataset", "RunConfig", "RunSummary"):
        from packager.batch import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


def read_inputs(path: str | Path, signature: Signature) -> dict[str, np.ndarray]:
    """Inputs from ``.npy`` (single-input models, memory-mapped) or ``.npz`` (keys = input names)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "does not exist", fix="pass an existing .npy or .npz file")
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".npy":
        if len(signature.inputs) != 1:
            raise InputError(str(path), "is one array but the model has several inputs",
                             expected=signature.input_names, got="one .npy array",
                             fix="pass an .npz whose keys are the input names")
        try:
            return {signature.inputs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
        except ValueError as exc:
            raise InputError(str(path), f"cannot be read ({exc})") from None
    raise InputError(str(path), "has an unsupported format", expected=".npy or .npz", got=path.suffix)


def run_batches(runner: Any, inputs: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Run in-memory ``inputs`` through ``runner`` in batches along each input's batch axis."""
    if batch_size < 1:
        raise InputError("--batch-size", "must be at least 1", got=batch_size)
    specs = {s.name: s for s in runner.input_specs}
    rows = {name: arr.shape[specs[name].batch_axis or 0] for name, arr in inputs.items() if name in specs}
    if len(set(rows.values())) > 1:
        raise InputError("inputs", "have different numbers of rows", expected="the same batch size for every input",
                         got=rows)
    total = next(iter(rows.values()), 0)
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, total, batch_size):
        feeds = {n: np.ascontiguousarray(a[start:start + batch_size]) for n, a in inputs.items()}
        for name, value in runner.run(feeds).items():
            chunks.setdefault(name, []).append(value)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
