"""Hostile graphs (issue 12, items 1-2): a package written by an attacker, every checksum matching.

Each test builds the real attack, first shows that it works against the framework's own loader
(so the test can fail), then that packager refuses it before anything runs: by default, from the
API, ``verify``, ``run``, a packed archive and an export source; and that ``--trust`` lets it through.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from packager.errors import ExitCode, TrustRequiredError, UnsafeArtifactError
from tests._integrity import copy_package, rehash, tiny_torch_package
from tests.conftest import run_cli

torch = pytest.importorskip("torch")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class FileLeak(torch.nn.Module):
    """What an attacker scripts: the output carries the bytes of a file on the host."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leak = torch.from_file(self.path, shared=False, size=4, dtype=torch.uint8)
        return x[:, :4] * 0 + leak.to(x.dtype)


class WritesOnLoad(torch.nn.Module):
    """Runs on ``torch.jit.load``: ``__setstate__`` maps a file with shared=True and overwrites it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :4]

    @torch.jit.export
    def __getstate__(self) -> str:
        return self.path

    @torch.jit.export
    def __setstate__(self, path: str) -> None:
        mapped = torch.from_file(path, shared=True, size=4, dtype=torch.uint8)
        mapped.fill_(88)  # used below, so TorchScript keeps the write
        self.n = int(mapped.sum())
        self.path = path
        self.training = False


@pytest.fixture(scope="module")
def torch_pkg(session_dir: Path) -> Path:
    return tiny_torch_package(session_dir)


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copy zip ``src`` to ``dst``; ``edit(name, data)`` returns new data (None: drop), and
    ``edit(None, None)`` returns extra ``{name: data}`` members to add."""
    with zipfile.ZipFile(src) as zin:
        items = [(i, zin.read(i.filename)) for i in zin.infolist()]
    root = items[0][0].filename.split("/", 1)[0]
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as zout:
        for info, data in items:
            new = edit(info.filename.split("/", 1)[1], data)
            if new is not None:
                zout.writestr(info, new)
        for name, data in edit(None, None).items():
            zout.writestr(f"{root}/{name}", data)
    tmp.replace(dst)


def _opaque_pt2(src: Path, dst: Path, marker: Path) -> None:
    """torch 2.13 ``pickle.loads`` every constant named ``opaque_obj_*`` in the constants config."""
    def edit(name, data):
        if name is None:
            return {"data/constants/opaque_obj_0": pickle.dumps(_Payload(marker))}
        if name.endswith("constants_config.json"):
            config = json.loads(data)
            config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                        "tensor_meta": None}
            return json.dumps(config).encode()
        return data
    _rewrite_zip(src, dst, edit)


