"""Output comparison in the manifest's parity shape: a thin layer over the judge.

Every verdict comes from :class:`packager.fidelity.judge.Judge` (export parity, ``verify``, the
callbacks, conversion attempts); this module keeps the small public helpers.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from packager.fidelity.judge import UNMEASURED, Judge, as_parity
from packager.fidelity.metrics import compare_metrics
from packager.manifest import OutputNoise, OutputParity

#: (atol, rtol) per output dtype when no noise was recorded (rtol relative to the output's scale).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = UNMEASURED


def default_tolerance(dtype: str) -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype`` without a noise record; integers and bools exact."""
    return DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))


def compare_array(name: str, reference: np.ndarray, candidate: np.ndarray, *, atol: float | None = None,
                  rtol: float | None = None, noise: OutputNoise | None = None) -> OutputParity:
    """Compare one output. Shapes and dtypes must agree before numbers are compared."""
    judge = Judge(atol, rtol, {name: noise} if noise is not None else {})
    tol = judge.tolerance(name, np.asarray(reference).dtype.name)
    return as_parity(compare_metrics(name, reference, candidate, tol))


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *,
                    atol: float | Mapping[str, float] | None = None,
                    rtol: float | Mapping[str, float] | None = None,
                    noise: Mapping[str, OutputNoise] | None = None) -> list[OutputParity]:
    """Compare every reference output with the candidate's output of the same name.

    Args:
        reference: Reference outputs by name.
        candidate: Candidate outputs by name.
        atol: One absolute tolerance, or one per output name (``"*"``: the others; the rest
            use the judge's rules).
        rtol: Same for the relative tolerance (relative to each output's scale).
        noise: Per output, the rounding noise recorded at export.
    """
    return Judge(atol, rtol, dict(noise or {})).parity(reference, candidate)
