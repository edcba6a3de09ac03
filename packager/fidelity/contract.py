"""Contract checks: names, dtypes, ranks and dynamic axes against the signature.

They run before any number is compared, so a renamed output or a batch axis baked to a
constant is reported as a contract failure and not as a numeric error.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from packager.signature import Signature, TensorSpec

#: ONNX TensorProto element types -> signature dtype names.
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


def _input_sizes(signature: Signature, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for spec in signature.inputs:
        arr = inputs.get(spec.name)
        if arr is None or np.ndim(arr) != spec.rank:
            continue
        for axis, dim in spec.dynamic_axes.items():
            sizes.setdefault(dim, int(np.shape(arr)[axis]))
    return sizes


def check_outputs(signature: Signature, outputs: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> list[str]:
    """Problems of one run's outputs against the signature (empty when they conform).

    Checks that the output names are exactly the signature's, and each output's dtype, rank,
    fixed dimensions, and dynamic dimensions that an input shares (an output ``batch`` axis
    must follow the input's batch size).
    """
    problems = []
    want = signature.output_names
    if not want:
        return problems
    missing = [n for n in want if n not in outputs]
    extra = [n for n in outputs if n not in set(want)]
    if missing:
        problems.append(f"output(s) {missing} missing (artifact returns {list(outputs)})")
    if extra:
        problems.append(f"output(s) {extra} are not in the signature {want}")
    sizes = _input_sizes(signature, inputs)
    for spec in signature.outputs:
        if spec.name not in outputs:
            continue
        problems += _check_array(spec, np.asarray(outputs[spec.name]), sizes)
    return problems


def _check_array(spec: TensorSpec, arr: np.ndarray, sizes: Mapping[str, int]) -> list[str]:
    out = []
    if arr.dtype.name != spec.dtype:
        out.append(f"output {spec.name!r} has dtype {arr.dtype.name}, signature says {spec.dtype}")
    if arr.ndim != spec.rank:
        return out + [f"output {spec.name!r} has rank {arr.ndim} {list(arr.shape)}, signature says "
                      f"{spec.rank} {spec.shape_str()}"]
    for axis, dim in enumerate(spec.shape):
        size = arr.shape[axis]
        if isinstance(dim, int) and size != dim:
            out.append(f"output {spec.name!r} axis {axis} is {size}, signature fixes it to {dim} "
                       f"(shape {list(arr.shape)} vs {spec.shape_str()}; channels-last vs channels-first?)")
        elif isinstance(dim, str) and dim in sizes and size != sizes[dim]:
            out.append(f"output {spec.name!r} axis {axis} ({dim!r}) is {size} but the inputs' {dim!r} is "
                       f"{sizes[dim]} (is the dynamic axis baked to a constant?)")
    return out


def _onnx_dims(value: Any) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def onnx_contract(model: Any, signature: Signature) -> list[str]:
    """Problems of an ONNX graph's declared inputs/outputs against the signature (no run needed).

    A dimension the signature declares dynamic but the graph fixes (a batch axis baked to the
    export batch) is a problem; names, element types and ranks must match.
    """
    problems = []
    graph_inputs = {v.name: v for v in model.graph.input}
    if len(graph_inputs) > len(signature.inputs):  # IR < 4 lists initializers as inputs too
        initializers = {t.name for t in model.graph.initializer}
        graph_inputs = {k: v for k, v in graph_inputs.items() if k not in initializers}
    graph_outputs = {v.name: v for v in model.graph.output}
    for kind, specs, values in (("input", signature.inputs, graph_inputs), ("output", signature.outputs, graph_outputs)):
        names = [s.name for s in specs]
        missing = [n for n in names if n not in values]
        extra = [n for n in values if n not in set(names)]
        if missing:
            problems.append(f"ONNX graph lacks {kind}(s) {missing} (it has {list(values)})")
        if extra and kind == "output":
            problems.append(f"ONNX graph has {kind}(s) {extra} that are not in the signature")
        elif extra:
            problems.append(f"ONNX graph needs {kind}(s) {extra} that the signature does not feed")
        for spec in specs:
            value = values.get(spec.name)
            if value is None or not value.type.HasField("tensor_type"):
                continue
            dtype = ONNX_DTYPES.get(value.type.tensor_type.elem_type, f"type {value.type.tensor_type.elem_type}")
            if dtype != spec.dtype:
                problems.append(f"ONNX {kind} {spec.name!r} is {dtype}, signature says {spec.dtype}")
            if not value.type.tensor_type.HasField("shape"):
                continue
            dims = _onnx_dims(value)
            if len(dims) != spec.rank:
                problems.append(f"ONNX {kind} {spec.name!r} has rank {len(dims)} {dims}, signature says "
                                f"{spec.rank} {spec.shape_str()}")
                continue
            problems += _axis_problems(f"ONNX {kind} {spec.name!r}", "graph", spec, tuple(dims), f"graph {dims}",
                                       signature)
    return problems


def _axis_problems(subject: str, where: str, spec: TensorSpec, dims: tuple, shown: str,
                   signature: Signature) -> list[str]:
    """Axis-by-axis differences between an artifact's declared ``dims`` and ``spec`` (same rank)."""
    problems = []
    for axis, (want, got) in enumerate(zip(spec.shape, dims)):
        if isinstance(want, int) and isinstance(got, int) and want != got:
            problems.append(f"{subject} axis {axis} is {got}, signature says {want} "
                            f"({shown} vs {spec.shape_str()}; channels-last vs channels-first?)")
        elif isinstance(want, str) and isinstance(got, int) and not (
                signature.dim(want).min == signature.dim(want).max == got):
            problems.append(f"{subject} axis {axis} ({want!r}) is fixed to {got} in the {where} "
                            "but is dynamic in the signature (exported without dynamic axes?)")
    return problems


def native_contract(native: Signature, signature: Signature) -> list[str]:
    """Problems of the inputs an artifact declares itself (a SavedModel or Paddle program
    signature, read by its runner) against the package signature.

    Outputs are left to the run-time checks: some formats name them generically.
    """
    problems = []
    mine = {s.name: s for s in native.inputs}
    missing = [s.name for s in signature.inputs if s.name not in mine]
    extra = [n for n in mine if n not in set(signature.input_names)]
    if missing or extra:
        problems.append(f"the artifact's own signature has inputs {list(mine)}, the package signature "
                        f"{signature.input_names}")
    for spec in signature.inputs:
        own = mine.get(spec.name)
        if own is None:
            continue
        if own.dtype != spec.dtype:
            problems.append(f"artifact input {spec.name!r} is {own.dtype}, signature says {spec.dtype}")
        if own.rank != spec.rank:
            problems.append(f"artifact input {spec.name!r} has rank {own.rank} {own.shape_str()}, signature says "
                            f"{spec.rank} {spec.shape_str()}")
            continue
        problems += _axis_problems(f"artifact input {spec.name!r}", "artifact", spec, own.shape, own.shape_str(),
                                   signature)
    return problems
