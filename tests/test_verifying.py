"""The fidelity engine end to end: matrix, sweep, references, noise floor, inputs, reports, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import packager
from packager.errors import InputError, TrustRequiredError, UsageError
from tests.conftest import HAS_GPU, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _cases(report, fmt: str) -> dict:
    row = next(r for r in report.rows if r.format == fmt)
    return {c.case: c for c in row.cases}


@pytest.fixture(scope="session")
def seq_package(session_dir: Path) -> Path:
    """A transformer-free sequence model (fast) with a declared seq range: every torch format."""
    import torch

    from tests.fidelity.models import Noisy

    torch.manual_seed(0)
    model = Noisy(noise=0.0).eval()
    return packager.export(model, out=session_dir / "seq", input_spec=["x:float32[batch,seq=2..6,4]"]).path


@pytest.fixture(scope="session")
def weight_broken_onnx(mlp_onnx_package: Path, session_dir: Path) -> Path:
    """The MLP's ONNX with one initializer scaled by 1.01 (golden data of the correct model)."""
    from onnx import numpy_helper

    from tests.fidelity.mutate import edit_onnx

    def scale(model) -> None:
        init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))

    return edit_onnx(mlp_onnx_package, scale, session_dir / "mlp_broken")


def test_onnx_only_package(mlp_onnx_package: Path) -> None:
    report = packager.verify(mlp_onnx_package)
    assert report and report.exit_code == 0 and len(report.rows) == 1
    row = report.rows[0]
    assert {c.name: c.passed for c in row.structure} == {"onnx.checker": True, "shape inference": True,
                                                         "initializer sizes": True, "IR version": True,
                                                         "opset": True}
    cases = _cases(report, "onnx")
    assert list(cases) == ["golden", "batch=1", "batch=3", "batch consistency", "call order"]
    assert cases["batch=1"].reference == "golden row 0" and cases["batch=1"].inputs == {"x": [1, 16]}
    assert cases["batch=3"].inputs == {"x": [3, 16]}
    out = cases["golden"].outputs[0]
    assert out.passed and out.min_atol is not None and out.cosine > 0.9999 and out.top1_agreement == 1.0
    assert report.live_reference is None  # nothing needed one
    assert row.parity.passed and row.parity.outputs[0].name == "output"  # the foundation's row shape


def test_truncated_initializer_is_named_by_the_structural_checks(mlp_onnx_package: Path, tmp_path: Path) -> None:
    """Raw weight bytes that do not fill their dims: the checker skips this, our scan names it."""
    from tests.fidelity.mutate import edit_onnx

    def truncate(model) -> None:
        init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        init.raw_data = init.raw_data[:-4]

    report = packager.verify(edit_onnx(mlp_onnx_package, truncate, tmp_path / "truncated"))
    sizes = next(c for c in report.rows[0].structure if c.name == "initializer sizes")
    assert not sizes.passed and "holds" in sizes.detail and "need" in sizes.detail
    assert not report and report.exit_code in (3, 4)


def test_sweep_of_other_dims_uses_the_reference_artifact(seq_package: Path) -> None:
    report = packager.verify(seq_package)
    assert report.passed, [(r.format, r.worst) for r in report.rows]
    # The golden data are at seq=6 (the declared max): the other extreme is swept.
    assert report.cases == ["golden", "batch=1", "batch=3", "seq=2"]
    assert report.live_reference.startswith("artifact torchscript")
    assert report.deterministic is True and report.noise_floor == {}
    onnx = _cases(report, "onnx")
    assert onnx["seq=2"].inputs["x"][1] == 2 and onnx["seq=2"].reference.startswith("artifact torchscript")
    assert onnx["seq=2"].outputs[0].passed
    ts = _cases(report, "torchscript")
    assert "live reference" in ts["seq=2"].reference  # never judged against itself
    designated = packager.verify(seq_package, reference="torch_export", formats=["onnx", "torch_export"])
    assert designated.live_reference.startswith("artifact torch_export")


