"""The shape sweep: which inputs a verification runs, and which reference each case needs.

Batch cases reuse golden rows, so the golden outputs' matching rows are their reference (the
eager model's own figures, valid for any model whose rows are independent). Cases that change
another dynamic dimension need fresh inputs, hence a live reference (an artifact or eager).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from packager.signature import BATCH, Signature, random_array


@dataclass
class Case:
    """One set of inputs to run through every cell.

    Attributes:
        name: ``golden``, ``batch=1``, ``batch=3``, ``seq=64``, ``user``, ``random``.
        inputs: Feeds by input name.
        reference: Fixed reference outputs (golden data), or ``None`` when a live reference
            (artifact or eager) must produce them.
        reference_label: What produced ``reference`` ("golden", "golden rows 0..2").
        consistency: Whether batch consistency (row i batched == row i alone) is checked here.
    """

    name: str
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] | None = None
    reference_label: str = ""
    consistency: bool = False
    notes: list[str] = field(default_factory=list)

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.inputs.items()}


def golden_sizes(signature: Signature, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Sizes of the named dimensions in a set of inputs."""
    sizes: dict[str, int] = {}
    for spec in signature.inputs:
        arr = inputs.get(spec.name)
        if arr is None or arr.ndim != spec.rank:
            continue
        for axis, dim in spec.dynamic_axes.items():
            sizes.setdefault(dim, int(arr.shape[axis]))
    return sizes


def take_rows(signature: Signature, arrays: Mapping[str, np.ndarray], rows: list[int],
              outputs: bool = False) -> dict[str, np.ndarray]:
    """Rows ``rows`` along each tensor's batch axis (tensors without one are kept whole)."""
    specs = {s.name: s for s in (signature.outputs if outputs else signature.inputs)}
    out = {}
    for name, arr in arrays.items():
        spec = specs.get(name)
        axis = spec.batch_axis if spec is not None else 0
        out[name] = arr if axis is None or arr.ndim <= axis else np.take(arr, rows, axis=axis)
    return out


def odd_batch(golden: int, info_min: int, info_max: int | None) -> int | None:
    """An odd batch size different from the golden one and 1 (3, else 5, else 7), within bounds."""
    for size in (3, 5, 7):
        if size != golden and size >= info_min and (info_max is None or size <= info_max):
            return size
    return None


def plan_cases(signature: Signature, golden_in: Mapping[str, np.ndarray], golden_out: Mapping[str, np.ndarray],
               *, sweep: bool = True, user_inputs: Mapping[str, np.ndarray] | None = None,
               random_case: bool = False, seed: int = 0) -> list[Case]:
    """The cases of a verification, golden first.

    Args:
        signature: The package signature.
        golden_in: Golden inputs.
        golden_out: Golden outputs.
        sweep: Add batch 1, an odd batch and the declared extremes of the other dynamic dims.
        user_inputs: The user's own data (``--inputs``), judged against a live reference.
        random_case: Add seeded random inputs at the golden sizes.
        seed: Seed of the random inputs.
    """
    cases = [Case("golden", dict(golden_in), dict(golden_out), "golden")]
    batched = any(s.batch_axis is not None for s in signature.inputs)
    sizes = golden_sizes(signature, golden_in)
    if sweep and batched and BATCH in sizes:
        n = sizes[BATCH]
        info = signature.dim(BATCH)
        if n != 1 and info.min <= 1:
            cases.append(Case("batch=1", take_rows(signature, golden_in, [0]),
                              take_rows(signature, golden_out, [0], outputs=True), "golden row 0"))
        odd = odd_batch(n, info.min, info.max)
        if odd is not None:
            # Golden rows repeated: every row's reference is a real eager output.
            rows = [i % n for i in range(odd)]
            cases.append(Case(f"batch={odd}", take_rows(signature, golden_in, rows),
                              take_rows(signature, golden_out, rows, outputs=True),
                              f"golden rows {rows}", consistency=True))
        elif n > 1:
            cases[0].consistency = True
    if sweep:
        rng_seed = seed
        for dim, size in sizes.items():
            if dim == BATCH:
                continue
            info = signature.dim(dim)
            if info.max is None:
                cases[0].notes.append(f"dimension {dim!r} has no declared range (write {dim}=MIN..MAX in "
                                      "--input-spec at export); its extremes were not swept")
                continue
            for extreme in dict.fromkeys((max(info.min, 1), info.max)):
                if extreme == size:
                    continue
                rng_seed += 1
                at = {**sizes, dim: extreme, BATCH: min(sizes.get(BATCH, 2), 2)}
                cases.append(Case(f"{dim}={extreme}", random_inputs(signature, at, rng_seed)))
    if random_case:
        cases.append(Case("random", random_inputs(signature, sizes, seed + 1000)))
    if user_inputs is not None:
        cases.append(Case("user", dict(user_inputs)))
    return cases


def random_inputs(signature: Signature, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Seeded random inputs at ``sizes`` within each input's value range."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature.inputs:
        shape = tuple(d if isinstance(d, int) else int(sizes.get(d, signature.dim(d).example_size(d)))
                      for d in spec.shape)
        feeds[spec.name] = random_array(rng, spec, shape)
    return feeds


def onnx_int_ranges(model: Any, signature: Signature) -> dict[str, tuple[float, float]]:
    """Value ranges of integer inputs read from an ONNX graph: an input that indexes an
    embedding table (``Gather`` of an initializer) takes values in ``[0, rows)``."""
    init = {t.name: list(t.dims) for t in model.graph.initializer}
    ints = {s.name for s in signature.inputs if s.dtype.startswith(("int", "uint")) and s.value_range is None}
    ranges: dict[str, tuple[float, float]] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in ints and node.input[0] in init:
            rows = init[node.input[0]][0] if init[node.input[0]] else 0
            if rows:
                low, high = ranges.get(node.input[1], (0.0, float("inf")))
                ranges[node.input[1]] = (0.0, min(high, float(rows)))
    return ranges
