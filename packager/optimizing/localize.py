"""Where two ONNX graphs of the same model start to differ: every intermediate tensor of both,
matched by name, compared node by node.

Used by ``packager optimize``'s budget search (which nodes cost the most accuracy: keep them in
fp32 / out of quantisation and retry) and by ``packager verify --localize`` (the first node whose
output diverges, and optionally that node alone as a failing subgraph, Polygraphy's
``debug reduce`` idea). fp16 conversion (onnxconverter-common) and ONNX Runtime's quantiser keep
the fp32 graph's node and tensor names for the nodes they change, so the reference graph's
tensors are found in the candidate; tensors only one graph has (Cast, QuantizeLinear outputs)
are skipped. Marking every tensor as a graph output stops ONNX Runtime from fusing across them:
the figures are those of the unfused graph, which is what the node names refer to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from packager.errors import UsageError, require
from packager.fidelity.budget import row_cosines

#: A node whose output's (1 - least row cosine) exceeds this, or whose error relative to the
#: output's scale exceeds :data:`DIVERGED_REL`, has diverged (``verify --localize``).
DIVERGED_COSINE = 1e-4
DIVERGED_REL = 1e-3


@dataclass
class NodeError:
    """How far one node's output is off, and how much of that the node itself added."""

    node: str
    op: str
    output: str
    #: 1 - the least row cosine of the output with the reference's.
    cosine_error: float
    max_abs: float
    rel: float
    #: ``cosine_error`` minus the largest ``cosine_error`` of the node's inputs: the error it added.
    gain: float

    @property
    def diverged(self) -> bool:
        return self.cosine_error > DIVERGED_COSINE or self.rel > DIVERGED_REL

    def line(self) -> str:
        return (f"node {self.node!r} ({self.op}) output {self.output!r}: 1-cosine {self.cosine_error:.3g}, "
                f"max abs {self.max_abs:.3g}, rel {self.rel:.3g} (added {self.gain:.3g})")


@dataclass
class Localization:
    """Every compared node of the reference graph, in topological order."""

    nodes: list[NodeError] = field(default_factory=list)
    #: Reference-graph tensors the candidate has no tensor of the same name for.
    unmatched: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> NodeError | None:
        return next((n for n in self.nodes if n.diverged), None)

    def costliest(self, count: int, exclude: set[str] = frozenset()) -> list[NodeError]:  # type: ignore[assignment]
        """The ``count`` nodes that added the most error (not already in ``exclude``)."""
        ranked = sorted((n for n in self.nodes if n.node not in exclude and n.gain > 0), key=lambda n: -n.gain)
        return ranked[:count]


def load_model(path: str | Path) -> Any:
    """The ONNX model with its external weights."""
    onnx = require("onnx", purpose="read ONNX graphs")
    return onnx.load(str(path))


def with_all_outputs(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` whose every node output is also a graph output (and their names)."""
    onnx = require("onnx", purpose="read ONNX graphs")
    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    graph = marked.graph
    present = {o.name for o in graph.output}
    names = []
    for node in graph.node:
        for out in node.output:
            if out and out not in present:
                present.add(out)
                names.append(out)
                # No type: ONNX Runtime infers it; a wrong guessed type would fail the load.
                graph.output.append(onnx.ValueInfoProto(name=out))
    return marked, names


def run_all(model: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` (graph outputs and intermediates) on ``feeds`` with ONNX Runtime."""
    ort = require("onnxruntime", purpose="run ONNX graphs")
    marked, _ = with_all_outputs(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = marked.SerializeToString()
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values))


def run_reference_evaluator(model: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` with ONNX's own reference implementation of the operators (numpy,
    the spec's semantics): the reference for a plain export's graph on a runtime."""
    require("onnx", purpose="read ONNX graphs")
    from onnx.reference import ReferenceEvaluator

    marked, _ = with_all_outputs(model)
    evaluator = ReferenceEvaluator(marked)
    names = [o.name for o in marked.graph.output]
    wanted = {i.name for i in marked.graph.input}
    values = evaluator.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values))


def _error(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float] | None:
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or ref.dtype.kind not in "fc" or got.dtype.kind not in "fc" or not ref.size:
        return None
    r, g = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r) & np.isfinite(g)
    if not finite.all():
        return (1.0, float("inf"), float("inf")) if (np.isfinite(r) != np.isfinite(g)).any() else None
    diff = float(np.abs(r - g).max())
    scale = float(np.abs(r).max())
    rows = r if r.ndim else r.reshape(1)
    cos = float(row_cosines(rows, g if g.ndim else g.reshape(1)).min())
    return max(0.0, 1.0 - cos), diff, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


