"""Export orchestration: source -> model -> formats -> parity -> one atomic package."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from packager import __version__
from packager.errors import ExportError, FidelityError, InputError, PackagerError, RuntimeLoadError, UsageError
from packager.exporters import (ArtifactSpec, ExportContext, LoadedModel, SourceOptions, bind_by_name, converter,
                                detect_framework, exporter, parse_exporter_options)
from packager.fidelity.judge import Judge, as_parity, conversion_kind
from packager.manifest import Artifact, Golden, Manifest, OutputNoise, Parity, Source
from packager.package import GOLDEN_INPUTS, GOLDEN_OUTPUTS, PackageWriter, check_destination, load_npz
from packager.steps import step
from packager.signature import BATCH, Signature, TensorSpec, infer_output_specs, parse_input_specs, spec_from_array
from packager.registry import FORMAT_RUNTIMES, FORMATS, conversion_source, distribution_of, writable_formats

log = logging.getLogger("packager")



@dataclass
class ExportResult:
    """What :func:`export` produced."""

    path: Path
    manifest: Manifest

    @property
    def passed(self) -> bool:
        return all(a.passed for a in self.manifest.artifacts)

    def __bool__(self) -> bool:
        return self.passed


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        # GPU builds ship under other names (onnxruntime-gpu, paddlepaddle-gpu).
        for alt in (f"{dist}-gpu", f"{dist}_gpu"):
            try:
                return importlib.metadata.version(alt)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "unknown"


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch tensors
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy"):  # tf / paddle tensors
        return np.asarray(value.numpy())
    return np.asarray(value)


def normalise_inputs(example: Any, names: list[str] | None) -> dict[str, np.ndarray]:
    """Example inputs as a name -> array dict (from a path, dict, array or tuple)."""
    if example is None:
        return {}
    if isinstance(example, (str, Path)):
        path = Path(example)
        if not path.is_file():
            raise InputError(str(path), "does not exist", fix="pass an .npz (keys = input names) or .npy file")
        if path.suffix == ".npz":
            example = load_npz(path)
        elif path.suffix == ".npy":
            try:
                example = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise InputError(str(path), f"cannot be read ({exc})") from None
        else:
            raise InputError(str(path), "is not an example-input file", expected=".npz or .npy", got=path.suffix)
    if isinstance(example, Mapping):
        return {str(k): _as_numpy(v) for k, v in example.items()}
    arrays = list(example) if isinstance(example, (tuple, list)) else [example]
    arrays = [_as_numpy(a) for a in arrays]
    if names is None or len(names) != len(arrays):
        names = [f"input_{i}" for i in range(len(arrays))] if len(arrays) > 1 else (names[:1] if names else ["input"])
    return dict(zip(names, arrays))


def _int_ranges(spec: TensorSpec, data: np.ndarray) -> TensorSpec:
    # Integer inputs (token ids, class ids) need a value range for generated inputs; the
    # example data is the best evidence of what the model accepts.
    if spec.value_range is None and data.dtype.kind in "iu" and data.size:
        return spec.model_copy(update={"value_range": (float(data.min()), float(data.max()) + 1)})
    return spec


def build_input_signature(loaded: LoadedModel, example: dict[str, np.ndarray], declared: Signature | None,
                          seed: int) -> tuple[Signature, dict[str, np.ndarray]]:
    """Input signature and concrete example inputs, from ``--input-spec`` and/or example data."""
    if declared is None and not example:
        if loaded.signature is not None and loaded.signature.inputs:
            declared = Signature(inputs=loaded.signature.inputs, dims=loaded.signature.dims)
        else:
            raise UsageError("example inputs", "are missing", fix="pass --example-inputs x.npz or --input-spec "
                             "'x:float32[batch,3,32,32]'")
    if declared is None:
        # Axes the model itself declares dynamic (a Keras Input(shape=(None, F)), a Paddle
        # InputSpec with None) stay dynamic: example arrays alone would freeze them at the
        # example's size and the package would refuse every other length.
        known = {s.name: s for s in loaded.signature.inputs} if loaded.signature is not None else {}
        specs = [_int_ranges(spec_from_array(name, arr, dynamic=_declared_axes(known.get(name), arr)), arr)
                 for name, arr in example.items()]
        dims = loaded.signature.dims if loaded.signature is not None else {}
        used = {d for s in specs for d in s.shape if isinstance(d, str)}
        return Signature(inputs=specs, dims={k: v for k, v in dims.items() if k in used}), example
    if not example:
        return declared, declared.example_inputs(seed=seed)
    # Both: the data must fit the declared spec.
    from runtimes.feeds import FeedValidator

    example = FeedValidator(declared.inputs, cast="strict")(example)
    specs = [_int_ranges(s, example[s.name]) for s in declared.inputs]
    return declared.model_copy(update={"inputs": specs}), example


def _declared_axes(spec: TensorSpec | None, array: np.ndarray) -> dict[int, str]:
    """Named (dynamic) axes of the model's own input spec, when its rank matches the example's."""
    if spec is None or len(spec.shape) != array.ndim:
        return {}
    return {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)}


def widen_batch(signature: Signature, example: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Repeat a batch-1 example to two rows.

    Exporters trace with the example: at batch 1, torch.export and the ONNX exporter may
    specialise the batch axis to the constant 1, and parity at batch 1 would not notice.
    """
    axes = {s.name: s.batch_axis for s in signature.inputs if s.batch_axis is not None}
    if not axes or any(example[name].shape[axis] != 1 for name, axis in axes.items()):
        return example, []
    widened = {name: (np.repeat(arr, 2, axis=axes[name]) if name in axes else arr) for name, arr in example.items()}
    return widened, ["example inputs had batch 1; repeated to batch 2 so the batch axis stays dynamic"]


