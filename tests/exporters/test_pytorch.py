"""PyTorch sources (every save kind) and formats, through the real exporters and runtimes."""

from pathlib import Path

import numpy as np
import pytest
import torch

import packager
import runtimes
from packager.errors import (ExistsError, ExportError, FidelityError, RuntimeLoadError, SourceError,
                             TrustRequiredError, UsageError)
from sample_models.torch_models import SmallCNN, build_mlp

pytestmark = pytest.mark.torch
MLP = "sample_models.torch_models:build_mlp"


@pytest.fixture(scope="module")
def mlp():
    from sample_models.torch_models import train_mlp

    return train_mlp(steps=5)


def _eager(model, x):
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _roundtrip(pkg: Path, model, x, fmt="torchscript"):
    with runtimes.load(pkg, format=fmt) as runner:
        got = runner.run({"x": x})["output"]
    np.testing.assert_allclose(got, _eager(model, x), atol=1e-5, rtol=1e-5)


def test_all_formats_from_memory(torch_cnn_package, torch_cnn):
    model, example = torch_cnn
    manifest = packager.Package(torch_cnn_package).manifest
    assert manifest.formats == ["torchscript", "onnx", "torch_export"]
    assert manifest.source.kind == "in_memory"
    x = np.random.default_rng(1).standard_normal((7, 3, 32, 32)).astype(np.float32)  # odd batch: axis is dynamic
    for fmt in manifest.formats:
        with runtimes.load(torch_cnn_package, format=fmt) as runner:
            got = runner.run({"x": x})["output"]
        np.testing.assert_allclose(got, _eager(model, x), atol=1e-4, rtol=1e-4)


def test_eval_mode_is_forced(tmp_path, torch_cnn):
    model, example = torch_cnn
    model.train()  # Dropout/BatchNorm in training mode would make outputs batch- and call-dependent
    try:
        result = packager.export(model, example, out=tmp_path / "p", formats=["torchscript"])
    finally:
        model.eval()
    assert result.passed
    x = example["x"][:1]
    with runtimes.load(result.path) as runner:
        a, b = runner.run({"x": x})["output"], runner.run({"x": x})["output"]
    np.testing.assert_array_equal(a, b)


def test_state_dict_plus_builder(tmp_path, mlp):
    model, example = mlp
    torch.save(model.state_dict(), tmp_path / "w.pth")
    result = packager.export(tmp_path / "w.pth", example, out=tmp_path / "p", builder=MLP, formats=["torchscript"])
    assert result.manifest.source.kind == "state_dict"
    assert result.manifest.source.builder == MLP
    _roundtrip(result.path, model, example["x"])


def test_state_dict_without_builder_is_a_clear_error(tmp_path, mlp):
    torch.save(mlp[0].state_dict(), tmp_path / "w.pth")
    with pytest.raises(UsageError, match="--builder"):
        packager.export(tmp_path / "w.pth", mlp[1], out=tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_builder_with_wrong_architecture(tmp_path, mlp):
    torch.save(SmallCNN().state_dict(), tmp_path / "w.pth")
    with pytest.raises(SourceError, match="does not fit the builder"):
        packager.export(tmp_path / "w.pth", mlp[1], out=tmp_path / "p", builder=MLP)


def test_training_checkpoint_dict_found_automatically(tmp_path, mlp):
    model, example = mlp
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 7,
                "loss": 0.5}, tmp_path / "ckpt.pt")
    result = packager.export(tmp_path / "ckpt.pt", example, out=tmp_path / "p", builder=MLP, formats=["torchscript"])
    assert result.manifest.source.kind == "checkpoint"
    _roundtrip(result.path, model, example["x"])


