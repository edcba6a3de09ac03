"""One runner shared by 8 threads x 1,000 calls gives exactly the sequential outputs, for every
runtime (issue 7). Models are tiny so 8,000 calls stay cheap; inputs vary in content and batch
size so a call that read another thread's buffers or state would show up as a mismatch."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._integrity import tiny_torch_package

THREADS = 8
CALLS = 1000


def _inputs(name: str, dtype: str = "float32", features: int = 16, count: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(42)
    return [{name: rng.standard_normal((1 + k % 4, features)).astype(dtype)} for k in range(count)]


def hammer(runner: Any, feeds: list[dict[str, np.ndarray]]) -> Counter:
    """Run ``THREADS`` x ``CALLS`` calls on one runner; count outputs that differ from sequential ones."""
    expected = [runner.run(f) for f in feeds]  # sequential reference, same runner
    barrier = threading.Barrier(THREADS)
    problems: Counter = Counter()
    lock = threading.Lock()

    def work(t: int) -> None:
        local: Counter = Counter()
        try:
            barrier.wait()
            for i in range(CALLS):
                k = (t * 7 + i * 3) % len(feeds)
                got = runner.run(feeds[k])
                for name, ref in expected[k].items():
                    if got[name].shape != ref.shape or not np.array_equal(got[name], ref, equal_nan=True):
                        local["mismatch"] += 1
                local["calls"] += 1
        except Exception as exc:  # a crash in a thread must fail the test, not vanish
            local[f"error {type(exc).__name__}: {exc}"] += 1
        with lock:
            problems.update(local)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # And the runner is still sane afterwards.
    for f, ref in zip(feeds, expected):
        for name, value in runner.run(f).items():
            np.testing.assert_array_equal(value, ref[name])
    return problems


def _assert_clean(problems: Counter) -> None:
    assert problems["calls"] == THREADS * CALLS, problems
    assert problems["mismatch"] == 0, problems
    assert set(problems) == {"calls"}, problems


@pytest.fixture(scope="module")
def torch_pkg(session_dir: Path) -> Path:
    return tiny_torch_package(session_dir)


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("torchscript", "torchscript"),
                                          ("torch_export", "torch_export")])
def test_shared_runner_torch_family(torch_pkg: Path, fmt: str, runtime: str) -> None:
    import runtimes

    with runtimes.load(torch_pkg, format=fmt, runtime=runtime) as runner:
        _assert_clean(hammer(runner, _inputs("x")))


# TensorFlow and Paddle run in a child interpreter each: importing paddle after tensorflow in one
# process segfaults (paddle 3.3 / tensorflow 2.21), and the suite imports both.


def tf_package(root: Path) -> Path:
    """A tiny Keras MLP exported as a SavedModel package (built once under ``root``)."""
    import keras

    import packager

    dest = root / "tiny_tf"
    if (dest / "manifest.json").is_file():
        return dest
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,), name="x")
    model = keras.Model(inp, keras.layers.Dense(4, name="y")(keras.layers.Dense(8, activation="relu")(inp)))
    example = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype("float32")}
    return packager.export(model, example, out=dest, formats=["saved_model"]).path


def paddle_package(root: Path) -> Path:
    """A tiny Paddle MLP exported as a Paddle Inference package (built once under ``root``)."""
    import paddle

    import packager

    dest = root / "tiny_paddle"
    if (dest / "manifest.json").is_file():
        return dest
    paddle.seed(0)
    layer = paddle.nn.Sequential(paddle.nn.Linear(16, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 4))
    layer.eval()
    example = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype("float32")}
    return packager.export(layer, example, out=dest, formats=["paddle_inference"]).path


CHILD_CASES = {"tensorflow": (tf_package, "saved_model", "tensorflow", {}),
               "paddle_inference": (paddle_package, "paddle_inference", "paddle_inference", {}),
               "paddle_inference_clone": (paddle_package, "paddle_inference", "paddle_inference",
                                          {"thread_mode": "clone"}),
               "paddle_jit": (paddle_package, "paddle_inference", "paddle_jit", {})}


def _child(case: str, root: str) -> None:
    """Entry point of the child interpreter: build, hammer, print the counts as JSON."""
    import json

    import runtimes

    build, fmt, runtime, options = CHILD_CASES[case]
    pkg = build(Path(root))
    from packager.package import Package

    if runtime not in Package(pkg).manifest.artifact(fmt).runtimes:
        print(json.dumps({"skip": f"the {fmt} artifact does not list {runtime}"}))
        return
    with runtimes.load(pkg, format=fmt, runtime=runtime, **options) as runner:
        print(json.dumps(dict(hammer(runner, _inputs(runner.signature.inputs[0].name)))))


@pytest.mark.parametrize("case", [pytest.param("tensorflow", marks=pytest.mark.tensorflow),
                                  pytest.param("paddle_inference", marks=pytest.mark.paddle),
                                  pytest.param("paddle_inference_clone", marks=pytest.mark.paddle),
                                  pytest.param("paddle_jit", marks=pytest.mark.paddle)])
def test_shared_runner_other_frameworks(case: str, session_dir: Path) -> None:
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    framework = "tensorflow" if case == "tensorflow" else "paddle"
    module = f"runtimes.{CHILD_CASES[case][2]}"
    if importlib.util.find_spec(framework) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{framework} or {module} is not installed")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "tests.test_concurrency", case, str(session_dir)], cwd=root,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in counts:
        pytest.skip(counts["skip"])
    _assert_clean(Counter(counts))


if __name__ == "__main__":
    import sys

    _child(sys.argv[1], sys.argv[2])
