"""Mutation suite, PaddlePaddle (Paddle inference via paddle_inference and paddle_jit, and
paddle2onnx): broken exports are caught with the right verdict, correct exports pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import packager
from tests.fidelity.mutate import edit_onnx, onnx_rename_output, swap_artifacts

pytest.importorskip("paddle")
pytest.importorskip("paddle2onnx")
pytestmark = pytest.mark.paddle
CELLS = {("paddle_inference", "paddle_inference"), ("paddle_inference", "paddle_jit"), ("onnx", "onnxruntime")}


@pytest.fixture(scope="module")
def pd_good(fid_dir: Path) -> tuple[Any, Path]:
    from tests.fidelity import paddle_models as P

    model = P.trained(0)
    return model, packager.export(model, P.image_inputs(0), out=fid_dir / "pd_good").path


def _broken(kind: str, good: Any, good_pkg: Path, fid_dir: Path) -> Path:
    from tests.fidelity import paddle_models as P

    model = P.float16_weights(good) if kind == "float16" else P.broken(kind, good)
    kwargs: dict[str, Any] = {}
    example: Any = P.image_inputs(0)
    if kind == "fixed_batch":
        kwargs, example = {"input_spec": ["x:float32[4,3,8,8]"]}, None
    elif kind == "channels_last":
        kwargs, example = {"input_spec": ["x:float32[batch,8,8,3]"]}, P.image_inputs(0, channels_last=True)
    raw = packager.export(model, example, out=fid_dir / f"pd_raw_{kind}", allow_mismatch=True, **kwargs).path
    return swap_artifacts(good_pkg, raw, fid_dir / f"pd_mut_{kind}")


def test_correct_export_passes(pd_good) -> None:
    report = packager.verify(pd_good[1])
    assert report.passed and {(r.format, r.runtime) for r in report.rows} == CELLS


@pytest.mark.parametrize("kind, verdict", [
    ("dropout", "numeric"), ("batchnorm", "numeric"), ("weight", "numeric"), ("float16", "numeric"),
    ("fixed_batch", "contract"), ("channels_last", "contract"),
])
def test_broken_export_is_caught(pd_good, fid_dir: Path, kind: str, verdict: str) -> None:
    model, good = pd_good
    report = packager.verify(_broken(kind, model, good, fid_dir))
    assert {r.verdict for r in report.rows} == {verdict}, [(r.format, r.runtime, r.verdict) for r in report.rows]
    assert len(report.rows) == len(CELLS)
    assert report.exit_code == (1 if verdict == "numeric" else 3)
    if kind in ("fixed_batch", "channels_last"):
        assert all(r.contract for r in report.rows)  # the programs' own input declarations


def test_output_dropped_or_renamed(fid_dir: Path) -> None:
    import paddle

    from tests.fidelity import paddle_models as P

    paddle.seed(0)
    two = P.TwoOutputs()
    two.eval()
    example = {"x": np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)}
    good = packager.export(two, example, out=fid_dir / "pd_two", output_names=["scores", "embedding"]).path
    one = P.TwoOutputs(drop=True)
    one.set_state_dict(two.state_dict())
    one.eval()
    raw = packager.export(one, example, out=fid_dir / "pd_one_raw", allow_mismatch=True, output_names=["scores"]).path
    dropped = packager.verify(swap_artifacts(good, raw, fid_dir / "pd_one"))
    assert dropped.exit_code == 3 and {r.verdict for r in dropped.rows} == {"contract"}
    renamed = edit_onnx(good, lambda m: onnx_rename_output(m, "embedding", "hidden"), fid_dir / "pd_renamed")
    assert packager.verify(renamed, formats=["onnx"]).exit_code == 3


@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.slow) if s >= 2 else s for s in range(10)])
def test_no_false_alarm(fid_dir: Path, seed: int) -> None:
    from tests.fidelity import paddle_models as P

    pkg = packager.export(P.trained(seed), P.image_inputs(seed), out=fid_dir / f"pd_seed{seed}", seed=seed).path
    report = packager.verify(pkg, random=True, seed=seed)
    assert report.passed, [(r.format, r.runtime, r.worst) for r in report.rows]
