"""The noise estimate without a float64 run (packager/fidelity/noise.py)."""
from __future__ import annotations

import numpy as np

from packager.fidelity import noise
from packager.signature import Signature, TensorSpec


class RowwiseModel:
    """A batch-invariant model (each row computed alone, the same kernels at any batch) that
    amplifies its input's rounding: rows alone sees 0, one input ulp does not."""

    @staticmethod
    def run_eager(loaded, feeds):
        x = feeds["x"].astype(np.float32)
        return [np.sin(np.float32(1e4) * x, dtype=np.float32)]


def test_input_ulps_see_what_rows_alone_cannot():
    sig = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 8))],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=("batch", 8))])
    x = np.random.default_rng(0).uniform(1, 2, (4, 8)).astype(np.float32)
    ref = {"y": RowwiseModel.run_eager(None, {"x": x})[0]}
    assert noise._rows_alone(RowwiseModel, None, sig, {"x": x}, ref) == {"y": 0.0}
    ulps = noise._input_ulps(RowwiseModel, None, sig, {"x": x}, ref)["y"]
    # d sin(1e4 x) ~ 1e4 * ulp(x in [1, 2)) = 1e4 * 2.4e-7: a few 1e-3.
    assert 1e-4 < ulps < 1e-2
    recorded = noise.measure_noise("paddle", RowwiseModel, None, sig, {"x": x}, ref)["y"]
    assert recorded.noise == ulps and recorded.method == "rows alone + input ulps"
