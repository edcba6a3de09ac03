"""Paddle end to end: every training-time save in, every format out, and each failure path
with a real failing program (no mocks). Models are tiny and trained a few steps."""

from __future__ import annotations

import argparse
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paddle")
pytestmark = pytest.mark.paddle

import packager  # noqa: E402
from packager.errors import ExportError, SourceError, TrustRequiredError, UsageError  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

LENET = "sample_models.paddle_models:build_lenet"
CNN = "sample_models.paddle_models:build_cnn"


@pytest.fixture(scope="session")
def lenet():
    from sample_models.paddle_models import train_lenet

    return train_lenet(seed=0, steps=3)


@pytest.fixture(scope="session")
def cnn():
    from sample_models.paddle_models import train_cnn

    return train_cnn(seed=0, steps=3)


@pytest.fixture(scope="session")
def lenet_saves(lenet, session_dir: Path) -> dict[str, Path]:
    from sample_models.paddle_models import save_everything

    model, _, opt = lenet
    return save_everything(model, opt, (1, 28, 28), session_dir / "paddle_lenet_saves")


@pytest.fixture(scope="session")
def cnn_saves(cnn, session_dir: Path) -> dict[str, Path]:
    from sample_models.paddle_models import save_everything

    model, _, opt = cnn
    return save_everything(model, opt, (3, 32, 32), session_dir / "paddle_cnn_saves")


def _eager(model, x: np.ndarray) -> np.ndarray:
    import paddle

    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


