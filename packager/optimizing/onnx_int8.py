"""int8 ONNX (format ``onnx_int8``) from the package's ONNX artifact, with ``onnxruntime.quantization``.

``quant_pre_process`` first (shape inference and the basic fusions the quantiser expects), then
either ``quantize_dynamic`` (int8 weights, activations quantised at run time per call: no
calibration) or ``quantize_static`` in QDQ format over the calibration batches (uint8
activations, int8 weights: ONNX Runtime's CPU kernels' U8S8 form). Weights are per channel by
default. ``plan.keep`` goes to ``nodes_to_exclude``: names of the pre-processed graph, which is
returned as the localisation's reference. A run that quantises no node is an error, not a
success: the artifact would be the fp32 model under an int8 name.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from packager.errors import ExportError, require
from packager.optimizing.plan import Made, Plan

FILE = "model.onnx"
#: The suffix ``quantize_dynamic`` gives the MatMul it makes of a Gemm.
GEMM_MATMUL = "_MatMul"
#: The manifest's description of the weights, by ``Plan.reduce_range``.
WEIGHTS = {True: "int8, 7-bit range (no uint8 x int8 saturation on x86 without VNNI)",
           False: "int8 (full range: exact on VNNI hosts, may saturate on AVX2-only x86)"}
#: Operators the quantised graph uses for int8 compute (dynamic and QOperator forms).
INT8_OPS = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                      "QLinearConv", "QLinearMatMul", "QGemm", "QAttention", "DynamicQuantizeLSTM"})


class _Reader:
    """The calibration batches as ONNX Runtime's ``CalibrationDataReader`` asks for them."""

    def __init__(self, batches: tuple[dict[str, np.ndarray], ...], names: set[str]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter([{k: v for k, v in b.items() if k in names}
                                                          for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def preprocess(source: Path, work: Path) -> Path:
    """``quant_pre_process`` of ``source`` into ``work`` (symbolic shape inference skipped when
    it fails: it does not know every operator)."""
    quant = require("onnxruntime.quantization", purpose="quantise ONNX models")
    target = (work / "preprocessed.onnx").resolve()
    source = Path(source).resolve()
    # An incomplete symbolic shape inference saves "sym_shape_infer_temp.onnx" and its external
    # data (uuid-named files) into the working directory before it raises: run it in the scratch
    # folder, not the user's (optimize is a single-threaded command, the chdir is safe there).
    with contextlib.chdir(work):
        try:
            quant.quant_pre_process(str(source), str(target))
        except Exception:  # symbolic shape inference raises on operators it does not know
            quant.quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return target


def quantized_nodes(model: Any) -> list[str]:
    """Names of the nodes that compute in int8: int8 operators, and QDQ nodes fed by a DequantizeLinear."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in INT8_OPS or (n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                                         and any(i in dq_outputs for i in n.input))]


def reference_name(name: str, gemms: set[str]) -> str:
    """The pre-processed graph's name of a node the quantiser made (``<name>_quant``, and
    ``<gemm>_MatMul`` for a Gemm the dynamic quantiser split)."""
    name = name.removesuffix("_quant")
    base = name.removesuffix(GEMM_MATMUL)
    return base if base in gemms else name


def convert(source: Path, dest: Path, plan: Plan) -> Made:
    """Write ``dest/model.onnx``, the int8 version of the ONNX file ``source``."""
    onnx = require("onnx", purpose="quantise ONNX models")
    quant = require("onnxruntime.quantization", purpose="quantise ONNX models")
    work = plan.work or dest
    pre = work / "preprocessed.onnx"
    if not pre.exists():
        with _quiet_quantizer():
            pre = preprocess(source, work)
    out = dest / FILE
    pre_model = onnx.load(str(pre), load_external_data=False)
    gemms = {n.name for n in pre_model.graph.node if n.op_type == "Gemm" and n.name}
    excluded = list(plan.keep)
    if plan.method == "dynamic":
        # quantize_dynamic first rewrites each Gemm into "<name>_MatMul" + "<name>_Add" and then
        # matches nodes_to_exclude against those names: exclude the MatMul a kept Gemm became.
        excluded += [f"{name}{GEMM_MATMUL}" for name in plan.keep if name in gemms]
    elif not plan.calibration:
        raise ExportError("static int8 quantisation", "has no calibration data",
                          fix="pass --calibration data.npz (or --calibration random to use generated inputs)")
    with _quiet_quantizer():
        if plan.method == "dynamic":
            quant.quantize_dynamic(str(pre), str(out), per_channel=plan.per_channel, reduce_range=plan.reduce_range,
                                   weight_type=quant.QuantType.QInt8, nodes_to_exclude=excluded or None)
        else:
            names = {i.name for i in pre_model.graph.input}
            quant.quantize_static(str(pre), str(out), _Reader(plan.calibration, names),
                                  quant_format=quant.QuantFormat.QDQ, per_channel=plan.per_channel,
                                  reduce_range=plan.reduce_range,
                                  activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                                  nodes_to_exclude=excluded or None, calibrate_method=quant.CalibrationMethod.MinMax)
    quantized = sorted({reference_name(n, gemms) for n in quantized_nodes(onnx.load(str(out), load_external_data=False))})
    from packager.exporting import dist_version

    return Made(path=FILE, changed=quantized, reference=pre,
                record={"tool": f"onnxruntime.quantization {dist_version('onnxruntime')}",
                        "method": plan.method, "format": "QDQ" if plan.method == "static" else "dynamic",
                        "per_channel": plan.per_channel, "activations": "uint8" if plan.method == "static" else
                        "uint8, quantised per call", "weights": WEIGHTS[plan.reduce_range],
                        "reduce_range": plan.reduce_range, "nodes_quantized": len(quantized),
                        "preprocess": "quant_pre_process"})


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantiser logs through the root logger (a warning per LayerNorm weight it skips, a
    line per tensor): those go to packager's debug log, not the terminal."""
    root = logging.getLogger()
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [_Keep()]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for record in records:
            logging.getLogger("packager").debug("onnxruntime.quantization: %s", record.getMessage())
