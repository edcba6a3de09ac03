"""Mutation suite, TensorFlow/Keras (SavedModel + tf2onnx): broken exports are caught with the
right verdict, correct exports pass across ten seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import packager
from tests.fidelity.mutate import edit_onnx, onnx_drop_output, onnx_rename_output, swap_artifacts

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytestmark = pytest.mark.tensorflow
FORMATS = ["saved_model", "onnx"]


@pytest.fixture(scope="module")
def tf_good(fid_dir: Path) -> tuple[Any, Path]:
    from tests.fidelity import tf_models as T

    model = T.build("good")
    return model, packager.export(model, T.image_inputs(0), out=fid_dir / "tf_good").path


def _broken(kind: str, good: Any, good_pkg: Path, fid_dir: Path) -> Path:
    from tests.fidelity import tf_models as T

    model = T.broken(kind, good)
    kwargs: dict[str, Any] = {"input_spec": ["image:float32[4,8,8,3]"]} if kind == "fixed_batch" else {}
    example = None if kwargs else T.image_inputs(0, channels_first=kind == "channels_first")
    raw = packager.export(model, example, out=fid_dir / f"tf_raw_{kind}", allow_mismatch=True, **kwargs).path
    return swap_artifacts(good_pkg, raw, fid_dir / f"tf_mut_{kind}")


def test_correct_export_passes(tf_good) -> None:
    report = packager.verify(tf_good[1])
    assert report.passed and {r.format for r in report.rows} == set(FORMATS)


@pytest.mark.parametrize("kind, verdict", [
    ("dropout", "numeric"), ("batchnorm", "numeric"), ("weight", "numeric"), ("float16", "numeric"),
    ("fixed_batch", "contract"), ("channels_first", "contract"),
])
def test_broken_export_is_caught(tf_good, fid_dir: Path, kind: str, verdict: str) -> None:
    model, good = tf_good
    report = packager.verify(_broken(kind, model, good, fid_dir))
    assert {r.format: r.verdict for r in report.rows} == {f: verdict for f in FORMATS}
    assert report.exit_code == (1 if verdict == "numeric" else 3)
    if kind == "batchnorm":
        assert all(next(c for c in r.cases if c.case == "batch consistency").verdict == "numeric"
                   for r in report.rows)
    if kind in ("fixed_batch", "channels_first"):
        assert all(r.contract for r in report.rows)  # seen from the artifacts' own signatures


def test_output_dropped_or_renamed(fid_dir: Path) -> None:
    from tests.fidelity import tf_models as T

    two = T.build("two_outputs")
    example = {"x": np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)}
    good = packager.export(two, example, out=fid_dir / "tf_two").path
    assert packager.verify(good).passed
    one = T.copy_weights(two, T.build("one_output"))
    raw = packager.export(one, example, out=fid_dir / "tf_one_raw", allow_mismatch=True).path
    dropped = packager.verify(swap_artifacts(good, raw, fid_dir / "tf_one"))
    assert dropped.exit_code == 3 and {r.verdict for r in dropped.rows} == {"contract"}
    renamed = edit_onnx(good, lambda m: onnx_rename_output(m, "embedding", "hidden"), fid_dir / "tf_renamed")
    report = packager.verify(renamed, formats=["onnx"])
    assert report.exit_code == 3 and report.rows[0].verdict == "contract"
    removed = edit_onnx(good, lambda m: onnx_drop_output(m, "embedding"), fid_dir / "tf_removed")
    assert packager.verify(removed, formats=["onnx"]).exit_code == 3


@pytest.mark.parametrize("seed", range(10))
def test_no_false_alarm(fid_dir: Path, seed: int) -> None:
    from tests.fidelity import tf_models as T

    pkg = packager.export(T.build("good", seed=seed), T.image_inputs(seed), out=fid_dir / f"tf_seed{seed}",
                          seed=seed).path
    report = packager.verify(pkg, random=True, seed=seed)
    assert report.passed, [(r.format, r.worst) for r in report.rows]


def test_eager_reference_from_a_keras_file(tf_good, fid_dir: Path) -> None:
    from tests.fidelity import tf_models as T

    model, _ = tf_good
    path = fid_dir / "tf_good.keras"
    model.save(path)
    pkg = packager.export(path, T.image_inputs(0), out=fid_dir / "tf_from_file").path
    report = packager.verify(pkg, reference="eager", source=path)
    assert report.passed and report.reference == "eager"
    assert all(c.reference.startswith("eager tensorflow") for r in report.rows for c in r.cases
               if c.case not in ("batch consistency", "call order"))
