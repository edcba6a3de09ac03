"""OpenVINO IR converted from a package's ONNX artifact (packager/exporters/openvino.py), from
every framework that writes ONNX, judged like every other artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest

import packager
from packager.errors import UsageError
from packager.manifest import MANIFEST_NAME
from tests.conftest import run_cli

ov = pytest.importorskip("openvino")


def test_ir_is_converted_from_the_onnx_artifact_with_fp32_weights_kept(torch_openvino_package):
    manifest = json.loads((torch_openvino_package / MANIFEST_NAME).read_text())
    arts = {a["format"]: a for a in manifest["artifacts"]}
    assert list(arts) == ["onnx", "openvino"], "onnx was not asked for: it is added, written first"
    ir = arts["openvino"]
    assert all(p["passed"] for p in ir["parity"]) and ir["options"]["converted_from"] == "onnx/model.onnx"
    assert sorted(f["path"] for f in ir["files"]) == ["openvino/model.bin", "openvino/model.xml"]
    assert any("openvino is converted from the onnx artifact" in line for line in manifest["extra"]["export_log"])
    # save_model's default compress_to_fp16=True would have stored the weights as f16.
    model = ov.Core().read_model(str(torch_openvino_package / "openvino" / "model.xml"))
    types = {op.get_element_type().get_type_name() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"}
    assert "f32" in types and not types & {"f16", "bf16"}, types
    assert set(ir["options"]["constant_types"]) == types
    # The signature's dynamic axes stay dynamic in the IR (seq keeps its declared bounds).
    shape = model.inputs[0].get_partial_shape()
    assert shape[0].is_dynamic and (shape[1].get_min_length(), shape[1].get_max_length()) == (1, 64)


def test_keras_and_paddle_models_get_openvino_through_their_onnx(keras_cnn, tmp_path):
    model, example = keras_cnn
    keras_pkg = packager.export(model, example, out=tmp_path / "keras", formats=["onnx", "openvino"])
    assert [(a.format, a.passed) for a in keras_pkg.manifest.artifacts] == [("onnx", True), ("openvino", True)]

    pytest.importorskip("paddle")
    from sample_models.paddle_models import train_lenet

    layer, x, _ = train_lenet(steps=2)
    paddle_pkg = packager.export(layer, {"x": x}, out=tmp_path / "paddle", formats=["openvino"])
    assert [(a.format, a.passed) for a in paddle_pkg.manifest.artifacts] == [("onnx", True), ("openvino", True)]
    for pkg in (keras_pkg.path, paddle_pkg.path):
        assert packager.verify(pkg, formats=["openvino"]).passed


def test_cli_exports_verifies_and_runs_the_ir(torch_transformer, tmp_path):
    import torch

    model, _ = torch_transformer
    torch.save(model, tmp_path / "model.pt")
    pkg = tmp_path / "pkg"
    proc = run_cli("export", str(tmp_path / "model.pt"), "--trust", "--formats", "onnx,openvino",
                   "--input-spec", "ids:int64[batch,seq=1..64]@0:100", "--out", str(pkg))
    assert proc.returncode == 0, proc.stderr
    assert "openvino" in proc.stdout and "PASS" in proc.stdout
    proc = run_cli("verify", str(pkg), "--format", "openvino")
    assert proc.returncode == 0 and "openvino cpu" in proc.stdout and "PASS" in proc.stdout, proc.stdout + proc.stderr
    ids = np.random.default_rng(0).integers(0, 100, (5, 9)).astype(np.int64)
    np.savez(tmp_path / "in.npz", ids=ids)
    outs = {}
    for fmt in ("onnx", "openvino"):
        proc = run_cli("run", str(pkg), "--format", fmt, "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / f"{fmt}.npz"))
        assert proc.returncode == 0, proc.stderr
        outs[fmt] = np.load(tmp_path / f"{fmt}.npz")["output"]
    assert outs["openvino"].shape == (5, 4)
    np.testing.assert_allclose(outs["openvino"], outs["onnx"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        eager = model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(outs["openvino"], eager, atol=1e-4, rtol=1e-4)


def test_a_format_that_needs_an_artifact_the_framework_does_not_write_is_refused(torch_cnn):
    model, example = torch_cnn
    with pytest.raises(UsageError, match="tflite is converted from the saved_model artifact"):
        packager.export(model, example, out="unused", formats=["tflite"])


def test_paddle_legacy_program_is_read_by_openvino_without_onnx(tmp_path):
    """OpenVINO's Paddle frontend reads a legacy .pdmodel (PP-OCRv4's, which paddle2onnx cannot
    convert: tests/zoo/test_shipped_weights.py): with paddle_legacy asked for and onnx not, the
    IR comes from the program, and no ONNX is added."""
    pytest.importorskip("paddle")
    from sample_models.paddle_models import train_lenet

    layer, x, _ = train_lenet(steps=2)
    result = packager.export(layer, {"x": x}, out=tmp_path / "pkg", formats=["paddle_legacy", "openvino"])
    assert [(a.format, a.passed) for a in result.manifest.artifacts] == [("paddle_legacy", True), ("openvino", True)]
    assert result.manifest.artifact("openvino").options["converted_from"] == "paddle_legacy/model.pdmodel"
    assert packager.verify(result.path).passed


def test_openvino_sources_are_chosen_among_the_formats_asked_for():
    from packager.exporting import with_sources
    from packager.exporters import paddle

    # onnx first when both are there; the legacy program when only it is; else onnx is added.
    assert with_sources(["onnx", "paddle_legacy", "openvino"], paddle.FORMATS)[0] == ["onnx", "paddle_legacy", "openvino"]
    assert with_sources(["paddle_legacy", "openvino"], paddle.FORMATS) == (["paddle_legacy", "openvino"], [])
    ordered, notes = with_sources(["paddle_inference", "openvino"], paddle.FORMATS)
    assert ordered == ["paddle_inference", "onnx", "openvino"] and "onnx was added" in notes[0]
