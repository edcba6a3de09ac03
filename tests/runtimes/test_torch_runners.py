"""TorchScript and torch.export runners (CPU; CUDA where present)."""

import numpy as np
import pytest

import runtimes
from packager.errors import DeviceError

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("fmt, runtime", [("torchscript", "torchscript"), ("torch_export", "torch_export")])
def test_runner_matches_onnx(torch_cnn_package, fmt, runtime):
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with runtimes.load(torch_cnn_package, format="onnx") as ref, runtimes.load(torch_cnn_package, format=fmt) as r:
        assert r.runtime == runtime
        np.testing.assert_allclose(r.run({"x": x})["output"], ref.run({"x": x})["output"], atol=1e-4, rtol=1e-4)


def test_outputs_do_not_alias_inputs(torch_cnn_package):
    x = np.ones((2, 3, 32, 32), np.float32)
    with runtimes.load(torch_cnn_package, format="torchscript") as r:
        first = r.run({"x": x})["output"].copy()
        x[:] = 0
        assert not np.array_equal(r.run({"x": x})["output"], first)


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
def test_cuda_without_gpu_is_an_error(torch_cnn_package, fmt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="cuda:0"):
        runtimes.load(torch_cnn_package, format=fmt, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
def test_cuda_matches_cpu(torch_cnn_package, fmt):
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with runtimes.load(torch_cnn_package, format=fmt) as cpu, runtimes.load(torch_cnn_package, format=fmt,
                                                                              device="cuda:0") as gpu:
        np.testing.assert_allclose(gpu.run({"x": x})["output"], cpu.run({"x": x})["output"], atol=1e-3, rtol=1e-3)