#: How the second eager run changes the dynamic sizes, tried in turn until the model accepts
#: one: non-batch sizes doubled, or halved at the top of their range, and the batch +1 (a
#: strided output axis, width / 8 in PP-OCR's recogniser, does not move when the width
#: goes 160 -> 161, and a CNN with stride 32 takes 64 -> 128 but not 65); each size +1 (or -1
#: at its bound); the batch alone (the other axes then stay as the example's).
SECOND_SIZES = ("double", "step", "batch")


def dynamic_sizes(signature: Signature, example: dict[str, np.ndarray]) -> dict[str, int]:
    """Each dynamic dimension's size in the example inputs."""
    sizes: dict[str, int] = {}
    for spec in signature.inputs:
        for axis, dim in spec.dynamic_axes.items():
            sizes.setdefault(dim, int(example[spec.name].shape[axis]))
    return sizes


def second_sizes(signature: Signature, sizes: dict[str, int], how: str) -> dict[str, int]:
    """Other sizes for the dynamic dimensions, changed as ``how`` of :data:`SECOND_SIZES` says."""
    other = {}
    for dim, size in sizes.items():
        info = signature.dim(dim)
        if how == "batch" and dim != BATCH:
            other[dim] = size
        elif how == "double" and dim != BATCH:  # or halved, at the top of its range
            doubled = size * 2 if info.max is None or size * 2 <= info.max else None
            halved = size // 2 if size % 2 == 0 and size // 2 >= max(info.min, 1) else None
            other[dim] = doubled or halved or size
        else:
            bigger = size + 1 if info.max is None or size + 1 <= info.max else None
            smaller = size - 1 if size - 1 >= max(info.min, 1) else None
            other[dim] = bigger or smaller or size
    return other


