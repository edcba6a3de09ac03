"""Output comparison: the one place where candidate outputs are judged against a reference.

Export-time parity and ``packager verify`` both call :func:`compare_outputs`; the fidelity
engine grows from here.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from packager.manifest import OutputParity

#: (atol, rtol) per output dtype. fp32 conversions reorder reductions; 1e-4 absorbs that
#: without hiding a wrong weight (a 1e-3 relative weight change moves outputs by ~1e-3).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-6),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


def default_tolerance(dtype: str) -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype``; integers and bools must match exactly."""
    return DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))


def compare_array(name: str, reference: np.ndarray, candidate: np.ndarray, *, atol: float | None = None,
                  rtol: float | None = None) -> OutputParity:
    """Compare one output. Shapes and dtypes must agree before numbers are compared."""
    ref = np.asarray(reference)
    got = np.asarray(candidate)
    d_atol, d_rtol = default_tolerance(ref.dtype.name)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if ref.shape != got.shape:
        return OutputParity(name=name, passed=False, atol=atol, rtol=rtol,
                            problem=f"shape {list(got.shape)} differs from the reference {list(ref.shape)}")
    if ref.dtype.kind != got.dtype.kind:
        return OutputParity(name=name, passed=False, atol=atol, rtol=rtol,
                            problem=f"dtype {got.dtype.name} differs from the reference {ref.dtype.name}")
    ref64 = ref.astype(np.float64)
    got64 = got.astype(np.float64)
    nan_ref, nan_got = np.isnan(ref64), np.isnan(got64)
    if not np.array_equal(nan_ref, nan_got):
        return OutputParity(name=name, passed=False, atol=atol, rtol=rtol,
                            problem=f"NaN positions differ (reference {int(nan_ref.sum())}, candidate {int(nan_got.sum())})")
    finite = ~nan_ref
    diff = np.abs(ref64[finite] - got64[finite])
    diff = np.where(np.isnan(diff), 0.0, diff)  # equal infinities give inf-inf = nan
    max_abs = float(diff.max()) if diff.size else 0.0
    denom = np.abs(ref64[finite])
    rel = diff / np.maximum(denom, np.finfo(np.float64).tiny)
    max_rel = float(rel.max()) if rel.size else 0.0
    passed = bool(np.allclose(got64, ref64, atol=atol, rtol=rtol, equal_nan=True))
    problem = None if passed else f"max abs error {max_abs:.3g} exceeds atol {atol:g} + rtol {rtol:g} x |reference|"
    return OutputParity(name=name, passed=passed, max_abs=max_abs, max_rel=max_rel, atol=atol, rtol=rtol,
                        problem=problem)


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *,
                    atol: float | Mapping[str, float] | None = None,
                    rtol: float | Mapping[str, float] | None = None) -> list[OutputParity]:
    """Compare every reference output with the candidate's output of the same name.

    Args:
        reference: Reference outputs by name.
        candidate: Candidate outputs by name.
        atol: One absolute tolerance, or one per output name (others use the dtype default).
        rtol: Same for the relative tolerance.
    """
    results = []
    for name, ref in reference.items():
        if name not in candidate:
            results.append(OutputParity(name=name, passed=False,
                                        problem=f"output missing from the candidate (it has {sorted(candidate)})"))
            continue
        a = atol.get(name) if isinstance(atol, Mapping) else atol
        r = rtol.get(name) if isinstance(rtol, Mapping) else rtol
        results.append(compare_array(name, ref, candidate[name], atol=a, rtol=r))
    for name in candidate:
        if name not in reference:
            results.append(OutputParity(name=name, passed=False, problem="output is not in the reference"))
    return results