def test_noise_floor_of_a_non_deterministic_eager_reference(session_dir: Path) -> None:
    import torch

    from tests.fidelity.models import build_noisy

    model = build_noisy()
    state = session_dir / "noisy_state.pt"
    torch.save(model.state_dict(), state)
    pkg = packager.export(state, out=session_dir / "noisy", builder="tests.fidelity.models:build_noisy",
                          input_spec=["x:float32[batch,seq=2..6,4]"], formats=["onnx"], atol=1e-2).path
    strict = packager.verify(pkg)
    assert strict.exit_code == 1  # judged against fixed golden data, the noise fails
    floored = packager.verify(pkg, reference="eager", source=state, builder="tests.fidelity.models:build_noisy")
    assert floored.deterministic is False and 0 < floored.noise_floor["output"] < 1e-3
    assert any("not deterministic" in n for n in floored.notes)
    assert floored.passed, [(r.worst, [c.case for c in r.cases if not c.passed]) for r in floored.rows]
    golden = _cases(floored, "onnx")["golden"]
    assert golden.reference.startswith("eager torch") and "noise floor" in golden.outputs[0].tolerance_source


def test_eager_reference_rebuilds_the_model(session_dir: Path) -> None:
    import torch

    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=3)
    state = session_dir / "mlp_state.pt"
    torch.save(model.state_dict(), state)
    pkg = packager.export(state, example, out=session_dir / "mlp_eager", formats=["onnx"],
                          builder="sample_models.torch_models:build_mlp").path
    # The manifest names a source and a builder: a package may not choose the code that judges
    # it, so using them needs trust; naming them yourself does not.
    with pytest.raises(TrustRequiredError, match="--builder"):
        packager.verify(pkg, reference="eager", source=state)
    report = packager.verify(pkg, reference="eager", source=state, builder="sample_models.torch_models:build_mlp")
    assert report.passed and report.reference == "eager"
    assert packager.verify(pkg, reference="eager", trust=True).passed  # source and builder from the manifest
    assert all(c.reference.startswith("eager torch") for c in _cases(report, "onnx").values()
               if c.case not in ("batch consistency", "call order"))
    with pytest.raises(InputError):
        packager.verify(pkg, reference="eager", source=session_dir / "missing.pt")


def test_user_inputs_and_random_inputs(seq_package: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32))
    report = packager.verify(seq_package, inputs=data, random=True, formats=["onnx", "torchscript"])
    assert report.passed and report.cases[-2:] == ["random", "user"]
    user = _cases(report, "onnx")["user"]
    assert user.inputs == {"x": [5, 3, 4]} and user.reference.startswith("artifact torchscript")
    np.savez(data, x=np.zeros((5, 3, 4), np.int32))
    with pytest.raises(InputError):
        packager.verify(seq_package, inputs=data)


def test_int_input_range_read_from_the_onnx_embedding(torch_transformer_package: Path) -> None:
    from packager.fidelity.onnx_checks import load_graph
    from packager.fidelity.sweep import onnx_int_ranges
    from packager.package import Package

    manifest = Package(torch_transformer_package).manifest
    spec = manifest.signature.inputs[0].model_copy(update={"value_range": None})
    signature = manifest.signature.model_copy(update={"inputs": [spec]})
    graph = load_graph(torch_transformer_package / manifest.artifact("onnx").path)
    assert onnx_int_ranges(graph, signature) == {"ids": (0.0, 100.0)}


def test_numeric_failure_report_and_plots(weight_broken_onnx: Path, tmp_path: Path) -> None:
    report = packager.verify(weight_broken_onnx)
    assert not report and report.exit_code == 1 and report.rows[0].verdict == "numeric"
    golden = _cases(report, "onnx")["golden"].outputs[0]
    assert golden.min_atol > golden.atol and golden.out_of_tolerance > 0
    from packager.fidelity.report_html import render

    page = render(report)
    assert page.count("data:image/png;base64,") >= 1 and "NUMERIC" in page


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_per_cell_error(mlp_onnx_package: Path) -> None:
    report = packager.verify(mlp_onnx_package, devices=["cpu", "cuda"])
    by_device = {r.device: r for r in report.rows}
    assert by_device["cpu"].passed
    assert by_device["cuda:0"].verdict == "runtime" and "CUDA" in by_device["cuda:0"].error
    assert report.exit_code == 4 and not report


@pytest.mark.gpu
def test_cuda_cells(seq_package: Path) -> None:
    report = packager.verify(seq_package, devices=["cpu", "cuda"])
    assert report.passed and {r.device for r in report.rows} == {"cpu", "cuda:0"}


def test_bad_usage(mlp_onnx_package: Path) -> None:
    with pytest.raises(UsageError):
        packager.verify(mlp_onnx_package, reference="nonsense")
    with pytest.raises(UsageError):
        packager.verify(mlp_onnx_package, devices=["tpu"])
    with pytest.raises(InputError):
        packager.verify(Path(__file__).parent / "no-such-package")


