"""TensorFlow/Keras sources (every save path) and formats, through real TF, tf2onnx and ONNX Runtime."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402  (after the skip: Keras 3 ships with TensorFlow)
import onnx  # noqa: E402

import packager  # noqa: E402
from packager.errors import SourceError, TrustRequiredError, UsageError  # noqa: E402
from packager.exporters import detect_framework  # noqa: E402
from sample_models import tf_models  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

pytestmark = pytest.mark.tensorflow
CNN = "sample_models.tf_models:build_cnn"
TWO = "sample_models.tf_models:build_two_tower"
ROOT = Path(__file__).resolve().parents[2]


def _eager(model, example: dict) -> list[np.ndarray]:
    """``model(x, training=False)``: the reference every format is held to."""
    inputs = [example[t.name] for t in model.inputs]
    out = model(inputs[0] if len(inputs) == 1 else inputs, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _golden_matches(pkg: Path, reference: list[np.ndarray], atol: float = 1e-5) -> None:
    package = packager.Package(pkg)
    _, outputs = package.golden()
    names = package.manifest.signature.output_names
    assert len(names) == len(reference)
    for name, ref in zip(names, reference):
        np.testing.assert_allclose(outputs[name], ref, atol=atol, rtol=1e-5, err_msg=name)


def _check_artifacts(pkg: Path, inputs: list[str], outputs: list[str]) -> None:
    """The SavedModel signature and the ONNX graph carry the manifest's names and a dynamic batch."""
    manifest = packager.Package(pkg).manifest
    assert manifest.signature.input_names == inputs
    assert manifest.signature.output_names == outputs
    assert all(s.shape[0] == "batch" for s in [*manifest.signature.inputs, *manifest.signature.outputs])
    assert not any(re.match(r"keras_tensor", n) for n in inputs + outputs)
    if "saved_model" in manifest.formats:
        sig = tf.saved_model.load(str(pkg / "saved_model")).signatures["serving_default"]
        _, kwargs = sig.structured_input_signature
        assert sorted(kwargs) == sorted(inputs)
        assert all(spec.shape[0] is None for spec in kwargs.values())
        assert sorted(sig.structured_outputs) == sorted(outputs)
    if "onnx" in manifest.formats:
        model = onnx.load(str(pkg / "onnx" / "model.onnx"))
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
        for value in model.graph.input:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


# --- detection ---------------------------------------------------------------------------------
def test_owns_and_claims_do_not_import_tensorflow(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"")
    code = ("import sys; from pathlib import Path; import packager.exporters.tensorflow as t; "
            f"assert t.claims(Path({str(tmp_path / 'm.keras')!r})); assert not t.owns(object()); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported TF'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_detects_keras_models_and_saves(keras_cnn, tmp_path):
    model, _ = keras_cnn
    assert detect_framework(model) == "tensorflow"
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    model.export(str(tmp_path / "sm"), verbose=False)
    for path in ("m.keras", "m.weights.h5", "sm", "."):  # "." holds ModelCheckpoint-like files
        assert detect_framework(tmp_path / path) == "tensorflow", path
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError):
        detect_framework(tmp_path / "empty")


# --- in-memory models ---------------------------------------------------------------------------
def test_in_memory_cnn_every_format_in_inference_mode(keras_cnn, keras_cnn_package):
    model, example = keras_cnn
    manifest = packager.Package(keras_cnn_package).manifest
    assert manifest.formats == ["saved_model", "onnx"]
    assert all(a.passed for a in manifest.artifacts)
    assert manifest.source.kind == "in_memory"
    _check_artifacts(keras_cnn_package, ["image"], ["logits"])
    reference = _eager(model, example)
    _golden_matches(keras_cnn_package, reference)
    # Dropout and BatchNorm make training mode differ: the golden data is really inference mode.
    # (on a copy: a training-mode call updates BatchNorm's moving statistics of the shared model)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    training = np.asarray(copy(example["image"], training=True))
    assert np.abs(training - reference[0]).max() > 1e-3
    # NHWC is kept (no transposes) and recorded for both formats.
    for art in manifest.artifacts:
        assert art.options["layout"] == {"image": "NHWC"}
    assert manifest.signature.inputs[0].shape == ("batch", 16, 16, 3)


