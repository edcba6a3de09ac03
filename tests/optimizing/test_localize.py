"""Localising divergence (packager.optimizing.localize, verify --localize): the first node whose
output departs from the reference graph, found on real graphs, and the failing subgraph written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from packager.manifest import MANIFEST_NAME
from packager.optimizing import optimize
from packager.optimizing.localize import load_model, localize, run_all
from tests._integrity import rehash
from tests.conftest import run_cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


def _perturb(model, node_index: int):
    """A copy of ``model`` whose ``node_index``-th weighted node has noise as large as its weights
    added to them (a scaled weight would not do: cosine cannot see a scale)."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weighted = [n for n in broken.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    node = weighted[node_index]
    init = next(i for i in broken.graph.initializer if i.name == node.input[1])
    weight = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).standard_normal(weight.shape) * float(weight.astype(np.float64).std())
    init.CopyFrom(numpy_helper.from_array((weight + noise).astype(weight.dtype), init.name))
    return broken, node


def test_first_divergence_is_the_changed_node(torch_cnn_package) -> None:
    reference = load_model(torch_cnn_package / "onnx" / "model.onnx")
    broken, node = _perturb(reference, 1)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    found = localize(reference, broken, feeds)
    first = found.first_divergence
    assert first is not None and first.node == node.name and first.op == node.op_type
    before = found.nodes[:found.nodes.index(first)]
    assert before and not any(n.diverged for n in before)
    assert found.costliest(1)[0].node == node.name
    # Unchanged graph: nothing diverges (ONNX Runtime is deterministic for one session config).
    assert localize(reference, reference, feeds).first_divergence is None


def test_verify_localize_names_the_node_and_writes_a_failing_subgraph(torch_cnn_package, cnn_calibration,
                                                                       copy_of, tmp_path) -> None:
    package = copy_of(torch_cnn_package)
    optimize(package, precision="fp16", calibration=cnn_calibration, measure_speed=False)
    # An attacker or a bad tool edits the fp16 weights of the second weighted node and the
    # checksums: the budget fails verify, and --localize says where.
    path = package / "onnx_fp16" / "model.onnx"
    broken, node = _perturb(load_model(path), 1)
    onnx.save(broken, str(path))
    rehash(package)
    proc = run_cli("verify", str(package), "--format", "onnx_fp16", "--localize", "--localize-out", str(tmp_path / "loc"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"first divergence at node {node.name!r} ({node.op_type})" in proc.stdout, proc.stdout
    assert "the onnx artifact it was made from" in proc.stdout
    sub, data = tmp_path / "loc" / "onnx_fp16" / "subgraph.onnx", tmp_path / "loc" / "onnx_fp16" / "subgraph_inputs.npz"
    assert sub.is_file() and data.is_file()
    # The subgraph alone reproduces the failure: run on the saved inputs it misses the reference output.
    session = ort.InferenceSession(str(sub))
    arrays = dict(np.load(data))
    expected = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("expected:")}
    feeds = {i.name: arrays[i.name] for i in session.get_inputs()}
    (got,) = session.run(None, feeds)
    (want,) = expected.values()
    assert got.shape == want.shape and np.abs(got - want).max() > 0.1 * np.abs(want).max()
    assert len(onnx.load(str(sub)).graph.node) < len(broken.graph.node)


def test_localize_on_a_plain_export_compares_with_the_spec(mlp_onnx_package) -> None:
    from packager.optimizing.localize import localize_artifact
    from packager.package import Package

    found = localize_artifact(Package(mlp_onnx_package), "onnx")
    assert "onnx.reference" in found.reference and found.result.first_divergence is None
    assert "no node diverges" in found.lines()[0]


def test_localize_refuses_non_onnx(torch_cnn_package) -> None:
    proc = run_cli("verify", str(torch_cnn_package), "--format", "torchscript", "--localize")
    assert proc.returncode == 0 and "no ONNX artifact failed" in proc.stderr


def test_every_tensor_is_compared_by_name(torch_cnn_package) -> None:
    model = load_model(torch_cnn_package / "onnx" / "model.onnx")
    values = run_all(model, {"x": np.zeros((1, 3, 32, 32), np.float32)})
    assert {o for n in model.graph.node for o in n.output} <= set(values)
    manifest = json.loads((torch_cnn_package / MANIFEST_NAME).read_text())
    assert manifest["name"]