def _guard_pt2(src: Path, dst: Path, marker: Path) -> None:
    """torch ``exec``s a program's guards as Python source when its module is built."""
    def edit(name, data):
        if name is None:
            return {}
        if name.startswith("models/"):
            program = json.loads(data)
            program["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
            return json.dumps(program).encode()
        return data
    _rewrite_zip(src, dst, edit)


@pytest.mark.parametrize("attack, entry", [(_opaque_pt2, "opaque_obj_0"), (_guard_pt2, "guard")])
def test_hostile_pt2_is_refused_before_torch_reads_it(attack, entry: str, torch_pkg: Path, tmp_path: Path) -> None:
    import runtimes

    marker = tmp_path / "PWNED"
    # The attack is real: torch's own loader runs the payload.
    probe = tmp_path / "probe.pt2"
    attack(torch_pkg / "torch_export/model.pt2", probe, marker)
    try:
        torch.export.load(str(probe)).module()(torch.ones(2, 16))
    except Exception:  # noqa: BLE001 - the payload has run by then, whatever torch says next
        pass
    assert marker.exists(), "the crafted .pt2 no longer runs code in torch: rebuild the attack"
    marker.unlink()

    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    attack(torch_pkg / "torch_export/model.pt2", pkg / "torch_export/model.pt2", marker)
    rehash(pkg)
    with pytest.raises(UnsafeArtifactError, match=entry) as info:
        runtimes.load(pkg, format="torch_export")
    assert info.value.exit_code == ExitCode.RUNTIME and "--trust" in info.value.fix
    # A manifest cannot trust itself through its runner options.
    data = json.loads((pkg / "manifest.json").read_text())
    next(a for a in data["artifacts"] if a["format"] == "torch_export").setdefault("options", {})["runner"] = {
        "trust": True}
    (pkg / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UnsafeArtifactError):
        runtimes.load(pkg, format="torch_export")

    verify = run_cli("verify", str(pkg), "--format", "torch_export")
    assert verify.returncode == ExitCode.RUNTIME, verify.stdout + verify.stderr
    np.save(tmp_path / "x.npy", np.ones((3, 16), np.float32))
    run = run_cli("run", str(pkg), "--format", "torch_export", "-i", str(tmp_path / "x.npy"),
                  "-o", str(tmp_path / "out.npz"), "--quiet")
    assert run.returncode == ExitCode.RUNTIME and "Traceback" not in run.stderr, run.stderr
    packed = run_cli("pack", str(pkg), "-o", str(tmp_path / "pkg.tar.gz"))
    assert packed.returncode == 0, packed.stderr
    from_archive = run_cli("verify", str(tmp_path / "pkg.tar.gz"), "--format", "torch_export")
    assert from_archive.returncode == ExitCode.RUNTIME, from_archive.stdout + from_archive.stderr
    source = run_cli("export", str(pkg / "torch_export/model.pt2"), "--example-inputs", str(tmp_path / "x.npy"),
                     "--formats", "onnx", "--out", str(tmp_path / "re"))
    assert source.returncode == ExitCode.USAGE and entry in source.stderr, source.stderr
    assert not marker.exists(), "the .pt2 ran code"


def test_hostile_pt2_source_needs_trust(torch_pkg: Path, tmp_path: Path) -> None:
    from packager.exporters import SourceOptions
    from packager.exporters.pytorch import load_source

    marker = tmp_path / "PWNED"
    _opaque_pt2(torch_pkg / "torch_export/model.pt2", tmp_path / "evil.pt2", marker)
    with pytest.raises(TrustRequiredError, match="opaque_obj_0"):
        load_source(tmp_path / "evil.pt2", SourceOptions())
    assert not marker.exists()


def _scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


def test_torchscript_that_reads_a_file_is_refused_and_trust_allows_it(torch_pkg: Path, tmp_path: Path) -> None:
    import runtimes

    secret = tmp_path / "secret"
    secret.write_bytes(b"KEY!")
    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    _scripted(FileLeak(str(secret)), pkg / "torchscript/model.pt")
    rehash(pkg)
    with pytest.raises(UnsafeArtifactError, match=r"aten::from_file.*method forward|aten::from_file"):
        runtimes.load(pkg, format="torchscript")
    verify = run_cli("verify", str(pkg), "--format", "torchscript")
    assert verify.returncode == ExitCode.RUNTIME and "aten::from_file" in verify.stdout + verify.stderr
    # Trusted, it runs, and the output really carries the file's bytes: the refusal guards a real leak.
    with runtimes.load(pkg, format="torchscript", trust=True) as runner:
        out = runner.run({"x": np.ones((2, 16), np.float32)})["output"]
    assert bytes(out[0].astype(np.uint8)) == b"KEY!"


def test_torchscript_that_writes_a_file_on_load_is_refused_before_loading(torch_pkg: Path, tmp_path: Path) -> None:
    import runtimes

    victim = tmp_path / "victim"
    victim.write_bytes(b"good")
    probe = _scripted(WritesOnLoad(str(victim)), tmp_path / "probe.pt")
    assert victim.read_bytes() == b"good"  # scripting and saving ran __getstate__ only
    torch.jit.load(str(probe))  # the attack is real: loading alone overwrites the file
    assert victim.read_bytes() == b"XXXX"
    victim.write_bytes(b"good")

    pkg = copy_package(torch_pkg, tmp_path / "pkg")
    (pkg / "torchscript/model.pt").write_bytes(probe.read_bytes())
    rehash(pkg)
    with pytest.raises(UnsafeArtifactError, match="aten::from_file"):
        runtimes.load(pkg, format="torchscript")
    assert victim.read_bytes() == b"good", "the TorchScript archive ran code on load"


def test_genuine_torch_artifacts_pass_the_scan(torch_pkg: Path) -> None:
    from runtimes._graphscan import pt2_findings, torchscript_source_findings

    assert pt2_findings(torch_pkg / "torch_export/model.pt2") == []
    assert torchscript_source_findings(torch_pkg / "torchscript/model.pt") == []
    import runtimes

    for fmt in ("torchscript", "torch_export"):
        with runtimes.load(torch_pkg, format=fmt) as runner:
            assert runner.run({"x": np.ones((2, 16), np.float32)})["output"].shape == (2, 4)


@pytest.mark.parametrize("guard, safe", [
    ("L['x'].size()[0] <= 64", True),
    ("Eq(Mod(L['x'].size()[1], 2), 0)", True),
    ("__import__('os').system('id') == 0", False),
    ("L['x'].__class__.__mro__ == 1", False),
    ("open('/etc/passwd').read() == ''", False),
    ("(lambda: 1)() == 1", False),
])
def test_guard_grammar(guard: str, safe: bool) -> None:
    from runtimes._graphscan import guard_is_safe

    assert guard_is_safe(guard) is safe


# --- TensorFlow (item 3) ---------------------------------------------------------------------


def _file_reading_saved_model(folder: Path, secret: Path) -> None:
    """A serving function with the package's signature whose output carries a file's length."""
    import tensorflow as tf

    class Leak(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")])
        def serve(self, image):
            size = tf.cast(tf.strings.length(tf.io.read_file(str(secret))), tf.float32)
            return {"logits": tf.zeros([tf.shape(image)[0], 10]) + size}

    module = Leak()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})


