"""OpenVINO runner (runtimes/openvino.py): dynamic shapes, explicit fp32, threads, clear refusals."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

import runtimes
from packager.errors import RuntimeLoadError, UsageError
from runtimes.openvino import OpenVinoRunner
from tests.conftest import run_cli

pytest.importorskip("openvino")


def test_dynamic_batch_and_bounded_seq_run_at_fp32(torch_openvino_package):
    with runtimes.load(torch_openvino_package, format="openvino") as runner:
        assert isinstance(runner, OpenVinoRunner)
        # Read back from the compiled model: not the plugin's bf16 default on CPUs that have it.
        assert runner._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
        assert any("inference precision f32" in n for n in runner.notes)
        with runtimes.load(torch_openvino_package, format="onnx") as onnx:
            for batch, seq in [(1, 1), (3, 7), (6, 64)]:
                ids = np.random.default_rng(batch).integers(0, 100, (batch, seq)).astype(np.int64)
                got, want = runner.run({"ids": ids}), onnx.run({"ids": ids})
                assert got["output"].shape == (batch, 4)
                np.testing.assert_allclose(got["output"], want["output"], atol=1e-4, rtol=1e-4)


def test_threads_share_one_compiled_model(torch_openvino_package):
    inputs = [np.random.default_rng(i).integers(0, 100, (2, 5 + i)).astype(np.int64) for i in range(8)]
    with runtimes.load(torch_openvino_package, format="openvino", performance_mode="throughput") as runner:
        assert runner.thread_safe
        alone = [runner.run({"ids": x})["output"] for x in inputs]
        together: list = [None] * len(inputs)

        def work(i: int) -> None:
            for _ in range(5):
                together[i] = runner.run({"ids": inputs[i]})["output"]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_cuda_is_refused_with_the_onnxruntime_alternative(torch_openvino_package):
    with pytest.raises(UsageError, match="not one the openvino runtime runs on") as caught:
        runtimes.load(torch_openvino_package, format="openvino", device="cuda")
    assert "onnxruntime on cuda" in str(caught.value)
    proc = run_cli("run", str(torch_openvino_package), "--format", "openvino", "--device", "cuda",
                   "-i", "unused.npz", "-o", "unused.npz")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_bare_ir_reads_its_signature_and_needs_its_bin(torch_openvino_package, tmp_path):
    ir = tmp_path / "ir"
    shutil.copytree(torch_openvino_package / "openvino", ir)
    with runtimes.load(ir / "model.xml") as runner:
        assert [s.name for s in runner.input_specs] == ["ids"] and runner.input_specs[0].shape[0] == "batch"
        assert runner.run({"ids": np.zeros((2, 3), np.int64)})["output"].shape == (2, 4)
    (ir / "model.bin").unlink()
    with pytest.raises(RuntimeLoadError, match=r"\.bin beside it"):
        runtimes.load(ir / "model.xml")


def test_unknown_precision_is_a_usage_error(torch_openvino_package):
    with pytest.raises(UsageError, match="inference_precision"):
        runtimes.load(torch_openvino_package, format="openvino", inference_precision="f8")
