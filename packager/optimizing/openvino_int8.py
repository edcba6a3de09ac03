"""int8 OpenVINO IR (format ``openvino_int8``) from the package's OpenVINO artifact, with NNCF.

``nncf.quantize`` over the calibration batches (post-training, min-max statistics, the
performance preset: symmetric int8 weights and activations, what OpenVINO's CPU plugin runs
fastest); ``plan.keep`` becomes NNCF's ignored scope (node names of the IR). Saved with
``compress_to_fp16=False`` like every IR packager writes. NNCF needs calibration data; there is
no dynamic form.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from packager.errors import ExportError, require
from packager.optimizing.plan import Made, Plan

FILE = "model.xml"


def convert(source: Path, dest: Path, plan: Plan) -> Made:
    """Write ``dest/model.xml`` (+ ``.bin``), the int8 version of the IR ``source``."""
    ov = require("openvino", purpose="read OpenVINO IR")
    nncf = require("nncf", purpose="quantise OpenVINO IR")
    if plan.method != "static" or not plan.calibration:
        raise ExportError("OpenVINO int8 quantisation", "needs calibration data (NNCF quantises statically)",
                          expected="--method static with --calibration", got=f"--method {plan.method}",
                          fix="pass --calibration data.npz (or --calibration random), and --method static")
    model = ov.Core().read_model(str(source))
    names = {p.get_any_name() for p in model.inputs}
    items = [{k: v for k, v in batch.items() if k in names} for batch in plan.calibration]
    rows = sum(int(next(iter(b.values())).shape[0]) for b in items if b)
    scope = nncf.IgnoredScope(names=list(plan.keep), validate=False) if plan.keep else None
    # NNCF draws progress bars on stdout and logs each step: kept for --debug, off the terminal.
    captured = io.StringIO()
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                                      preset=nncf.QuantizationPreset.PERFORMANCE, ignored_scope=scope)
    finally:
        nncf_log.setLevel(level)
    logging.getLogger("packager").debug("nncf: %s", captured.getvalue())
    ov.save_model(quantized, str(dest / FILE), compress_to_fp16=False)
    fq = [op.get_friendly_name() for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"]
    from packager.exporting import dist_version

    return Made(path=FILE, changed=fq, reference=source,
                record={"tool": f"nncf {dist_version('nncf')}", "method": "static", "preset": "performance",
                        "fake_quantize_nodes": len(fq), "calibration_rows": rows})
