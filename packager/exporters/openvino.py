"""OpenVINO IR (``model.xml`` + ``model.bin``), converted from the package's ONNX artifact, or
from its ``paddle_legacy`` one.

``openvino.convert_model`` reads the very ONNX (or ``.pdmodel``) file the package ships, with the signature's
dynamic axes as dynamic dimensions of the partial shapes (a bounded axis, ``seq=1..64``, keeps
its bounds); ``openvino.save_model`` writes it with ``compress_to_fp16=False``: its default
stores fp32 weights as fp16, which a fp32 export must never become silently. The saved IR is
read back and a precision it gained (f16/bf16 constants the converted model did not have)
fails the export. The IR is then judged like every other artifact (export parity, ``verify``).

Paddle's legacy ``.pdmodel`` programs are read by OpenVINO's Paddle frontend when the package
holds a ``paddle_legacy`` artifact and no ``onnx`` one (``--formats paddle_legacy,openvino``):
paddle2onnx cannot convert some real programs (PP-OCRv4's detector and recogniser stop at
hardswish/hardsigmoid attributes) that OpenVINO reads. Paddle 3's PIR ``.json`` is not read by
OpenVINO, so those programs go through ONNX. Either way the IR is judged the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from packager.errors import ExportError, require
from packager.exporters import ArtifactSpec, ExportContext

#: Element types that are a lower precision than fp32.
LOW_PRECISION = frozenset({"f16", "bf16"})


def convert(source: Path, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    """Convert the ONNX file (or legacy Paddle ``.pdmodel``) ``source`` into ``dest/model.xml``
    (+ ``model.bin``)."""
    ov = require("openvino", purpose="convert package artifacts to OpenVINO IR")
    kind = "Paddle program" if source.suffix == ".pdmodel" else "ONNX artifact"
    try:
        model = ov.convert_model(str(source), input=_partial_shapes(ov, ctx))
    except Exception as exc:  # OpenVINO raises its own GeneralFailure / OpConversionFailure classes
        raise ExportError("format openvino", f"openvino.convert_model failed on the {kind}: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                          fix=("check that ONNX Runtime runs the onnx artifact ('packager verify'), or "
                               if kind == "ONNX artifact" else "") + "drop openvino from --formats") from None
    converted = constant_types(model)
    target = dest / "model.xml"
    ov.save_model(model, str(target), compress_to_fp16=False)
    saved = constant_types(ov.Core().read_model(str(target)))
    gained = sorted((saved - converted) & LOW_PRECISION)
    if gained:
        raise ExportError("format openvino", f"the saved IR holds {', '.join(gained)} constants that the converted "
                          "model did not have", expected=sorted(converted), got=sorted(saved),
                          fix="report this: save_model was called with compress_to_fp16=False")
    ctx.log.append(f"openvino {ov.__version__.split('-')[0]}: IR converted from {source.parent.name}/{source.name}, "
                   f"constants {', '.join(sorted(saved)) or 'none'}")
    return ArtifactSpec(path=f"{dest.name}/{target.name}",
                        options={"converted_from": f"{source.parent.name}/{source.name}",
                                 "constant_types": sorted(saved)})


def _partial_shapes(ov: Any, ctx: ExportContext) -> list[tuple[str, Any]]:
    """``(input name, PartialShape)`` per input: fixed axes as they are, dynamic ones dynamic."""
    def dimension(dim: int | str) -> Any:
        if isinstance(dim, int):
            return ov.Dimension(dim)
        info = ctx.signature.dim(dim)
        return ov.Dimension(info.min, info.max) if info.max is not None else ov.Dimension(-1)

    return [(spec.name, ov.PartialShape([dimension(d) for d in spec.shape])) for spec in ctx.signature.inputs]


def constant_types(model: Any) -> set[str]:
    """Element types of a model's constants (its weights): ``{"f32", "i64"}``."""
    return {op.get_element_type().get_type_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant"}
