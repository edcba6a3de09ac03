"""Output comparison for export-time parity: a thin layer over the fidelity metrics.

Export parity calls :func:`compare_outputs`; ``packager verify`` uses the same
:mod:`packager.fidelity.metrics` with every figure kept.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from packager.fidelity.metrics import CONVERTED, OutputMetrics, Tolerance, compare_all, compare_metrics, resolve_tolerance
from packager.manifest import OutputParity

#: (atol, rtol) per output dtype used at export time (the converted-artifact bound; see
#: :mod:`packager.fidelity.metrics` for the native and reduced-precision tables).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = CONVERTED


def default_tolerance(dtype: str) -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype``; integers and bools must match exactly."""
    return DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))


def compare_array(name: str, reference: np.ndarray, candidate: np.ndarray, *, atol: float | None = None,
                  rtol: float | None = None) -> OutputParity:
    """Compare one output. Shapes and dtypes must agree before numbers are compared."""
    return _parity(compare_metrics(name, reference, candidate, _tolerance(name, np.asarray(reference), atol, rtol)))


def _tolerance(name: str, ref: np.ndarray, atol: float | None, rtol: float | None) -> Tolerance:
    # Export-time parity keeps the foundation's per-dtype table (a converted-artifact bound).
    return resolve_tolerance(name, ref.dtype.name, "converted", atol, rtol)


def _parity(m: OutputMetrics) -> OutputParity:
    return OutputParity(name=m.name, passed=m.passed, max_abs=m.max_abs, max_rel=m.max_rel, atol=m.atol,
                        rtol=m.rtol, problem=m.problem)


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *,
                    atol: float | Mapping[str, float] | None = None,
                    rtol: float | Mapping[str, float] | None = None) -> list[OutputParity]:
    """Compare every reference output with the candidate's output of the same name.

    Args:
        reference: Reference outputs by name.
        candidate: Candidate outputs by name.
        atol: One absolute tolerance, or one per output name (``"*"``: the others; the rest
            use the dtype default).
        rtol: Same for the relative tolerance.

    The full figures (mean error, p99, cosine, top-k, minimum passing tolerances) come from
    :func:`packager.fidelity.metrics.compare_all`; this keeps the manifest's parity shape.
    """
    return [_parity(m) for m in compare_all(reference, candidate, "converted", atol, rtol).outputs]
