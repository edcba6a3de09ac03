"""OpenVINO int8 with NNCF (format openvino_int8) on the sample transformer's IR, the real libraries."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from packager.errors import UsageError
from packager.manifest import MANIFEST_NAME
from packager.optimizing import optimize
from tests.conftest import run_cli

pytest.importorskip("nncf")


def test_nncf_int8_ir_is_quantised_judged_and_runs(torch_openvino_package, copy_of, tmp_path) -> None:
    package = copy_of(torch_openvino_package)
    calibration = tmp_path / "ids.npz"
    np.savez(calibration, ids=np.random.default_rng(0).integers(0, 100, (64, 16)))
    result = optimize(package, precision="int8", source="openvino", calibration=calibration)
    assert result.passed
    manifest = json.loads((package / MANIFEST_NAME).read_text())
    art = next(a for a in manifest["artifacts"] if a["format"] == "openvino_int8")
    record = art["options"]["optimization"]
    assert record["tool"].startswith("nncf ") and record["fake_quantize_nodes"] >= 4
    assert record["from"] == "openvino" and record["calibration"]["rows"] == 64
    xml = (package / art["path"]).read_text()
    assert "FakeQuantize" in xml
    # Saved with compress_to_fp16=False: no weight became fp16 on the way.
    assert "f16" not in set(re.findall(r'element_type="([a-z0-9]+)"', xml))
    assert run_cli("verify", str(package), "--format", "openvino_int8").returncode == 0

    with pytest.raises(UsageError, match="needs calibration data"):
        optimize(package, precision="int8", source="openvino",
                 method="static", overwrite=True)
