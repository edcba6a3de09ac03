"""Tables readable at 80 columns and in CI logs: no name broken mid-word (issue 13)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.text import Text

from packager.tables import print_table
from tests.conftest import run_cli

COLUMNS = ("cell", "verdict", "worst output @ case", "max abs", "min atol", "tol use", "cases")
ROW = ["paddle_inference (paddle_inference) cuda:0", Text("PASS", "green"), "logits_of_the_classifier @ golden",
       "2.98e-08", "0", "0.0213", "4/4"]


def test_off_a_terminal_every_cell_is_printed_whole() -> None:
    buf = io.StringIO()
    print_table(Console(file=buf, width=80), "verify pkg", COLUMNS, [ROW], right=("max abs",))
    lines = buf.getvalue().splitlines()
    assert lines[0] == "verify pkg" and lines[1].split() == ["cell", "verdict", "worst", "output", "@", "case",
                                                             "max", "abs", "min", "atol", "tol", "use", "cases"]
    assert set(lines[2]) <= {"-", " "}
    assert lines[3].split("  ")[0] == "paddle_inference (paddle_inference) cuda:0"
    assert "logits_of_the_classifier @ golden" in lines[3] and len(lines) == 4
    assert not any(ch in buf.getvalue() for ch in "┃│━")


def test_on_a_terminal_the_first_column_is_never_broken() -> None:
    buf = io.StringIO()
    print_table(Console(file=buf, width=80, force_terminal=True, color_system=None), "verify pkg", COLUMNS,
                [["onnx (onnxruntime) cpu", "PASS", "output @ golden", "2.98e-08", "0", "0.0213", "4/4"]])
    assert "onnx (onnxruntime) cpu" in buf.getvalue()


def test_verify_in_a_ci_log_prints_plain_columns(mlp_onnx_package: Path) -> None:
    proc = run_cli("verify", str(mlp_onnx_package))
    assert proc.returncode == 0
    row = next(line for line in proc.stdout.splitlines() if line.startswith("onnx (onnxruntime) cpu"))
    assert row.split()[3] == "PASS"
