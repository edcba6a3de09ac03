"""The main job (`packager demo`) on one fast sample, through the same path a user takes."""

import io
import shlex

import numpy as np
import pytest
from rich.console import Console

import packager
from packager.errors import UsageError
from sample_models.demo import run_demo
from tests.conftest import run_cli


def test_demo_sample_exports_verifies_and_runs(tmp_path):
    buf = io.StringIO()
    failed = run_demo(tmp_path, only=["torch_transformer"], console=Console(file=buf, width=120))
    assert failed == []
    assert packager.verify(tmp_path / "torch_transformer")
    assert np.load(tmp_path / "torch_transformer-outputs.npz")["output"].shape == (100, 4)
    text = buf.getvalue()
    assert "torch_transformer" in text and "PASS" in text and ".pt" in text
    # The replay commands it prints work as printed, on the packages it kept.
    replay = [line.strip() for line in text.splitlines() if line.startswith("  packager ")]
    assert [r.split()[1] for r in replay] == ["inspect", "verify", "run"]
    for command in replay:
        proc = run_cli(*shlex.split(command)[1:])
        assert proc.returncode == 0, (command, proc.stderr)


def test_unknown_sample_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nope"):
        run_demo(tmp_path, only=["nope"])