@pytest.mark.tensorflow
def test_saved_model_that_reads_a_file_is_refused(keras_cnn_package: Path, tmp_path: Path) -> None:
    import shutil

    import runtimes
    from runtimes._graphscan import saved_model_findings
    from runtimes._tf import read_saved_model

    assert saved_model_findings(read_saved_model(keras_cnn_package / "saved_model")) == []  # a real Keras export
    secret = tmp_path / "secret"
    secret.write_bytes(b"12345")
    pkg = copy_package(keras_cnn_package, tmp_path / "pkg")
    shutil.rmtree(pkg / "saved_model")
    _file_reading_saved_model(pkg / "saved_model", secret)
    data = json.loads((pkg / "manifest.json").read_text())
    artifact = next(a for a in data["artifacts"] if a["format"] == "saved_model")
    artifact["files"] = [{"path": str(p.relative_to(pkg)), "sha256": "0", "size": 0}
                         for p in sorted((pkg / "saved_model").rglob("*")) if p.is_file()]
    (pkg / "manifest.json").write_text(json.dumps(data))
    rehash(pkg)
    with pytest.raises(UnsafeArtifactError, match="op ReadFile"):
        runtimes.load(pkg, format="saved_model")
    verify = run_cli("verify", str(pkg), "--format", "saved_model")
    assert verify.returncode == ExitCode.RUNTIME and "ReadFile" in verify.stdout + verify.stderr
    with runtimes.load(pkg, format="saved_model", trust=True) as runner:  # the leak is real
        out = runner.run({"image": np.zeros((2, 16, 16, 3), np.float32)})["logits"]
    assert float(out[0, 0]) == 5.0


# --- Paddle (item 3) -------------------------------------------------------------------------


