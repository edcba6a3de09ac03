"""The TensorFlow SavedModel runner on real exported packages."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import packager  # noqa: E402
import runtimes  # noqa: E402
from packager.errors import DeviceError, FeedError, RuntimeLoadError, UsageError  # noqa: E402
from runtimes.tensorflow import TensorFlowRunner  # noqa: E402
from sample_models import tf_models  # noqa: E402

pytestmark = pytest.mark.tensorflow


def _eager(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


def test_runs_the_package_saved_model_at_any_batch(keras_cnn, keras_cnn_package):
    model, _ = keras_cnn
    with runtimes.load(keras_cnn_package, format="saved_model") as runner:
        assert isinstance(runner, TensorFlowRunner)
        assert runner.runtime == "tensorflow" and runner.signature_key == "serving_default"
        assert [s.name for s in runner.input_specs] == ["image"]
        for batch in (1, 7):
            x = tf_models.cnn_data(batch, seed=batch)[0]
            got = runner.run({"image": x})
            assert list(got) == ["logits"]
            assert got["logits"].shape == (batch, tf_models.NUM_CLASSES)
            np.testing.assert_allclose(got["logits"], _eager(model, x), atol=1e-5, rtol=1e-5)


def test_golden_data_passes_verify(keras_cnn_package, keras_two_tower_package):
    for pkg in (keras_cnn_package, keras_two_tower_package):
        report = packager.verify(pkg)
        assert report.passed, report.to_dict()
        assert {row.parity.runtime for row in report.rows} == {"tensorflow", "onnxruntime"}


def test_bare_saved_model_reads_its_own_signature(keras_two_tower, keras_two_tower_package):
    model, example = keras_two_tower
    with runtimes.load(keras_two_tower_package / "saved_model") as runner:
        assert runner.signature.input_names == ["image", "tabular"]
        assert runner.signature.output_names == ["class_logits", "score"]
        assert runner.signature.input("image").shape == ("batch", 16, 16, 3)
        got = runner.run(example)
    ref = model([example["image"], example["tabular"]], training=False)
    np.testing.assert_allclose(got["class_logits"], ref[0], atol=1e-5)
    np.testing.assert_allclose(got["score"], ref[1], atol=1e-5)


def test_missing_signature_is_a_clear_error(keras_cnn_package):
    with pytest.raises(RuntimeLoadError, match="has no signature 'predict'") as info:
        TensorFlowRunner(keras_cnn_package / "saved_model", signature_key="predict")
    assert info.value.expected == ["serving_default"]
    with pytest.raises(RuntimeLoadError, match="no saved_model.pb"):
        TensorFlowRunner(keras_cnn_package / "onnx")


def test_feeds_are_validated(keras_cnn_package):
    with runtimes.load(keras_cnn_package, format="saved_model") as runner:
        with pytest.raises(FeedError, match="input names"):
            runner.run({"x": np.zeros((1, 16, 16, 3), np.float32)})
        with pytest.raises(FeedError, match="NCHW vs NHWC"):
            runner.run({"image": np.zeros((1, 3, 16, 16), np.float32)})
        with pytest.raises(FeedError, match="dtype"):
            runner.run({"image": np.zeros((1, 16, 16, 3), np.float64)})
    with pytest.raises(UsageError, match="closed"):
        runner.run({"image": np.zeros((1, 16, 16, 3), np.float32)})


def test_concurrent_calls_agree(keras_cnn_package):
    xs = [tf_models.cnn_data(3, seed=s)[0] for s in range(4)]
    with runtimes.load(keras_cnn_package, format="saved_model") as runner:
        expected = [runner.run({"image": x})["logits"] for x in xs]
        results: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            for _ in range(5):
                results[i] = runner.run({"image": xs[i]})["logits"]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, ref in enumerate(expected):
        np.testing.assert_array_equal(results[i], ref)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="TensorFlow sees a GPU here")
def test_cuda_without_a_visible_gpu_is_a_device_error(keras_cnn_package):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="not available to tensorflow") as info:
            runtimes.load(keras_cnn_package, format="saved_model", device=device)
        assert "--device cpu" in info.value.fix


@pytest.mark.gpu
def test_runs_on_gpu(keras_cnn, keras_cnn_package):
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("this TensorFlow build sees no GPU")
    model, example = keras_cnn
    with runtimes.load(keras_cnn_package, format="saved_model", device="cuda:0") as runner:
        assert "/GPU:0" in " ".join(runner.notes)
        got = runner.run(example)["logits"]
    np.testing.assert_allclose(got, _eager(model, example["image"]), atol=1e-4, rtol=1e-4)
    gpus = len(tf.config.list_physical_devices("GPU"))
    with pytest.raises(DeviceError):
        runtimes.load(keras_cnn_package, format="saved_model", device=f"cuda:{gpus}")


def test_saved_model_from_keras_export_runs_bare(keras_cnn, tmp_path: Path):
    model, example = keras_cnn
    model.export(str(tmp_path / "sm"), verbose=False)
    with runtimes.load(tmp_path / "sm") as runner:
        assert runner.signature.input_names == ["image"]
        got = runner.run(example)
    np.testing.assert_allclose(got["output_0"], _eager(model, example["image"]), atol=1e-5)