def test_two_inputs_two_outputs_keep_every_name(keras_two_tower, keras_two_tower_package):
    model, example = keras_two_tower
    _check_artifacts(keras_two_tower_package, ["image", "tabular"], ["class_logits", "score"])
    _golden_matches(keras_two_tower_package, _eager(model, example))
    manifest = packager.Package(keras_two_tower_package).manifest
    assert manifest.artifact("onnx").options["layout"] == {"image": "NHWC"}  # tabular has no layout
    for fmt in manifest.formats:
        with packager.load(keras_two_tower_package, format=fmt) as runner:
            x = tf_models.two_tower_data(5, seed=9)[0]
            got = runner.run(x)
        for name, ref in zip(["class_logits", "score"], _eager(model, x)):
            np.testing.assert_allclose(got[name], ref, atol=1e-5, rtol=1e-5, err_msg=f"{fmt} {name}")


def test_tf_module_with_signature(tmp_path):
    class Affine(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.arange(12, dtype=np.float32).reshape(4, 3) / 10)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def __call__(self, features):
            return {"scores": tf.matmul(features, self.w), "total": tf.reduce_sum(features, axis=1, keepdims=True)}

    module = Affine()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    result = packager.export(module, {"features": x}, out=tmp_path / "pkg")
    assert result.passed
    _check_artifacts(result.path, ["features"], ["scores", "total"])
    _golden_matches(result.path, [x @ module.w.numpy(), x.sum(axis=1, keepdims=True)])

    class TwoArgs(tf.Module):  # unnamed specs: inputs take the Python argument names
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, left, right):
            return left * 2.0 - right

    result = packager.export(TwoArgs(), {"left": x, "right": x + 1}, out=tmp_path / "two", formats=["onnx"])
    assert result.manifest.signature.input_names == ["left", "right"]
    _golden_matches(result.path, [x * 2.0 - (x + 1)])


