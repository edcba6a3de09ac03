"""The real CLI in subprocesses: exit codes, one-line errors, no framework imports where none is needed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

FRAMEWORKS_LOADED = ("import sys; from packager.cli import main; code = main({args!r}); "
                     "print('FRAMEWORKS', sorted(m for m in sys.modules if m.split('.')[0] in "
                     "('torch', 'tensorflow', 'paddle', 'keras'))); sys.exit(code)")


def _frameworks_after(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", FRAMEWORKS_LOADED.format(args=args)], capture_output=True,
                          text=True, timeout=300)
    line = [l for l in proc.stdout.splitlines() if l.startswith("FRAMEWORKS")][-1]
    return proc.returncode, line


def test_help_imports_no_framework():
    code, line = _frameworks_after(["--help"])
    assert code == 0 and line == "FRAMEWORKS []"


def test_running_an_onnx_package_imports_no_framework(torch_cnn_package, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 3, 32, 32), np.float32))
    code, line = _frameworks_after(["run", str(torch_cnn_package), "--input", str(tmp_path / "x.npy"),
                                    "--output", str(tmp_path / "y.npz")])
    assert code == 0 and line == "FRAMEWORKS []"
    assert np.load(tmp_path / "y.npz")["output"].shape == (5, 10)


def test_verify_onnx_only_imports_no_framework(mlp_onnx_package):
    code, line = _frameworks_after(["verify", str(mlp_onnx_package)])
    assert code == 0 and line == "FRAMEWORKS []"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import torch

    from sample_models.torch_models import train_mlp

    d = tmp_path_factory.mktemp("saves")
    model, example = train_mlp(steps=5)
    torch.save(model.state_dict(), d / "w.pth")
    torch.save(model, d / "full.pt")
    np.savez(d / "ex.npz", **example)
    return d


def test_export_inspect_verify_run(saved, tmp_path):
    pkg = tmp_path / "pkg"
    proc = run_cli("export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
                   "--example-inputs", str(saved / "ex.npz"), "--formats", "onnx,torchscript", "--out", str(pkg))
    assert proc.returncode == 0, proc.stderr
    assert (pkg / "manifest.json").exists()

    proc = run_cli("inspect", str(pkg), "--json")
    assert proc.returncode == 0
    manifest = json.loads(proc.stdout)
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx", "torchscript"]
    proc = run_cli("inspect", str(pkg))
    assert "x" in proc.stdout and "[batch,16]" in proc.stdout and "PASS" in proc.stdout

    assert run_cli("verify", str(pkg)).returncode == 0

    np.save(tmp_path / "in.npy", np.random.default_rng(0).standard_normal((70, 16)).astype(np.float32))
    proc = run_cli("run", str(pkg), "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "o.npz"),
                   "--batch-size", "32", "--format", "torchscript")
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "o.npz")["output"].shape == (70, 4)
    again = run_cli("run", str(pkg), "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "o.npz"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_export_existing_needs_overwrite(saved, tmp_path):
    args = ["export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
            "--input-spec", "x:float32[batch,16]", "--formats", "onnx", "--out", str(tmp_path / "p")]
    assert run_cli(*args).returncode == 0
    proc = run_cli(*args)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert run_cli(*args, "--overwrite").returncode == 0


def test_parity_failure_exit_code_1(saved, tmp_path):
    proc = run_cli("export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
                   "--example-inputs", str(saved / "ex.npz"), "--formats", "onnx", "--out", str(tmp_path / "p"),
                   "--atol", "0", "--rtol", "0")
    # ONNX Runtime reorders float sums: exact equality fails, and the message gives the figures.
    assert proc.returncode == 1, proc.stderr
    assert "export parity" in proc.stderr and "max abs" in proc.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, fragment", [
    (["export", "missing.pth", "--out", "p"], "missing.pth"),
    (["export", "{full}", "--input-spec", "x:float32[batch,16]", "--out", "{tmp}/p"], "--trust"),
    (["export", "{weights}", "--input-spec", "x:float32[batch", "--out", "{tmp}/p",
      "--builder", "sample_models.torch_models:build_mlp"], "cannot be parsed"),
    (["export", "{weights}", "--input-spec", "x:float32[batch,16]", "--out", "{tmp}/p",
      "--builder", "nope.module:fn"], "cannot be imported"),
    (["verify", "{tmp}"], "manifest.json"),
    (["run", "{tmp}", "--input", "a.npy", "--output", "b.npz"], "not a recognised artifact"),
    (["export", "{weights}", "--input-spec", "x:float32[batch,16]", "--out", "{tmp}/p", "--formats", "tflite"],
     "tflite"),
])
def test_bad_input_is_one_message_exit_2(saved, tmp_path, args, fragment):
    subs = {"full": str(saved / "full.pt"), "weights": str(saved / "w.pth"), "tmp": str(tmp_path)}
    proc = run_cli(*[a.format(**subs) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "verify", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_tampered_package_fails_closed(torch_cnn_package, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(torch_cnn_package, pkg)
    onnx_file = pkg / "onnx" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    proc = run_cli("verify", str(pkg))
    assert proc.returncode == 2
    assert "onnx/model.onnx" in proc.stderr and "SHA-256" in proc.stderr


def test_schema_command_prints_json_schema():
    proc = run_cli("schema")
    assert proc.returncode == 0 and json.loads(proc.stdout)["title"] == "Manifest"


def test_schema_command_prints_the_report_schema():
    from packager.verifying import report_json_schema

    proc = run_cli("schema", "--report")
    assert proc.returncode == 0 and json.loads(proc.stdout) == report_json_schema()


# --- square brackets are text, never markup (issue 12 item 8) ----------------------------------
def test_help_keeps_square_brackets():
    proc = run_cli("export", "--help")
    assert proc.returncode == 0
    assert "float32[" in proc.stdout  # the --input-spec example the fix message points to


@pytest.mark.parametrize("name", ["[/x]", "a[b]c", "[bold]x", "[", "]x[/"])
def test_bracketed_paths_in_errors(tmp_path, name):
    missing = tmp_path / name / "pkg"
    for args in (["verify", str(missing)], ["inspect", str(missing)], ["run", str(missing), "-i", "x.npz", "-o", "y.npz"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)  # not 1 (MarkupError) nor 70
        assert name in proc.stderr.replace("\n", ""), proc.stderr
        assert "Traceback" not in proc.stderr


def test_bracketed_names_in_messages_and_the_verify_report(mlp_onnx_package, tmp_path):
    """Input names, id columns and output names with brackets, through real commands."""
    import packager

    feeds = {"x[/b]": np.zeros((2, 16), np.float32)}
    np.savez(tmp_path / "bad.npz", **feeds)
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o.npz"))
    assert proc.returncode == 2 and "x[/b]" in proc.stderr.replace("\n", ""), proc.stderr
    data = packager.Package(mlp_onnx_package).manifest.signature
    good = {s.name: np.zeros((2, 16), np.float32) for s in data.inputs}
    np.savez(tmp_path / "good.npz", **good)
    proc = run_cli("run", str(mlp_onnx_package), "-i", str(tmp_path / "good.npz"), "-o", str(tmp_path / "o.npz"),
                   "--id-column", "[/id]")
    assert proc.returncode == 2 and "[/id]" in proc.stderr.replace("\n", ""), proc.stderr

    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=1)
    pkg = packager.export(model, example, out=tmp_path / "pkg", formats=["onnx"], output_names=["logits[/red]"]).path
    proc = run_cli("verify", str(pkg), env={"COLUMNS": "300"})  # one table line per row
    assert proc.returncode == 0, proc.stderr
    assert "logits[/red]" in (proc.stdout + proc.stderr).replace("\n", "")