def test_cli_reports_and_exit_codes(mlp_onnx_package: Path, weight_broken_onnx: Path, tmp_path: Path) -> None:
    import jsonschema

    from packager.verifying import report_json_schema

    js, page, junit = tmp_path / "r.json", tmp_path / "r.html", tmp_path / "r.xml"
    ok = run_cli("verify", str(mlp_onnx_package), "--json", str(js), "--html", str(page), "--junit", str(junit))
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "PASS" in ok.stdout
    data = json.loads(js.read_text())
    jsonschema.validate(data, report_json_schema())
    assert data["passed"] and data["rows"][0]["cases"][0]["outputs"][0]["min_atol"] is not None
    suites = ET.parse(junit).getroot()
    assert suites.get("failures") == "0" and int(suites.get("tests")) >= 5
    assert "<table>" in page.read_text()

    bad = run_cli("verify", str(weight_broken_onnx), "--junit", str(junit), "--json", "-")
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["exit_code"] == 1
    assert int(ET.parse(junit).getroot().get("failures")) >= 1

    tight = run_cli("verify", str(mlp_onnx_package), "--atol", "output:0", "--rtol", "0", "--no-sweep")
    assert tight.returncode in (0, 1)  # exact match is possible; the flag must parse either way
    assert run_cli("verify", str(tmp_path / "missing")).returncode == 2
    assert run_cli("verify", str(mlp_onnx_package), "--input-range", "x:oops").returncode == 2
    assert run_cli("verify", str(mlp_onnx_package), "--format", "tflite").returncode == 2


def test_copied_package_verifies_without_the_model_code(seq_package: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "elsewhere" / "pkg"
    shutil.copytree(seq_package, copy)
    env = {"PYTHONPATH": ""}
    result = run_cli("verify", str(copy), "--json", "-", cwd=tmp_path, env=env)  # tests/ is not importable there
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] and len(data["rows"]) == 3 and data["live_reference"].startswith("artifact torchscript")


def test_cli_eager_reference(session_dir: Path, tmp_path: Path) -> None:
    import torch

    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=2)
    state = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), state)
    np.savez(tmp_path / "ex.npz", **example)
    pkg = packager.export(model, example, out=tmp_path / "pkg", formats=["onnx"]).path  # in memory: no source
    missing = run_cli("verify", str(pkg), "--reference", "eager")
    assert missing.returncode == 2 and "--source" in missing.stderr
    ok = run_cli("verify", str(pkg), "--reference", "eager", "--source", str(state), "--builder",
                 "sample_models.torch_models:build_mlp", "--json", "-")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["reference"] == "eager"


