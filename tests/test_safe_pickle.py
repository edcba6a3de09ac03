"""The restricted unpickler: weights load, code never runs."""

from __future__ import annotations

import argparse
import io
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packager.safe_pickle import UnsafePickleError, is_pickle, safe_load, safe_loads


def test_numpy_arrays_dtypes_scalars_and_containers_round_trip() -> None:
    obj = {"w": np.arange(6, dtype="float32").reshape(2, 3), "ids": np.array([1, 2], dtype="int64"),
           "od": OrderedDict(a=np.float16(1.5)), "t": ("eager_tmp_0", np.ones(2)), "s": {1, 2}, "b": b"\x00\x01",
           "n": None, "f": 0.5, "c": 1 + 2j, "nested": [[np.bool_(True)], {"x": "y"}]}
    for protocol in (2, 3, 4, 5):
        back = safe_loads(pickle.dumps(obj, protocol=protocol))
        assert back["w"].dtype == np.float32 and np.array_equal(back["w"], obj["w"])
        assert back["t"][0] == "eager_tmp_0" and back["od"]["a"] == np.float16(1.5)
        assert back["s"] == {1, 2} and back["b"] == b"\x00\x01" and back["c"] == 1 + 2j


def test_paddle_save_files_load(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")
    layer = paddle.nn.Sequential(paddle.nn.Linear(3, 2), paddle.nn.BatchNorm1D(2))
    opt = paddle.optimizer.Adam(parameters=layer.parameters())
    layer(paddle.randn([4, 3])).mean().backward()
    opt.step()
    paddle.save(layer.state_dict(), str(tmp_path / "m.pdparams"))
    paddle.save(opt.state_dict(), str(tmp_path / "m.pdopt"))
    paddle.save({"model": layer.state_dict(), "epoch": 2, "tensor": paddle.ones([2])}, str(tmp_path / "c.pdparams"))
    state = safe_load(tmp_path / "m.pdparams")
    assert set(state) - {"StructuredToParameterName@@"} == set(layer.state_dict())
    np.testing.assert_array_equal(state["0.weight"], layer.state_dict()["0.weight"].numpy())
    assert safe_load(tmp_path / "m.pdopt")
    ckpt = safe_load(tmp_path / "c.pdparams")
    assert ckpt["epoch"] == 2 and np.array_equal(ckpt["tensor"][1], np.ones(2, "float32"))
    assert is_pickle(tmp_path / "m.pdparams")


class _Boom:
    def __reduce__(self):  # pragma: no cover - executed only if the loader were unsafe
        import os

        return (os.system, ("echo pwned > /tmp/packager-safe-pickle-pwned",))


@pytest.mark.parametrize("obj, refused", [
    (_Boom(), "system"),
    (argparse.Namespace(lr=0.1), "argparse.Namespace"),
    ({"state": {"w": np.ones(2)}, "fn": print}, "builtins.print"),
    (getattr, "builtins.getattr"),
])
def test_everything_else_is_refused_before_import(obj, refused: str) -> None:
    data = pickle.dumps(obj, protocol=4)
    with pytest.raises(UnsafePickleError) as info:
        safe_loads(data)
    assert refused in f"{info.value.module}.{info.value.name}"
    assert not Path("/tmp/packager-safe-pickle-pwned").exists()


def test_handwritten_global_opcode_is_refused() -> None:
    # protocol 0 GLOBAL + REDUCE: subprocess.check_output(['id'])
    data = b"csubprocess\ncheck_output\n(](S'id'\natR."
    with pytest.raises(UnsafePickleError):
        safe_loads(data)


def test_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.pdparams"
    path.write_bytes(b"PK\x03\x04zip")
    assert not is_pickle(path)
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(b"\x80\x04garbage")


arrays = st.builds(lambda shape, dt: np.zeros(shape, dtype=dt),
                   st.lists(st.integers(0, 3), max_size=3).map(tuple),
                   st.sampled_from(["float32", "float64", "int64", "int8", "bool", "float16", "uint8"]))
values = st.recursive(st.one_of(arrays, st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
                                st.none(), st.booleans()),
                      lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                        inner, max_size=3),
                                              st.tuples(inner, inner)), max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(values, st.sampled_from([2, 4, 5]))
def test_any_plain_structure_round_trips(value, protocol: int) -> None:
    back = safe_loads(pickle.dumps(value, protocol=protocol))
    _assert_equal(back, value)


def _assert_equal(a, b) -> None:
    if isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
    elif isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in b:
            _assert_equal(a[k], b[k])
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b
