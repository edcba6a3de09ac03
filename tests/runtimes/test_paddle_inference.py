"""Paddle Inference and paddle.jit.load runners on real (untrained, tiny) models."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paddle")
pytestmark = pytest.mark.paddle

import runtimes  # noqa: E402
from packager.errors import DeviceError, FeedError, RuntimeLoadError  # noqa: E402
from tests.conftest import HAS_GPU  # noqa: E402


@pytest.fixture(scope="session")
def lenet_models(session_dir: Path):
    """(layer, {"pir": .json, "legacy": .pdmodel, "v1": folder}) of an untrained LeNet."""
    import paddle

    from sample_models.paddle_models import LeNet, _write_v1_dir, save_layer

    paddle.seed(1)
    layer = LeNet()
    layer.eval()
    root = session_dir / "paddle_runner_models"
    pir = save_layer(layer, (None, 1, 28, 28), root / "pir" / "model")
    legacy = save_layer(layer, (None, 1, 28, 28), root / "legacy" / "model", legacy=True)
    from runtimes._paddle import quiet

    with quiet():
        v1 = _write_v1_dir(legacy, root / "v1")
    return layer, {"pir": pir, "legacy": legacy, "v1": v1}


def _eager(layer, x: np.ndarray) -> np.ndarray:
    import paddle

    with paddle.no_grad():
        return layer(paddle.to_tensor(x)).numpy()


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype("float32")


@pytest.mark.parametrize("program", ["pir", "legacy", "v1"])
def test_paddle_inference_runs_every_program_kind(program: str, lenet_models) -> None:
    layer, paths = lenet_models
    with runtimes.load(paths[program], format="paddle_legacy" if program != "pir" else "paddle_inference") as runner:
        assert runner.runtime == "paddle_inference"
        spec = runner.input_specs[0]
        assert spec.name == "x" and spec.shape == ("batch", 1, 28, 28) and spec.dtype == "float32"
        for n in (1, 5):
            x = _x(n, seed=n)
            out = runner.run({"x": x})
            np.testing.assert_allclose(next(iter(out.values())), _eager(layer, x), rtol=1e-4, atol=1e-5)
        assert any("oneDNN on" in note and "memory optim on" in note for note in runner.notes), runner.notes
        with pytest.raises(FeedError, match="rank"):
            runner.run({"x": x[0]})


def test_options_are_applied_and_reported(lenet_models) -> None:
    _, paths = lenet_models
    with runtimes.load(paths["pir"], runtime="paddle_inference", onednn=False, memory_optim=False,
                       threads=2) as runner:
        assert runner.notes == ["configuration: CPU, oneDNN off, memory optim off, 2 thread(s)"]
        runner.run({"x": _x(2)})


def test_option_strings_parse_by_type(lenet_models) -> None:
    """``onednn="false"`` (as a CLI or a manifest gives it) turns oneDNN off: not a truthy string."""
    _, paths = lenet_models
    with runtimes.load(paths["pir"], runtime="paddle_inference", onednn="false", memory_optim="0",
                       threads="2") as runner:
        assert runner.notes == ["configuration: CPU, oneDNN off, memory optim off, 2 thread(s)"]


def test_refused_configuration_is_retried_and_noted(lenet_models) -> None:
    """Paddle 3.x refuses memory optimisation on a PIR program with the old executor (a real
    Paddle failure): the runner retries without it and says so."""
    layer, paths = lenet_models
    with runtimes.load(paths["pir"], runtime="paddle_inference", new_executor=False) as runner:
        assert any(n.startswith("memory optimisation disabled") for n in runner.notes), runner.notes
        assert runner.notes[-1].startswith("configuration: CPU, oneDNN on, memory optim off")
        x = _x(3)
        np.testing.assert_allclose(next(iter(runner.run({"x": x}).values())), _eager(layer, x), rtol=1e-4, atol=1e-5)


def test_onednn_rejection_is_retried_without_onednn(tmp_path: Path) -> None:
    """A real oneDNN rejection (bilinear interpolate by scale in a PIR program): the runner
    rebuilds the predictor without oneDNN, gives the right answer and says so in its notes."""
    import paddle

    from sample_models.paddle_models import UpsampleHead, save_layer

    paddle.seed(0)
    layer = UpsampleHead()
    path = save_layer(layer, (None, 3, 8, 8), tmp_path / "up" / "model")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32")
    with runtimes.load(path, runtime="paddle_inference") as runner:
        got = next(iter(runner.run({"x": x}).values()))
        assert any(n.startswith("oneDNN disabled: the first run failed") and "ConvertPirAttribute" in n
                   for n in runner.notes), runner.notes
        assert runner.notes[-1].startswith("configuration: CPU, oneDNN off")
        again = next(iter(runner.run({"x": x}).values()))  # stays on the working configuration
    np.testing.assert_allclose(got, _eager(layer, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got, again)


@pytest.mark.parametrize("thread_mode", ["clone", "lock"])
def test_threads_get_correct_results(thread_mode: str, lenet_models) -> None:
    layer, paths = lenet_models
    inputs = [_x(1 + i % 3, seed=i) for i in range(12)]
    want = [_eager(layer, x) for x in inputs]
    errors: list[str] = []
    with runtimes.load(paths["pir"], runtime="paddle_inference", thread_mode=thread_mode) as runner:
        assert runner.thread_safe is (thread_mode == "clone")

        def work(offset: int) -> None:
            for rep in range(3):
                for i in range(offset, len(inputs), 4):
                    got = next(iter(runner.run({"x": inputs[i]}).values()))
                    if not np.allclose(got, want[i], rtol=1e-4, atol=1e-5):
                        errors.append(f"thread {offset} input {i} rep {rep}")

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_unknown_thread_mode(lenet_models) -> None:
    from packager.errors import UsageError

    with pytest.raises(UsageError, match="thread_mode"):
        runtimes.load(lenet_models[1]["pir"], runtime="paddle_inference", thread_mode="pool")


def test_mismatched_params_fail_at_load(lenet_models, tmp_path: Path) -> None:
    import shutil

    _, paths = lenet_models
    shutil.copy(paths["legacy"], tmp_path / "model.pdmodel")
    (tmp_path / "model.pdiparams").write_bytes(b"\x00" * 64)  # truncated / foreign weights
    with pytest.raises(RuntimeLoadError, match="step: load") as info:
        runtimes.load(tmp_path / "model.pdmodel")
    assert "oneDNN on" in info.value.got and "oneDNN off" in info.value.got  # what was tried


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error")
def test_cuda_without_a_cuda_build_is_an_error(lenet_models) -> None:
    _, paths = lenet_models
    for runtime in ("paddle_inference", "paddle_jit"):
        with pytest.raises(DeviceError, match="CUDA build") as info:
            runtimes.load(paths["pir"], runtime=runtime, device="cuda:0")
        assert "--device cpu" in info.value.fix


@pytest.mark.gpu
def test_paddle_inference_on_gpu(lenet_models) -> None:
    layer, paths = lenet_models
    x = _x(4)
    with runtimes.load(paths["pir"], runtime="paddle_inference", device="cuda") as runner:
        got = next(iter(runner.run({"x": x}).values()))
        assert any("GPU 0" in n for n in runner.notes)
    np.testing.assert_allclose(got, _eager(layer, x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("program", ["pir", "legacy"])
def test_paddle_jit_runner(program: str, lenet_models) -> None:
    layer, paths = lenet_models
    with runtimes.load(paths[program], format="paddle_inference", runtime="paddle_jit") as runner:
        x = _x(3)
        np.testing.assert_allclose(next(iter(runner.run({"x": x}).values())), _eager(layer, x), rtol=1e-4, atol=1e-5)