#: Ops whose int8 form ends in another op that carries the original output's name (dynamic
#: quantisation: MatMulInteger, then a Mul by the scales).
_DECOMPOSED = frozenset({"MatMul", "Gemm", "Conv", "Attention", "LSTM"})
_TAILS = frozenset({"Mul", "Add", "Cast", "DequantizeLinear"})


def same_computation(ref_op: str, cand_op: str | None) -> bool:
    """Whether the candidate tensor of a reference tensor's name was computed by the same
    operation: the same op, its int8/fp16 form (QLinearConv, MatMulInteger), or the tail of its
    quantised decomposition. Quantisers also drop ops (a Relu after a Conv is folded into the
    quantisation's clipping) and give their output name to another tensor: compared, those would
    report a divergence that is only a renaming."""
    if cand_op is None:
        return False
    return cand_op == ref_op or ref_op in cand_op or (ref_op in _DECOMPOSED and cand_op in _TAILS)


def dequantized_names(model: Any) -> dict[str, str]:
    """Tensor -> the output of the DequantizeLinear its QuantizeLinear feeds (QDQ graphs)."""
    quantize = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {quantize[n.input[0]]: n.output[0] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input and n.input[0] in quantize}


def owners(reference: Any, excludable: set[str]) -> dict[str, str]:
    """Each node of ``reference`` -> the nearest node at or above it named in ``excludable``
    (the nodes the quantiser changed), following first data inputs: a Relu's error is its
    Conv's doing when only the Conv can be kept out of quantisation."""
    initializers = {i.name for i in reference.graph.initializer}
    producer = {o: n for n in reference.graph.node for o in n.output}
    found: dict[str, str] = {}
    for node in reference.graph.node:
        name = node.name or node.output[0]
        here, steps = node, 0
        while here is not None and (here.name or here.output[0]) not in excludable and steps < 8:
            data = next((i for i in here.input if i and i not in initializers), None)
            here, steps = producer.get(data) if data else None, steps + 1
        if here is not None and (here.name or here.output[0]) in excludable:
            found[name] = here.name or here.output[0]
    return found


def compare(reference: Any, ref_values: Mapping[str, np.ndarray], cand_values: Mapping[str, np.ndarray],
            candidate: Any = None) -> Localization:
    """Each node of the ``reference`` graph whose first output both graphs computed (by the same
    operation, :func:`same_computation`, when the ``candidate`` graph is given), with its error
    and the error it added over its inputs."""
    result = Localization()
    errors: dict[str, float] = {}
    producers = ({o: n.op_type for n in candidate.graph.node for o in n.output} if candidate is not None else None)
    quantized = dequantized_names(candidate) if candidate is not None else {}
    for node in reference.graph.node:
        out = next((o for o in node.output if o), None)
        if out is None or out not in ref_values:
            continue
        # A QDQ graph's consumers read the tensor after its QuantizeLinear/DequantizeLinear pair:
        # that is the value to compare (it also undoes a fused activation: a Relu folded into a
        # Conv is the uint8 clipping at zero, and the Conv's output took the Relu's name).
        got_name = quantized.get(out)
        if got_name is None and producers is not None and out in producers \
                and not same_computation(node.op_type, producers[out]):
            result.unmatched += 1
            continue
        got_name = got_name or out
        if got_name not in cand_values:
            result.unmatched += 1
            continue
        figures = _error(ref_values[out], cand_values[got_name])
        if figures is None:
            continue
        cos_err, max_abs, rel = figures
        errors[out] = cos_err
        upstream = max((errors.get(i, 0.0) for i in node.input if i), default=0.0)
        result.nodes.append(NodeError(node.name or out, node.op_type, out, cos_err, max_abs, rel, cos_err - upstream))
    return result


def localize(reference: Any, candidate: Any, feeds: Mapping[str, np.ndarray],
             reference_runner: Callable[[Any, Mapping[str, np.ndarray]], dict[str, np.ndarray]] = run_all
             ) -> Localization:
    """Run both graphs with every tensor marked and compare them node by node."""
    return compare(reference, reference_runner(reference, feeds), run_all(candidate, feeds), candidate)


