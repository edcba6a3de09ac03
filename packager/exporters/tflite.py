"""LiteRT / TFLite flatbuffer (``model.tflite``), converted from the package's SavedModel.

``tf.lite.TFLiteConverter.from_saved_model`` reads the SavedModel the package ships (Keras 3
models get there through the SavedModel the tensorflow exporter writes: ``from_keras_model``
breaks on Keras 3), with TFLite's builtin ops only and no optimisations: fp32 stays fp32, nothing
is quantised. A model that needs TensorFlow kernels (Flex, ``SELECT_TF_OPS``) or custom ops is
refused here with the ops named, since the plain LiteRT interpreter cannot run it. Tensor
types are read back from the flatbuffer: a type the SavedModel did not have (float16, int8)
fails the export. The signature's dynamic axes stay ``-1`` in the flatbuffer's shape
signatures; the runner resizes them per call.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from packager.errors import ExportError, require
from packager.exporters import ArtifactSpec, ExportContext
from packager.exporters.tensorflow import DEFAULT_SIGNATURE

#: Ops of variables left unfrozen in a flatbuffer.
UNFROZEN = frozenset({"VAR_HANDLE", "READ_VARIABLE"})
#: Element types a conversion without quantisation must not introduce.
QUANTISED = frozenset({"float16", "bfloat16", "int8", "uint8", "int16", "int4"})


def convert(source: Path, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    """Convert the SavedModel folder ``source`` into ``dest/model.tflite``."""
    from runtimes._tf import import_tf

    tf = import_tf()
    flatbuffer = _convert(tf.lite.TFLiteConverter.from_saved_model(str(source), signature_keys=[DEFAULT_SIGNATURE]))
    if op_names(flatbuffer) & UNFROZEN:
        # Keras 3 variables in a SavedModel are not frozen by from_saved_model: the flatbuffer
        # keeps them as resource variables with no initialiser, which the interpreter reads as
        # garbage (XNNPACK) or refuses. The SavedModel's own serving function, loaded, freezes
        # every variable it reads.
        loaded = tf.saved_model.load(str(source))
        flatbuffer = _convert(tf.lite.TFLiteConverter.from_concrete_functions(
            [loaded.signatures[DEFAULT_SIGNATURE]], loaded))
        ctx.log.append("tflite: from_saved_model left the variables unfrozen (Keras 3 variables); converted from "
                       "the SavedModel's loaded serving function instead, which freezes them")
    target = dest / "model.tflite"
    target.write_bytes(flatbuffer)
    types = tensor_types(flatbuffer)
    inputs = {s.dtype for s in [*ctx.signature.inputs, *ctx.signature.outputs]}
    gained = sorted((types - inputs) & QUANTISED)
    if gained:
        raise ExportError("format tflite", f"the converted model holds {', '.join(gained)} tensors: it was quantised",
                          expected="the SavedModel's types", got=sorted(types),
                          fix="report this: the converter ran with no optimisations")
    ctx.log.append(f"tflite (TensorFlow {tf.__version__} converter): converted from {source.name}/, builtin ops "
                   f"only, tensor types {', '.join(sorted(types))}")
    return ArtifactSpec(path=f"{dest.name}/{target.name}",
                        options={"converted_from": f"{source.name}/", "signature_key": DEFAULT_SIGNATURE,
                                 "tensor_types": sorted(types), "runner": {"signature_key": DEFAULT_SIGNATURE}})


def _convert(converter: Any) -> bytes:
    """Run a converter with builtin ops only and no optimisations; ops it cannot lower are named."""
    from runtimes._tf import import_tf

    tf = import_tf()

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.optimizations = []  # no quantisation: fp32 weights and kernels
    try:
        return bytes(converter.convert())
    except Exception as exc:  # tf.lite's ConverterError; its .errors name the ops
        flex, custom = unsupported_ops(exc)
        if flex or custom:
            needs = "; ".join(part for part in (f"TensorFlow (Flex) kernels for {', '.join(flex)}" if flex else "",
                                               f"custom kernels for {', '.join(custom)}" if custom else "") if part)
            raise ExportError("format tflite", f"the model needs ops the LiteRT interpreter does not have: {needs}",
                              expected="TFLite builtin ops only",
                              fix="replace those ops in the model, or drop tflite from --formats (a Flex model "
                                  "needs the TensorFlow-linked interpreter, which packager does not ship)") from None
        raise ExportError("format tflite", f"TFLiteConverter failed: {' '.join(str(exc).split())[:500]}",
                          fix="drop tflite from --formats; the saved_model and onnx artifacts do not depend on it") \
            from None


def unsupported_ops(exc: BaseException) -> tuple[list[str], list[str]]:
    """TF ops the converter could not lower: (needing Flex kernels, needing custom ops)."""
    flex: list[str] = []
    custom: list[str] = []
    for error in getattr(exc, "errors", None) or []:
        op = getattr(getattr(error, "operator", None), "name", "")
        code = str(error).split("error_code:", 1)[-1].split()[0] if "error_code:" in str(error) else ""
        if op and "FLEX" in code:
            flex.append(op.removeprefix("tf."))
        elif op and "CUSTOM" in code:
            custom.append(op.removeprefix("tf."))
    if not flex and not custom:  # older converters: only the message names them
        text = str(exc)
        flex = re.findall(r"Flex ops: ([\w, ]+)", text)[:1]
        custom = re.findall(r"Custom ops: ([\w, ]+)", text)[:1]
    return sorted(set(flex)), sorted(set(custom))


def _interpreter(flatbuffer: bytes) -> Any:
    lite = require("ai_edge_litert.interpreter", purpose="read TFLite models")
    return lite.Interpreter(model_content=flatbuffer,
                            experimental_op_resolver_type=lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def op_names(flatbuffer: bytes) -> set[str]:
    """Builtin op names of a flatbuffer's main subgraph (``{"CONV_2D", "FULLY_CONNECTED"}``)."""
    return {op["op_name"] for op in _interpreter(flatbuffer)._get_ops_details()}


def tensor_types(flatbuffer: bytes) -> set[str]:
    """Element types of every tensor of a flatbuffer (``{"float32", "int32"}``)."""
    import numpy as np

    return {np.dtype(t["dtype"]).name for t in _interpreter(flatbuffer).get_tensor_details()}
