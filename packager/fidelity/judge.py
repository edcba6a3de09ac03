"""The one judge: whether an artifact's outputs match a reference, for export parity, ``verify``,
the training callbacks and the Paddle ONNX conversion attempts alike.

One rule set, in this order (each output records which rules decided it, ``tolerance_source``):

1. integers and bools must match exactly;
2. an artifact declared reduced precision (``options.precision``) gets that precision's bound, and
   an optimised artifact (``options.budget``: ``packager optimize``) is judged by its accuracy
   budget instead of elementwise bounds (:mod:`packager.fidelity.budget`);
3. an output whose rounding noise was measured at export (``manifest.golden.noise``) gets
   ``rtol = clip(NOISE_FACTOR x noise / scale, SCALE_FLOOR, NOISE_RTOL_CAP)`` (float32: at most
   1e-3, for models that are noisy by themselves) and ``atol = ABS_FLOOR``: a correct artifact is another
   fp32 evaluation of the same maths, off by about the noise (measured: up to 6.7x it); a defect
   (fp16-rounded weights, a weight off by 1e-3) is hundreds of times the noise;
4. without a noise record (packages exported before it): the dtype defaults of ``UNMEASURED``;
5. a CUDA device widens ``rtol`` to ``DEVICE_RTOL`` (TF32 convolutions, ~1e-3 relative);
6. ``--atol`` / ``--rtol`` (one value, or per output name) replace what the rules gave;
7. a non-deterministic live reference raises ``atol`` to twice its measured floor.

Every bound is ``atol + rtol x scale`` with ``scale`` = max |reference| of the output in that
case (:class:`packager.fidelity.metrics.Tolerance`). The contract (names, dtypes, ranks,
dynamic axes) is :mod:`packager.fidelity.contract`; the figures :mod:`packager.fidelity.metrics`.
Numpy only: no framework is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from packager import registry
from packager.fidelity.budget import apply_budget, parse_budget
from packager.fidelity.contract import check_outputs
from packager.fidelity.metrics import OutputMetrics, Tolerance, compare_many
from packager.manifest import OutputNoise, OutputParity

#: A correct artifact's error is 0-6.7x the measured noise (the test suite's torch, TF and Paddle
#: models, every format; docs/fidelity.md); 32x leaves ~5x of room for another CPU's vector units
#: and stays 18x below the smallest defect measured (a weight off by 1e-3: 593x).
NOISE_FACTOR = 32.0
#: The least ``rtol`` when the noise is known (an output computed exactly has noise 0, yet a
#: converter may still round it differently): 2e-6 is ~16 float32 ulps of the largest element.
SCALE_FLOOR = {"float64": 1e-12, "float32": 2e-6, "float16": 4e-3, "bfloat16": 3e-2}
#: The least float32 ``rtol`` when the noise is only the rows-alone spread (TF, Paddle: no
#: float64 run): that spread sees the reordering of a batched sum, not an inference graph's
#: fused convolution + BatchNorm. Measured on real models: Paddle resnet18 / MobileNetV3
#: Inference and ONNX need 3.9e-6-4.9e-6 with a rows-alone noise of 1.0e-7 x scale (49x it);
#: a Keras EfficientNetB0 SavedModel 7.4e-6. 2e-5 is 2.7x above the worst, 5x below the
#: smallest defect (docs/fidelity.md).
ESTIMATED_SCALE_FLOOR = {"float32": 2e-5}
#: The least ``atol``: what an all-zero output may be off by (a few ulps of 1).
ABS_FLOOR = {"float64": 1e-15, "float32": 1e-7, "float16": 1e-4, "bfloat16": 1e-3}
#: (atol, rtol) for an output without a noise record (packages exported before it): the
#: pre-noise per-dtype defaults, now relative to the output's scale, hence never stricter.
UNMEASURED = {"float64": (1e-7, 1e-6), "float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2),
              "bfloat16": (5e-2, 5e-2)}
#: The most ``rtol`` a measured noise may give (rule 3). Deep random-init Keras models spread by
#: themselves: rows run alone move ResNet50's logits by 8.6e-6 x scale, EfficientNetB0's by up to
#: 1.6e-4 x scale; their SavedModel, ONNX, TFLite and OpenVINO artifacts were all off by 2-16x that
#: noise (tests/zoo/test_vision.py), which the no-record default (1e-4) failed, the native
#: SavedModel included: false alarms. Capped at 1e-3 so that a model with Dropout left on (its
#: rows-alone spread is of the outputs' own size) still gets no more than 1e-3 x scale.
NOISE_RTOL_CAP = {"float32": 1e-3}
#: An artifact the exporter declared as reduced precision is judged with that precision's bound.
REDUCED = {"float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
#: Least ``rtol`` per device kind: CUDA convolutions use TF32 by default (10-bit mantissa).
DEVICE_RTOL = {"cuda": 2e-3}
#: Formats whose runtime executes the framework's own graph. Informative only: they are judged
#: by the same rules as converted ones (torch.export decomposes ops: not bit-identical to eager).
NATIVE_FORMATS = registry.NATIVE_FORMATS


def conversion_kind(fmt: str | None, options: Mapping[str, Any] | None = None) -> str:
    """``budget:<budget>``, ``reduced:<dtype>``, ``native`` or ``converted`` for an artifact format
    and its options."""
    budget = (options or {}).get("budget")
    if budget:
        return f"budget:{budget}"
    precision = str((options or {}).get("precision", "") or "")
    if precision in REDUCED:
        return f"reduced:{precision}"
    return "native" if fmt in NATIVE_FORMATS else "converted"


def _pick(value: float | Mapping[str, float] | None, name: str) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    if name in value:
        return float(value[name])
    return float(value["*"]) if "*" in value else None


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _rules(dtype: str, kind: str, noise: OutputNoise | None) -> tuple[float, float, str]:
    """(atol, rtol, source) from rules 1-4 of the module docstring."""
    if not _is_float(dtype):
        return 0.0, 0.0, f"exact ({dtype})"
    if kind.startswith("budget:"):  # figures only: the budget decides (Judge.compare_cases)
        return 0.0, 0.0, kind.replace(":", " ", 1)
    if kind.startswith("reduced:"):
        atol, rtol = REDUCED[kind.split(":", 1)[1]]
        return atol, rtol, f"declared {kind.split(':', 1)[1]} artifact"
    if noise is not None and noise.noise is not None:
        floor = SCALE_FLOOR.get(dtype, SCALE_FLOOR["float32"])
        if not str(noise.method).startswith("float64"):
            floor = max(floor, ESTIMATED_SCALE_FLOOR.get(dtype, 0.0))
        absolute = ABS_FLOOR.get(dtype, ABS_FLOOR["float32"])
        if noise.scale == 0:  # an all-zero output: the noise is all there is to scale by
            return max(absolute, NOISE_FACTOR * noise.noise), floor, f"noise {noise.noise:.2g} ({noise.method})"
        rel = NOISE_FACTOR * noise.noise / noise.scale
        if rel <= floor:
            return absolute, floor, f"{dtype} floor (noise {noise.noise:.2g} ({noise.method}) x{NOISE_FACTOR:g} below it)"
        cap = NOISE_RTOL_CAP.get(dtype, UNMEASURED.get(dtype, UNMEASURED["float32"])[1])
        if rel > cap:  # a noise record loosens a verdict only this far
            return absolute, cap, f"{dtype} noise cap (noise {noise.noise:.2g} ({noise.method}) x{NOISE_FACTOR:g} above it)"
        return absolute, rel, f"noise {noise.noise:.2g} ({noise.method}) x{NOISE_FACTOR:g} / scale {noise.scale:.3g}"
    atol, rtol = UNMEASURED.get(dtype, UNMEASURED["float32"])
    return atol, rtol, f"default {dtype} (no noise record)"


def resolve_tolerance(name: str, dtype: str, kind: str = "converted", atol: float | Mapping[str, float] | None = None,
                      rtol: float | Mapping[str, float] | None = None, floor: float = 0.0,
                      noise: OutputNoise | None = None, device: str = "cpu") -> Tolerance:
    """The tolerance for output ``name`` (the module docstring's rules, in order).

    Args:
        name: Output name.
        dtype: The reference's dtype name.
        kind: Conversion kind (:func:`conversion_kind`); only ``reduced:*`` changes the bound.
        atol: One absolute tolerance, or per output name (``"*"`` = all others).
        rtol: Same for the relative tolerance (relative to the output's scale).
        floor: Noise floor of a non-deterministic reference (max abs difference between two
            reference runs); the absolute tolerance is raised to twice it.
        noise: The output's rounding noise measured at export, if any.
        device: Where the candidate ran (``cpu``, ``cuda:0``).
    """
    a, r, source = _rules(dtype, kind, noise)
    parts = [source]
    widen = DEVICE_RTOL.get(device.split(":", 1)[0])
    if widen and _is_float(dtype) and r < widen and not kind.startswith(("reduced:", "budget:")):
        r = widen
        parts.append(f"{device} rtol {widen:g} (TF32)")
    given_a, given_r = _pick(atol, name), _pick(rtol, name)
    if given_a is not None or given_r is not None:
        parts.append(", ".join(p for p in (f"atol {given_a:g}" if given_a is not None else "",
                                           f"rtol {given_r:g}" if given_r is not None else "") if p) + " given")
    a = a if given_a is None else given_a
    r = r if given_r is None else given_r
    if floor > 0 and 2 * floor > a:
        a = 2 * floor
        parts.append(f"noise floor {floor:.3g}")
    return Tolerance(atol=float(a), rtol=float(r), source="; ".join(parts))


@dataclass
class Judged:
    """The outcome of comparing all outputs of one case."""

    outputs: list[OutputMetrics]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def degenerate(self) -> list[str]:
        """One line per output whose reference proves nothing (not a failure)."""
        return [o.degenerate for o in self.outputs if o.degenerate]


@dataclass
class Judge:
    """Tolerance overrides and the package's noise record, applied the same way everywhere.

    Args:
        atol: One absolute tolerance, or per output name (``"*"``: the others).
        rtol: Same for the relative tolerance (relative to each output's scale).
        noise: Per output, the rounding noise measured at export (``manifest.golden.noise``).
        floors: Per output, the noise floor of a non-deterministic live reference.
    """

    atol: float | Mapping[str, float] | None = None
    rtol: float | Mapping[str, float] | None = None
    noise: Mapping[str, OutputNoise] = field(default_factory=dict)
    floors: Mapping[str, float] = field(default_factory=dict)

    def tolerance(self, name: str, dtype: str, kind: str = "converted", device: str = "cpu") -> Tolerance:
        """The tolerance of output ``name`` for an artifact of ``kind`` run on ``device``."""
        return resolve_tolerance(name, dtype, kind, self.atol, self.rtol, self.floors.get(name, 0.0),
                                 self.noise.get(name), device)

    def compare(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                kind: str = "converted", device: str = "cpu") -> Judged:
        """Compare every reference output with the candidate's output of the same name.

        A reference output the candidate lacks, or a candidate output the reference lacks, is a
        ``contract`` verdict.
        """
        return self.compare_cases([(reference, candidate, kind, device)])[0]

    def compare_cases(self, cases: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], str, str]]
                      ) -> list[Judged]:
        """:meth:`compare` for many ``(reference, candidate, kind, device)`` cases, the figures of
        all of them computed together (:func:`packager.fidelity.metrics.compare_many`)."""
        plans: list[list[int | OutputMetrics]] = []
        items: list[tuple[str, Any, Any, Tolerance]] = []
        for reference, candidate, kind, device in cases:
            plan: list[int | OutputMetrics] = []
            for name, ref in reference.items():
                ref_dtype = np.asarray(ref).dtype.name
                tol = self.tolerance(name, ref_dtype, kind, device)
                if name not in candidate:
                    plan.append(OutputMetrics(name=name, passed=False, verdict="contract", atol=tol.atol,
                                              rtol=tol.rtol, tolerance_source=tol.source, reference_dtype=ref_dtype,
                                              problem=f"output missing from the candidate (it has {sorted(candidate)})"))
                    continue
                plan.append(len(items))
                items.append((name, ref, candidate[name], tol))
            for name in candidate:
                if name not in reference:
                    plan.append(OutputMetrics(name=name, passed=False, verdict="contract",
                                              problem="output is not in the reference"))
            plans.append(plan)
        computed = compare_many(items)
        budgets = [kind for _, _, kind, _ in cases]
        judged = []
        for plan, kind in zip(plans, budgets):
            outputs = [computed[x] if isinstance(x, int) else x for x in plan]
            if kind.startswith("budget:"):
                budget = parse_budget(kind.split(":", 1)[1])
                outputs = [apply_budget(computed[x], budget, items[x][1], items[x][2]) if isinstance(x, int) else x
                           for x in plan]
            judged.append(Judged(outputs))
        return judged

    def contract(self, signature: Any, outputs: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> list[str]:
        """Contract problems of one run's outputs (names, dtypes, ranks, dynamic axes)."""
        return check_outputs(signature, outputs, inputs)

    def parity(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
               kind: str = "converted", device: str = "cpu") -> list[OutputParity]:
        """:meth:`compare` in the manifest's parity shape (export parity, conversion attempts)."""
        return [as_parity(m) for m in self.compare(reference, candidate, kind, device).outputs]


def as_parity(m: OutputMetrics) -> OutputParity:
    """One output's figures in the manifest's parity shape."""
    return OutputParity(name=m.name, passed=m.passed, max_abs=m.max_abs, max_rel=m.max_rel, atol=m.atol,
                        rtol=m.rtol, problem=m.problem)


def judge_for(manifest: Any, atol: float | Mapping[str, float] | None = None,
              rtol: float | Mapping[str, float] | None = None) -> Judge:
    """The judge of a package: its noise record (none for packages exported before it)."""
    noise = dict(manifest.golden.noise) if manifest.golden is not None else {}
    return Judge(atol=atol, rtol=rtol, noise=noise)
