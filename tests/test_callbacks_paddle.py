"""paddle.Model.fit callback: exports on improvement / at the end; failures never stop training
and never replace the last good package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("paddle")
pytestmark = pytest.mark.paddle


def test_callback_exports_on_improvement_and_keeps_the_good_package(tmp_path: Path) -> None:
    import packager
    from packager.callbacks.paddle import PackagerCallback
    from sample_models.paddle_models import fit_hapi

    out = tmp_path / "pkg"
    good = PackagerCallback(out, input_spec=["x:float32[batch,3,32,32]"], formats=["paddle_inference"],
                            monitor="loss")
    # Wrong channel count: the export fails (step: paddle.jit.save) after the good one has written.
    bad = PackagerCallback(out, input_spec=["x:float32[batch,1,32,32]"], formats=["paddle_inference"])
    model = fit_hapi(epochs=2, n=32, callbacks=[good, bad], eval_data=True)

    assert good.history and all(v.ok for _, v in good.history), good.history
    assert good.history[0][0].startswith("loss=")
    assert len(bad.history) == 1 and not bad.history[0][1].ok
    assert "kept the previous package" in bad.history[0][1].message
    # Training went on (both epochs ran) and the network is usable in train mode afterwards.
    assert model.network.training is False  # fit_hapi puts it in eval at the end
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["signature"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert packager.verify(out).passed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg.candidate-")]  # no leftovers
