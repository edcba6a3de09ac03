"""Mutation suite, PyTorch + ONNX: each broken export is caught with the right verdict, and the
correct exports pass (zero false alarms across ten seeds).

A broken package = a deliberately broken model (or edited artifact) exported as a user would,
its artifacts swapped into a package whose golden data come from the correct model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import packager
from tests.fidelity import models as M
from tests.fidelity.conftest import TORCH_FORMATS
from tests.fidelity.mutate import edit_onnx, onnx_drop_output, onnx_rename_output, set_option

pytestmark = pytest.mark.torch


def verdicts(report: packager.verifying.VerifyReport) -> dict[str, str]:
    return {row.format: row.verdict for row in report.rows}


def case(report, fmt: str, name: str):
    row = next(r for r in report.rows if r.format == fmt)
    return next(c for c in row.cases if c.case == name)


def test_correct_export_passes(cnn) -> None:
    _model, _example, path = cnn
    report = packager.verify(path)
    assert report and report.exit_code == 0
    assert verdicts(report) == {f: "pass" for f in TORCH_FORMATS}
    for row in report.rows:
        assert [c.case for c in row.cases] == ["golden", "batch=1", "batch=3", "batch consistency", "call order"]


def test_dropout_left_in_training_mode(cnn, broken) -> None:
    model, example, good = cnn
    report = packager.verify(broken("dropout", good, M.variant(M.DropoutTraining, model), example))
    assert report.exit_code == 1
    assert verdicts(report) == {f: "numeric" for f in TORCH_FORMATS}
    for fmt in TORCH_FORMATS:
        assert case(report, fmt, "golden").verdict == "numeric"


def test_batchnorm_left_in_training_mode(cnn, broken) -> None:
    model, example, good = cnn
    report = packager.verify(broken("batchnorm", good, M.variant(M.BatchNormTraining, model), example))
    assert report.exit_code == 1
    assert verdicts(report) == {f: "numeric" for f in TORCH_FORMATS}
    for fmt in TORCH_FORMATS:
        # Batch statistics make row i depend on the other rows: batch consistency sees it too.
        consistency = case(report, fmt, "batch consistency")
        assert consistency.verdict == "numeric" and "depends on the batch" in " ".join(consistency.notes)


def test_one_weight_perturbed_by_1e_3(cnn, broken) -> None:
    model, example, good = cnn
    report = packager.verify(broken("weight", good, M.perturbed(model, "conv.weight", 1e-3), example))
    assert report.exit_code == 1
    assert verdicts(report) == {f: "numeric" for f in TORCH_FORMATS}
    out = case(report, "onnx", "golden").outputs[0]
    # The figures say how far off it is: a tolerance ~10x the default would have hidden it.
    assert 1e-4 < out.min_atol < 1e-2 and out.max_abs > out.atol
    assert out.top1_agreement is not None and out.cosine > 0.999


def test_batch_axis_fixed_to_export_batch(cnn, broken) -> None:
    model, _example, good = cnn
    path = broken("fixed_batch", good, M.variant(M.FixedBatch, model), None, input_spec=["x:float32[4,3,8,8]"])
    report = packager.verify(path)
    assert report.exit_code == 3
    assert verdicts(report) == {f: "contract" for f in TORCH_FORMATS}
    onnx_row = next(r for r in report.rows if r.format == "onnx")
    assert any("fixed to 4" in p for p in onnx_row.contract)  # seen statically, before any run
    for fmt in TORCH_FORMATS:
        assert case(report, fmt, "golden").passed  # right at the export batch ...
        assert case(report, fmt, "batch=1").verdict == "contract"  # ... wrong at any other


def test_channels_last_vs_channels_first(cnn, broken) -> None:
    model, example, good = cnn
    nhwc = {"x": np.ascontiguousarray(example["x"].transpose(0, 2, 3, 1))}
    path = broken("channels_last", good, M.variant(M.ChannelsLast, model), nhwc,
                  input_spec=["x:float32[batch,8,8,3]"])
    report = packager.verify(path)
    assert report.exit_code == 3
    assert verdicts(report) == {f: "contract" for f in TORCH_FORMATS}
    onnx_row = next(r for r in report.rows if r.format == "onnx")
    assert any("channels-last" in p for p in onnx_row.contract)


def test_float16_artifact_judged_with_fp32_tolerances(cnn, broken, fid_dir: Path) -> None:
    model, example, good = cnn
    path = broken("fp16", good, M.Float16(model), example)
    report = packager.verify(path)
    assert report.exit_code == 1
    assert verdicts(report) == {f: "numeric" for f in TORCH_FORMATS}
    out = case(report, "onnx", "golden").outputs[0]
    # Judged against the output's measured rounding noise (float64 run at export), not a table.
    assert "noise" in out.tolerance_source and "float64" in out.tolerance_source and out.min_atol > 1e-4
    # Declared as a float16 artifact, the same files are judged with float16 tolerances.
    for fmt in TORCH_FORMATS:
        set_option(path, fmt, precision="float16")
    declared = packager.verify(path, sweep=False)
    assert declared.passed, [(r.format, r.worst) for r in declared.rows]
    assert all(r.conversion == "reduced:float16" for r in declared.rows)
    for fmt in TORCH_FORMATS:
        set_option(path, fmt, precision=None)


def test_output_dropped(two_outputs, broken) -> None:
    model, example, good = two_outputs
    dropped = M.DropsOutput()
    dropped.load_state_dict(model.state_dict())
    path = broken("dropped", good, dropped.eval(), example, output_names=["scores"])
    report = packager.verify(path)
    assert report.exit_code == 3
    assert verdicts(report) == {f: "contract" for f in TORCH_FORMATS}
    golden = case(report, "torchscript", "golden")
    assert any("embedding" in p for p in golden.contract)


@pytest.mark.parametrize("edit", ["rename", "drop"])
def test_onnx_output_renamed_or_dropped(two_outputs, fid_dir: Path, edit: str) -> None:
    _model, _example, good = two_outputs
    change = (lambda m: onnx_rename_output(m, "embedding", "hidden")) if edit == "rename" else (
        lambda m: onnx_drop_output(m, "embedding"))
    path = edit_onnx(good, change, fid_dir / f"onnx_{edit}")
    report = packager.verify(path, formats=["onnx"])
    assert report.exit_code == 3 and verdicts(report) == {"onnx": "contract"}
    row = report.rows[0]
    assert any("embedding" in p for p in row.contract)
    # Contract failures are reported as such, never as numeric errors.
    assert all(o.verdict != "numeric" for c in row.cases for o in c.outputs)


def _seed_package(fid_dir: Path, seed: int, formats: list[str]) -> Path:
    model, example = M.trained_cnn(seed), M.image_inputs(seed)
    return packager.export(model, example, out=fid_dir / f"seed{seed}_{len(formats)}", formats=formats,
                           seed=seed).path


@pytest.mark.parametrize("seed", range(10))
def test_no_false_alarm_onnx_torchscript(fid_dir: Path, seed: int) -> None:
    report = packager.verify(_seed_package(fid_dir, seed, ["torchscript", "onnx"]), random=True, seed=seed)
    assert report.passed, [(r.format, r.worst, [c.case for c in r.cases if not c.passed]) for r in report.rows]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_no_false_alarm_all_formats(fid_dir: Path, seed: int) -> None:
    report = packager.verify(_seed_package(fid_dir, seed, TORCH_FORMATS), random=True, seed=seed)
    assert report.passed, [(r.format, r.worst, [c.case for c in r.cases if not c.passed]) for r in report.rows]


def test_inputs_bound_in_the_wrong_order(fid_dir: Path, broken) -> None:
    """Golden data from ``model(**feeds)`` catch an artifact that feeds ``a`` to ``b``."""
    good_model = M.TwoInputs().eval()
    rng = np.random.default_rng(0)
    feeds = {"b": rng.standard_normal((4, 6)).astype(np.float32), "a": rng.standard_normal((4, 6)).astype(np.float32)}
    good = packager.export(good_model, feeds, out=fid_dir / "two_inputs_good", formats=TORCH_FORMATS).path
    assert packager.verify(good).exit_code == 0
    swapped = M.InputsSwapped()
    swapped.load_state_dict(good_model.state_dict())
    report = packager.verify(broken("inputs_swapped", good, swapped.eval(), feeds))
    assert report.exit_code == 1
    assert verdicts(report) == {f: "numeric" for f in TORCH_FORMATS}
