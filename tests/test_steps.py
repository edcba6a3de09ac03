"""Steps of long work (export, verify) are shown as they finish: JSON lines off a terminal, a
status on one, nothing with -q (issue 18 item 4)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tests.conftest import run_cli


def _steps(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith('{"event": "step"')]


def test_verify_reports_each_phase_as_a_json_line_off_a_terminal(mlp_onnx_package: Path) -> None:
    proc = run_cli("verify", str(mlp_onnx_package))
    assert proc.returncode == 0, proc.stderr
    steps = _steps(proc.stderr)
    assert [s["step"] for s in steps] == ["static checks", "load cells", "golden", "live reference", "sweep"]
    assert all(s["command"] == "verify" and s["status"] == "done" and s["elapsed_s"] >= 0 for s in steps)
    since = [s["since_start_s"] for s in steps]
    assert since == sorted(since)
    assert not _steps(run_cli("-q", "verify", str(mlp_onnx_package)).stderr)


def test_on_a_terminal_steps_are_a_status_and_one_line_each() -> None:
    from packager.steps import StepReporter, step

    stream = io.StringIO()
    with StepReporter(stream=stream, terminal=True):
        with step("export", "onnx"):
            pass
        with step("export", "parity"):
            pass
    text = stream.getvalue()
    assert "export: onnx (" in text and "export: parity (" in text and '"event"' not in text



def test_export_reports_loading_each_format_parity_and_writing(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=2)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    np.savez(tmp_path / "ex.npz", **example)
    proc = run_cli("export", str(tmp_path / "w.pth"), "--builder", "sample_models.torch_models:build_mlp",
                   "--example-inputs", str(tmp_path / "ex.npz"), "--formats", "onnx,torchscript",
                   "-o", str(tmp_path / "pkg"))
    assert proc.returncode == 0, proc.stderr
    assert [s["step"] for s in _steps(proc.stderr)] == [
        "load torch source", "eager reference", "format onnx", "format torchscript", "parity", "write package"]
    assert proc.stdout.splitlines()[-1] == f"wrote {tmp_path / 'pkg'}"
