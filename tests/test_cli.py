"""The real CLI in subprocesses: exit codes, one-line errors, no framework imports where none is needed."""

import json
import re
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


#: A model whose ONNX export really computes something else than eager, on every CPU: an
#: export-only code path (as detection models carry for their post-processing) adds 0.5.
EXPORT_ONLY_OFFSET = """
import torch


class ExportOnlyOffset(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.linear(x)
        if torch.onnx.is_in_onnx_export():  # true under both torch ONNX exporters
            y = y + 0.5
        return y


def build():
    return ExportOnlyOffset()
"""


def test_parity_failure_exit_code_1(saved, tmp_path):
    """A real mismatch (0.5 on every output value, far beyond any tolerance) is exit 1, not a
    rounding difference that one CPU's ONNX Runtime kernels happen to reproduce exactly."""
    import torch

    (tmp_path / "offset.py").write_text(EXPORT_ONLY_OFFSET)
    weights = torch.Generator().manual_seed(0)
    torch.save({"linear.weight": torch.randn(4, 16, generator=weights), "linear.bias": torch.zeros(4)},
               tmp_path / "w.pth")
    proc = run_cli("export", str(tmp_path / "w.pth"), "--builder", "offset:build", "--example-inputs",
                   str(saved / "ex.npz"), "--formats", "onnx,torchscript", "--out", str(tmp_path / "p"),
                   cwd=tmp_path, env={"PYTHONPATH": f"{Path(__file__).resolve().parents[1]}:{tmp_path}"})
    assert proc.returncode == 1, proc.stderr
    # The error, without the step lines (they name every format written, torchscript too).
    text = " ".join(" ".join(line for line in proc.stderr.splitlines() if '"event": "step"' not in line).split())
    assert "export parity: onnx" in text and "max abs error 0.5" in text, proc.stderr  # the figures
    assert "torchscript" not in text, proc.stderr  # traced, not exported: eager's path, which passes
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


@pytest.mark.parametrize("trigger", ["float64", "channels", "missing_argument"])
def test_inputs_the_model_rejects_are_usage_errors_not_internal(tmp_path, trigger):
    """A model that raises on the user's example inputs is exit 2 with the model's own words
    (issue 12 item 10), never exit 70 'report it'."""
    import torch

    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=1)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    args = ["export", str(tmp_path / "w.pth"), "--builder", "sample_models.torch_models:build_mlp", "--out",
            str(tmp_path / "p"), "--formats", "onnx"]
    if trigger == "float64":
        np.savez(tmp_path / "x.npz", x=example["x"].astype(np.float64))
        args += ["--example-inputs", str(tmp_path / "x.npz")]
        fragment = "float64"
    elif trigger == "channels":
        args += ["--input-spec", "x:float32[batch,17]"]
        fragment = "float32[4, 17]"
    else:
        (tmp_path / "two.py").write_text(
            "import torch\nclass Two(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.w = torch.nn.Parameter(torch.ones(3))\n"
            "    def forward(self, x, scale):\n        return x * self.w * scale\n"
            "def build():\n    return Two()\n")
        torch.save({"w": torch.ones(3)}, tmp_path / "w.pth")
        args = ["export", str(tmp_path / "w.pth"), "--builder", "two:build", "--out", str(tmp_path / "p"),
                "--formats", "onnx", "--input-spec", "x:float32[batch,3]"]
        fragment = "scale"
    proc = run_cli(*args, cwd=tmp_path, env={"PACKAGER_PARITY_IN_PROCESS": "1",
                                             "PYTHONPATH": f"{Path(__file__).resolve().parents[1]}:{tmp_path}"})
    assert proc.returncode == 2, proc.stderr
    assert "example inputs" in proc.stderr and fragment in proc.stderr.replace("\n", ""), proc.stderr
    assert "report it" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists()


