"""Inputs bound by name (issue 11, defect 1), and artifacts that load without the model's code
(defect 5, exporter side).

The minimal false pass: ``forward(a, b) = a - 2*b`` exported with ``{"b": ..., "a": ...}`` used
to feed ``b`` to ``a``; golden data computed the same wrong way made export and verify pass.
Every check here compares with the model called the way its users call it, ``model(**feeds)``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import packager
from packager.errors import ExitCode, UsageError
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


def _arrays(seed: int = 0, shape: tuple[int, ...] = (3, 4)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _run(package: Path, fmt: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import runtimes

    with runtimes.load(package, format=fmt) as runner:
        return runner.run(feeds)


@pytest.mark.torch
def test_torch_inputs_given_out_of_order_are_bound_by_name(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class AMinusTwoB(torch.nn.Module):
        def forward(self, a, b):
            return a - 2 * b

    a, b = _arrays()
    result = packager.export(AMinusTwoB(), {"b": b, "a": a}, out=tmp_path / "pkg")
    assert result.manifest.extra["input_binding"] == {"mode": "keyword", "order": ["a", "b"],
                                                      "given_order": ["b", "a"]}
    a2, b2 = _arrays(seed=1, shape=(5, 4))  # a fresh batch at another size
    for fmt in ("onnx", "torchscript", "torch_export"):
        np.testing.assert_allclose(_run(result.path, fmt, {"b": b2, "a": a2})["output"], a2 - 2 * b2, atol=1e-6)
    verify = run_cli("verify", str(result.path))
    assert verify.returncode == ExitCode.OK, verify.stdout + verify.stderr


@pytest.mark.torch
def test_torch_feeds_that_skip_a_parameter_are_called_by_keyword(tmp_path: Path) -> None:
    """HF-style forward: many optional parameters, only some fed (mask left out)."""
    torch = pytest.importorskip("torch")

    class Optional3(torch.nn.Module):
        def forward(self, x, mask=None, scale=None):
            y = x if mask is None else x * mask
            return {"y": y * scale, "total": y.sum(dim=1)}

    x, scale = _arrays()
    result = packager.export(Optional3(), {"scale": scale, "x": x}, out=tmp_path / "pkg")
    assert result.manifest.extra["input_binding"]["order"] == ["x", "scale"]
    x2, s2 = _arrays(seed=2, shape=(6, 4))
    for fmt in ("onnx", "torchscript", "torch_export"):
        out = _run(result.path, fmt, {"x": x2, "scale": s2})
        np.testing.assert_allclose(out["y"], x2 * s2, atol=1e-6)
        np.testing.assert_allclose(out["total"], x2.sum(axis=1), atol=1e-5)
    with pytest.raises(UsageError, match="script"):
        packager.export(Optional3(), {"scale": scale, "x": x}, out=tmp_path / "s", formats=["torchscript"],
                        options={"torchscript_mode": "script"})


@pytest.mark.torch
def test_a_feed_that_names_no_parameter_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class AB(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    a, b = _arrays()
    with pytest.raises(UsageError, match=r"\['c'\].*not named like the model's inputs") as info:
        packager.export(AB(), {"a": a, "c": b}, out=tmp_path / "pkg")
    assert info.value.exit_code == ExitCode.USAGE and "['a', 'b']" in str(info.value)
    assert not (tmp_path / "pkg").exists()


@pytest.mark.torch
def test_pt2_of_a_model_with_its_own_output_class_loads_without_that_class(tmp_path: Path) -> None:
    """torch.export writes the output's pytree class into the .pt2; a deployment host that never
    imported the model's library could not load it. The exporter returns a flat tuple instead."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT))
    from tests.exporters._pytree_output import ScoresModel

    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    result = packager.export(ScoresModel(), {"x": x}, out=tmp_path / "pkg", formats=["torch_export"],
                             output_names=["logits", "pooled"])
    code = ("import sys, numpy as np, runtimes\n"
            "r = runtimes.load(sys.argv[1], format='torch_export')\n"
            "out = r.run({'x': np.ones((3, 6), np.float32)})\n"
            "assert 'tests.exporters._pytree_output' not in sys.modules\n"
            "print(sorted(out), out['logits'].shape, out['pooled'].shape)\n")
    child = subprocess.run([sys.executable, "-c", code, str(result.path)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "['logits', 'pooled'] (3, 3) (3,)" in child.stdout


@pytest.mark.paddle
def test_paddle_inputs_given_out_of_order_are_bound_by_name(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")

    class AMinusTwoB(paddle.nn.Layer):
        def forward(self, a, b):
            return a - 2 * b

    a, b = _arrays()
    result = packager.export(AMinusTwoB(), {"b": b, "a": a}, out=tmp_path / "pkg")
    a2, b2 = _arrays(seed=3, shape=(5, 4))
    for fmt in result.manifest.formats:
        np.testing.assert_allclose(_run(result.path, fmt, {"b": b2, "a": a2})["output"], a2 - 2 * b2, atol=1e-5)


@pytest.mark.tensorflow
def test_keras_named_inputs_given_out_of_order_are_bound_by_name(keras_two_tower, tmp_path: Path) -> None:
    model, example = keras_two_tower
    reversed_example = dict(reversed(list(example.items())))
    result = packager.export(model, reversed_example, out=tmp_path / "pkg")
    want = model({k: v for k, v in example.items()}, training=False)
    want = {k: np.asarray(v) for k, v in want.items()} if isinstance(want, dict) else None
    for fmt in result.manifest.formats:
        got = _run(result.path, fmt, reversed_example)
        if want is not None:
            for name, value in want.items():
                np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4)
