"""ONNX graph helpers shared by the framework exporters."""

from __future__ import annotations

from typing import Any

from packager.signature import Signature


def name_dynamic_dims(graph: Any, signature: Signature) -> None:
    """Name the graph's symbolic input/output dims after the signature (``batch``, ``seq``).

    Converters call them ``s0``, ``unk__12`` or leave them empty; named dims make the ONNX file
    document its own batch axis. Fixed dims and values whose rank differs are left alone.
    """
    specs = {s.name: s for s in [*signature.inputs, *signature.outputs]}
    for value in [*graph.input, *graph.output]:
        spec = specs.get(value.name)
        if spec is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != spec.rank:
            continue
        for axis, dim in enumerate(dims):
            want = spec.shape[axis]
            if isinstance(want, str) and not dim.HasField("dim_value"):
                dim.dim_param = want