def test_missing_framework_is_a_usage_error(tmp_path):
    """``export model.pth`` where torch is not installed: exit 2 naming the extra (issue 12 item 10)."""
    (tmp_path / "w.pth").write_bytes(b"PK")  # never read: the framework is missing first
    code = ("import sys; sys.modules['torch'] = None; from packager.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    for extra in ([], ["--framework", "torch"]):
        proc = subprocess.run([sys.executable, "-c", code, "export", str(tmp_path / "w.pth"), *extra,
                               "--input-spec", "x:float32[batch,3]", "--out", str(tmp_path / "p")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "packager[torch]" in proc.stderr and "report it" not in proc.stderr


# --- CLI conventions (issue 13 C): --version, --debug anywhere, -o for every output ---------------
def test_version_prints_the_version_and_imports_no_framework():
    import packager

    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"packager {packager.__version__}\n"
    code, line = _frameworks_after(["--version"])
    assert code == 0 and line == "FRAMEWORKS []"


@pytest.mark.parametrize("where", ["before", "after", "middle"])
def test_debug_before_or_after_the_command(tmp_path, where):
    args = {"before": ["--debug", "verify", str(tmp_path)], "after": ["verify", str(tmp_path), "--debug"],
            "middle": ["verify", "--debug", str(tmp_path), "--no-sweep"]}[where]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "No such option" not in proc.stderr
    assert "Traceback" in proc.stderr and "manifest.json" in proc.stderr.replace("\n", "")
    plain = run_cli("verify", str(tmp_path))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr


def test_debug_is_hoisted_only_before_a_double_dash():
    from packager.cli import _hoist_debug

    assert _hoist_debug(["verify", "p", "--debug"]) == (["--debug", "verify", "p"], True)
    assert _hoist_debug(["--debug", "verify", "--debug"]) == (["--debug", "verify"], True)
    assert _hoist_debug(["verify", "p"]) == (["verify", "p"], False)
    assert _hoist_debug(["run", "--", "--debug"]) == (["run", "--", "--debug"], False)
    # -q/-v move too (the root parses them); -v counts, so each stays; a flag after -- stays put.
    assert _hoist_debug(["verify", "p", "-v", "-v", "-q"]) == (["-v", "-v", "-q", "verify", "p"], False)
    assert _hoist_debug(["export", "m", "--quiet", "--", "-v"]) == (["--quiet", "export", "m", "--", "-v"], False)


def test_every_command_documents_the_common_options_in_its_help():
    import typer

    from packager.cli import app

    for name in typer.main.get_command(app).commands:
        proc = run_cli(name, "--help")
        assert proc.returncode == 0, (name, proc.stderr)
        text = " ".join(proc.stdout.split())
        assert "-q/--quiet, -v/--verbose (-vv) and --debug" in text, (name, proc.stdout)


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_export_and_verify_print_only_the_result_line(saved, tmp_path, where):
    pkg = tmp_path / "pkg"
    export = ["export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
              "--example-inputs", str(saved / "ex.npz"), "--formats", "onnx", "--out", str(pkg)]
    quiet = (lambda args: ["-q", *args]) if where == "before" else (lambda args: [*args, "--quiet"])
    proc = run_cli(*quiet(export))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"wrote {pkg}"] and proc.stderr == ""
    proc = run_cli(*quiet(["verify", str(pkg)]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("PASS: "), proc.stdout
    loud = run_cli("verify", str(pkg))
    assert loud.returncode == 0 and len(loud.stdout.splitlines()) > 3 and loud.stdout.splitlines()[-1][:5] == "PASS:"


def test_quiet_run_keeps_the_summary_line_and_drops_the_notes(mlp_onnx_package, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((7, 16), np.float32))
    args = ["run", str(mlp_onnx_package), "--input", str(tmp_path / "x.npy")]
    loud = run_cli(*args, "--output", str(tmp_path / "a.npz"))
    quiet = run_cli("-q", *args, "--output", str(tmp_path / "b.npz"))
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    # Without a terminal, run writes JSON-lines progress to stderr; -q leaves the summary line alone.
    assert quiet.stdout == "" and len(quiet.stderr.splitlines()) == 1, quiet.stderr
    assert quiet.stderr.startswith("wrote 7 of 7 rows to "), quiet.stderr
    assert '"event": "progress"' in loud.stderr and loud.stderr.splitlines()[-1].startswith("wrote 7 of 7 rows")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["output"], np.load(tmp_path / "b.npz")["output"])


def test_verbose_export_shows_the_export_phases(saved, tmp_path):
    proc = run_cli("export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
                   "--example-inputs", str(saved / "ex.npz"), "--formats", "onnx,torchscript",
                   "--out", str(tmp_path / "pkg"), "-v")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^packager: exported onnx \(onnx/model\.onnx\) in [0-9.]+ s$", proc.stderr, re.M), proc.stderr
    assert re.search(r"^packager: exported torchscript ", proc.stderr, re.M), proc.stderr
    plain = run_cli("export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
                    "--example-inputs", str(saved / "ex.npz"), "--formats", "onnx", "--out", str(tmp_path / "p2"))
    assert plain.returncode == 0 and "packager: exported" not in plain.stderr


def test_quiet_and_verbose_together_is_a_usage_error(tmp_path):
    proc = run_cli("-q", "verify", str(tmp_path), "-v")
    assert proc.returncode == 2, proc.stderr
    assert "contradict" in proc.stderr and "Traceback" not in proc.stderr


def test_every_output_option_has_o_and_both_long_names():
    import typer

    from packager.cli import app

    group = typer.main.get_command(app)
    with_output = {}
    for name, command in group.commands.items():
        for param in command.params:
            names = set(param.opts) | set(param.secondary_opts)
            if param.param_type_name == "option" and names & {"-o", "--out", "--output"}:
                with_output[name] = names
    assert set(with_output) == {"export", "run", "pack", "demo", "triton"}
    for name, names in with_output.items():
        assert {"-o", "--out", "--output"} <= names, (name, names)


def test_output_aliases_work(mlp_onnx_package, saved, tmp_path):
    proc = run_cli("export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
                   "--input-spec", "x:float32[batch,16]", "--formats", "onnx", "--output", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "e" / "manifest.json").exists()
    proc = run_cli("pack", str(mlp_onnx_package), "--output", str(tmp_path / "a.tar.gz"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.tar.gz").exists()
    proc = run_cli("pack", str(mlp_onnx_package), "-o", str(tmp_path / "b.tar.gz"))
    assert proc.returncode == 0 and (tmp_path / "b.tar.gz").exists(), proc.stderr
    np.save(tmp_path / "x.npy", np.zeros((3, 16), np.float32))
    for flag, name in (("-o", "o1.npz"), ("--out", "o2.npz"), ("--output", "o3.npz")):
        proc = run_cli("run", str(mlp_onnx_package), "-i", str(tmp_path / "x.npy"), flag, str(tmp_path / name))
        assert proc.returncode == 0, (flag, proc.stderr)
        assert np.load(tmp_path / name)["output"].shape[0] == 3


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted_by_a_library"])
def test_ctrl_c_in_any_command_prints_the_message_exits_130_and_leaves_nothing(tmp_path: Path, converted: bool
                                                                               ) -> None:
    """typer turned Ctrl-C outside `run` into a silent exit 130; the message is documented for
    every command, and an interrupted export must leave no hidden temp folder. A library that
    turns the KeyboardInterrupt into another error (pydantic, converters did) gave exit 70."""
    import os
    import signal
    import time

    import torch

    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "w.pt")
    marker = tmp_path / "building"
    (tmp_path / "slowbuild.py").write_text(
        "import pathlib, time, torch\n"
        "def build():\n"
        f"    pathlib.Path({str(marker)!r}).write_text('x')\n"
        + ("    try:\n        time.sleep(120)\n    except KeyboardInterrupt:\n"
           "        raise RuntimeError('a library swallowed the interrupt')\n" if converted else
           "    time.sleep(120)\n") +
        "    return torch.nn.Linear(4, 2)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "packager", "export", str(tmp_path / "w.pt"), "--builder",
         f"{tmp_path / 'slowbuild.py'}:build", "--input-spec", "x:float32[batch,4]", "-o", str(tmp_path / "pkg")],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the builder was never called"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted; nothing was left half-written" in stderr and "Traceback" not in stderr
    # One line: what was kept, and how to go on.
    assert "no package was written (the destination is unchanged); run the same command again" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["building", "slowbuild.py", "w.pt"]


# --- builders are found the way Python users expect (issue 18) ---------------------------------
def _console_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``packager`` console script: unlike ``python -m``, it does not put the
    current folder on sys.path itself."""
    script = Path(sys.executable).parent / "packager"
    if not script.is_file():
        pytest.skip("no packager console script next to this interpreter")
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_builder_module_of_the_current_folder_from_the_console_script(saved, tmp_path):
    (tmp_path / "mymodels.py").write_text("from sample_models.torch_models import build_mlp as build\n")
    proc = _console_script("export", str(saved / "w.pth"), "--builder", "mymodels:build", "--example-inputs",
                           str(saved / "ex.npz"), "--formats", "onnx", "-o", "pkg", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pkg" / "manifest.json").is_file()


def test_builder_file_imports_the_modules_beside_it(saved, tmp_path):
    models = tmp_path / "other" / "dir"
    models.mkdir(parents=True)
    (models / "layers.py").write_text("from sample_models.torch_models import build_mlp\n")
    (models / "blocks.py").write_text("SIZE = 16\n")
    (models / "file.py").write_text("from layers import build_mlp\n\n\ndef build():\n"
                                    "    import blocks  # imported when the builder runs\n\n"
                                    "    assert blocks.SIZE == 16\n    return build_mlp()\n")
    proc = _console_script("export", str(saved / "w.pth"), "--builder", "other/dir/file.py:build",
                           "--example-inputs", str(saved / "ex.npz"), "--formats", "onnx", "-o", "pkg", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_a_missing_builder_file_says_it_does_not_exist(saved, tmp_path):
    proc = run_cli("export", str(saved / "w.pth"), "--builder", "modles/file.py:build", "--example-inputs",
                   str(saved / "ex.npz"), "-o", "pkg", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "file 'modles/file.py' does not exist" in proc.stderr and "cannot be imported" not in proc.stderr
    assert str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr


def test_cli_fixes_name_flags_not_api_keywords(saved, tmp_path):
    args = ("export", str(saved / "w.pth"), "--builder", "sample_models.torch_models:build_mlp", "--example-inputs",
            str(saved / "ex.npz"), "--formats", "onnx", "-o", str(tmp_path / "pkg"))
    assert run_cli(*args).returncode == 0
    again = run_cli(*args)
    assert again.returncode == 2 and "pass --overwrite to replace it" in again.stderr, again.stderr
    assert "=True" not in again.stderr


def test_every_fix_reads_as_cli_flags_on_the_command_line():
    """Each ``fix=`` text in packager and runtimes, as the CLI prints it, has no API keyword
    (``overwrite=True``): the CLI shows the flag form (packager.errors.cli_words)."""
    import ast
    import re

    from packager.errors import cli_words

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in [*(root / "packager").rglob("*.py"), *(root / "runtimes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for kw in getattr(node, "keywords", []) if isinstance(node, ast.Call) else []:
                if kw.arg not in ("fix", "fix_suffix"):
                    continue
                text = "".join(c.value for c in ast.walk(kw.value) if isinstance(c, ast.Constant)
                               and isinstance(c.value, str))
                if re.search(r"\b[a-z_]+=(True|False)\b", cli_words(text)):
                    found.append(f"{path.relative_to(root)}:{kw.value.lineno}: {text}")
    assert not found, found
