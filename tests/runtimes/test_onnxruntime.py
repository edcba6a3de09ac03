import numpy as np
import pytest

import runtimes
from packager.errors import DeviceError, InputError, RuntimeLoadError, UsageError
from runtimes.onnxruntime import OnnxRuntimeRunner


def test_load_package_picks_onnx_and_exposes_specs(torch_cnn_package):
    with runtimes.load(torch_cnn_package) as runner:
        assert isinstance(runner, OnnxRuntimeRunner)
        assert [s.name for s in runner.input_specs] == ["x"]
        assert runner.output_specs[0].shape == ("batch", 10)
        assert runner.run({"x": np.zeros((1, 3, 32, 32), np.float32)})["output"].shape == (1, 10)


def test_bare_onnx_file_reads_its_own_signature(torch_cnn_package):
    with runtimes.load(torch_cnn_package / "onnx" / "model.onnx") as runner:
        spec = runner.input_specs[0]
        assert spec.name == "x" and spec.dtype == "float32" and spec.shape == ("batch", 3, 32, 32)
        assert runner.run({"x": np.zeros((5, 3, 32, 32), np.float32)})["output"].shape == (5, 10)


def test_closed_runner_refuses(mlp_onnx_package):
    runner = runtimes.load(mlp_onnx_package)
    runner.close()
    with pytest.raises(UsageError, match="closed"):
        runner.run({"x": np.zeros((1, 16), np.float32)})


def test_cuda_without_gpu_is_an_error_not_a_fallback(mlp_onnx_package):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(DeviceError, match="CUDA execution provider"):
        runtimes.load(mlp_onnx_package, device="cuda")


@pytest.mark.gpu
def test_cuda_runs_on_gpu(mlp_onnx_package):
    with runtimes.load(mlp_onnx_package, device="cuda:0") as runner:
        assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
        assert runner.run({"x": np.zeros((2, 16), np.float32)})["output"].shape == (2, 4)


def test_corrupt_onnx_is_a_load_error(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeLoadError, match="refused to load"):
        runtimes.load(bad)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:1"])
def test_bad_device_names(mlp_onnx_package, device):
    with pytest.raises(UsageError, match="device"):
        runtimes.load(mlp_onnx_package, device=device)


def test_unknown_format_in_package(mlp_onnx_package):
    with pytest.raises(InputError, match="not in this package"):
        runtimes.load(mlp_onnx_package, format="torchscript")


def test_unrecognised_bare_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"")
    with pytest.raises(InputError, match="not a recognised artifact"):
        runtimes.load(f)
