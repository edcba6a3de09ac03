"""Feed validation through a real ONNX Runtime runner: every message names input, expected, got, fix."""

import numpy as np
import pytest

import runtimes
from packager.errors import FeedError


@pytest.fixture(scope="module")
def runner(mlp_onnx_package):
    with runtimes.load(mlp_onnx_package) as r:
        yield r


def _x(n=2, dtype=np.float32):
    return np.ones((n, 16), dtype)


def test_valid_feed_runs(runner):
    assert runner.run({"x": _x()})["output"].shape == (2, 4)


@pytest.mark.parametrize("feeds, fragments", [
    ({}, ["missing ['x']", "pass exactly the inputs ['x']"]),
    ({"x": _x(), "y": _x()}, ["unknown ['y']"]),
    ({"x": _x(dtype=np.float64)}, ["input 'x'", "expected float32, got float64", "may lose information"]),
    ({"x": _x(dtype=np.float16)}, ["expected float32, got float16", "cast='safe'"]),
    ({"x": np.ones(16, np.float32)}, ["wrong rank", "expected 2-D [batch,16]", "array[None]"]),
    ({"x": np.ones((2, 15), np.float32)}, ["dimension 1", "expected 16", "got 15"]),
    ({"x": "text"}, ["is not an array", "got str"]),
])
def test_bad_feeds_are_explained(runner, feeds, fragments):
    with pytest.raises(FeedError) as info:
        runner.run(feeds)
    for fragment in fragments:
        assert fragment in info.value.message
    assert info.value.exit_code == 2


def test_safe_cast_is_opt_in(mlp_onnx_package):
    with runtimes.load(mlp_onnx_package, cast="safe") as r:
        half = r.run({"x": _x(dtype=np.float16)})["output"]
        with pytest.raises(FeedError, match="may lose information"):
            r.run({"x": _x(dtype=np.float64)})  # float64 -> float32 is lossy: never implicit
    with runtimes.load(mlp_onnx_package) as r:
        np.testing.assert_allclose(half, r.run({"x": _x()})["output"])


def test_not_a_mapping(runner):
    with pytest.raises(FeedError, match="dict"):
        runner.run([_x()])
