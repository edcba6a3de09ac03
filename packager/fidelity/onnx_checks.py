"""Structural checks of an ONNX file: ``onnx.checker`` (full), shape inference, IR/opset support."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def load_graph(path: str | Path, data: bytes | bytearray | None = None) -> Any:
    """The ONNX model without external weights (enough for contract and version checks),
    parsed from ``data`` when the file's content is already in memory."""
    onnx = require("onnx", purpose="check ONNX artifacts")
    if data is not None:
        model = onnx.ModelProto()
        model.ParseFromString(data)  # takes any buffer (onnx.load_model_from_string wants bytes)
        return model
    return onnx.load(str(path), load_external_data=False)


#: Bytes per element of ONNX element types (for the initializer size check).
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _scan_initializers(model: Any, strip: bool) -> list[str]:
    """Initializers whose raw data size does not match their dims (the checker skips this);
    with ``strip``, large ones then get 8 placeholder bytes. One pass: reading ``raw_data`` copies it."""
    problems = []
    for tensor in model.graph.initializer:
        if tensor.data_location == 1:  # external data: checked by the checker with the file
            continue
        size = len(tensor.raw_data)
        if size and tensor.data_type in _ITEMSIZE:
            want = math.prod(tensor.dims) * _ITEMSIZE[tensor.data_type]
            if size != want:
                problems.append(f"initializer {tensor.name!r} holds {size} bytes, its dims {list(tensor.dims)} "
                                f"need {want}")
        if strip and size > 1024:
            tensor.raw_data = b"\0" * 8
    return problems


@dataclass
class LightGraph:
    """An ONNX file parsed for checking, its large initializers' data replaced by 8
    placeholder bytes: contracts, shape inference and the checker look at names, types and
    dims, never at weight values, and serialising 10 MB of weights for them would cost tens
    of ms."""

    model: Any
    #: Whether initializers live in external files (then checked by path, with their files).
    external: bool
    #: Initializers whose raw data size does not match their dims (the checker skips this).
    size_problems: list[str]


def load_light(path: str | Path, data: bytes | bytearray | None = None) -> LightGraph:
    """Parse an ONNX file (from ``data`` when its content is in memory) into a :class:`LightGraph`."""
    model = load_graph(path, data)
    external = any(t.data_location == 1 for t in model.graph.initializer)
    return LightGraph(model=model, external=external, size_problems=_scan_initializers(model, strip=not external))


def structural_checks(path: str | Path, graph: LightGraph | None = None) -> list[Check]:
    """``onnx.checker`` plus strict shape inference (together: ``full_check``), initializer
    sizes, and IR/opset vs ONNX Runtime.

    Args:
        path: The ONNX file.
        graph: The file as :func:`load_light` parsed it (parsed here when not given).
    """
    onnx = require("onnx", purpose="check ONNX artifacts")
    checks: list[Check] = []
    graph = graph if graph is not None else load_light(path)
    model, external, sizes = graph.model, graph.external, graph.size_problems
    # Serialised once for both checks (the checker would otherwise serialise it deterministically).
    light = model if external else model.SerializeToString()
    try:
        # External-data models are checked by path (the checker then finds their files).
        onnx.checker.check_model(str(path) if external else light, full_check=False)
        checks.append(Check(name="onnx.checker", passed=True, detail="graph, nodes, opset imports"))
    except Exception as exc:  # onnx raises ValidationError/InferenceError subclasses
        checks.append(Check(name="onnx.checker", passed=False, detail=str(exc).strip().splitlines()[0][:500]))
    try:
        if isinstance(light, bytes) and hasattr(onnx.shape_inference, "C"):
            # The binding under infer_shapes: the inferred model is not needed, only whether it fails.
            onnx.shape_inference.C.infer_shapes(light, True, True, True)
        else:
            onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
        checks.append(Check(name="shape inference", passed=True, detail="strict, with type checks and data "
                            "propagation (the checker's full_check)"))
    except Exception as exc:
        checks.append(Check(name="shape inference", passed=False, detail=str(exc).strip().splitlines()[0][:500]))
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
