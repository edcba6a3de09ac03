"""fp16 ONNX (format ``onnx_fp16``) from the package's ONNX artifact, with onnxconverter-common.

``convert_float_to_float16(keep_io_types=True)``: weights and activations in fp16, the graph's
inputs and outputs still float32 (the signature does not change, callers feed what they fed).
Nodes in ``plan.keep`` stay fp32 (Casts around them): those whose fp32 values exceed the fp16
range on the golden/calibration data (found by :mod:`packager.optimizing.core` before the first
try) and those the budget search found costly. Back-to-back Cast pairs the converter leaves are
removed (``remove_unnecessary_cast_node``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from packager.errors import require
from packager.optimizing.plan import Made, Plan

FILE = "model.onnx"


def convert(source: Path, dest: Path, plan: Plan) -> Made:
    """Write ``dest/model.onnx``, the fp16 version of the ONNX file ``source``."""
    onnx = require("onnx", purpose="convert ONNX to fp16")
    float16 = require("onnxconverter_common.float16", purpose="convert ONNX to fp16")
    import warnings

    model = onnx.load(str(source))
    split = _split_read_outputs(model)
    with warnings.catch_warnings():  # "the model contains values out of fp16 range": kept fp32 below
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=list(plan.keep),
                                                disable_shape_infer=False)
    casts_before = sum(n.op_type == "Cast" for n in half.graph.node)
    float16.remove_unnecessary_cast_node(half.graph)
    casts_after = sum(n.op_type == "Cast" for n in half.graph.node)
    onnx.save(half, str(dest / FILE))
    blocked = set(float16.DEFAULT_OP_BLOCK_LIST)
    kept_ops = sorted({n.op_type for n in model.graph.node if n.op_type in blocked})
    converted = [n.name for n in model.graph.node if n.name not in plan.keep and n.op_type not in blocked]
    return Made(path=FILE, changed=converted, reference=source,
                record={"tool": f"onnxconverter-common {_version('onnxconverter-common')}",
                        "nodes_fp16": len(converted), "nodes_total": len(model.graph.node),
                        "ops_kept_fp32_by_the_converter": kept_ops,
                        "cast_pairs_removed": casts_before - casts_after,
                        "outputs_split": split})


def _split_read_outputs(model: Any) -> list[str]:
    """Give each graph output that other nodes also read its own Identity node.

    With ``keep_io_types`` the converter casts a graph output back to float32 but leaves the
    nodes reading the same tensor expecting fp16, and ONNX Runtime refuses the model ("Type
    (tensor(float16)) of output arg ... does not match"): BERT's pooler reads
    ``last_hidden_state``. The producer now writes ``<name>_inner``, its readers read that, and an
    Identity makes the output: same values, one type per tensor.
    """
    onnx = require("onnx", purpose="convert ONNX to fp16")
    outputs = {o.name for o in model.graph.output}
    read = {i for n in model.graph.node for i in n.input} & outputs
    for name in sorted(read):
        inner = f"{name}_inner"
        for node in model.graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}_output"))
    return sorted(read)


def _version(dist: str) -> str:
    from packager.exporting import dist_version

    return dist_version(dist)