def test_eager_reference_never_imports_a_builder_the_package_names(session_dir: Path, tmp_path: Path) -> None:
    """Attack: a package whose manifest names a builder module shipped beside it (every listed
    checksum still matches). ``verify --reference eager`` used to import it from the manifest."""
    import torch

    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=2)
    state = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), state)
    pkg = packager.export(state, example, out=tmp_path / "pkg", formats=["onnx"],
                          builder="sample_models.torch_models:build_mlp").path
    marker = tmp_path / "pwned"
    (tmp_path / "evil_build.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from sample_models.torch_models import build_mlp as build\n")
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["source"]["builder"] = "evil_build:build"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}"}
    refused = run_cli("verify", str(pkg), "--reference", "eager", cwd=tmp_path, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "--builder" in refused.stderr and "--trust" in refused.stderr and "Traceback" not in refused.stderr
    assert not marker.exists()
    mine = run_cli("verify", str(pkg), "--reference", "eager", "--source", str(state), "--builder",
                   "sample_models.torch_models:build_mlp", cwd=tmp_path, env=env)
    assert mine.returncode == 0, mine.stderr
    assert not marker.exists()


def test_no_framework_imported_for_onnx_packages(mlp_onnx_package: Path, tmp_path: Path) -> None:
    code = (
        "import sys, packager\n"
        f"report = packager.verify({str(mlp_onnx_package)!r})\n"
        "assert report.passed\n"
        "heavy = [m for m in ('torch', 'tensorflow', 'paddle', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from packager.cli import app\n"
        "from packager.fidelity.report_junit import write_junit\n"
        f"write_junit(report, {str(tmp_path / 'j.xml')!r})\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    help_code = ("import sys\nfrom packager.cli import main\nassert main(['--help']) == 0\n"
                 "heavy = [m for m in ('torch', 'tensorflow', 'paddle', 'matplotlib', 'onnx') if m in sys.modules]\n"
                 "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", help_code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_docs_carry_the_current_report_schema() -> None:
    import re

    from packager.verifying import report_json_schema

    text = (Path(__file__).parents[1] / "docs" / "fidelity.md").read_text()
    match = re.search(r"<!-- schema:start -->\n```json\n(.*)\n```\n<!-- schema:end -->", text, re.S)
    assert match and json.loads(match.group(1)) == report_json_schema()


def test_the_table_explains_its_terms(mlp_onnx_package: Path) -> None:
    proc = run_cli("verify", str(mlp_onnx_package))
    assert proc.returncode == 0
    assert "min atol: the smallest atol that would have passed" in proc.stdout
    assert "tol use: max |err| / (atol + rtol x max|ref|)" in proc.stdout


def _summary(report) -> tuple:
    """What a verification decided (verdicts, cases, references, outputs), without timings or figures."""
    rows = [(r.format, r.runtime, r.device, r.verdict, r.error,
             [(c.case, c.verdict, c.reference, [(o.name, o.passed) for o in c.outputs]) for c in r.cases])
            for r in report.rows]
    return report.cases, report.live_reference, report.notes, report.exit_code, rows


def test_verification_runs_its_phases_in_order(seq_package: Path) -> None:
    """The class behind ``verify``: every phase once, in order, runners closed before judging;
    ``verify()`` is that class's report."""
    from packager.verifying import Verification, VerifyOptions

    calls: list[str] = []

    class Recording(Verification):
        def close(self) -> None:
            calls.append("close")
            super().close()

        def judge(self) -> None:
            assert all(c.runner._closed for c in self.cells if c.runner is not None)
            calls.append("judge")
            super().judge()

    for phase in set(Verification.PHASES) - {"judge"}:
        def record(self, _phase=phase):
            calls.append(_phase)
            return getattr(Verification, _phase)(self)
        setattr(Recording, phase, record)
    options = VerifyOptions(formats=["onnx", "torchscript"], random=True)
    report = Recording(seq_package, options).run()
    assert calls == [*Verification.PHASES[:5], "close", *Verification.PHASES[5:]]
    assert report.live_reference and report.live_reference.startswith("artifact torchscript")
    assert _summary(report) == _summary(packager.verify(seq_package, formats=["onnx", "torchscript"], random=True))


def test_a_failed_phase_still_closes_the_runners(mlp_onnx_package: Path) -> None:
    from packager.verifying import Verification

    class Failing(Verification):
        def sweep(self) -> None:
            raise RuntimeError("sweep broke")

    verification = Failing(mlp_onnx_package)
    with pytest.raises(RuntimeError, match="sweep broke"):
        verification.run()
    assert verification.cells and all(c.runner._closed for c in verification.cells)


def test_outputs_that_depend_on_the_shapes_run_before_fail_the_call_order_check(tmp_path):
    """An artifact poisoned by its first call's shape (as OpenVINO's per-shape kernel cache was
    after a first call with seq=1) passes every case in the sweep's order, golden first; the
    call-order check runs the cases again on a fresh runner, smallest first, and fails it."""
    import torch

    from sample_models.torch_models import train_mlp
    from tests._integrity import rehash, tiny_torch_package

    class FirstCallPoisoned(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("calls", torch.zeros(()))
            self.register_buffer("poison", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(self.calls == 0) and x.shape[0] == 1:
                self.poison.fill_(1.0)
            self.calls.add_(1.0)
            return self.net(x) + self.poison

    pkg = tiny_torch_package(tmp_path, formats=("onnx", "torchscript"))
    model, _ = train_mlp(steps=3)  # train_mlp is seeded: the same weights as the package's
    torch.jit.script(FirstCallPoisoned(model.eval())).save(str(pkg / "torchscript" / "model.pt"))
    rehash(pkg)
    report = packager.verify(pkg)
    rows = {r.format: r for r in report.rows}
    assert rows["onnx"].passed
    ts = rows["torchscript"]
    by_case = {c.case: c for c in ts.cases}
    assert all(c.passed for name, c in by_case.items() if name != "call order"), by_case
    order = by_case["call order"]
    assert not order.passed and order.verdict == "numeric", order
    assert "smallest case first" in order.reference and "batch=1" in order.reference
    assert any("depend on the shapes run before" in n for n in order.notes)
    assert not report.passed
