"""packager optimize on models we did not write (issue 16's targets): a transformer encoder
(transformers BertModel) and a CNN (transformers ResNetForImageClassification, trained on a small
learnable image task) each get fp16 and int8 artifacts that meet the default budgets (int8:
top-1 agreement >= 0.99 on the calibration rows), verify by them, and record the speed-up
measured on this host (reported, not asserted: speed is for benchmarks). The same CNN untrained
shows what a top-1 miss on near ties reports."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.zoo import models as Z

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime.quantization")

BERT_SPEC = ["input_ids:int64[batch,seq=1..32]@0:100", "token_type_ids:int64[batch,seq=1..32]@0:2",
             "attention_mask:int64[batch,seq=1..32]@0:2"]
CASES = {"bert": [("fp16", None, None), ("int8", "dynamic", None), ("int8", "static", None)],
         "resnet": [("fp16", None, None), ("int8", "static", None)]}


def _package(name: str, tmp_path):
    import packager

    if name == "bert":
        out = packager.export(Z.tiny_bert(), Z.bert_feeds(2, 8, 0), out=tmp_path / "pkg", formats=["onnx"],
                              input_spec=BERT_SPEC)
        calibration = Z.bert_feeds(64, 16, 5)
    else:
        model, accuracy = Z.trained_resnet()
        assert accuracy >= 0.99  # trained: its answers are confident, so top-1 agreement means something
        out = packager.export(model, {"pixel_values": Z.blobs(4, 9)[0]}, out=tmp_path / "pkg",
                              formats=["onnx"], input_spec=["pixel_values:float32[batch,3,32,32]"])
        calibration = {"pixel_values": Z.blobs(128, 7)[0]}
    path = tmp_path / "calibration.npz"
    np.savez(path, **calibration)
    return out.path, path


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_real_models_meet_the_default_budgets(tmp_path, name, capsys):
    import packager
    from packager.fidelity.budget import DEFAULT_BUDGETS
    from packager.optimizing import optimize

    package, calibration = _package(name, tmp_path)
    for precision, method, budget in CASES[name]:
        result = optimize(package, precision=precision, method=method, calibration=calibration, overwrite=True,
                          budget=budget)
        record = result.artifact.options["optimization"]
        assert result.passed, record["tries"]
        assert record["budget"] == (budget or DEFAULT_BUDGETS["float16" if precision == "fp16" else "int8"])
        # Not a constant reference: the calibration outputs vary across rows.
        for values in record["figures"]["calibration"].values():
            assert values["cosine"] is not None
        with capsys.disabled():
            print(f"\n{name} {result.artifact.format} {method or ''}: {record['figures']['calibration']} "
                  f"speed-up {record['speed']['speedup']}x (batch {record['speed']['batch_size']}), "
                  f"{len(record['kept'])} kept")
    report = packager.verify(str(package))
    assert report.exit_code == 0, [(r.format, r.verdict, r.worst) for r in report.rows]
    formats = {r.format for r in report.rows}
    assert {"onnx_fp16", "onnx_int8"} <= formats
    manifest = json.loads((package / "manifest.json").read_text())
    assert all(a["parity"][0]["passed"] for a in manifest["artifacts"])


@pytest.mark.slow
def test_untrained_cnn_top1_miss_is_explained(tmp_path):
    """A random-init classifier's logits sit in near ties (top-2 margins down to 1e-3, below int8's
    error of ~0.1): the default int8 budget's top-1 term measures luck on them. The search either
    meets it or stops with exit 1 saying the flipped rows are near ties, never a bare figure."""
    import packager
    from packager.errors import FidelityError
    from packager.optimizing import optimize

    out = packager.export(Z.tiny_resnet(), {"pixel_values": Z.images(4, 9)}, out=tmp_path / "pkg",
                          formats=["onnx"], input_spec=["pixel_values:float32[batch,3,64,64]"])
    np.savez(tmp_path / "calibration.npz", pixel_values=Z.images(128, 7))
    try:
        optimize(out.path, precision="int8", method="static", calibration=tmp_path / "calibration.npz", max_tries=2)
    except FidelityError as exc:
        text = str(exc)
        assert "misses the budget" in text and "rows changed class" in text, text
        assert "near ties" in text, text
    # Judged by cosine and relative error instead, the same artifact is fine.
    result = optimize(out.path, precision="int8", method="static", calibration=tmp_path / "calibration.npz",
                      budget="cosine>=0.99,rel<=0.25", overwrite=True)
    assert result.passed
