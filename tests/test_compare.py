"""Per-output metrics and tolerances (numpy only: fast, no framework)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from packager.compare import compare_array, compare_outputs, default_tolerance
from packager.fidelity.judge import Judge, conversion_kind, resolve_tolerance
from packager.fidelity.metrics import Tolerance, compare_metrics, noise_floor

FP32 = Tolerance(atol=1e-4, rtol=1e-4, source="test")


def test_identical_arrays_pass_with_zero_figures(rng) -> None:
    ref = rng.standard_normal((4, 10)).astype(np.float32)
    m = compare_metrics("y", ref, ref.copy(), FP32)
    assert m.passed and m.verdict == "pass"
    assert m.max_abs == 0 and m.mean_abs == 0 and m.out_of_tolerance == 0
    assert m.cosine == pytest.approx(1.0) and m.top1_agreement == 1.0 and m.topk_agreement == 1.0
    assert m.min_atol == 0 and m.min_rtol == 0


def test_figures_of_a_known_error() -> None:
    ref = np.array([[1.0, 2.0, 4.0, 0.0]], np.float64)
    got = ref + np.array([[0.0, 0.0, 0.01, 0.0]], np.float64)
    m = compare_metrics("y", ref, got, FP32)
    assert not m.passed and m.verdict == "numeric"
    assert m.max_abs == pytest.approx(0.01, rel=1e-5)
    assert m.mean_abs == pytest.approx(0.0025, rel=1e-5)
    assert m.max_rel == pytest.approx(0.0025, rel=1e-5)
    assert m.out_of_tolerance == pytest.approx(0.25)
    # min atol at rtol 1e-4: 0.01 - 1e-4 * 4; min rtol at atol 1e-4: (0.01 - 1e-4) / 4
    assert m.min_atol == pytest.approx(0.01 - 4e-4, rel=1e-4)
    assert m.min_rtol == pytest.approx((0.01 - 1e-4) / 4, rel=1e-4)
    assert "would pass with atol" in m.problem


def test_min_tolerances_would_pass(rng) -> None:
    ref = rng.standard_normal((8, 6))
    got = ref + rng.standard_normal((8, 6)) * 1e-3
    m = compare_metrics("y", ref, got, FP32)
    assert not m.passed
    again = compare_metrics("y", ref, got, Tolerance(atol=m.min_atol * (1 + 1e-9) + 1e-15, rtol=FP32.rtol, source=""))
    assert again.passed
    assert compare_metrics("y", ref, got, Tolerance(atol=FP32.atol, rtol=m.min_rtol * (1 + 1e-9), source="")).passed


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-1e3, 1e3)),
       arrays(np.float64, st.integers(1, 30), elements=st.floats(-1, 1)))
def test_min_atol_is_the_edge_of_passing(ref: np.ndarray, noise: np.ndarray) -> None:
    noise = np.resize(noise, ref.shape)
    got = ref + noise
    m = compare_metrics("y", ref, got, FP32)
    edge = Tolerance(atol=m.min_atol + 1e-9, rtol=FP32.rtol, source="")
    assert compare_metrics("y", ref, got, edge).passed
    assert m.passed == (m.min_atol <= FP32.atol)


def test_nan_positions_must_match() -> None:
    ref = np.array([1.0, np.nan, 3.0], np.float32)
    same = compare_metrics("y", ref, ref.copy(), FP32)
    assert same.passed and same.nan_reference == 1 and same.nan_candidate == 1
    moved = compare_metrics("y", ref, np.array([np.nan, 2.0, 3.0], np.float32), FP32)
    assert not moved.passed and "NaN positions differ" in moved.problem
    assert moved.nan_reference == 1 and moved.nan_candidate == 1


def test_inf_signs_must_match() -> None:
    ref = np.array([np.inf, -np.inf, 1.0], np.float32)
    assert compare_metrics("y", ref, ref.copy(), FP32).passed
    flipped = compare_metrics("y", ref, np.array([np.inf, np.inf, 1.0], np.float32), FP32)
    assert not flipped.passed and "Inf" in flipped.problem and flipped.inf_candidate == 2
    finite = compare_metrics("y", ref, np.array([1e30, -np.inf, 1.0], np.float32), FP32)
    assert not finite.passed


def test_integer_outputs_match_exactly() -> None:
    ref = np.array([1, 2, 3], np.int64)
    assert compare_metrics("ids", ref, ref.copy(), Tolerance(atol=0, rtol=0, source="")).passed
    off = compare_metrics("ids", ref, np.array([1, 2, 4], np.int64), Tolerance(atol=0, rtol=0, source=""))
    assert not off.passed and off.out_of_tolerance == pytest.approx(1 / 3)


def test_shape_or_kind_mismatch_is_a_contract_verdict() -> None:
    ref = np.zeros((2, 3), np.float32)
    assert compare_metrics("y", ref, np.zeros((3, 2), np.float32), FP32).verdict == "contract"
    assert compare_metrics("y", ref, np.zeros((2, 3), np.int64), FP32).verdict == "contract"


def test_topk_agreement_of_class_scores() -> None:
    ref = np.array([[0.1, 0.9, 0.0, 0.5], [0.8, 0.1, 0.2, 0.3]], np.float32)
    got = np.array([[0.9, 0.1, 0.0, 0.5], [0.8, 0.1, 0.2, 0.3]], np.float32)
    m = compare_metrics("scores", ref, got, FP32)
    assert m.top1_agreement == 0.5 and m.k == 3 and m.topk_agreement == 1.0
    assert compare_metrics("v", np.zeros(5, np.float32), np.zeros(5, np.float32), FP32).top1_agreement is None


def test_tolerances_by_dtype_and_conversion() -> None:
    assert default_tolerance("float32") == (1e-4, 1e-4)
    assert default_tolerance("int64") == (0.0, 0.0)
    assert conversion_kind("onnx") == "converted" and conversion_kind("torchscript") == "native"
    assert conversion_kind("onnx", {"precision": "float16"}) == "reduced:float16"
    native = resolve_tolerance("y", "float32", "native")
    converted = resolve_tolerance("y", "float32", "converted")
    half = resolve_tolerance("y", "float32", "reduced:float16")
    # One rule set: a native artifact is judged exactly like a converted one (issue 11, item 2).
    assert (native.atol, native.rtol) == (converted.atol, converted.rtol) and converted.atol < half.atol
    assert resolve_tolerance("y", "int64", "reduced:float16").atol == 0.0


def test_tolerance_overrides_global_and_per_output() -> None:
    per = resolve_tolerance("logits", "float32", "converted", atol={"logits": 1e-2, "*": 1e-3})
    rest = resolve_tolerance("other", "float32", "converted", atol={"logits": 1e-2, "*": 1e-3})
    assert per.atol == 1e-2 and rest.atol == 1e-3 and "given" in per.source
    assert resolve_tolerance("y", "float32", "converted", atol=5e-4, rtol=0.0).rtol == 0.0


def test_noise_floor_raises_atol() -> None:
    floors = noise_floor({"y": np.zeros(3)}, {"y": np.array([0.0, 2e-4, 0.0])})
    assert floors == {"y": pytest.approx(2e-4)}
    tol = resolve_tolerance("y", "float32", "converted", floor=floors["y"])
    assert tol.atol == pytest.approx(4e-4) and "noise floor" in tol.source
    judged = Judge(floors=floors).compare({"y": np.zeros(3)}, {"y": np.array([0.0, 3e-4, 0.0])})
    assert judged.passed


def test_missing_and_extra_outputs_are_contract() -> None:
    judged = Judge().compare({"a": np.zeros(2), "b": np.zeros(2)}, {"a": np.zeros(2), "c": np.zeros(2)})
    by = {o.name: o for o in judged.outputs}
    assert by["a"].passed and by["b"].verdict == "contract" and by["c"].verdict == "contract"


def test_compare_outputs_keeps_its_signature(rng) -> None:
    ref = {"y": rng.standard_normal((2, 3)).astype(np.float32)}
    results = compare_outputs(ref, {"y": ref["y"] + 1e-3}, atol=1e-4, rtol={"y": 0.0})
    assert len(results) == 1 and not results[0].passed and results[0].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert compare_outputs(ref, {"y": ref["y"]}, atol={"y": 1e-6})[0].passed
    single = compare_array("y", ref["y"], ref["y"] + 1e-3, atol=1e-2)
    assert single.passed and single.atol == 1e-2


def _same_figures(a, b) -> None:
    left, right = a.model_dump(), b.model_dump()
    assert left.keys() == right.keys()
    for key, value in left.items():
        if isinstance(value, float) and isinstance(right[key], float):
            assert value == pytest.approx(right[key], rel=1e-9, abs=1e-300, nan_ok=True), key
        else:
            assert value == right[key], key


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([(), (7,), (3, 2)]), st.integers(0, 4),
                          st.sampled_from(["float32", "float64", "int64"])), min_size=1, max_size=6),
       st.integers(0, 2**32 - 1))
def test_comparisons_figured_together_equal_those_figured_alone(specs, seed) -> None:
    """compare_many concatenates comparisons that share a tolerance and row shape: each must get
    exactly what it would get alone (shape/dtype mismatches, NaN/Inf and empty arrays included)."""
    from packager.fidelity.metrics import compare_many

    rng = np.random.default_rng(seed)
    items = []
    for rows, tail, special, dtype in specs:
        ref = (rng.standard_normal((rows, *tail)) * 10).astype(dtype)
        got = (ref + rng.standard_normal(ref.shape) * 1e-3).astype(dtype)
        if special == 1 and got.size and got.dtype.kind == "f":
            got.flat[0] = np.nan
        elif special == 2 and got.size and got.dtype.kind == "f":
            ref.flat[-1] = got.flat[-1] = -np.inf
        elif special == 3:
            got = got[:-1] if rows else got  # a shape mismatch
        items.append(("y", ref, got, FP32 if special != 4 else Tolerance(atol=0.0, rtol=0.0, source="exact")))
    together = compare_many(items)
    for item, result in zip(items, together):
        _same_figures(result, compare_many([item])[0])
