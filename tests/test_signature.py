import numpy as np
import pytest

from packager.errors import SignatureError
from packager.signature import (Signature, TensorSpec, infer_output_specs, parse_input_specs, parse_spec,
                                split_specs)


def test_parse_spec_with_dims_and_range():
    spec, dims = parse_spec("ids:int64[batch,seq=1..64]@0:1000")
    assert spec.name == "ids" and spec.dtype == "int64"
    assert spec.shape == ("batch", "seq")
    assert spec.value_range == (0.0, 1000.0)
    assert dims["seq"].min == 1 and dims["seq"].max == 64
    assert spec.batch_axis == 0
    assert str(spec) == "ids:int64[batch,seq]@0:1000"


@pytest.mark.parametrize("text, fragment", [
    ("x:float32", "cannot be parsed"),
    ("x:float33[batch]", "unknown dtype"),
    ("x:float32[batch,-3]", "neither an integer nor a name"),
    ("x:float32[batch,seq=9..2]", "reversed"),
    ("x:float32[batch]@1:1", "empty"),
])
def test_parse_spec_errors_name_the_problem(text, fragment):
    with pytest.raises(SignatureError) as info:
        parse_spec(text)
    assert fragment in info.value.message


def test_split_specs_keeps_commas_inside_brackets():
    assert split_specs(["a:float32[batch,3] b:int64[batch,seq]", "c:bool[2];d:uint8[1]"]) == [
        "a:float32[batch,3]", "b:int64[batch,seq]", "c:bool[2]", "d:uint8[1]"]


def test_duplicate_inputs_rejected():
    with pytest.raises(SignatureError, match="declared twice"):
        parse_input_specs(["x:float32[batch]", "x:float32[batch]"])


def test_example_inputs_are_seeded_and_fit():
    sig = parse_input_specs(["x:float32[batch,3]", "ids:int64[batch,seq=5]@0:7"])
    a, b = sig.example_inputs(seed=3), sig.example_inputs(seed=3)
    assert a["x"].shape == (4, 3) and a["ids"].shape == (4, 5)
    assert a["ids"].min() >= 0 and a["ids"].max() < 7
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], sig.example_inputs(seed=4)["x"])


def test_output_axes_inferred_from_two_runs():
    # 8 classes equals the seq size of the first run: only the axis that changed is dynamic.
    first = [np.zeros((4, 8), np.float32), np.zeros((4, 8, 8), np.float32)]
    second = [np.zeros((5, 8), np.float32), np.zeros((5, 9, 8), np.float32)]
    specs = infer_output_specs(["logits", "hidden"], first, second, {"batch": 4, "seq": 8}, {"batch": 5, "seq": 9})
    assert specs[0].shape == ("batch", 8)
    assert specs[1].shape == ("batch", "seq", 8)


def test_signature_roundtrip_json():
    sig = Signature(inputs=[TensorSpec(name="x", dtype="float32", shape=("batch", 3))])
    assert Signature.model_validate_json(sig.model_dump_json()) == sig
