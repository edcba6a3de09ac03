"""``packager run``: batch inference over .npy/.npz inputs with a runner.

This is the simple in-memory path; streaming, resume and Ray grow from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from packager.errors import InputError
from packager.package import load_npz
from packager.signature import Signature


def read_inputs(path: str | Path, signature: Signature) -> dict[str, np.ndarray]:
    """Inputs from ``.npy`` (single-input models) or ``.npz`` (keys = input names)."""
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
    """Run ``inputs`` through ``runner`` in batches along each input's batch axis."""
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