def second_inputs(signature: Signature, example: dict[str, np.ndarray], seed: int,
                  sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Inputs at the dynamic ``sizes`` (:func:`second_sizes`), to tell which output axes are dynamic."""
    if all(sizes[d] == example_size for d, example_size in dynamic_sizes(signature, example).items() if d != BATCH):
        # Only the batch varies: reuse real rows so int/float ranges stay realistic.
        n = sizes.get(BATCH, 1)
        feeds = {}
        for spec in signature.inputs:
            arr = example[spec.name]
            axis = spec.batch_axis
            if axis is None:
                feeds[spec.name] = arr
            else:
                reps = -(-n // arr.shape[axis])
                feeds[spec.name] = np.concatenate([arr] * reps, axis=axis).take(range(n), axis=axis)
        return feeds
    return signature.example_inputs(seed=seed + 1, sizes=sizes)


def _second_run(fw: Any, loaded: LoadedModel, signature: Signature, example: dict[str, np.ndarray], seed: int,
                reference: list[np.ndarray], notes: list[str]) -> tuple[dict[str, np.ndarray] | None, dict[str, int],
                                                                        dict[str, int], list[np.ndarray]]:
    """The eager model at other dynamic sizes (:data:`SECOND_SIZES`, the first it accepts):
    ``(inputs, sizes of the example, sizes of the run, outputs)``; inputs None when it accepted none."""
    sizes_a = dynamic_sizes(signature, example)
    refused, tried = [], [sizes_a]
    for how in SECOND_SIZES:
        sizes_b = second_sizes(signature, sizes_a, how)
        if sizes_b in tried:
            continue
        tried.append(sizes_b)
        second = second_inputs(signature, example, seed, sizes_b)
        try:
            return second, sizes_a, sizes_b, fw.run_eager(loaded, second)
        except Exception as exc:  # the model rejects these sizes: try the next way
            changed = ", ".join(f"{d}={sizes_b[d]}" for d in sizes_b if sizes_b[d] != sizes_a[d])
            refused.append(changed)
            log.debug("second eager run at %s failed: %s", changed, exc)
    if refused:
        notes.append(f"the model refused every other size tried ({'; '.join(refused)}): the output axes are "
                     "fixed at the example's sizes; declare the sizes it takes in --input-spec")
    return None, sizes_a, sizes_a, reference


def _first_eager_run(fw: Any, loaded: LoadedModel, example: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model on the example inputs. The inputs are the user's (dtypes, shapes, a missing
    argument): a model that rejects them is a usage error with the model's own words (exit 2),
    not a packager bug (exit 70)."""
    try:
        return fw.run_eager(loaded, example)
    except PackagerError:
        raise
    except Exception as exc:  # whatever the framework raises on bad inputs
        shown = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in example.items())
        text = " ".join(str(exc).split())
        raise InputError(f"the model called on the example inputs ({shown or 'none'})",
                         f"raised {type(exc).__name__}: {text[:400]}",
                         fix="make the example inputs (or --input-spec) match what the model takes: dtype "
                             "(float32, not float64), shape, and every forward() argument without a default") \
            from None


