"""TFLite flatbuffers converted from a package's SavedModel (packager/exporters/tflite.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import packager
from packager.errors import ExportError
from packager.exporters.tflite import op_names, tensor_types
from packager.manifest import MANIFEST_NAME

pytest.importorskip("ai_edge_litert")


def test_flatbuffer_is_converted_from_the_saved_model_unquantised(keras_tflite_package):
    manifest = json.loads((keras_tflite_package / MANIFEST_NAME).read_text())
    arts = {a["format"]: a for a in manifest["artifacts"]}
    assert list(arts) == ["saved_model", "tflite"] and all(p["passed"] for a in arts.values() for p in a["parity"])
    flat = (keras_tflite_package / "tflite" / "model.tflite").read_bytes()
    assert arts["tflite"]["options"]["converted_from"] == "saved_model/"
    # Keras 3 variables: frozen into constants, none left as resource variables.
    assert not op_names(flat) & {"VAR_HANDLE", "READ_VARIABLE"}
    types = tensor_types(flat)
    assert "float32" in types and not types & {"float16", "int8", "uint8"}, types
    assert set(arts["tflite"]["options"]["tensor_types"]) == types


def test_two_inputs_and_two_outputs_are_bound_by_name(keras_two_tower, keras_tflite_package):
    import runtimes

    model, example = keras_two_tower
    eager = model({k: v for k, v in example.items()}, training=False)
    eager = {k: np.asarray(v) for k, v in eager.items()} if isinstance(eager, dict) else None
    with runtimes.load(keras_tflite_package, format="tflite") as runner:
        assert sorted(s.name for s in runner.input_specs) == sorted(example)
        out = runner.run(dict(reversed(list(example.items()))))  # feed order does not matter
    with runtimes.load(keras_tflite_package, format="saved_model") as runner:
        ref = runner.run(example)
    assert set(out) == set(ref) and len(out) == 2
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], atol=1e-4, rtol=1e-4, err_msg=name)
        if eager is not None:
            np.testing.assert_allclose(out[name], eager[name], atol=1e-4, rtol=1e-4, err_msg=name)
    assert packager.verify(keras_tflite_package, formats=["tflite"]).passed


def test_a_model_that_needs_flex_kernels_is_refused_naming_the_op(tmp_path):
    import keras
    import tensorflow as tf

    inp = keras.Input((3, 3), name="m")
    model = keras.Model(inp, keras.layers.Lambda(lambda m: tf.linalg.inv(m))(inp))
    example = {"m": (np.eye(3, dtype=np.float32) * 2)[None].repeat(2, 0)}
    with pytest.raises(ExportError, match="Flex.*MatrixInverse") as caught:
        packager.export(model, example, out=tmp_path / "inv", formats=["tflite"])
    assert "drop tflite from --formats" in str(caught.value)
    assert not (tmp_path / "inv").exists(), "a refused export leaves nothing behind"
