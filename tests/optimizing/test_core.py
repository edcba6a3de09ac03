"""packager optimize on real models with the real libraries: fp16 (onnxconverter-common), int8
dynamic and static QDQ (onnxruntime.quantization), the budget search, what the manifest records,
and that verify and run take the new artifacts as they are."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from packager.errors import FidelityError, UsageError
from packager.fidelity.budget import DEFAULT_BUDGETS
from packager.manifest import MANIFEST_NAME
from packager.optimizing import optimize
from tests.conftest import run_cli

pytest.importorskip("onnxruntime.quantization")
onnx = pytest.importorskip("onnx")


def _model(package, fmt):
    manifest = json.loads((package / MANIFEST_NAME).read_text())
    art = next(a for a in manifest["artifacts"] if a["format"] == fmt)
    return onnx.load(str(package / art["path"])), art


def test_dynamic_int8_that_breaks_the_model_is_caught(outlier_package, outlier_calibration, copy_of) -> None:
    package = copy_of(outlier_package)
    before = (package / MANIFEST_NAME).read_bytes()
    proc = run_cli("optimize", str(package), "--precision", "int8", "--method", "dynamic",
                   "--calibration", str(outlier_calibration), "--max-tries", "1")
    assert proc.returncode == 1, proc.stderr
    assert "misses the budget cosine>=0.99" in proc.stderr and "Traceback" not in proc.stderr
    # The figure that failed is given (the quantised first layer leaves cosine far below 0.99).
    cosine = float(proc.stderr.split("cosine ")[1].split()[0])
    assert cosine < 0.9
    assert (package / MANIFEST_NAME).read_bytes() == before
    assert not (package / "onnx_int8").exists()


def test_budget_search_keeps_the_costly_layer_and_recovers(outlier_package, outlier_calibration, copy_of) -> None:
    package = copy_of(outlier_package)
    result = optimize(package, precision="int8", method="dynamic", calibration=outlier_calibration,
                      budget="cosine>=0.99", measure_speed=False)
    first, last = result.attempts[0], result.attempts[-1]
    assert not first.passed and first.figures["calibration"]["output"]["cosine"] < 0.9
    assert last.passed and last.figures["calibration"]["output"]["cosine"] >= 0.99
    record = result.artifact.options["optimization"]
    fp32, _ = _model(package, "onnx")
    first_layer = next(n.name for n in fp32.graph.node if "x" in n.input)
    # The layer reading the outlier feature is the one kept out of quantisation, and first.
    assert record["kept"][0]["node"] == first_layer and "1-cosine" in record["kept"][0]["why"]
    assert first_layer not in record["changed_nodes"] and record["nodes_quantized"] >= 1
    assert len(record["tries"]) == len(result.attempts) and record["budget"] == "cosine>=0.99"
    x = np.load(outlier_calibration)["x"]
    digest = hashlib.sha256(b"x" + np.ascontiguousarray(x).tobytes()).hexdigest()
    assert record["calibration"]["sha256"] == digest and record["calibration"]["rows"] == 128

    proc = run_cli("verify", str(package), "--format", "onnx_int8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "budget cosine>=0.99" in proc.stdout

    out = package.parent / "int8_out.npz"
    proc = run_cli("run", str(package), "--format", "onnx_int8", "-i", str(outlier_calibration), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert np.load(out)["output"].shape == (128, 10)


def test_static_int8_cnn_is_qdq_and_verifies(torch_cnn_package, cnn_calibration, copy_of) -> None:
    package = copy_of(torch_cnn_package)
    result = optimize(package, precision="int8", calibration=cnn_calibration, measure_speed=False)
    model, art = _model(package, "onnx_int8")
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    record = art["options"]["optimization"]
    assert record["method"] == "static" and record["format"] == "QDQ" and record["per_channel"] is True
    assert record["nodes_quantized"] >= 2 and record["budget"] == DEFAULT_BUDGETS["int8"]
    assert result.passed and art["parity"][0]["passed"]
    assert "budget" in " ".join(art["parity"][0]["notes"])
    assert run_cli("verify", str(package), "--format", "onnx_int8").returncode == 0


def test_fp16_cnn_has_fp16_weights_and_fp32_io(torch_cnn_package, cnn_calibration, copy_of) -> None:
    package = copy_of(torch_cnn_package)
    result = optimize(package, precision="fp16", calibration=cnn_calibration)
    model, art = _model(package, "onnx_fp16")
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    record = art["options"]["optimization"]
    assert record["figures"]["calibration"]["output"]["cosine"] >= 0.999
    speed = record["speed"]
    assert speed["onnx_ms"] > 0 and speed["onnx_fp16_ms"] > 0 and speed["speedup"] > 0
    assert result.passed
    # The original artifacts are untouched: same files, same checksums.
    before = json.loads((torch_cnn_package / MANIFEST_NAME).read_text())
    after = json.loads((package / MANIFEST_NAME).read_text())
    assert [a["files"] for a in before["artifacts"]] == [a["files"] for a in after["artifacts"][:-1]]


def test_fp16_keeps_overflowing_nodes_in_fp32(session_dir, copy_of) -> None:
    import torch

    import packager
    from packager.optimizing import onnx_fp16
    from packager.optimizing.plan import Plan

    class Big(torch.nn.Module):  # an intermediate of ~1e5: inf in fp16 (max 65504)
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
            # Buffers, not literals: the exporter cannot fold the scale-up and scale-down away.
            self.register_buffer("up", torch.tensor(1e4))
            self.register_buffer("down", torch.tensor(1e-4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) * self.up * self.down)

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) * 10
    source = packager.export(Big().eval(), {"x": x}, out=session_dir / "fp16_big", formats=["onnx"]).path
    package = copy_of(source)
    # Converted as a whole, the graph overflows by the ONNX spec's fp16 semantics (ONNX's reference
    # evaluator; ONNX Runtime's CPU provider happens to run fp16 Mul in fp32, a GPU does not).
    from onnx.reference import ReferenceEvaluator

    plain = session_dir / "fp16_plain"
    plain.mkdir(exist_ok=True)
    onnx_fp16.convert(package / "onnx" / "model.onnx", plain, Plan(method="fp16"))
    with np.errstate(over="ignore", invalid="ignore"):
        got = ReferenceEvaluator(str(plain / "model.onnx")).run(None, {"x": x})[0]
    assert not np.isfinite(got).all()

    result = optimize(package, precision="fp16", measure_speed=False)
    kept = result.artifact.options["optimization"]["kept"]
    assert len(kept) == 2 and all("beyond the fp16 range" in k["why"] for k in kept)
    assert result.passed
    model, _ = _model(package, "onnx_fp16")
    with np.errstate(over="ignore", invalid="ignore"):
        safe = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert np.isfinite(safe).all()
    # The kept nodes compute in fp32: every tensor they read or write is float32.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output]}
    types |= {i.name: i.data_type for i in model.graph.initializer}
    kept_nodes = [n for n in model.graph.node if n.name in {k["node"] for k in kept}]
    assert len(kept_nodes) == 2
    for node in kept_nodes:
        assert all(types.get(t) == onnx.TensorProto.FLOAT for t in [*node.input, *node.output]), node


def test_refusals_are_usage_errors(torch_cnn_package, mlp_onnx_package, copy_of) -> None:
    with pytest.raises(UsageError, match="fp16 or int8"):
        optimize(torch_cnn_package, precision="int4")
    with pytest.raises(UsageError, match="needs calibration data"):
        optimize(torch_cnn_package, precision="int8", method="static")
    with pytest.raises(UsageError, match="does not apply"):
        optimize(torch_cnn_package, precision="fp16", method="static")
    package = copy_of(mlp_onnx_package)
    optimize(package, precision="fp16", measure_speed=False)
    proc = run_cli("optimize", str(package), "--precision", "fp16")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("optimize", str(package), "--precision", "fp16", "--from", "openvino")
    assert proc.returncode == 2 and "no fp16 variant" in proc.stderr


def test_random_calibration_is_only_used_when_asked_and_warns(mlp_onnx_package, copy_of) -> None:
    package = copy_of(mlp_onnx_package)
    result = optimize(package, precision="int8", calibration="random", measure_speed=False,
                      budget="cosine>=0.95")
    assert any("random" in n and "noise" in n for n in result.notes)
    assert result.artifact.options["optimization"]["calibration"]["source"].startswith("random")


def test_a_graph_with_nothing_to_quantise_is_refused(session_dir, copy_of) -> None:
    import torch

    import packager

    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x * 2.0 + 1.0)

    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    package = copy_of(packager.export(Affine().eval(), {"x": x}, out=session_dir / "affine", formats=["onnx"]).path)
    with pytest.raises(FidelityError, match="quantised no node"):
        optimize(package, precision="int8", method="dynamic", measure_speed=False)
    assert not (package / "onnx_int8").exists()


def test_bench_shows_the_speedup_and_never_picks_an_optimised_artifact(mlp_onnx_package, copy_of) -> None:
    from packager.bench import bench

    package = copy_of(mlp_onnx_package)
    optimize(package, precision="int8", method="dynamic", measure_speed=False, budget="cosine>=0.9")
    report = bench(package, batch_sizes=[4], min_time=0.05, record=False)
    (speedup,) = report.speedups()
    assert speedup["format"] == "onnx_int8" and speedup["source"] == "onnx" and speedup["speedup"] > 0
    assert report.fastest["cpu"]["format"] == "onnx"