def export(
    source: Any,
    example_inputs: Any = None,
    *,
    out: str | Path,
    formats: Iterable[str] | str | None = None,
    input_spec: Iterable[str] | str | None = None,
    name: str | None = None,
    framework: str | None = None,
    builder: str | None = None,
    state_key: str | None = None,
    signature_key: str | None = None,
    trust: bool = False,
    overwrite: bool = False,
    allow_mismatch: bool = False,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    output_names: list[str] | None = None,
    opset: int | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    isolate: bool | None = None,
) -> ExportResult:
    """Export a model (in memory or a training-time save) into a verified package.

    Args:
        source: An in-memory model, or a path to a save (state_dict, checkpoint, full model,
            Keras file, Paddle params, an inference model, ...).
        example_inputs: Arrays (dict, tuple, array, or an .npz/.npy path) used for tracing and
            golden data. Optional when ``input_spec`` is given.
        out: Package folder to create.
        formats: Formats to write (default: the framework's defaults).
        input_spec: Input specs naming the dynamic axes, e.g. ``["ids:int64[batch,seq]"]``.
        name: Model name (default: the output folder's name).
        framework: ``torch``, ``tensorflow`` or ``paddle`` (default: detected).
        builder: ``module:function`` returning the architecture, for weights-only saves.
        state_key: Key of the model weights inside a checkpoint dict.
        signature_key: Signature of a SavedModel (default ``serving_default``) or tf.function of a
            tf.Module to export.
        trust: Allow sources that unpickle arbitrary code.
        overwrite: Replace an existing package at ``out``.
        allow_mismatch: Write the package even if an artifact fails parity.
        atol: Absolute tolerance (one, or per output name).
        rtol: Relative tolerance (one, or per output name).
        output_names: Names for the model's outputs (default: the model's own, else output_0...).
        opset: ONNX opset.
        seed: Seed for generated inputs.
        options: Exporter options, e.g. ``{"torchscript_mode": "script"}``; each framework
            exporter's ``Options`` declares them with their types (strings parse: ``"false"``).
        isolate: Judge parity in a fresh process that has not imported the model's code, as a
            deployment host loads the package (default; ``PACKAGER_PARITY_IN_PROCESS=1`` or
            ``False``: in this process, faster, but blind to artifacts that need the model's code).

    Raises:
        FidelityError: An artifact failed parity and ``allow_mismatch`` is false (nothing written).
        RuntimeLoadError: An artifact does not load or run in a fresh process (nothing written).
        ExportError: A format could not be produced (nothing written).
        InputError: Too little free space at ``out`` (checked first), or the disk filled up.
        UsageError: An unknown exporter option, or a value that does not parse as its type.
    """
    out = check_destination(out, overwrite)
    framework = framework or detect_framework(source)
    fw = exporter(framework)
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(formats or ())
    chosen = bool(formats)  # else the framework's defaults, narrowed to what the loaded source can write
    formats = formats or list(fw.DEFAULT_FORMATS)
    writable = writable_formats(fw.FORMATS)
    unknown = [f for f in formats if f not in writable]
    if unknown:
        sources = {f: FORMATS[f].derived_from for f in unknown if f in FORMATS and FORMATS[f].derived_from}
        raise UsageError(f"format(s) {unknown}", f"cannot be written from a {framework} model",
                         expected=", ".join(writable), got=", ".join(formats),
                         fix="; ".join(f"{f} is converted from the {' or '.join(s)} artifact, which a {framework} model "
                                       "does not write" for f, s in sources.items()) or None)
    if len(set(formats)) != len(formats):
        raise UsageError("--formats", "lists a format twice", got=", ".join(formats))
    # Checked once, by the exporter's declared types: "false" is False, a typo is an error.
    exporter_options = parse_exporter_options(framework, fw.Options, options).model_dump()

    with step("export", f"load {framework} source"):
        loaded: LoadedModel = fw.load_source(source, SourceOptions(builder=builder, state_key=state_key,
                                                                    trust=trust, signature_key=signature_key,
                                                                    extra=dict(exporter_options)))
    skipped: list[str] = []
    if not chosen and hasattr(fw, "default_formats"):
        formats, skipped = fw.default_formats(loaded)
    formats, added = with_sources(list(formats), fw.FORMATS)
    declared = parse_input_specs(input_spec)
    example = normalise_inputs(example_inputs, declared.input_names if declared else loaded.input_names)
    signature, example = build_input_signature(loaded, example, declared, seed)
    example, binding = bind_by_name(loaded, example)
    specs = {s.name: s for s in signature.inputs}
    signature = signature.model_copy(update={"inputs": [specs[n] for n in example]})
    example, notes = widen_batch(signature, example)
    notes += skipped + added

    with step("export", "eager reference"):
        reference = _first_eager_run(fw, loaded, example)
    names = output_names or loaded.output_names or (
        [f"output_{i}" for i in range(len(reference))] if len(reference) > 1 else ["output"])
    if len(names) != len(reference):
        raise UsageError("output names", "do not match the model's outputs", expected=f"{len(reference)} names",
                         got=names)
    second, sizes_a, sizes_b, reference_b = _second_run(fw, loaded, signature, example, seed, reference, notes)
    outputs = infer_output_specs(names, reference, reference_b, sizes_a, sizes_b)
    signature = signature.model_copy(update={"outputs": outputs})
    ref = dict(zip(names, reference))
    noise = _reference_noise(framework, fw, loaded, signature, example, ref, Judge(atol, rtol), notes)

    ctx = ExportContext(signature=signature, example_inputs=example, opset=opset, options=dict(exporter_options),
                        log=notes, judge=Judge(atol, rtol, noise))
    # Parity also runs at the second sizes: an artifact whose batch (or seq) axis was baked
    # to the export size passes on the golden inputs but fails here.
    extra_cases = [(second, dict(zip(names, reference_b)))] if second is not None and sizes_b != sizes_a else []
    versions = {framework: fw.framework_version()}
    reserve = estimate_package_bytes(loaded, formats, [example, ref, *(a for case in extra_cases for a in case)])
    with PackageWriter(out, overwrite=overwrite, reserve=reserve) as writer:
        # Golden data first: the parity worker reads the very files that ship.
        golden = Golden(inputs=writer.write_npz(GOLDEN_INPUTS, example),
                        outputs=writer.write_npz(GOLDEN_OUTPUTS, ref), reference=loaded.reference,
                        noise=noise)
        written: dict[str, Artifact] = {}
        for fmt in formats:  # a converted format's source first (with_sources): it is converted from that file
            with step("export", f"format {fmt}"):
                written[fmt] = _export_format(fw, fmt, loaded, ctx, writer, versions, written)
        artifacts = list(written.values())
        with step("export", "parity"):
            _judge_artifacts(writer.root, artifacts, signature, (example, ref), extra_cases, atol, rtol, noise,
                             isolate)
        manifest = Manifest(
            name=name or out.name, packager_version=__version__,
            source=Source(framework=framework, framework_version=versions[framework], kind=loaded.kind,
                          path=loaded.path, builder=loaded.builder),
            versions=versions, signature=signature, artifacts=artifacts, golden=golden,
            extra={**_extra(ctx.log, state_key=state_key, signature_key=signature_key), "input_binding": binding})
        for line in ctx.log:  # converter logs: in the manifest, and on the terminal with -v
            log.info("%s", line)
        failed = [a for a in artifacts if not a.passed]
        if failed and not allow_mismatch:
            raise parity_error(failed)
        with step("export", "write package"):
            path = writer.commit(manifest)
    return ExportResult(path=path, manifest=manifest)