# --- in-memory Layer, every format ------------------------------------------------------------
def test_in_memory_layer_exports_every_format(lenet, tmp_path: Path) -> None:
    import onnx

    import runtimes

    model, example, _ = lenet
    result = packager.export(model, example, out=tmp_path / "pkg",
                             formats=["paddle_inference", "paddle_legacy", "paddle_static", "onnx"])
    manifest = result.manifest
    assert result.passed, [a.parity for a in manifest.artifacts]
    assert manifest.source.kind == "in_memory" and manifest.golden.reference.startswith("paddle dygraph")
    paths = {a.format: a.path for a in manifest.artifacts}
    assert paths["paddle_inference"].endswith("model.json")
    assert paths["paddle_legacy"].endswith("model.pdmodel")
    assert (tmp_path / "pkg" / "paddle_legacy" / "model.pdiparams").is_file()
    assert paths["onnx"] == "onnx/model.onnx"
    assert str(manifest.signature.inputs[0]) == "x:float32[batch,1,28,28]"
    # ONNX keeps the batch axis dynamic, named after the signature, and passes the checker.
    graph = onnx.load(str(tmp_path / "pkg" / "onnx" / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in graph.graph.output] == manifest.signature.output_names
    onnx_art = manifest.artifact("onnx")
    assert onnx_art.options["opset"] == 13 and onnx_art.options["converter"] == "paddle2onnx"
    # Every artifact runs at another batch size and agrees with the dygraph model.
    x = np.random.default_rng(3).standard_normal((7, 1, 28, 28)).astype("float32")
    want = _eager(model, x)
    for fmt in ("paddle_inference", "paddle_legacy", "paddle_static", "onnx"):
        with runtimes.load(tmp_path / "pkg", format=fmt) as runner:
            got = runner.run({"x": x})[manifest.signature.output_names[0]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=fmt)
    assert packager.verify(tmp_path / "pkg").passed  # every runtime of every format, paddle_jit included
    # Paddle's console noise was captured, not printed, and kept in the manifest.
    assert any("Paddle2ONNX" in line or "onnx attempts" in line for line in manifest.extra["export_log"])


def test_onednn_fallback_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    from sample_models.paddle_models import UpsampleHead

    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32")
    result = packager.export(UpsampleHead(), x, out=tmp_path / "pkg", formats=["paddle_inference"])
    assert result.passed
    notes = result.manifest.artifact("paddle_inference").parity[0].notes
    assert any(n.startswith("oneDNN disabled") for n in notes), notes


def test_paddle_model_object_is_accepted(cnn, tmp_path: Path) -> None:
    import paddle

    model, example, _ = cnn
    hapi = paddle.Model(model)
    result = packager.export(hapi, example, out=tmp_path / "pkg", formats=["paddle_inference"])
    assert result.passed and result.manifest.source.framework == "paddle"


# --- every save path, both sample models ---------------------------------------------------------
SOURCES = ["state_dict", "checkpoint", "hapi", "hapi_infer", "jit_pir", "jit_legacy", "static", "v1_dir"]
KINDS = {"state_dict": "state_dict", "checkpoint": "checkpoint", "hapi": "paddle_model_save",
         "hapi_infer": "inference_model", "jit_pir": "inference_model", "jit_legacy": "inference_model_legacy",
         "static": "inference_model", "v1_dir": "inference_model_v1"}


@pytest.mark.parametrize("source", SOURCES)
def test_lenet_every_source_to_inference_and_onnx(source: str, lenet, lenet_saves, tmp_path: Path) -> None:
    model, _, _ = lenet
    weights = source in ("state_dict", "checkpoint", "hapi")
    formats = ["paddle_inference", "onnx"] + (["paddle_legacy"] if source in ("jit_legacy", "v1_dir") else [])
    opset = 17 if source == "static" else None
    result = packager.export(lenet_saves[source], out=tmp_path / "pkg", formats=formats,
                             builder=LENET if weights else None, opset=opset,
                             input_spec=["x:float32[batch,1,28,28]"] if weights else None)
    manifest = result.manifest
    assert result.passed, [(a.format, a.parity) for a in manifest.artifacts]
    assert manifest.artifact("onnx").options["opset"] == (opset or 13)
    assert manifest.source.kind == KINDS[source]
    # The golden outputs are the trained model's: the weights really were loaded.
    inputs, outputs = packager.package.Package(tmp_path / "pkg").golden()
    np.testing.assert_allclose(next(iter(outputs.values())), _eager(model, inputs["x"]), rtol=1e-4, atol=1e-4)
    if source in ("jit_legacy", "v1_dir"):
        # A translated program: paddle.jit.load cannot read it, so only Paddle Inference is listed.
        assert manifest.artifact("paddle_inference").runtimes == ["paddle_inference"]
        assert packager.verify(tmp_path / "pkg").passed
    if not weights:
        # An imported inference model: names/shapes read from the program, Paddle Inference is the reference.
        assert manifest.golden.reference == "paddle inference (imported model)"
        assert manifest.signature.inputs[0].shape == ("batch", 1, 28, 28)


@pytest.mark.parametrize("source", SOURCES)
def test_cnn_every_source(source: str, cnn, cnn_saves, tmp_path: Path) -> None:
    model, _, _ = cnn
    weights = source in ("state_dict", "checkpoint", "hapi")
    result = packager.export(cnn_saves[source], out=tmp_path / "pkg", formats=["paddle_inference"],
                             builder=CNN if weights else None,
                             input_spec=["x:float32[batch,3,32,32]"] if weights else None)
    assert result.passed and result.manifest.source.kind == KINDS[source]
    inputs, outputs = packager.package.Package(tmp_path / "pkg").golden()
    # BatchNorm uses running statistics and Dropout is off: eval-mode outputs.
    np.testing.assert_allclose(next(iter(outputs.values())), _eager(model, inputs["x"]), rtol=1e-4, atol=1e-4)


def test_checkpoint_records_state_key_epoch_and_optimizer(cnn_saves) -> None:
    from packager.exporters import SourceOptions
    from packager.exporters.paddle import load_source

    loaded = load_source(cnn_saves["checkpoint"], SourceOptions(builder=CNN))
    assert loaded.extra["state_key"] == "model_state_dict" and loaded.extra["epoch"] == 3
    assert loaded.extra["optimizer_file"].endswith("ckpt.pdopt")
    hapi = load_source(cnn_saves["hapi"], SourceOptions(builder="sample_models.paddle_models:build_cnn_model"))
    assert hapi.kind == "paddle_model_save" and hapi.extra["optimizer_file"].endswith("model.pdopt")


def test_inference_model_path_forms(lenet_saves) -> None:
    from packager.exporters.paddle import claims
    from runtimes._paddle import find_model_files

    json_file = lenet_saves["jit_pir"]
    prefix = json_file.with_suffix("")
    for form in (json_file, prefix, json_file.with_suffix(".pdiparams"), json_file.parent):
        files = find_model_files(form)
        assert files is not None and files.model == json_file and files.program == "pir", form
        assert claims(Path(form))
    legacy = lenet_saves["jit_legacy"]
    info = find_model_files(legacy.with_suffix(".pdiparams.info"))
    assert info is not None and info.program == "legacy"
    assert find_model_files(lenet_saves["v1_dir"]).program == "v1"
    assert claims(lenet_saves["hapi"])  # a paddle.Model.save prefix (prefix.pdparams exists)
    assert not claims(json_file.parent / "missing.json")


def test_program_without_parameters(tmp_path: Path) -> None:
    """jit.save of a Layer without parameters writes no .pdiparams: still an inference model."""
    import paddle

    from sample_models.paddle_models import save_layer

    path = save_layer(paddle.nn.Sequential(paddle.nn.ReLU(), paddle.nn.Softmax()), (None, 5), tmp_path / "m" / "model")
    assert not path.with_suffix(".pdiparams").exists()
    result = packager.export(path.parent, out=tmp_path / "pkg", formats=["paddle_inference", "onnx"])
    assert result.passed and result.manifest.source.kind == "inference_model"


def test_input_spec_fills_dynamic_dims_of_an_inference_model(cnn, tmp_path: Path) -> None:
    from sample_models.paddle_models import save_layer

    model, _, _ = cnn
    path = save_layer(model, (None, 3, None, None), tmp_path / "dyn" / "model")
    bare = packager.export(path, out=tmp_path / "bare", formats=["paddle_inference"])
    assert bare.manifest.signature.inputs[0].shape == ("batch", 3, "x_dim2", "x_dim3")
    filled = packager.export(path, out=tmp_path / "filled", formats=["paddle_inference"],
                             input_spec=["x:float32[batch,3,h=24,w=24]"])
    assert filled.passed
    inputs, _ = packager.package.Package(tmp_path / "filled").golden()
    assert inputs["x"].shape == (4, 3, 24, 24)


def test_converter_limitation_names_the_op(cnn, tmp_path: Path) -> None:
    """paddle2onnx converts adaptive pooling only for static H/W: the error names the op."""
    from sample_models.paddle_models import save_layer

    model, _, _ = cnn
    path = save_layer(model, (None, 3, None, None), tmp_path / "dyn" / "model")
    with pytest.raises(ExportError) as info:
        packager.export(path, out=tmp_path / "p", formats=["onnx"], input_spec=["x:float32[batch,3,h=24,w=24]"])
    assert "pool2d" in info.value.problem and "convert failed at op pd_op.pool2d" in info.value.problem


# --- source errors ----------------------------------------------------------------------------
def test_state_dict_needs_builder(lenet_saves, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--builder"):
        packager.export(lenet_saves["state_dict"], out=tmp_path / "p", input_spec=["x:float32[batch,1,28,28]"])


def test_weights_that_do_not_fit_the_builder(lenet_saves, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not fit") as info:
        packager.export(lenet_saves["state_dict"], out=tmp_path / "p", builder=CNN,
                        input_spec=["x:float32[batch,3,32,32]"])
    assert "--builder" in info.value.fix


def test_wrong_state_key_and_ambiguous_checkpoint(lenet, tmp_path: Path) -> None:
    import paddle

    model, _, _ = lenet
    path = tmp_path / "two.pdparams"
    paddle.save({"student": model.state_dict(), "teacher": model.state_dict()}, str(path))
    with pytest.raises(SourceError, match="no unambiguous") as info:
        packager.export(path, out=tmp_path / "p", builder=LENET, input_spec=["x:float32[batch,1,28,28]"])
    assert "--state-key" in info.value.fix
    with pytest.raises(SourceError, match="has no key 'nope'"):
        packager.export(path, out=tmp_path / "p", builder=LENET, state_key="nope",
                        input_spec=["x:float32[batch,1,28,28]"])
    result = packager.export(path, out=tmp_path / "p", builder=LENET, state_key="teacher", formats=["paddle_inference"],
                             input_spec=["x:float32[batch,1,28,28]"])
    assert result.passed


def test_optimizer_file_is_refused_with_the_params_file_named(lenet_saves, tmp_path: Path) -> None:
    pdopt = lenet_saves["checkpoint"].with_suffix(".pdopt")
    with pytest.raises(SourceError, match="optimizer state") as info:
        packager.export(pdopt, out=tmp_path / "p", builder=LENET, input_spec=["x:float32[batch,1,28,28]"])
    assert "ckpt.pdparams" in info.value.fix


def test_pickled_objects_need_trust(lenet, tmp_path: Path) -> None:
    import paddle

    model, _, _ = lenet
    path = tmp_path / "ckpt.pdparams"
    # A real-world checkpoint that carries a Python object (the argparse options) besides the weights.
    paddle.save({"model_state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, str(path))
    with pytest.raises(TrustRequiredError, match="argparse.Namespace") as info:
        packager.export(path, out=tmp_path / "p", builder=LENET, input_spec=["x:float32[batch,1,28,28]"])
    assert "--trust" in info.value.fix
    result = packager.export(path, out=tmp_path / "p", builder=LENET, trust=True, formats=["paddle_inference"],
                             input_spec=["x:float32[batch,1,28,28]"])
    assert result.passed


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"w": Evil()}, protocol=4))
    with pytest.raises(TrustRequiredError, match="system"):
        packager.export(path, out=tmp_path / "p", builder=LENET, input_spec=["x:float32[batch,1,28,28]"])
    assert not marker.exists()


def test_folder_with_two_models_is_ambiguous(lenet_saves, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(lenet_saves["jit_pir"], folder / f"{name}.json")
        shutil.copy(lenet_saves["jit_pir"].with_suffix(".pdiparams"), folder / f"{name}.pdiparams")
    with pytest.raises(SourceError, match="several"):
        packager.export(folder, out=tmp_path / "p")


def test_unreadable_paddle1_folder_says_what_to_do(lenet_saves, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "v1"
    shutil.copytree(lenet_saves["v1_dir"], folder)
    (folder / "__model__").write_bytes(b"\x08\x01garbage-not-a-program-desc")
    with pytest.raises(SourceError, match="Paddle 1.x") as info:
        packager.export(folder, out=tmp_path / "p")
    assert "save_inference_model" in info.value.fix and "step: load" in info.value.problem


def test_params_file_from_another_model_fails_at_load(lenet_saves, cnn_saves, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(lenet_saves["jit_legacy"], folder / "model.pdmodel")
    shutil.copy(cnn_saves["jit_legacy"].with_suffix(".pdiparams"), folder / "model.pdiparams")
    with pytest.raises(PackagerErrorTypes) as info:
        packager.export(folder / "model.pdmodel", out=tmp_path / "p")
    assert "load" in info.value.message


PackagerErrorTypes = (SourceError, ExportError, packager.errors.RuntimeLoadError)


# --- conversion failures (real failing programs) ------------------------------------------------
def test_legacy_program_paddle2onnx_crashes_on_is_diagnosed(tmp_path: Path) -> None:
    from sample_models.paddle_models import ExpandHead, save_layer

    layer = ExpandHead()
    legacy = save_layer(layer, (None, 4, 4), tmp_path / "legacy" / "model", legacy=True)
    with pytest.raises(ExportError) as info:
        packager.export(legacy, out=tmp_path / "p", formats=["paddle_legacy", "onnx"])
    err = info.value
    assert err.subject == "format onnx" and "convert" in err.problem
    assert "SIGSEGV" in err.problem  # what happened, not a raw log
    assert "re-saved as PIR" in err.problem and "opset 17" in err.problem and "without the optimiser" in err.problem
    assert "dygraph" in err.fix and "paddle_inference" in err.fix
    assert not (tmp_path / "p").exists()  # nothing half-written
    # The same Layer converts fine from its PIR program: the advice in the fix holds.
    ok = packager.export(layer, np.ones((2, 4, 4), "float32"), out=tmp_path / "ok", formats=["onnx"])
    assert ok.passed
    # ... and the legacy program still deploys with Paddle Inference.
    assert packager.export(legacy, out=tmp_path / "pi", formats=["paddle_legacy"]).passed


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    from sample_models.paddle_models import CumprodHead, save_layer

    path = save_layer(CumprodHead(), (None, 8), tmp_path / "m" / "model")
    with pytest.raises(ExportError) as info:
        packager.export(path, out=tmp_path / "p", formats=["onnx"])
    assert "cumprod" in info.value.problem and "convert" in info.value.problem
    assert "custom op" in info.value.fix
    assert "Paddle2ONNX" in (info.value.details or "")  # the converter's log is kept, not printed


def test_hung_converter_is_killed(lenet_saves, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="did not finish within 0.3 s") as info:
        packager.export(lenet_saves["jit_pir"], out=tmp_path / "p", formats=["onnx"],
                        options={"paddle2onnx_timeout": "0.3"})
    assert "opset 17" in info.value.problem  # every workaround was still tried


def test_legacy_format_from_a_pir_program_is_refused(lenet_saves, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="PIR") as info:
        packager.export(lenet_saves["jit_pir"], out=tmp_path / "p", formats=["paddle_legacy"])
    assert "--builder" in info.value.fix


def test_broken_onnx_is_caught_by_the_check_step(tmp_path: Path, lenet) -> None:
    """A converted model that ONNX Runtime refuses fails the 'check' step of an attempt."""
    import onnx
    from onnx import helper

    from packager.exporters import ExportContext
    from packager.exporters.paddle import Attempt, _check_onnx
    from packager.signature import parse_input_specs

    # A real invalid graph: Concat of a rank-2 and a rank-3 tensor (the rank error paddle2onnx can emit).
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axes"], ["x3"], name="unsq"),
         helper.make_node("Concat", ["x", "x3"], ["output"], axis=0, name="concat_bad")],
        "bad", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [0])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    signature = parse_input_specs(["x:float32[batch,4]"])
    signature = signature.model_copy(update={"outputs": [signature.inputs[0].model_copy(update={"name": "output"})]})
    ctx = ExportContext(signature=signature, example_inputs={"x": np.ones((2, 4), "float32")})
    attempt = Attempt("test", None, 13, True, onnx_path=path)
    _check_onnx(attempt, ctx, [np.ones((2, 4), "float32")])
    assert not attempt.ok and attempt.step == "check"
    assert attempt.node == "node concat_bad" and "same rank" in attempt.reason


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_exports_an_inference_model_and_reports_untrusted_pickles(lenet_saves, tmp_path: Path) -> None:
    proc = run_cli("export", str(lenet_saves["jit_legacy"].with_suffix("")), "--out", str(tmp_path / "pkg"),
                   "--formats", "paddle_inference,onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["source"]["framework"] == "paddle"
    console = proc.stdout + proc.stderr
    assert "Paddle2ONNX" not in console and "Warning" not in console  # converter noise stays out of the console
    assert "Paddle2ONNX" in json.dumps(manifest["extra"])  # ... and is kept in the report
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"w": Counter()}, protocol=4))
    proc = run_cli("export", str(evil), "--out", str(tmp_path / "p2"), "--builder", LENET,
                   "--input-spec", "x:float32[batch,1,28,28]")
    assert proc.returncode == 2 and "--trust" in proc.stderr + proc.stdout


def test_cli_exports_a_relative_prefix_from_its_folder(lenet_saves, tmp_path: Path) -> None:
    """`packager export jit/model -o pkg` from the folder holding jit/: the paddle2onnx worker runs
    elsewhere, so the paths it gets must be absolute (issue 18)."""
    import shutil

    shutil.copytree(lenet_saves["jit_pir"].parent, tmp_path / "jit")
    proc = run_cli("export", "jit/model", "-o", "ppkg", "--formats", "paddle_inference,onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "ppkg" / "manifest.json").read_text())
    assert {a["format"] for a in manifest["artifacts"]} == {"paddle_inference", "onnx"}


def test_a_model_file_missing_in_the_converter_is_not_a_conversion_failure(tmp_path: Path) -> None:
    from packager.exporters.paddle import _Worker

    worker = _Worker(tmp_path / "p2o.log")
    try:
        with pytest.raises(SourceError, match="does not exist") as info:
            worker.call({"cmd": "convert", "model": str(tmp_path / "gone" / "net.json"),
                         "params": str(tmp_path / "gone" / "net.pdiparams"), "opset": 13, "optimize": True,
                         "out": str(tmp_path / "out.onnx")})
        assert info.value.exit_code == 2 and "gone" in info.value.subject
    finally:
        worker.close()


def test_generated_output_names_point_to_output_names(lenet_saves, tmp_path: Path) -> None:
    """paddle.jit.save names outputs fetch_name_N: export and inspect say --output-names renames them."""
    source = str(lenet_saves["jit_pir"].with_suffix(""))
    proc = run_cli("export", source, "-o", str(tmp_path / "pkg"), "--formats", "paddle_inference")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in (proc.stderr, run_cli("inspect", str(tmp_path / "pkg")).stderr):
        line = " ".join(text.split())
        assert "output(s) 'fetch_name_0' carry the names the saved Paddle program gave them" in line, text
        assert "export again with --output-names NAME (one name per output, in order)" in line, text
    named = run_cli("export", source, "-o", str(tmp_path / "named"), "--formats", "paddle_inference",
                    "--output-names", "logits")
    assert named.returncode == 0, named.stderr[-2000:]
    assert "--output-names" not in named.stderr
    inspected = run_cli("inspect", str(tmp_path / "named"))
    assert "logits" in inspected.stdout and "--output-names" not in inspected.stderr
