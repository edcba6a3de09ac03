"""LiteRT runner (runtimes/litert.py): signature runner by name, resized dynamic batch, XNNPACK on or off."""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from packager.errors import FeedError, RuntimeLoadError, UsageError
from runtimes.litert import LiteRtRunner

pytest.importorskip("ai_edge_litert")


def _inputs(package, batch: int) -> dict[str, np.ndarray]:
    from packager.package import Package

    rng = np.random.default_rng(batch)
    return {s.name: rng.normal(size=(batch, *s.shape[1:])).astype(s.dtype)
            for s in Package(package).manifest.signature.inputs}


@pytest.mark.parametrize("xnnpack", [True, False])
def test_batch_is_resized_per_call_with_or_without_xnnpack(keras_tflite_package, xnnpack):
    with runtimes.load(keras_tflite_package, format="tflite", xnnpack=xnnpack) as runner, \
            runtimes.load(keras_tflite_package, format="saved_model") as ref:
        assert isinstance(runner, LiteRtRunner) and f"XNNPACK {'on' if xnnpack else 'off'}" in runner.notes[0]
        for batch in (1, 5, 2, 5):  # grow, shrink, grow again: each a resize and reallocation
            feeds = _inputs(keras_tflite_package, batch)
            got, want = runner.run(feeds), ref.run(feeds)
            for name in want:
                assert got[name].shape[0] == batch
                np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4, err_msg=name)


def test_a_wrong_fixed_axis_is_refused_before_the_interpreter(keras_tflite_package):
    feeds = _inputs(keras_tflite_package, 2)
    name = next(n for n, v in feeds.items() if v.ndim > 1)
    feeds[name] = np.zeros((2, *[d + 1 for d in feeds[name].shape[1:]]), np.float32)
    with runtimes.load(keras_tflite_package, format="tflite") as runner:
        with pytest.raises(FeedError, match="dimension 1 has the wrong size"):
            runner.run(feeds)


def test_cuda_is_refused(keras_tflite_package):
    with pytest.raises(UsageError, match="not one the litert runtime runs on"):
        runtimes.load(keras_tflite_package, format="tflite", device="cuda:0")


def test_corrupt_flatbuffer_is_a_load_error(tmp_path):
    bad = tmp_path / "m.tflite"
    bad.write_bytes(b"TFL3 not a model")
    with pytest.raises(RuntimeLoadError, match="LiteRT refused to load it"):
        runtimes.load(bad)


def test_bare_flatbuffer_reads_its_signature(keras_tflite_package):
    with runtimes.load(keras_tflite_package / "tflite" / "model.tflite") as runner:
        assert {s.shape[0] for s in runner.input_specs} == {"batch"}
        feeds = _inputs(keras_tflite_package, 3)
        assert all(v.shape[0] == 3 for v in runner.run(feeds).values())


def test_a_flatbuffer_with_flex_ops_is_refused_and_reads_no_file(tmp_path):
    """A hostile package's tflite artifact calling TensorFlow's ReadFile (a Flex op) never runs:
    the interpreter has no Flex kernels, whatever --trust says."""
    import tensorflow as tf

    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")

    class ReadsAFile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {"out": x + tf.cast(tf.strings.length(tf.io.read_file(str(secret))), tf.float32)}

    module = ReadsAFile()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    hostile = tmp_path / "model.tflite"
    hostile.write_bytes(converter.convert())
    for trust in (False, True):
        with pytest.raises(RuntimeLoadError, match="FlexReadFile") as caught:
            runtimes.load(hostile, trust=trust)
        assert "TensorFlow (Flex) kernels" in str(caught.value)