def with_sources(formats: list[str], written: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Formats in writing order, each converted format after its source artifact (the first of
    its sources asked for; else the first the exporter writes (``written``), added, since the
    package ships what the conversion started from), and notes on what was added."""
    ordered: list[str] = []
    notes = []
    for fmt in formats:
        source = conversion_source(fmt, formats, written)
        if source and source not in ordered:
            if source not in formats:
                notes.append(f"{fmt} is converted from the {source} artifact: {source} was added to the formats")
            ordered.append(source)
        if fmt not in ordered:
            ordered.append(fmt)
    return ordered, notes


def _export_format(fw: Any, fmt: str, loaded: LoadedModel, ctx: ExportContext, writer: PackageWriter,
                   versions: dict[str, str], written: Mapping[str, Artifact]) -> Artifact:
    """Write one format into the package being built; its parity is judged later, with the others.

    A format the registry derives from another artifact (OpenVINO IR from ONNX, TFLite from the
    SavedModel) is converted from that artifact's file in ``written`` by its registered converter;
    every other format comes from the framework exporter ``fw``.
    """
    dest = writer.path(fmt)
    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        source = conversion_source(fmt, list(written))
        spec: ArtifactSpec = (converter(fmt)(writer.root / written[source].path, ctx, dest) if source else
                              fw.export_format(fmt, loaded, ctx, dest))
    except PackagerError:
        raise
    except Exception as exc:
        raise ExportError(f"format {fmt}", f"export failed: {type(exc).__name__}: {str(exc)[:500]}",
                          fix="see --debug for the full trace; try another format or opset",
                          details="\n".join(ctx.log)) from exc
    log.info("exported %s (%s) in %.1f s", fmt, spec.path, time.perf_counter() - started)
    runtimes = tuple(spec.runtimes or FORMAT_RUNTIMES[fmt])
    for rt in runtimes:
        versions[rt] = dist_version(distribution_of(rt))
    return Artifact(format=fmt, path=spec.path, files=writer.files(fmt), runtimes=list(runtimes),
                    options=spec.options)


def _judge_artifacts(root: Path, artifacts: list[Artifact], signature: Signature,
                     golden: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                     extra_cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]], atol: Any, rtol: Any,
                     noise: Mapping[str, OutputNoise], isolate: bool | None) -> None:
    """Fill each artifact's parity: by default in one fresh process that has not imported the
    model's code, as a deployment host loads the package (:mod:`packager.fidelity.isolated`)."""
    from packager.fidelity.isolated import in_process_requested, run_isolated

    if not artifacts:
        return
    if isolate is None:
        isolate = not in_process_requested()
    if not isolate:
        for art in artifacts:
            art.parity = [check_parity(root / art.path, art, signature, golden[0], golden[1], atol, rtol,
                                       extra_cases=extra_cases, noise=noise)]
        return
    run = run_isolated(root, artifacts, signature, (GOLDEN_INPUTS, GOLDEN_OUTPUTS), extra_cases, atol, rtol, noise)
    for art, parity in zip(artifacts, run.parities):
        art.parity = [parity]


#: Bytes each format is expected to take per byte of model weights (measured: 1.00-1.005 for
#: TorchScript, ONNX and torch.export), and per format for graphs, metadata and converters' extras.
FORMAT_WEIGHT_FACTOR = 1.25
FORMAT_SLACK = 1 << 20


def _tensor_bytes(tensor: Any) -> int:
    """Bytes of one torch / paddle / TF / Keras tensor or variable, from its shape and dtype."""
    count = 1
    for dim in tuple(tensor.shape):
        count *= int(dim or 0)
    if hasattr(tensor, "element_size"):  # torch, paddle
        return count * int(tensor.element_size())
    dtype = tensor.dtype
    if hasattr(dtype, "size"):  # tf.DType
        return count * int(dtype.size)
    try:
        return count * np.dtype(str(dtype)).itemsize  # Keras 3 variables: "float32"
    except TypeError:
        return count * 4


#: Where each framework's models keep their weights, tried in order (the first that answers wins).
WEIGHT_PROBES: tuple[Any, ...] = (
    lambda model: model.state_dict().values(),  # torch nn.Module / ScriptModule, paddle Layer (buffers too)
    lambda model: model.weights,  # Keras
    lambda model: model.variables,  # tf.Module, a loaded SavedModel
    lambda model: model.network.state_dict().values(),  # paddle.Model
)


def _path_bytes(path: str | None) -> int:
    if not path or not Path(path).exists():
        return 0
    target = Path(path)
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) if target.is_dir() else \
        target.stat().st_size