def test_sequential_and_subclassed_models_get_clean_names(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    keras.utils.set_random_seed(0)
    seq = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3), keras.layers.Dropout(0.5),
                            keras.layers.Dense(2)])
    result = packager.export(seq, x, out=tmp_path / "seq", formats=["saved_model"])  # a bare array
    name = result.manifest.signature.input_names[0]
    assert seq.inputs[0].name.startswith("keras_tensor")  # what Keras calls the tensor...
    assert name.startswith("input_layer")  # ...and the InputLayer's name, which the manifest uses
    _golden_matches(result.path, [np.asarray(seq(x, training=False))])

    class Heads(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.drop = keras.layers.Dropout(0.5)

        def call(self, features, training=False):
            h = self.drop(self.dense(features), training=training)
            return {"main": h, "aux": self.dense(features) * 2.0}

    heads = Heads()
    heads(x)
    result = packager.export(heads, {"features": x}, out=tmp_path / "sub")
    assert result.passed
    _check_artifacts(result.path, ["features"], ["main", "aux"])
    ref = heads(x, training=False)
    _golden_matches(result.path, [np.asarray(ref["main"]), np.asarray(ref["aux"])])


def test_layer_state_held_as_tensors_is_frozen_into_the_onnx_graph(tmp_path):
    """A Normalization layer keeps its mean/variance as captured tensors, not variables (as in
    keras.applications.EfficientNet); tf2onnx used to leave them as extra graph inputs."""
    tf.random.set_seed(0)
    model = keras.Sequential([keras.Input((4,), name="x"),
                              keras.layers.Normalization(mean=[1.0, 2.0, 3.0, 4.0], variance=[1.0, 4.0, 9.0, 16.0]),
                              keras.layers.Dense(3)])
    x = np.random.default_rng(0).normal(2.0, 3.0, (5, 4)).astype(np.float32)
    packager.export(model, {"x": x}, out=tmp_path / "pkg", formats=["onnx"])
    graph = onnx.load(str(tmp_path / "pkg" / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}] == ["x"]
    assert packager.verify(str(tmp_path / "pkg")).exit_code == 0
    import runtimes

    with runtimes.load(str(tmp_path / "pkg"), format="onnx") as runner:
        got = next(iter(runner.run({"x": x[:3]}).values()))
    np.testing.assert_allclose(got, _eager(model, {"x": x[:3]})[0], atol=1e-5)


def test_input_spec_only_and_opset_choice(keras_cnn, tmp_path):
    model, _ = keras_cnn
    result = packager.export(model, out=tmp_path / "pkg", formats=["onnx"], opset=13,
                             input_spec=["image:float32[batch,16,16,3]"])
    assert result.passed
    art = result.manifest.artifact("onnx")
    assert art.options["opset"] == 13
    proto = onnx.load(str(result.path / art.path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    with pytest.raises(UsageError, match="not supported by tf2onnx") as info:
        packager.export(model, out=tmp_path / "bad", formats=["onnx"], opset=99)
    assert info.value.expected == "7..18"
    # An old opset (tf2onnx lists the weights as graph inputs too): only the real feeds are checked.
    old = packager.export(model, out=tmp_path / "old", formats=["onnx"], opset=8)
    assert old.passed


def test_wrong_example_names_are_a_usage_error(keras_two_tower, tmp_path):
    model, example = keras_two_tower
    with pytest.raises(UsageError, match="not named like the model's inputs"):
        packager.export(model, {"a": example["image"], "b": example["tabular"]}, out=tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


# --- every save path ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saves(keras_cnn, keras_two_tower, tmp_path_factory) -> Path:
    """The two samples saved every way a training script saves a Keras model."""
    root = tmp_path_factory.mktemp("tf_saves")
    for name, (model, _) in (("cnn", keras_cnn), ("two", keras_two_tower)):
        model.save(root / f"{name}.keras")
        model.save(root / f"{name}.h5")  # legacy HDF5 full model
        model.save_weights(root / f"{name}.weights.h5")
        model.export(str(root / f"{name}_export"), verbose=False)  # Keras 3 SavedModel
    tf.saved_model.save(keras_two_tower[0], str(root / "two_tf_saved"))
    return root


SOURCE_CASES = [
    ("cnn", "cnn.keras", {}, "full_model"),
    ("cnn", "cnn.h5", {}, "legacy_h5"),
    ("cnn", "cnn.weights.h5", {"builder": CNN}, "weights"),
    ("cnn", "cnn.keras", {"builder": CNN}, "keras_weights"),
    ("cnn", "cnn_export", {}, "saved_model"),
    ("two", "two.keras", {}, "full_model"),
    ("two", "two.h5", {}, "legacy_h5"),
    ("two", "two.weights.h5", {"builder": TWO}, "weights"),
    ("two", "two_export", {}, "saved_model"),
]


@pytest.mark.parametrize("sample,file,kwargs,kind", SOURCE_CASES, ids=[c[1] + ("+builder" if c[2] else "")
                                                                       for c in SOURCE_CASES])
def test_every_save_exports_and_matches(sample, file, kwargs, kind, saves, keras_cnn, keras_two_tower, tmp_path):
    model, example = keras_cnn if sample == "cnn" else keras_two_tower
    result = packager.export(saves / file, example, out=tmp_path / "pkg", **kwargs)
    assert result.passed, [(a.format, a.parity) for a in result.manifest.artifacts]
    assert result.manifest.source.kind == kind
    assert result.manifest.source.path == str(saves / file)
    _golden_matches(result.path, _eager(model, example))
    keras_names = (["image"], ["logits"]) if sample == "cnn" else (["image", "tabular"], ["class_logits", "score"])
    if kind == "saved_model":  # model.export names outputs output_0...; inputs keep the Keras names
        outputs = [f"output_{i}" for i in range(len(keras_names[1]))] if sample == "two" else ["output_0"]
        _check_artifacts(result.path, keras_names[0], outputs)
    else:
        _check_artifacts(result.path, *keras_names)


def test_tf_saved_model_save_of_a_keras_model(saves, keras_two_tower, tmp_path):
    model, example = keras_two_tower
    # tf.saved_model.save names a Keras 3 model's inputs after its call arguments.
    renamed = {"inputs": example["image"], "inputs_1": example["tabular"]}
    result = packager.export(saves / "two_tf_saved", renamed, out=tmp_path / "pkg")
    assert result.passed
    assert result.manifest.signature.input_names == ["inputs", "inputs_1"]
    _golden_matches(result.path, _eager(model, example))


@pytest.fixture(scope="module")
def multi_signature(keras_cnn, tmp_path_factory) -> Path:
    model, _ = keras_cnn
    spec = tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")
    module = tf.Module()
    module.model = model
    logits = tf.function(lambda image: {"logits": model(image, training=False)}, input_signature=[spec])
    probs = tf.function(lambda image: {"probs": tf.nn.softmax(model(image, training=False))}, input_signature=[spec])
    path = tmp_path_factory.mktemp("multi") / "sm"
    tf.saved_model.save(module, str(path), signatures={"serving_default": logits.get_concrete_function(),
                                                       "probs": probs.get_concrete_function()})
    return path


def test_saved_model_signature_choice(multi_signature, keras_cnn, tmp_path):
    model, example = keras_cnn
    default = packager.export(multi_signature, example, out=tmp_path / "default", formats=["saved_model"])
    assert default.manifest.signature.output_names == ["logits"]
    chosen = packager.export(multi_signature, example, out=tmp_path / "probs", signature_key="probs")
    assert chosen.passed
    _check_artifacts(chosen.path, ["image"], ["probs"])
    _golden_matches(chosen.path, [tf.nn.softmax(_eager(model, example)[0]).numpy()])
    with pytest.raises(SourceError, match="has no signature 'nope'") as info:
        packager.export(multi_signature, example, out=tmp_path / "bad", signature_key="nope")
    assert "probs" in str(info.value.expected) and "serving_default" in str(info.value.expected)


def test_weights_only_needs_a_fitting_builder(saves, keras_cnn, tmp_path):
    _, example = keras_cnn
    with pytest.raises(UsageError, match="weights only") as info:
        packager.export(saves / "cnn.weights.h5", example, out=tmp_path / "a")
    assert "--builder" in info.value.fix
    with pytest.raises(SourceError, match="do not fit the builder"):
        packager.export(saves / "cnn.weights.h5", example, out=tmp_path / "b", builder=TWO)


def test_broken_files_are_source_errors(tmp_path, keras_cnn):
    _, example = keras_cnn
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    for name in ("bad.keras", "bad.h5"):
        with pytest.raises(SourceError):
            packager.export(tmp_path / name, example, out=tmp_path / f"out_{name}")
    with pytest.raises(SourceError, match="not a Keras model or tf.Module"):
        packager.export({"not": "a model"}, example, out=tmp_path / "obj", framework="tensorflow")


# --- code in the file: safe mode and --trust --------------------------------------------------
@pytest.fixture(scope="module")
def code_saves(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("code")
    x = keras.Input((4,), name="x")
    lam = keras.Model(x, keras.layers.Dense(2, name="y")(keras.layers.Lambda(lambda t: t * 2.0)(x)))
    lam.save(root / "lambda.keras")
    lam.save(root / "lambda.h5")
    tf_models.build_two_tower_custom().save(root / "custom.keras")
    return root


@pytest.mark.parametrize("file", ["lambda.keras", "lambda.h5", "custom.keras"])
def test_code_in_the_file_needs_trust(file, code_saves, tmp_path):
    with pytest.raises(TrustRequiredError, match="needs code to load") as info:
        packager.export(code_saves / file, out=tmp_path / "pkg")
    assert "--trust" in info.value.fix
    assert ("Lambda" if file.startswith("lambda") else "Scale") in info.value.problem
    result = packager.export(code_saves / file, out=tmp_path / "pkg", trust=True)
    assert result.passed


@pytest.mark.slow  # two fresh processes, each importing TensorFlow
def test_cli_trust_imports_the_custom_layer_module(code_saves, tmp_path):
    """A fresh process: --trust imports the module named in the file to register the custom class."""
    refused = run_cli("export", str(code_saves / "custom.keras"), "--out", str(tmp_path / "refused"), cwd=ROOT)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--trust" in refused.stdout + refused.stderr
    proc = run_cli("export", str(code_saves / "custom.keras"), "--out", str(tmp_path / "pkg"), "--trust", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["signature"]["inputs"]] == ["image", "tabular"]
    assert "oneDNN" not in proc.stderr and "cuda drivers" not in proc.stderr  # TF's banners are silenced


def test_cli_signature_option(multi_signature, keras_cnn, tmp_path):
    _, example = keras_cnn
    np.savez(tmp_path / "x.npz", **example)
    proc = run_cli("export", str(multi_signature), "--out", str(tmp_path / "pkg"), "--signature", "probs",
                   "--example-inputs", str(tmp_path / "x.npz"), "--formats", "saved_model", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert [o["name"] for o in manifest["signature"]["outputs"]] == ["probs"]
    assert manifest["extra"]["source_options"] == {"signature_key": "probs"}
    # The eager reference reloads the same signature, not serving_default.
    report = packager.verify(tmp_path / "pkg", reference="eager", source=multi_signature)
    assert report.passed, report.to_dict()


# --- ModelCheckpoint --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    (root / "best").mkdir()
    (root / "weights").mkdir()
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(root / "best" / "best.keras"), monitor="loss", save_best_only=True),
        keras.callbacks.ModelCheckpoint(str(root / "weights" / "ep{epoch:02d}-loss{loss:.4f}.weights.h5"),
                                        monitor="loss", save_weights_only=True),
    ]
    tf_models.train_cnn(seed=3, epochs=3, n=96, callbacks=callbacks)
    return root


def test_model_checkpoint_full_model_folder(checkpoints, keras_cnn, tmp_path):
    _, example = keras_cnn
    result = packager.export(checkpoints / "best", example, out=tmp_path / "pkg")
    assert result.passed
    assert result.manifest.source.path == str(checkpoints / "best" / "best.keras")
    assert result.manifest.source.kind.startswith("checkpoint")
    saved = keras.saving.load_model(checkpoints / "best" / "best.keras")
    _golden_matches(result.path, _eager(saved, example))
    # pointing at the file ModelCheckpoint wrote works the same way
    direct = packager.export(checkpoints / "best" / "best.keras", example, out=tmp_path / "file",
                             formats=["saved_model"])
    assert direct.manifest.source.kind == "full_model"
    _golden_matches(direct.path, _eager(saved, example))


def test_model_checkpoint_weights_folder_picks_the_best(checkpoints, keras_cnn, tmp_path):
    _, example = keras_cnn
    files = sorted((checkpoints / "weights").glob("*.weights.h5"))
    assert len(files) == 3
    losses = {f: float(re.search(r"loss([0-9.]+)\.weights", f.name).group(1)) for f in files}
    best = min(files, key=losses.get)
    result = packager.export(checkpoints / "weights", example, out=tmp_path / "best", builder=CNN,
                             options={"monitor": "loss"})
    assert result.passed
    assert result.manifest.source.path == str(best)
    assert any("picked" in line and best.name in line for line in result.manifest.extra["export_log"])
    model = tf_models.build_cnn()
    model.load_weights(best)
    _golden_matches(result.path, _eager(model, example))
    newest = packager.export(checkpoints / "weights", example, out=tmp_path / "newest", builder=CNN)
    assert newest.manifest.source.path == str(files[-1])  # ep03: written last


def test_inspect_shows_the_recorded_layout_of_image_inputs(keras_cnn_package):
    """A Keras image model is channels_last: inspect says NHWC beside the input, so a user who
    feeds NCHW arrays (the torch habit) sees why before running it."""
    from tests.conftest import run_cli

    proc = run_cli("inspect", str(keras_cnn_package))
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "dtype" in line and "shape" in line)
    assert "layout" in header, proc.stdout
    image = next(line for line in proc.stdout.splitlines() if " image " in f" {line} ")
    assert "NHWC" in image, proc.stdout
