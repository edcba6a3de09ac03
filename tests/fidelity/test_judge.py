"""The one judge (packager.fidelity.judge): its rules, the noise-relative policy, degenerate
references, and the invariant that export parity and ``verify`` give the same verdict on the same
artifact and data."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from packager.fidelity.judge import NOISE_FACTOR, SCALE_FLOOR, Judge, resolve_tolerance
from packager.manifest import OutputNoise

NOISE = OutputNoise(scale=3.0, noise=4.5e-7, method="float64")  # the TinyCNN's, measured


# --- rules (numpy only) -----------------------------------------------------------------------
def test_rules_in_order() -> None:
    assert resolve_tolerance("ids", "int64").atol == 0.0
    unmeasured = resolve_tolerance("y", "float32")
    assert (unmeasured.atol, unmeasured.rtol) == (1e-4, 1e-4) and "no noise record" in unmeasured.source
    measured = resolve_tolerance("y", "float32", noise=NOISE)
    assert measured.rtol == pytest.approx(NOISE_FACTOR * 4.5e-7 / 3.0) and "float64" in measured.source
    exact = resolve_tolerance("y", "float32", noise=OutputNoise(scale=3.0, noise=0.0, method="float64"))
    assert exact.rtol == SCALE_FLOOR["float32"] and "floor" in exact.source
    # A model noisy by itself (deep random-init Keras nets: rows alone move outputs by up to
    # 1.6e-4 x scale) gets 32x its noise, up to the cap: past it, no wider.
    noisy = resolve_tolerance("y", "float32", noise=OutputNoise(scale=1000.0, noise=0.015, method="rows alone"))
    assert noisy.rtol == pytest.approx(NOISE_FACTOR * 0.015 / 1000.0) and noisy.rtol > 1e-4
    wild = resolve_tolerance("y", "float32", noise=OutputNoise(scale=1.0, noise=0.5, method="rows alone"))
    assert wild.rtol == 1e-3 and "noise cap" in wild.source
    half = resolve_tolerance("y", "float32", "reduced:float16", noise=NOISE)
    assert half.rtol == 1e-2 and "declared float16" in half.source
    gpu = resolve_tolerance("y", "float32", noise=NOISE, device="cuda:0")
    assert gpu.rtol == 2e-3 and "TF32" in gpu.source
    given = resolve_tolerance("logits", "float32", atol={"logits": 1e-3}, rtol=0.0, noise=NOISE)
    assert (given.atol, given.rtol) == (1e-3, 0.0) and "given" in given.source
    floored = resolve_tolerance("y", "float32", noise=NOISE, floor=1e-3)
    assert floored.atol == 2e-3 and "noise floor" in floored.source


def test_large_dynamic_range_is_judged_against_the_output_scale() -> None:
    """The EfficientNetB0 false alarm: logits up to ~50, 3.7e-4 off on elements near zero. The
    per-element rule (atol 1e-4 + rtol 1e-4 x |ref|) failed it; a tf.function of the same model
    differs from eager by as much, so it is rounding, and relative to the scale it is 7e-6."""
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((4, 1000)) * 12).astype(np.float32)
    ref[0, 0], ref[1, :8] = 50.0, 1e-3
    got = ref.copy()
    got[1, :8] += 3.7e-4
    old_rule = np.abs(got - ref) > 1e-4 + 1e-4 * np.abs(ref)
    assert old_rule.sum() == 8  # what the per-element rule refused
    assert Judge().compare({"y": ref}, {"y": got}).passed  # no noise record
    spread = OutputNoise(scale=50.0, noise=1.2e-4, method="rows alone")  # an EfficientNet-like spread
    judged = Judge(noise={"y": spread}).compare({"y": ref}, {"y": got}).outputs[0]
    assert judged.passed and judged.scale == pytest.approx(50.0) and judged.tolerance_use < 1


def test_minimum_tolerances_are_relative_to_the_scale() -> None:
    ref = np.array([[10.0, 0.0, -2.0]])
    got = ref + np.array([[0.0, 1e-3, 0.0]])
    m = Judge(atol=1e-6, rtol=1e-6).compare({"y": ref}, {"y": got}).outputs[0]
    assert not m.passed and m.scale == 10.0
    assert m.min_atol == pytest.approx(1e-3 - 1e-5) and m.min_rtol == pytest.approx((1e-3 - 1e-6) / 10)
    assert Judge(atol=m.min_atol * 1.0001, rtol=1e-6).compare({"y": ref}, {"y": got}).passed
    assert Judge(atol=1e-6, rtol=m.min_rtol * 1.0001).compare({"y": ref}, {"y": got}).passed


@pytest.mark.parametrize("ref, words", [
    (np.zeros((2, 3), np.float32), "is all zero"),
    (np.full((2, 3), 0.2, np.float32), "is constant"),
    (np.full((2, 3), 0.2, np.float32) + np.float32(1e-7) * np.arange(6, dtype=np.float32).reshape(2, 3),
     "nearly constant"),
    (np.full((2,), 3, np.int64), "is constant"),
])
def test_degenerate_references_are_said_not_failed(ref: np.ndarray, words: str) -> None:
    judged = Judge().compare({"logits": ref}, {"logits": ref.copy()})
    assert judged.passed
    assert len(judged.degenerate) == 1 and words in judged.degenerate[0]
    assert "reference output 'logits'" in judged.degenerate[0] and "parity is not informative" in judged.degenerate[0]
    informative = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert Judge().compare({"y": informative}, {"y": informative}).degenerate == []


def test_old_manifests_without_a_noise_record_still_load() -> None:
    from packager.manifest import Golden

    entry = {"path": "golden/inputs.npz", "sha256": "0" * 64, "size": 1}
    golden = Golden.model_validate({"inputs": entry, "outputs": {**entry, "path": "golden/outputs.npz"},
                                    "reference": "torch eager"})
    assert golden.noise == {}


# --- real torch models ------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from tests.fidelity import models as M  # noqa: E402
from tests.fidelity.conftest import TORCH_FORMATS  # noqa: E402

import packager  # noqa: E402
from packager.exporting import check_parity  # noqa: E402
from packager.manifest import load_manifest  # noqa: E402


def _x(seed: int = 0, batch: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 12)).astype(np.float32)}


@pytest.fixture(scope="module")
def heads(fid_dir: Path) -> tuple[object, dict, Path]:
    torch.manual_seed(0)
    model = M.TwoHeads().eval()
    with torch.no_grad():  # outputs of scale ~0.3: a float16 rounding then moves them by < 1e-4
        model.a.weight.mul_(0.2)
        model.b.weight.mul_(0.2)
    path = packager.export(model, _x(), out=fid_dir / "heads_good", formats=TORCH_FORMATS,
                           output_names=["a", "b"]).path
    return model, _x(), path


def _golden_verdicts(path: Path, atol=None, rtol=None) -> dict[str, tuple]:
    """Per format: (passed, per-output (max_abs, atol, rtol)) from export's check_parity and
    from verify's golden case, on the package's own golden data."""
    from packager.package import Package

    package = Package(path)
    manifest = package.manifest
    golden_in, golden_out = package.golden()
    parity = {}
    for art in manifest.artifacts:
        p = check_parity(package.resolve(art.path), art, manifest.signature, golden_in, golden_out, atol, rtol,
                         noise=manifest.golden.noise)
        parity[art.format] = (p.passed, [(o.name, o.max_abs, o.atol, o.rtol) for o in p.outputs])
    report = packager.verify(path, sweep=False, atol=atol, rtol=rtol)
    verified = {}
    for row in report.rows:
        golden = next(c for c in row.cases if c.case == "golden")
        verified[row.format] = (golden.passed, [(o.name, o.max_abs, o.atol, o.rtol) for o in golden.outputs])
    return parity, verified


@pytest.mark.parametrize("mutant", ["good", "fp16", "weight"])
def test_export_parity_and_verify_agree_on_the_same_data(heads, broken, mutant: str) -> None:
    """The invariant: an artifact export accepts passes verify and one it refuses fails verify,
    same figures and tolerances, for TorchScript, ONNX and torch.export (one judge, no
    native/converted split)."""
    model, example, good = heads
    path = good if mutant == "good" else broken(
        f"heads_{mutant}", good, M.fp16_rounded(model) if mutant == "fp16" else M.perturbed(model, "a.weight", 1e-3),
        example, output_names=["a", "b"])
    parity, verified = _golden_verdicts(path)
    assert parity == verified
    assert {f: v[0] for f, v in verified.items()} == {f: mutant == "good" for f in TORCH_FORMATS}
    # At the edge: the minimum tolerance verify reports makes both pass, together.
    if mutant != "good":
        report = packager.verify(path, sweep=False, formats=["onnx"])
        edge = max(o.min_atol for c in report.rows[0].cases for o in c.outputs) * 1.001
        parity, verified = _golden_verdicts(path, atol=edge)
        assert parity == verified and verified["onnx"][0]


def test_an_accepted_export_passes_the_full_verify(heads) -> None:
    _model, _example, good = heads
    manifest = load_manifest(good)
    assert all(a.passed for a in manifest.artifacts)
    report = packager.verify(good, random=True)
    assert report.passed, [(r.format, r.worst) for r in report.rows]
    assert set(manifest.golden.noise) == {"a", "b"} and manifest.golden.noise["a"].method == "float64"


def test_fp16_rounded_weights_are_caught_where_a_fixed_atol_passed_them(heads, broken) -> None:
    """Weights rounded through float16, stored as float32: every output moves by less than the
    old fixed atol 1e-4, yet by hundreds of times the measured rounding noise."""
    model, example, good = heads
    path = broken("heads_fp16", good, M.fp16_rounded(model), example, output_names=["a", "b"])
    report = packager.verify(path)
    assert report.exit_code == 1 and {r.format: r.verdict for r in report.rows} == {f: "numeric" for f in TORCH_FORMATS}
    golden = next(c for c in report.rows[1].cases if c.case == "golden")
    worst = max(golden.outputs, key=lambda o: o.tolerance_use)
    assert worst.max_abs < 1e-4 and worst.tolerance_use > 10, worst


def test_swapped_outputs_are_caught(heads, broken) -> None:
    model, example, good = heads
    swapped = M.SwappedHeads()
    swapped.load_state_dict(model.state_dict())
    report = packager.verify(broken("heads_swapped", good, swapped.eval(), example, output_names=["a", "b"]))
    assert report.exit_code == 1 and {r.format: r.verdict for r in report.rows} == {f: "numeric" for f in TORCH_FORMATS}
    for row in report.rows:
        golden = next(c for c in row.cases if c.case == "golden")
        assert not any(o.passed for o in golden.outputs)


def test_degenerate_reference_is_said_at_export_in_verify_and_in_reports(fid_dir: Path) -> None:
    torch.manual_seed(0)
    result = packager.export(M.ZeroHead().eval(), _x(), out=fid_dir / "zero_head", formats=["onnx"],
                             output_names=["scores", "logits"])
    note = "reference output 'logits' is all zero: parity is not informative"
    manifest = result.manifest
    assert note in manifest.extra["export_log"] and manifest.golden.noise["logits"].degenerate == note
    assert note in manifest.artifacts[0].parity[0].notes and result.passed
    report = packager.verify(result.path)
    assert report.passed and report.notes.count(note) == 1
    golden = next(c for c in report.rows[0].cases if c.case == "golden")
    assert {o.name: o.degenerate for o in golden.outputs} == {"scores": None, "logits": note}
    from packager.fidelity.report_junit import render

    xml = ET.tostring(render(report).getroot(), encoding="unicode")
    assert "parity is not informative" in xml
    assert note in json.dumps(report.to_dict())


def test_packages_without_a_noise_record_verify_with_the_defaults(heads, fid_dir: Path) -> None:
    import shutil

    _model, _example, good = heads
    old = fid_dir / "heads_old"
    shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(good, old)
    data = json.loads((old / "manifest.json").read_text())
    del data["golden"]["noise"]
    (old / "manifest.json").write_text(json.dumps(data))
    report = packager.verify(old)
    assert report.passed
    out = next(c for c in report.rows[0].cases if c.case == "golden").outputs[0]
    assert "no noise record" in out.tolerance_source


def test_paddle_onnx_attempts_are_judged_by_the_exports_judge(tmp_path: Path) -> None:
    """A conversion attempt 1e-3 off: refused by the default rules, accepted under --atol 1e-2
    (the Paddle exporter used to ignore --atol here). No Paddle needed: a hand-made ONNX model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from packager.exporters import ExportContext
    from packager.exporters.paddle import Attempt, _check_onnx
    from packager.signature import Signature, TensorSpec

    shift = numpy_helper.from_array(np.full((1, 3), 1e-3, np.float32), "shift")
    graph = helper.make_graph([helper.make_node("Add", ["x", "shift"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [shift])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    signature = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 3])],
                          outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 3])])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    verdicts = {}
    for label, judge in (("default", None), ("atol 1e-2", Judge(atol=1e-2))):
        path = tmp_path / f"{label}.onnx"
        onnx.save(model, str(path))
        attempt = Attempt("test", None, 17, True, onnx_path=path)
        _check_onnx(attempt, ExportContext(signature=signature, example_inputs={"x": x}, judge=judge), [x])
        verdicts[label] = (attempt.step, attempt.ok)
    assert verdicts == {"default": ("compare", False), "atol 1e-2": ("compare", True)}