def model_bytes(loaded: LoadedModel) -> int:
    """Bytes of the model's weights (in memory), else of its source on disk, else 0."""
    for probe in WEIGHT_PROBES:
        try:
            return sum(_tensor_bytes(t) for t in probe(loaded.model))
        except Exception:  # not this framework's kind of model: try the next probe
            continue
    return _path_bytes(loaded.path)


def estimate_package_bytes(loaded: LoadedModel, formats: list[str], arrays: Iterable[Mapping[str, np.ndarray]]) -> int:
    """Free space an export needs before it starts: each format holds the weights once (with
    a margin), plus graphs and metadata, plus the golden data and the parity worker's cases."""
    data = sum(int(a.nbytes) for group in arrays for a in group.values())
    weights = model_bytes(loaded)
    return int(weights * FORMAT_WEIGHT_FACTOR * len(formats)) + FORMAT_SLACK * len(formats) + 2 * data


def _extra(log: list[str], **source_options: str | None) -> dict[str, Any]:
    """Manifest extras: the export log, and the source options `verify --reference eager` reuses."""
    extra: dict[str, Any] = {}
    if log:
        extra["export_log"] = log
    options = {k: v for k, v in source_options.items() if v is not None}
    if options:
        extra["source_options"] = options
    return extra


def _reference_noise(framework: str, fw: Any, loaded: LoadedModel, signature: Signature,
                     example: dict[str, np.ndarray], ref: dict[str, np.ndarray], judge: Judge,
                     notes: list[str]) -> dict[str, OutputNoise]:
    """Each output's rounding noise for the judge (:mod:`packager.fidelity.noise`); a reference
    that proves nothing (constant, all zero) is said in the log and the manifest, not failed."""
    from packager.fidelity.noise import degenerate_notes, measure_noise

    noise = measure_noise(framework, fw, loaded, signature, example, ref)
    for note in degenerate_notes(Judge(judge.atol, judge.rtol, noise), ref, noise):
        log.warning("%s", note)
        notes.append(note)
    return noise


