"""`packager triton`: model repositories that Triton's own ModelConfig protobuf accepts (parsed
with the model_config_pb2 tritonclient ships), the rules Triton users trip on, and the check
that finds them in any repository."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import runtimes
from packager.errors import ExistsError
from packager.fidelity.judge import judge_for
from packager.package import Package
from packager.serving.triton import check_repository, model_config_class, write_repository
from tests.conftest import run_cli

pytest.importorskip("tritonclient")


def _config(repo: Path, model: str):
    from google.protobuf import text_format

    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_class()())


def _type(config, value: int) -> str:
    return config.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number[value].name


def _all_formats(package: Path) -> list[str]:
    return [a.format for a in Package(package).manifest.artifacts]


def _check_written(package: Path, repo: Path) -> None:
    models = write_repository(package, repo, formats=_all_formats(package))
    assert check_repository(repo) == []
    signature = Package(package).manifest.signature
    for model in models:
        config = _config(repo, model.name)
        assert config.name == model.name == model.path.name
        assert (model.path / "1").is_dir()
        assert config.max_batch_size == 32  # every sample model has its batch axis first
        assert config.HasField("dynamic_batching") == model.dynamic_batching
        assert model.dynamic_batching, model.why  # the sample models pass batch consistency
        for entry, spec in zip(config.input, signature.inputs):
            assert list(entry.dims) == [d if isinstance(d, int) else -1 for d in spec.shape[1:]]
            assert _type(config, entry.data_type) == {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[spec.dtype]
            assert entry.format == 0  # no FORMAT_NCHW / NHWC
        assert len(config.output) == len(signature.outputs)
        group = config.instance_group[0]
        kind = group.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number[group.kind].name
        assert kind == "KIND_CPU" and group.count == 1
        backend = {"onnx": "onnxruntime", "torchscript": "pytorch", "openvino": "openvino"}.get(model.format, "python")
        assert config.backend == backend == model.backend
        warm = config.model_warmup[0]
        assert warm.batch_size == 1 and set(warm.inputs) == {e.name for e in config.input}


@pytest.mark.torch
def test_torch_packages_every_format(torch_cnn_package: Path, torch_transformer_package: Path, tmp_path: Path) -> None:
    _check_written(torch_cnn_package, tmp_path / "repo")
    _check_written(torch_transformer_package, tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [
        "torch_cnn_onnx", "torch_cnn_torch_export", "torch_cnn_torchscript",
        "torch_transformer_onnx", "torch_transformer_torch_export", "torch_transformer_torchscript"]
    ids = _config(tmp_path / "repo", "torch_transformer_onnx").input[0]
    assert ids.name == "ids" and list(ids.dims) == [-1]  # [batch, seq]: the batch axis is left out


@pytest.mark.slow
@pytest.mark.tensorflow
def test_keras_packages_every_format(keras_cnn_package: Path, keras_tflite_package: Path, tmp_path: Path) -> None:
    _check_written(keras_cnn_package, tmp_path / "repo")
    _check_written(keras_tflite_package, tmp_path / "repo")


@pytest.mark.slow
def test_openvino_package(torch_openvino_package: Path, tmp_path: Path) -> None:
    _check_written(torch_openvino_package, tmp_path / "repo")
    folder = tmp_path / "repo" / "torch_openvino_openvino" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml"]


@pytest.mark.slow
@pytest.mark.paddle
def test_paddle_package(tmp_path: Path) -> None:
    import packager
    from sample_models.paddle_models import train_cnn

    model, example, _ = train_cnn(seed=0, steps=2)
    package = packager.export(model, example, out=tmp_path / "paddle_cnn", formats=["paddle_inference", "onnx"]).path
    _check_written(package, tmp_path / "repo")


@pytest.mark.torch
def test_libtorch_names_tensors_by_position(torch_cnn_package: Path, tmp_path: Path) -> None:
    [model] = write_repository(torch_cnn_package, tmp_path / "repo", formats=["torchscript"], name="cnn")
    config = _config(tmp_path / "repo", "cnn")
    assert config.platform == "pytorch_libtorch"
    assert [i.name for i in config.input] == ["x__0"] and [o.name for o in config.output] == ["output__0"]
    assert model.renamed == {"x": "x__0", "output": "output__0"}


@pytest.mark.torch
def test_warmup_files_are_the_golden_rows(torch_cnn_package: Path, tmp_path: Path) -> None:
    write_repository(torch_cnn_package, tmp_path / "repo", name="cnn")
    inputs, _ = Package(torch_cnn_package).golden()
    raw = (tmp_path / "repo" / "cnn" / "warmup" / "input_0").read_bytes()
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(1, 3, 32, 32), inputs["x"][:1])


@pytest.mark.torch
def test_dynamic_batching_only_with_evidence(batch_dependent_package: Path, tmp_path: Path) -> None:
    [model] = write_repository(batch_dependent_package, tmp_path / "repo")
    config = _config(tmp_path / "repo", model.name)
    assert config.max_batch_size == 32 and not config.HasField("dynamic_batching")
    assert "batch consistency failed" in model.why
    assert "# dynamic batching off: batch consistency failed" in (model.path / "config.pbtxt").read_text()
    assert check_repository(tmp_path / "repo") == []


@pytest.mark.torch
def test_no_batch_axis_means_max_batch_size_0_and_full_dims(tmp_path: Path) -> None:
    import torch

    import packager

    model = torch.nn.Linear(4, 2).eval()
    package = packager.export(model, {"x": torch.randn(3, 4)}, out=tmp_path / "fixed", formats=["onnx"],
                              input_spec=["x:float32[3,4]"]).path
    [written] = write_repository(package, tmp_path / "repo")
    config = _config(tmp_path / "repo", written.name)
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [3, 4]
    assert not config.HasField("dynamic_batching") and "no batch axis" in written.why
    assert list(config.model_warmup[0].inputs["x"].dims) == [3, 4]
    assert check_repository(tmp_path / "repo") == []


@pytest.mark.torch
def test_python_backend_model_runs_the_package(torch_cnn_package: Path, tmp_path: Path, monkeypatch) -> None:
    """The generated model.py, driven the way Triton's python backend drives it. Triton's
    ``triton_python_backend_utils`` exists only inside the server, so a minimal stand-in with
    its four names (Tensor, InferenceResponse, TritonError, get_input_tensor_by_name) replaces
    it; the runtime and the package copy are real."""
    [model] = write_repository(torch_cnn_package, tmp_path / "repo", formats=["torch_export"], name="cnn")
    assert model.backend == "python"

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list, error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor, utils.InferenceResponse, utils.TritonError = Tensor, InferenceResponse, str
    utils.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    monkeypatch.setenv("PACKAGER_TRUST", "1")  # torch.export's .pt2 holds pickled objects
    spec = importlib.util.spec_from_file_location("generated_model", model.path / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = module.TritonPythonModel()
    backend.initialize({"model_instance_kind": "CPU"})
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    good, bad = backend.execute([{"x": Tensor("x", x)}, {"x": Tensor("x", x[:, :2])}])
    backend.finalize()
    expected = runtimes.load(torch_cnn_package, format="torch_export", trust=True).run({"x": x})
    assert judge_for(Package(torch_cnn_package).manifest).compare(
        expected, {"output": good.output_tensors[0].as_numpy()}).passed
    assert bad.error is not None and "wrong size" in bad.error  # one bad request fails alone


MISTAKES = [
    ("name", lambda t: t.replace('name: "cnn"', 'name: "other"'), "differs from its folder"),
    ("format", lambda t: t.replace("data_type: TYPE_FP32\n    dims: [ 3, 32, 32 ]",
                                   "data_type: TYPE_FP32\n    format: FORMAT_NCHW\n    dims: [ 3, 32, 32 ]", 1),
     "sets format: FORMAT_NCHW"),
    ("batch axis in dims", lambda t: t.replace("dims: [ 3, 32, 32 ]", "dims: [ -1, 3, 32, 32 ]", 1),
     "do not fit model.onnx's shape"),
    ("dynamic batching without max_batch_size", lambda t: t.replace("max_batch_size: 32", "max_batch_size: 0"),
     "dynamic_batching needs max_batch_size > 0"),
    ("not protobuf text", lambda t: t + "\nnot_a_field: 3\n", "is not a valid ModelConfig"),
    ("zero dim", lambda t: t.replace("dims: [ 10 ]", "dims: [ 0 ]"), "sizes are >= 1, or -1"),
]


@pytest.mark.torch
@pytest.mark.parametrize("what, edit, words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_check_finds_what_triton_would_refuse(torch_cnn_package: Path, tmp_path: Path, what, edit, words) -> None:
    write_repository(torch_cnn_package, tmp_path / "repo", name="cnn")
    config = tmp_path / "repo" / "cnn" / "config.pbtxt"
    text = config.read_text()
    edited = edit(text)
    assert edited != text, f"the edit for {what!r} changed nothing"
    config.write_text(edited)
    problems = check_repository(tmp_path / "repo")
    assert any(words in p.message for p in problems), problems
    done = run_cli("triton", "--check", str(tmp_path / "repo"))
    assert done.returncode == 3 and words in done.stderr and "Traceback" not in done.stderr


@pytest.mark.torch
def test_check_finds_layout_mistakes(torch_cnn_package: Path, tmp_path: Path) -> None:
    write_repository(torch_cnn_package, tmp_path / "repo", name="cnn")
    model = tmp_path / "repo" / "cnn"
    (model / "warmup" / "input_0").write_bytes(b"\0" * 12)
    shutil.move(model / "1", model / "v1")
    messages = " | ".join(p.message for p in check_repository(tmp_path / "repo"))
    assert "positive integers, got ['v1']" in messages and "has no version folder" in messages
    assert re.search(r"holds 12 bytes, dims \[3, 32, 32\] need 12288", messages)


@pytest.mark.torch
def test_cli_writes_checks_and_refuses_to_overwrite(torch_cnn_package: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    done = run_cli("triton", str(torch_cnn_package), "-o", str(repo), "--name", "cnn", "--instances", "cpu:2")
    assert done.returncode == 0, done.stderr
    assert "dynamic batching on" in done.stdout and "passes the lints" in done.stderr
    assert _config(repo, "cnn").instance_group[0].count == 2
    again = run_cli("triton", str(torch_cnn_package), "-o", str(repo), "--name", "cnn")
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    with pytest.raises(ExistsError):
        write_repository(torch_cnn_package, repo, name="cnn")
    assert run_cli("triton", str(torch_cnn_package), "-o", str(repo), "--name", "cnn", "--overwrite").returncode == 0
    bad = run_cli("triton", str(torch_cnn_package), "-o", str(repo), "--instances", "tpu:1")
    assert bad.returncode == 2 and "KIND:COUNT" in bad.stderr
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