def test_checkpoint_with_state_key(tmp_path, mlp):
    model, example = mlp
    other = build_mlp()
    torch.save({"student": model.state_dict(), "teacher": other.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(SourceError, match="--state-key"):
        packager.export(tmp_path / "ckpt.pt", example, out=tmp_path / "p", builder=MLP)
    result = packager.export(tmp_path / "ckpt.pt", example, out=tmp_path / "p", builder=MLP, state_key="student",
                             formats=["torchscript"])
    _roundtrip(result.path, model, example["x"])
    with pytest.raises(SourceError, match="has no key 'nope'"):
        packager.export(tmp_path / "ckpt.pt", example, out=tmp_path / "q", builder=MLP, state_key="nope")


def test_full_pickled_model_needs_trust(tmp_path, mlp):
    model, example = mlp
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(TrustRequiredError) as info:
        packager.export(tmp_path / "full.pt", example, out=tmp_path / "p")
    assert "--trust" in info.value.message and "state_dict" in info.value.message
    assert not (tmp_path / "p").exists()
    result = packager.export(tmp_path / "full.pt", example, out=tmp_path / "p", trust=True, formats=["torchscript"])
    assert result.manifest.source.kind == "full_model"
    _roundtrip(result.path, model, example["x"])


def test_torchscript_and_pt2_sources(tmp_path, mlp):
    model, example = mlp
    x = torch.from_numpy(example["x"])
    torch.jit.save(torch.jit.trace(model, (x,)), tmp_path / "m.ts.pt")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    for src, kind in (("m.ts.pt", "torchscript"), ("m.pt2", "torch_export")):
        result = packager.export(tmp_path / src, example, out=tmp_path / kind, formats=["onnx"])
        assert result.manifest.source.kind == kind
        _roundtrip(result.path, model, example["x"], fmt="onnx")


def test_torchscript_module_gets_torchscript_and_onnx_by_default(tmp_path, mlp):
    """torch.export cannot trace a ScriptModule (a torch.jit.load-ed file, Silero VAD's shipped
    .jit): the defaults leave torch_export out and say so; asked for, it is a clear error."""
    model, example = mlp
    scripted = torch.jit.script(model.eval())
    result = packager.export(scripted, example, out=tmp_path / "p")
    assert result.manifest.formats == ["torchscript", "onnx"] and result.passed
    assert any("torch_export left out" in line for line in result.manifest.extra["export_log"])
    with pytest.raises(ExportError, match="cannot be written from a TorchScript module") as info:
        packager.export(scripted, example, out=tmp_path / "q", formats=["torch_export"])
    assert "--formats torchscript,onnx" in info.value.fix
    assert not (tmp_path / "q").exists()


def test_torch_export_names_the_axis_the_model_fixes(tmp_path):
    """A multi-layer GRU given an initial state makes torch.export fix the sequence length: the
    error names the input, axis and size instead of torch's internal L['i0'].size()[1]."""
    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(4, 8, num_layers=2, batch_first=True)

        def forward(self, x, h):
            return self.gru(x, h)[0]

    rng = np.random.default_rng(0)
    example = {"x": rng.standard_normal((3, 5, 4)).astype(np.float32),
               "h": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    with pytest.raises(ExportError, match=r"input 'x' axis 1 \(seq\) at 5"):
        packager.export(Tagger().eval(), example, out=tmp_path / "p", formats=["torch_export"],
                        input_spec=["x:float32[batch,seq,4]", "h:float32[2,batch,8]"])
    # The other formats keep the axis dynamic.
    result = packager.export(Tagger().eval(), example, out=tmp_path / "ok", formats=["torchscript", "onnx"],
                             input_spec=["x:float32[batch,seq,4]", "h:float32[2,batch,8]"])
    assert result.passed and result.manifest.signature.outputs[0].shape == ("batch", "seq", 8)


def test_script_mode(tmp_path, mlp):
    model, example = mlp
    result = packager.export(model, example, out=tmp_path / "p", formats=["torchscript"],
                             options={"torchscript_mode": "script"})
    assert result.manifest.artifact("torchscript").options["mode"] == "script"
    _roundtrip(result.path, model, example["x"])


def test_unscriptable_model_fails_cleanly_leaving_nothing(tmp_path):
    class Dynamic(torch.nn.Module):
        def forward(self, x):
            return x * len({id(x)})  # sets of objects are not scriptable

    with pytest.raises(ExportError, match="torch.jit.script failed"):
        packager.export(Dynamic(), {"x": np.ones((2, 3), np.float32)}, out=tmp_path / "p",
                        formats=["torchscript"], options={"torchscript_mode": "script"})
    assert list(tmp_path.iterdir()) == []  # neither the package nor a temp folder


def test_transformer_dynamic_sequence(torch_transformer_package, torch_transformer):
    model, _ = torch_transformer
    manifest = packager.Package(torch_transformer_package).manifest
    assert manifest.signature.inputs[0].shape == ("batch", "seq")
    assert manifest.signature.dims["seq"].max == 64
    ids = np.random.default_rng(0).integers(0, 100, (3, 41))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    for fmt in manifest.formats:
        with runtimes.load(torch_transformer_package, format=fmt) as runner:
            np.testing.assert_allclose(runner.run({"ids": ids})["output"], want, atol=1e-4, rtol=1e-4)


def test_multiple_inputs_and_named_dict_outputs(tmp_path):
    from sample_models.torch_models import TwoHeads

    torch.manual_seed(0)
    model = TwoHeads()
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((3, 2, 4)).astype(np.float32),
             "extra": rng.standard_normal((3, 4)).astype(np.float32)}
    result = packager.export(model, feeds, out=tmp_path / "p")
    sig = result.manifest.signature
    assert sig.input_names == ["image", "extra"] and sig.output_names == ["scores", "aux"]
    for fmt in result.manifest.formats:
        with runtimes.load(result.path, format=fmt) as runner:
            out = runner.run(feeds)
        assert set(out) == {"scores", "aux"}


def test_parity_failure_fails_export_and_writes_nothing(tmp_path, torch_cnn):
    model, example = torch_cnn
    with pytest.raises(FidelityError) as info:
        packager.export(model, example, out=tmp_path / "p", formats=["onnx"], atol=0.0, rtol=0.0)
    message = info.value.message
    assert "onnx" in message and "'output'" in message and "max abs" in message
    assert info.value.exit_code == 1
    assert not (tmp_path / "p").exists()
    result = packager.export(model, example, out=tmp_path / "p", formats=["onnx"], atol=0.0, rtol=0.0,
                             allow_mismatch=True)
    assert not result.passed and (tmp_path / "p" / "manifest.json").exists()


def test_existing_package_needs_overwrite(tmp_path, mlp):
    model, example = mlp
    first = packager.export(model, example, out=tmp_path / "p", formats=["torchscript"])
    before = (first.path / "manifest.json").read_text()
    with pytest.raises(ExistsError, match="--overwrite"):
        packager.export(model, example, out=tmp_path / "p", formats=["onnx"])
    assert (first.path / "manifest.json").read_text() == before
    second = packager.export(model, example, out=tmp_path / "p", formats=["onnx"], overwrite=True)
    assert second.manifest.formats == ["onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_input_spec_generates_seeded_inputs(tmp_path, mlp):
    model, _ = mlp
    result = packager.export(model, out=tmp_path / "p", input_spec="x:float32[batch,16]", formats=["onnx"])
    golden_in, _ = packager.Package(result.path).golden()
    assert golden_in["x"].shape == (4, 16)
    again = packager.export(model, out=tmp_path / "q", input_spec="x:float32[batch,16]", formats=["onnx"])
    np.testing.assert_array_equal(golden_in["x"], packager.Package(again.path).golden()[0]["x"])


def test_example_inputs_must_fit_input_spec(tmp_path, mlp):
    from packager.errors import FeedError

    model, example = mlp
    with pytest.raises(FeedError, match="dimension 1"):
        packager.export(model, example, out=tmp_path / "p", input_spec="x:float32[batch,15]")


def test_unknown_format(tmp_path, mlp):
    with pytest.raises(UsageError, match="saved_model"):
        packager.export(mlp[0], mlp[1], out=tmp_path / "p", formats=["saved_model"])


def test_batch_axis_baked_by_tracing_fails_export(tmp_path):
    class Baked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            # int() turns the traced batch size into a constant: the TorchScript artifact then
            # works at the export batch only, while eager works at any batch.
            return self.fc(x).reshape(int(x.shape[0]), 2, 2)

    torch.manual_seed(0)
    example = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    with pytest.raises(RuntimeLoadError) as info:
        packager.export(Baked(), example, out=tmp_path / "p", formats=["torchscript"])
    assert "torchscript" in info.value.message and "x[5, 16]" in info.value.message
    assert info.value.exit_code == 4
    assert not (tmp_path / "p").exists()


def test_batch_of_one_example_is_widened(tmp_path, mlp):
    model, example = mlp
    result = packager.export(model, {"x": example["x"][:1]}, out=tmp_path / "p", formats=["onnx", "torch_export"])
    assert packager.Package(result.path).golden()[0]["x"].shape[0] == 2
    assert any("batch 1" in line for line in result.manifest.extra["export_log"])
    x = np.random.default_rng(5).standard_normal((9, 16)).astype(np.float32)
    for fmt in ("onnx", "torch_export"):
        with runtimes.load(result.path, format=fmt) as runner:
            np.testing.assert_allclose(runner.run({"x": x})["output"], _eager(model, x), atol=1e-5, rtol=1e-5)


class _Recurrent(torch.nn.Module):
    """batch_first LSTM/GRU over a dynamic ``seq`` with a per-step head."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(torch.nn, cell)(4, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_rnn_onnx_declares_the_measured_dynamic_seq_axis(tmp_path, cell):
    """The dynamo exporter declares the output's seq axis as the example's 8; running proves it
    dynamic, so the graph must say so, and verify must not report a contract mismatch (issue 11)."""
    import onnx

    model = _Recurrent(cell).eval()
    x = np.random.default_rng(0).standard_normal((2, 8, 4)).astype(np.float32)
    pkg = packager.export(model, {"x": x}, out=tmp_path / "pkg", formats=["onnx"],
                          input_spec=["x:float32[batch,seq=1..64,4]"]).path
    graph = onnx.load(pkg / "onnx" / "model.onnx").graph
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", "seq", 3]
    report = packager.verify(pkg, sweep=True)
    assert report.exit_code == 0, [(r.contract, r.worst) for r in report.rows]
    with runtimes.load(pkg) as runner:
        for seq in (1, 50):
            feed = np.random.default_rng(seq).standard_normal((3, seq, 4)).astype(np.float32)
            with torch.no_grad():
                ref = model(torch.from_numpy(feed)).numpy()
            got = runner.run({"x": feed})["output"]
            assert got.shape == (3, seq, 3) and np.max(np.abs(got - ref)) < 1e-5