def check_parity(path: Path, artifact: Artifact, signature: Signature, inputs: dict[str, np.ndarray],
                 reference: dict[str, np.ndarray], atol: Any, rtol: Any, device: str = "cpu",
                 extra_cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = (),
                 noise: Mapping[str, OutputNoise] | None = None) -> Parity:
    """Run one artifact with its first runtime on the golden inputs (and ``extra_cases``) and
    judge it against the reference with :class:`packager.fidelity.judge.Judge`, the rules
    ``verify`` applies (``noise``: the outputs' noise record, as written to the manifest); per
    output, the failing (else the worst) case is kept."""
    from runtimes import runner_class, select
    from runtimes.base import manifest_options

    runtime = artifact.runtimes[0]
    judge = Judge(atol, rtol, dict(noise or {}))
    kind = conversion_kind(artifact.format, artifact.options)
    per_output: dict[str, Any] = {}
    degenerate: list[str] = []
    try:
        # The selection every caller opens through; a bare artifact, as the package's manifest is
        # not written yet, and unsigned: public_key=False so $PACKAGER_PUBLIC_KEY cannot refuse it.
        selection = select(path, artifact.format, runtime, signature=signature, public_key=False,
                           **manifest_options(artifact, runner_class(runtime)))
        with selection.open(device, "strict") as runner:
            for case, (feeds, want) in enumerate([(inputs, reference), *extra_cases]):
                try:
                    got = runner.run(feeds)
                except PackagerError as exc:
                    shape = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
                    return Parity(runtime=runtime, device=device, passed=False,
                                  error=f"with inputs {shape}: {exc.message}")
                judged = judge.compare(want, got, kind, device)
                if case == 0:
                    degenerate = judged.degenerate
                for result in map(as_parity, judged.outputs):
                    if case and result.problem:
                        shape = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
                        result.problem = f"with inputs {shape}: {result.problem}"
                    kept = per_output.get(result.name)
                    if kept is None or (kept.passed and (not result.passed or
                                                         (result.max_abs or 0) > (kept.max_abs or 0))):
                        per_output[result.name] = result
            notes = list(runner.notes) + degenerate
    except PackagerError as exc:
        return Parity(runtime=runtime, device=device, passed=False, error=exc.message)
    results = list(per_output.values())
    return Parity(runtime=runtime, device=device, passed=all(r.passed for r in results), outputs=results,
                  notes=notes)


def parity_error(failed: list[Artifact]) -> FidelityError:
    """One error listing every failing format, output and figure."""
    lines = []
    for art in failed:
        for parity in art.parity:
            if parity.error:
                lines.append(f"{art.format} ({parity.runtime}): {parity.error}")
            for out in parity.outputs:
                if not out.passed:
                    figures = f"max abs {out.max_abs:.3g}, max rel {out.max_rel:.3g}" if out.max_abs is not None else ""
                    lines.append(f"{art.format} ({parity.runtime}) output {out.name!r}: {out.problem} {figures}".strip())
    numeric = any(not o.passed for art in failed for p in art.parity for o in p.outputs)
    # Only numbers that differ are a fidelity failure (exit 1); an artifact that cannot run is exit 4.
    cls = FidelityError if numeric else RuntimeLoadError
    return cls("export parity", "; ".join(lines), fix="fix the export, loosen --atol/--rtol if the error "
               "is expected, or pass --allow-mismatch to write the package anyway")
