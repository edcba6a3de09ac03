"""Each output's intrinsic rounding noise, measured at export and recorded in the manifest.

The judge scales its tolerance to it (:mod:`packager.fidelity.judge`): a correct artifact is one
more fp32 evaluation of the model, off by about this much; a defect is far more.

Methods, best first, per framework (a registry: the first that works gives each output):

- ``float64``: the eager model run again in float64 (torch: ``model.double()`` on a deep
  copy); the fp32 outputs' distance to it is their rounding error.
- ``rows alone``: each of the first rows run alone, against its row of the batched run: the
  same maths with other kernel blockings (the spread of equivalent fp32 computations); for
  TensorFlow and Paddle, where a float64 model is impractical.

Measured on the test suite's torch models, the two agree within 1.5x (docs/fidelity.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable, Mapping

import numpy as np

from packager.manifest import OutputNoise
from packager.signature import Signature

log = logging.getLogger("packager")

#: Rows run alone by the ``rows alone`` method (each is one more eager run at export).
ROWS_ALONE = 4
#: Models larger than this are not deep-copied into float64 (memory); rows alone are used.
MAX_FLOAT64_BYTES = 1 << 30

Method = Callable[[Any, Any, Signature, Mapping[str, np.ndarray], Mapping[str, np.ndarray]], dict[str, float]]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float | None:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        return None
    d = np.abs(a64 - b64)
    d = d[np.isfinite(d)]
    return float(d.max()) if d.size else 0.0


def _distances(reference: Mapping[str, np.ndarray], outs: list[np.ndarray]) -> dict[str, float]:
    """Max |reference - out| per output (outputs in the reference's order; shape changes skipped)."""
    found = {}
    for (name, ref), out in zip(reference.items(), outs):
        d = _max_diff(ref, out)
        if d is not None:
            found[name] = d
    return found


def _torch_float64(fw: Any, loaded: Any, signature: Signature, example: Mapping[str, np.ndarray],
                   reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    import torch

    model = loaded.model
    if not isinstance(model, torch.nn.Module):
        raise TypeError("not an nn.Module")
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size > MAX_FLOAT64_BYTES:
        raise MemoryError(f"{size} bytes of weights")
    twin = dataclasses.replace(loaded, model=copy.deepcopy(model).double(), extra=dict(loaded.extra))
    feeds = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in example.items()}
    return _distances(reference, fw.run_eager(twin, feeds))


def _rows_alone(fw: Any, loaded: Any, signature: Signature, example: Mapping[str, np.ndarray],
                reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    from packager.fidelity.sweep import take_rows

    batched = [s for s in signature.inputs if s.batch_axis is not None]
    if not batched:
        raise ValueError("no batch axis")
    n = int(example[batched[0].name].shape[batched[0].batch_axis])
    if n < 2:
        raise ValueError("batch of 1")
    axes = {s.name: s.batch_axis for s in signature.outputs}
    noise: dict[str, float] = {}
    for i in range(min(n, ROWS_ALONE)):
        outs = fw.run_eager(loaded, take_rows(signature, example, [i]))
        for (name, ref), out in zip(reference.items(), outs):
            axis = axes.get(name)
            if axis is None or np.ndim(ref) <= axis:
                continue
            d = _max_diff(np.take(ref, [i], axis=axis), out)
            if d is not None:
                noise[name] = max(noise.get(name, 0.0), d)
    return noise


def _input_ulps(fw: Any, loaded: Any, signature: Signature, example: Mapping[str, np.ndarray],
                reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The outputs' move when every float input moves by one ulp (random sign, seeded): how much
    the model amplifies a rounding at its input, which an inference graph's other kernels make
    at every layer. Rows alone misses it where the kernels are batch-invariant: PP-OCRv4's
    detector has a rows-alone spread of 0, yet its sigmoid map moves by 3e-5 under a PIR
    re-save of the same program (tests/zoo/test_shipped_weights.py)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for name, value in example.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            toward = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(value.dtype)
            value = np.nextafter(value, toward)
        feeds[name] = value
    return _distances(reference, fw.run_eager(loaded, feeds))


def _estimated(fw: Any, loaded: Any, signature: Signature, example: Mapping[str, np.ndarray],
               reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Without a float64 run: the larger of the rows-alone spread and the input-ulp move, per
    output (each sees a part of fp32 rounding the other does not)."""
    found: dict[str, float] = {}
    for method in (_rows_alone, _input_ulps):
        try:
            measured = method(fw, loaded, signature, example, reference)
        except Exception as exc:  # noqa: BLE001 - no batch axis, a batch of 1: the other one
            log.debug("noise estimate %s failed: %s: %s", method.__name__, type(exc).__name__, exc)
            continue
        for name, value in measured.items():
            found[name] = max(found.get(name, 0.0), value)
    if not found:
        raise ValueError("neither rows alone nor input ulps applied")
    return found


#: framework -> methods, best first; every framework falls back to the rows-alone estimate.
METHODS: dict[str, list[tuple[str, Method]]] = {
    "torch": [("float64", _torch_float64), ("rows alone + input ulps", _estimated)],
    "tensorflow": [("rows alone + input ulps", _estimated)],
    "paddle": [("rows alone + input ulps", _estimated)],
}


def _nondeterministic(fw: Any, loaded: Any, example: Mapping[str, np.ndarray],
                      reference: Mapping[str, np.ndarray]) -> list[str]:
    """Outputs a second fp32 eager run on the same inputs changes (random ops)."""
    try:
        again = fw.run_eager(loaded, dict(example))
    except Exception:  # noqa: BLE001 - it ran once already; treat a failure as unknown
        return list(reference)
    return [name for (name, ref), out in zip(reference.items(), again) if (_max_diff(ref, out) or 0.0) > 0]


def _scale(ref: np.ndarray) -> float:
    a = np.abs(np.asarray(ref, np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def measure_noise(framework: str, fw: Any, loaded: Any, signature: Signature, example: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray]) -> dict[str, OutputNoise]:
    """Per float output: its scale and rounding noise (``noise=None`` where no method applies).

    Never raises: a method that fails (a model that cannot run in float64, no batch axis) is
    logged and the next one tried; outputs no method measured are judged with the defaults.
    """
    floats = {k: v for k, v in reference.items() if np.asarray(v).dtype.kind in "fc"}
    found: dict[str, tuple[float, str]] = {}
    unstable = _nondeterministic(fw, loaded, example, reference)
    if unstable:
        # Randomness is not rounding: absorbing it would hide a Dropout left in training mode.
        log.info("eager outputs %s differ between two runs: no noise record", unstable)
        return {name: OutputNoise(scale=_scale(ref), method="none (not deterministic)") for name, ref in floats.items()}
    for label, method in METHODS.get(framework, [("rows alone + input ulps", _estimated)]):
        if len(found) == len(floats):
            break
        try:
            measured = method(fw, loaded, signature, example, reference)
        except Exception as exc:  # any framework error: the next method, or the defaults
            log.debug("noise method %s failed: %s: %s", label, type(exc).__name__, exc)
            continue
        for name, value in measured.items():
            if name in floats and name not in found:
                found[name] = (value, label)
    return {name: OutputNoise(scale=_scale(ref), noise=found[name][0] if name in found else None,
                              method=found[name][1] if name in found else "none")
            for name, ref in floats.items()}


def degenerate_notes(judge: Any, reference: Mapping[str, np.ndarray], noise: dict[str, OutputNoise]) -> list[str]:
    """Notes for reference outputs that prove nothing (constant, all zero); each is also put on
    the output's noise record, so ``verify`` and ``inspect`` can repeat it."""
    notes = judge.compare(reference, reference).degenerate
    for note in notes:
        for name, record in noise.items():
            if f"output {name!r} " in note:
                noise[name] = record.model_copy(update={"degenerate": note})
    return notes
