"""The Keras export-after-training callback, in real model.fit runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

import packager  # noqa: E402
from packager.callbacks.keras import LOG_KEY, PackagerCallback  # noqa: E402
from packager.errors import UsageError  # noqa: E402
from sample_models import tf_models  # noqa: E402

pytestmark = pytest.mark.tensorflow


def _fit(model, callback: PackagerCallback, epochs: int = 3) -> keras.callbacks.History:
    x, y = tf_models.cnn_data(64, seed=1)
    return model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[callback])


@pytest.fixture(scope="module")
def example() -> dict[str, np.ndarray]:
    return {"image": tf_models.cnn_data(4, seed=5)[0]}


def test_exports_when_the_monitored_metric_improves(tmp_path: Path, example, capsys):
    keras.utils.set_random_seed(0)
    model = tf_models.compile_cnn(tf_models.build_cnn())
    callback = PackagerCallback(tmp_path / "pkg", example, monitor="loss", formats=["saved_model"])
    history = _fit(model, callback)
    assert callback.verdicts, "nothing was exported"
    assert all(v.ok for _, v in callback.verdicts), [v.message for _, v in callback.verdicts]
    # one attempt per improving epoch, reported in the epoch logs (History) and on the console
    improving = [e for e, loss in enumerate(history.history["loss"])
                 if loss < min(history.history["loss"][:e], default=np.inf)]
    assert [e for e, _ in callback.verdicts] == improving
    assert history.history[LOG_KEY] == [1.0] * len(improving)
    assert "packager: epoch 1" in capsys.readouterr().out
    # the package is the model of the best epoch (here the last one improved), verified
    assert packager.verify(tmp_path / "pkg").passed
    _, golden = packager.Package(tmp_path / "pkg").golden()
    if improving[-1] == len(history.history["loss"]) - 1:
        np.testing.assert_allclose(golden["logits"], model(example["image"], training=False), atol=1e-5)


def test_exports_at_the_end_without_monitor(tmp_path: Path, example):
    keras.utils.set_random_seed(1)
    model = tf_models.compile_cnn(tf_models.build_cnn())
    callback = PackagerCallback(tmp_path / "pkg", example, verbose=0)
    _fit(model, callback, epochs=2)
    assert [e for e, _ in callback.verdicts] == [None]
    assert callback.verdicts[0][1].ok
    manifest = packager.Package(tmp_path / "pkg").manifest
    assert manifest.formats == ["saved_model", "onnx"]
    _, golden = packager.Package(tmp_path / "pkg").golden()
    np.testing.assert_allclose(golden["logits"], model(example["image"], training=False), atol=1e-5)


class PythonNoise(keras.layers.Layer):
    """Adds a Python-side random number: eager calls differ from any traced graph, so every
    export of a model using it fails parity (a real, not simulated, verification failure)."""

    def call(self, inputs):
        return inputs + float(np.random.default_rng().uniform(1.0, 2.0))


def test_failed_verification_keeps_the_last_good_package(tmp_path: Path, example):
    out = tmp_path / "pkg"
    keras.utils.set_random_seed(2)
    good = tf_models.compile_cnn(tf_models.build_cnn())
    _fit(good, PackagerCallback(out, example, verbose=0, formats=["saved_model"]), epochs=1)
    before = (out / "manifest.json").read_bytes()

    image = keras.Input(tf_models.IMAGE, name="image")
    logits = keras.layers.Dense(tf_models.NUM_CLASSES, name="logits")(
        PythonNoise()(keras.layers.GlobalAveragePooling2D()(image)))
    noisy = tf_models.compile_cnn(keras.Model(image, logits))
    callback = PackagerCallback(out, example, monitor="loss", at_end=True, verbose=0, formats=["saved_model"])
    history = _fit(noisy, callback, epochs=3)
    assert len(history.epoch) == 3, "training must not stop"
    assert callback.verdicts and not any(v.ok for _, v in callback.verdicts)
    message = callback.verdicts[0][1].message
    assert "kept the previous package" in message and "saved_model (tensorflow) output 'logits'" in message, message
    assert 0.0 in history.history[LOG_KEY]
    assert (out / "manifest.json").read_bytes() == before
    assert packager.verify(out).passed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "candidate folders left behind"


def test_bad_mode_is_a_usage_error(tmp_path: Path):
    with pytest.raises(UsageError):
        PackagerCallback(tmp_path / "pkg", monitor="loss", mode="best")


def test_missing_metric_warns_once_and_exports_nothing(tmp_path: Path, example, capsys):
    model = tf_models.compile_cnn(tf_models.build_cnn())
    callback = PackagerCallback(tmp_path / "pkg", example, monitor="val_accuracy")
    _fit(model, callback, epochs=2)
    assert callback.verdicts == []
    assert capsys.readouterr().out.count("is not in the epoch logs") == 1
    assert not (tmp_path / "pkg").exists()
