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


def test_dimension_with_a_step():
    spec, infos = parse_spec("x:float32[batch,3,h=3..127/2,w=4..128/2]")
    h, w = infos["h"], infos["w"]
    assert (h.min, h.max, h.step) == (3, 127, 2) and w.step == 2
    assert h.allows(5) and not h.allows(4) and not h.allows(129) and w.allows(128) and not w.allows(7)
    assert h.snap(10) == 9 and w.snap(200) == 128 and w.snap(1) == 4 and h.example_size("h") == 7
    assert w.top == 128 and parse_spec("x:float32[h=2..9/2]")[1]["h"].top == 8
    for bad in ("x:float32[batch=2..8/2]", "x:float32[h=2..8/1]"):
        with pytest.raises(SignatureError, match="step must be 2 or more"):
            parse_spec(bad)
    with pytest.raises(SignatureError, match="neither an integer nor a name"):
        parse_spec("x:float32[h=8/2]")  # a step needs a range


def test_second_sizes_keep_equal_dimensions_apart():
    """A square image's h and w must change differently between the two eager runs, or an output
    axis cannot tell which one it follows (it was named h twice)."""
    from packager.exporting import second_sizes

    sig = parse_input_specs(["x:float32[batch,3,h=4..128/2,w=4..128/2]"])
    for how in ("double", "step"):
        other = second_sizes(sig, {"batch": 2, "h": 32, "w": 32}, how)
        assert other["h"] != other["w"] and all(sig.dim(d).allows(other[d]) for d in ("h", "w")), (how, other)
    outs = infer_output_specs(["y"], [np.zeros((2, 3, 32, 32))], [np.zeros((2, 3, 64, 34))],
                              {"batch": 2, "h": 32, "w": 32}, {"batch": 2, "h": 64, "w": 34})
    assert outs[0].shape == (2, 3, "h", "w")
