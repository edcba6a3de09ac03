"""Structural checks of an ONNX file: ``onnx.checker`` (full), shape inference, IR/opset support."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from packager.errors import require


class Check(BaseModel):
    """One structural check."""

    model_config = ConfigDict(extra="forbid")

    name: str
    passed: bool
    detail: str = ""
    #: ``contract`` (the file breaks the ONNX spec) or ``runtime`` (the runtime cannot load it).
    severity: str = "contract"


@functools.lru_cache(maxsize=1)
def ort_support() -> tuple[int, int]:
    """(max IR version, max default-domain opset) the installed ONNX Runtime understands.

    ORT exposes its operator schemas but not its IR version: the opset is the highest
    ``since_version`` of the default domain, the IR version the one ONNX pairs with it (or the
    installed onnx package's, whichever is higher, since ORT bundles an ONNX at least as new).
    """
    import onnx
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    opset = max((s.since_version for s in C.get_all_operator_schema() if s.domain in ("", "ai.onnx")), default=0)
    ir = onnx.IR_VERSION
    for _release, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx <= opset:
            ir = max(ir, ir_version)
    return ir, opset


def load_graph(path: str | Path) -> Any:
    """The ONNX model without external weights (enough for contract and version checks)."""
    onnx = require("onnx", extra="onnx", purpose="check ONNX artifacts")
    return onnx.load(str(path), load_external_data=False)


#: Bytes per element of ONNX element types (for the initializer size check).
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def skeleton(model: Any) -> Any:
    """A copy of ``model`` whose large initializers carry 8 placeholder bytes.

    The checker and shape inference look at types and dims, never at weight values, but
    serialising a proto for them costs time proportional to the weights (tens of ms for a
    10 MB model). Weight sizes are checked separately by :func:`initializer_problems`.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if len(tensor.raw_data) > 1024:
            tensor.raw_data = b"\0" * 8
    return copy


def initializer_problems(model: Any) -> list[str]:
    """Initializers whose raw data size does not match their dims (the checker skips this)."""
    problems = []
    for tensor in model.graph.initializer:
        if not tensor.raw_data or tensor.data_type not in _ITEMSIZE or tensor.data_location == 1:
            continue
        want = int(np.prod(tensor.dims, dtype=np.int64)) * _ITEMSIZE[tensor.data_type]
        if len(tensor.raw_data) != want:
            problems.append(f"initializer {tensor.name!r} holds {len(tensor.raw_data)} bytes, its dims "
                            f"{list(tensor.dims)} need {want}")
    return problems


def structural_checks(path: str | Path, model: Any | None = None) -> list[Check]:
    """``onnx.checker`` plus strict shape inference (together: ``full_check``), initializer
    sizes, and IR/opset vs ONNX Runtime."""
    onnx = require("onnx", extra="onnx", purpose="check ONNX artifacts")
    checks: list[Check] = []
    model = model if model is not None else load_graph(path)
    external = any(t.data_location == 1 for t in model.graph.initializer)
    light = model if external else skeleton(model)
    try:
        # External-data models are checked by path (the checker then finds their files).
        onnx.checker.check_model(str(path) if external else light, full_check=False)
        checks.append(Check(name="onnx.checker", passed=True, detail="graph, nodes, opset imports"))
    except Exception as exc:  # onnx raises ValidationError/InferenceError subclasses
        checks.append(Check(name="onnx.checker", passed=False, detail=str(exc).strip().splitlines()[0][:500]))
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
        checks.append(Check(name="shape inference", passed=True, detail="strict, with type checks and data "
                            "propagation (the checker's full_check)"))
    except Exception as exc:
        checks.append(Check(name="shape inference", passed=False, detail=str(exc).strip().splitlines()[0][:500]))
    sizes = initializer_problems(model)
    checks.append(Check(name="initializer sizes", passed=not sizes, detail="; ".join(sizes[:3]) or "match their dims"))
    try:
        max_ir, max_opset = ort_support()
    except ImportError:
        return checks
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    checks.append(Check(name="IR version", passed=model.ir_version <= max_ir, severity="runtime",
                        detail=f"file IR {model.ir_version}, ONNX Runtime supports <= {max_ir}"))
    checks.append(Check(name="opset", passed=opset <= max_opset, severity="runtime",
                        detail=f"file opset {opset}, ONNX Runtime supports <= {max_opset}"))
    return checks