def write_subgraph(candidate_path: Path, candidate: Any, node: NodeError, reference: Any,
                   feeds: Mapping[str, np.ndarray], ref_values: Mapping[str, np.ndarray], dest: Path) -> list[Path]:
    """The diverging node as the candidate computes it, cut out of the candidate graph
    (``onnx.utils.extract_model``: from the node's data inputs to its output, QuantizeLinear/
    DequantizeLinear and Casts in between included), plus an .npz with its inputs and the
    reference's output (``expected:<name>``): the smallest failing subgraph, to file with a
    runtime's or converter's bug, Polygraphy ``debug reduce``'s idea for one node."""
    require("onnx", purpose="read ONNX graphs")
    import onnx.utils

    target = next(n for n in reference.graph.node if (n.name or n.output[0]) == node.node)
    initializers = {i.name for i in reference.graph.initializer} | {i.name for i in candidate.graph.initializer}
    produced = {o for n in candidate.graph.node for o in n.output} | {i.name for i in candidate.graph.input}
    inputs = [i for i in target.input if i and i not in initializers and i in produced]
    output = dequantized_names(candidate).get(node.output, node.output)
    dest.mkdir(parents=True, exist_ok=True)
    model_file = dest / "subgraph.onnx"
    onnx.utils.extract_model(str(candidate_path), str(model_file), inputs, [output])
    data_file = dest / "subgraph_inputs.npz"
    values = {**feeds, **ref_values}
    # The candidate may read an input in another dtype than the reference computed it (an fp16
    # graph): the saved inputs are the reference's values in the subgraph's input dtypes.
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
              for i in onnx.load(str(model_file), load_external_data=False).graph.input}
    arrays = {name: np.asarray(values[name]).astype(dtypes.get(name, np.asarray(values[name]).dtype))
              for name in inputs if name in values}
    arrays[f"expected:{output}"] = np.asarray(ref_values[node.output])
    np.savez(data_file, **arrays)
    return [model_file, data_file]


@dataclass
class ArtifactLocalization:
    """``verify --localize`` for one ONNX-family artifact of a package."""

    format: str
    #: What the artifact's tensors were compared with.
    reference: str
    result: Localization
    written: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        first = self.result.first_divergence
        head = f"{self.format}: against {self.reference}: "
        if first is None:
            worst = self.result.costliest(1)
            return [head + "no node diverges (1-cosine <= "
                    f"{DIVERGED_COSINE:g} and rel <= {DIVERGED_REL:g} everywhere)"
                    + (f"; the largest added error is at {worst[0].line()}" if worst else "")
                    + (". For a plain export this means the graph computes what the ONNX spec says: a failure "
                       "against the eager model is in the conversion itself, not in the runtime"
                       if self.reference.startswith("the same graph") else "")]
        lines = [head + f"first divergence at {first.line()}"]
        lines += [f"  costliest: {n.line()}" for n in self.result.costliest(3)]
        if self.result.unmatched:
            lines.append(f"  {self.result.unmatched} reference tensors have no same-named tensor in the artifact "
                         "(fused or renamed): not compared")
        lines += [f"  wrote {p}" for p in self.written]
        return lines


def localize_artifact(package: Any, fmt: str, feeds: Mapping[str, np.ndarray] | None = None,
                      out: Path | None = None) -> ArtifactLocalization:
    """Where the ``fmt`` artifact of an opened :class:`~packager.package.Package` departs from its
    reference graph, on ``feeds`` (default: the golden inputs).

    An optimised artifact is compared with the fp32 ONNX it was made from; a plain ONNX export
    with the same graph evaluated by ONNX's reference implementation (``onnx.reference``), which
    tells a runtime's deviation from the spec apart from a conversion that is wrong as a whole.
    ``out``: write the first diverging node as a one-node model plus its inputs (:func:`write_subgraph`).
    """
    from packager.registry import ONNX_FORMATS

    manifest = package.manifest
    if fmt not in ONNX_FORMATS:
        raise UsageError(f"--localize on {fmt}", "works on ONNX graphs only", expected=sorted(ONNX_FORMATS), got=fmt,
                         fix="localise the package's ONNX artifact (export it with --formats onnx)")
    art = manifest.artifact(fmt)
    feeds = dict(feeds if feeds is not None else package.golden()[0])
    candidate_path = package.resolve(art.path)
    candidate = load_model(candidate_path)
    origin = (art.options.get("optimization") or {}).get("from")
    if origin and origin in manifest.formats:
        reference = load_model(package.resolve(manifest.artifact(origin).path))
        label = f"the {origin} artifact it was made from (ONNX Runtime)"
        ref_values = run_all(reference, feeds)
    else:
        reference = candidate
        label = "the same graph in ONNX's reference evaluator (onnx.reference)"
        ref_values = run_reference_evaluator(reference, feeds)
    result = compare(reference, ref_values, run_all(candidate, feeds), candidate)
    found = ArtifactLocalization(fmt, label, result)
    first = result.first_divergence
    if out is not None and first is not None:
        found.written = write_subgraph(candidate_path, candidate, first, reference, feeds, ref_values, out / fmt)
    return found