@pytest.mark.paddle
def test_paddle_program_with_file_ops_is_refused(tmp_path: Path) -> None:
    """A PIR program holding a ``save_combine`` op (what writes parameter files) is refused by both
    Paddle runners before a predictor is created; the untouched program loads."""
    paddle = pytest.importorskip("paddle")
    import runtimes
    from runtimes._graphscan import paddle_program_findings

    class Double(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.scale = paddle.nn.Linear(4, 4, bias_attr=False)
            self.scale.weight.set_value(np.eye(4, dtype=np.float32) * 2)

        def forward(self, x):
            return self.scale(x)

    paddle.jit.save(Double(), str(tmp_path / "ok/model"),
                    input_spec=[paddle.static.InputSpec([None, 4], "float32", "x")])
    assert paddle_program_findings(tmp_path / "ok/model.json") == []
    program = json.loads((tmp_path / "ok/model.json").read_text())
    ops = program["program"]["regions"][0]["blocks"][0]["ops"]
    ops.insert(len(ops) - 1, {"#": "1.save_combine", "A": [{"AT": {"#": "0.a_str", "D": str(tmp_path / "w")},
                                                             "N": "file_path"}], "I": [], "O": []})
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil/model.json").write_text(json.dumps(program))
    (tmp_path / "evil/model.pdiparams").write_bytes((tmp_path / "ok/model.pdiparams").read_bytes())
    for runtime in ("paddle_inference", "paddle_jit"):
        with pytest.raises(UnsafeArtifactError, match="op save_combine"):
            runtimes.load(tmp_path / "evil/model.json", format="paddle_inference", runtime=runtime)
    with runtimes.load(tmp_path / "ok/model.json", format="paddle_inference") as runner:
        (out,) = runner.run({"x": np.ones((2, 4), np.float32)}).values()
    assert out.tolist() == [[2.0] * 4] * 2


@pytest.mark.paddle
def test_legacy_paddle_program_ops_are_scanned() -> None:
    pytest.importorskip("paddle")
    from paddle.base.proto import framework_pb2

    from runtimes._graphscan import paddle_program_findings

    desc = framework_pb2.ProgramDesc()
    block = desc.blocks.add(idx=0, parent_idx=-1)
    block.ops.add(type="scale")
    block.ops.add(type="load_combine")
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pdmodel") as handle:
        handle.write(desc.SerializeToString())
        handle.flush()
        assert paddle_program_findings(handle.name, framework_pb2.ProgramDesc()) == [
            f"op load_combine in block 0 of {Path(handle.name).name}"]


@pytest.mark.paddle
def test_legacy_paddle_program_that_writes_a_file_is_refused(tmp_path: Path) -> None:
    """The real attack: a legacy ``.pdmodel`` with a ``save`` op appended writes any file when
    Paddle Inference runs it (shown first on a plain predictor); packager refuses it unless
    trusted."""
    paddle = pytest.importorskip("paddle")
    from paddle import inference
    from paddle.base.proto import framework_pb2

    import runtimes
    from runtimes._paddle import quiet
    from sample_models.paddle_models import save_layer

    layer = paddle.nn.Linear(4, 4, bias_attr=False)
    layer.eval()
    model = save_layer(layer, (None, 4), tmp_path / "m" / "model", legacy=True)
    params = model.with_suffix(".pdiparams")
    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString(model.read_bytes())
    block = desc.blocks[0]
    weight = next(v.name for v in block.vars if v.persistable and v.name not in ("feed", "fetch"))
    target = tmp_path / "written_by_the_model"
    op = block.ops.add(type="save")
    op.inputs.add(parameter="X").arguments.append(weight)
    for name, kind, field, value in (("file_path", framework_pb2.STRING, "s", str(target)),
                                     ("overwrite", framework_pb2.BOOLEAN, "b", True),
                                     ("save_as_fp16", framework_pb2.BOOLEAN, "b", False),
                                     ("save_to_memory", framework_pb2.BOOLEAN, "b", False)):
        attr = op.attrs.add(name=name, type=kind)
        setattr(attr, field, value)
    model.write_bytes(desc.SerializeToString())
    x = np.ones((2, 4), np.float32)

    config = inference.Config(str(model), str(params))
    config.disable_gpu()
    with quiet():
        predictor = inference.create_predictor(config)
        predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(x)
        predictor.run()
    assert target.exists()  # the attack works on an unguarded predictor
    target.unlink()

    with pytest.raises(UnsafeArtifactError, match="op save in block 0") as caught:
        runtimes.load(model, format="paddle_legacy")
    assert caught.value.exit_code == ExitCode.RUNTIME and "--trust" in caught.value.message
    assert not target.exists()
    with runtimes.load(model, format="paddle_legacy", trust=True) as runner:  # the user's own call
        runner.run({"x": x})
    assert target.exists()


def test_onnx_custom_domain_cannot_load_code() -> None:
    """ONNX Runtime resolves a custom-op domain only from a library registered on the session;
    packager never registers one (no runner option does), so such a model is refused (exit 4)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    import runtimes
    from packager.errors import RuntimeLoadError

    node = helper.make_node("Exfiltrate", ["x"], ["y"], domain="evil.ops")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil.ops", 1)])
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        onnx.save(model, str(path))
        with pytest.raises(RuntimeLoadError, match="evil.ops|Exfiltrate") as info:
            runtimes.load(path, signature=None)
        assert info.value.exit_code == ExitCode.RUNTIME
