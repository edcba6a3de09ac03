"""ONNX graph helpers shared by the framework exporters."""

from __future__ import annotations

from typing import Any

from packager.signature import Signature


def name_dynamic_dims(graph: Any, signature: Signature) -> None:
    """Name the graph's symbolic input/output dims after the signature (``batch``, ``seq``).

    Converters call them ``s0``, ``unk__12`` or leave them empty; named dims make the ONNX file
    document its own batch axis. Values whose rank differs are left alone, and so are fixed
    input dims (a runtime enforces those: a real mismatch the contract check must report).

    A fixed *output* dim that the signature marks dynamic is rewritten as dynamic: the
    signature's output dims were measured by running the eager model at two sizes, while the
    declared one is a converter's trace-time guess (torch's dynamo exporter declares an LSTM's
    ``seq`` output axis as the example's 8; the graph computes any length). Export parity then
    runs the artifact at other sizes, so a graph that really is fixed still fails there.
    """
    specs = {s.name: s for s in [*signature.inputs, *signature.outputs]}
    for is_output, value in [*((False, v) for v in graph.input), *((True, v) for v in graph.output)]:
        spec = specs.get(value.name)
        if spec is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != spec.rank:
            continue
        for axis, dim in enumerate(dims):
            want = spec.shape[axis]
            if isinstance(want, str) and (not dim.HasField("dim_value") or is_output):
                dim.dim_param = want  # dim_value and dim_param are one oneof: this clears the value
