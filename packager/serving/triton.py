"""``packager triton``: a Triton Inference Server model repository for a package, and an
offline check of any repository.

Layout written (one model folder per artifact format; docs/serving.md):
``REPO/<name>/config.pbtxt``, ``REPO/<name>/<version>/<model files>``, ``REPO/<name>/warmup/``.
The backend comes from the registry (``FormatRecord.triton_backend``): ONNX -> ``onnxruntime``,
TorchScript -> ``pytorch`` (libtorch), OpenVINO IR -> ``openvino`` (full config: that backend
does not auto-complete), every other format -> the ``python`` backend with a generated
``model.py`` that loads the package copy in the version folder with ``runtimes``.

Rules Triton users trip on, each applied here and checked by :func:`check_repository`: the
folder name equals ``name``; version folders are positive integers; with ``max_batch_size > 0``
dims leave the batch axis out and every input and output has a dynamic first axis, otherwise
``max_batch_size: 0`` and full dims; no ``format: FORMAT_NCHW``; TYPE_* from the signature;
``dynamic_batching`` only with batching evidence (packager/serving/evidence.py), with the
reason written in the config when it is off; ``model_warmup`` from the golden inputs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packager.errors import DependencyError, ExistsError, UsageError
from packager.registry import FORMATS
from packager.signature import Signature, TensorSpec

#: signature dtype -> Triton's ModelConfig DataType.
TRITON_TYPES: dict[str, str] = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
}
#: Bytes per element of each TYPE_* (warmup file sizes).
TYPE_SIZES: dict[str, int] = {t: (2 if d == "bfloat16" else np.dtype(d).itemsize) for d, t in TRITON_TYPES.items()}
#: backend -> (platform, the file name Triton loads by default).
BACKENDS: dict[str, tuple[str | None, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "pytorch": ("pytorch_libtorch", "model.pt"),
    "openvino": (None, "model.xml"),
    "python": (None, "model.py"),
}
#: libtorch binds tensors by position: config names must read NAME__INDEX (outputs always).
LIBTORCH_NAME = re.compile(r"^.+__\d+$")
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclass
class TritonModel:
    """One model folder written."""

    name: str
    format: str
    backend: str
    path: Path
    max_batch_size: int
    dynamic_batching: bool
    why: str
    #: Signature name -> config name, where the backend needs other names (libtorch).
    renamed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@dataclass
class Problem:
    """One finding of :func:`check_repository`."""

    model: str
    message: str
    severity: str = "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- writing ------------------------------------------------------------------------------
def _instances(text: str) -> tuple[str, int]:
    kind, _, count = text.partition(":")
    if kind not in INSTANCE_KINDS or not count.isdigit() or int(count) < 1:
        raise UsageError(f"--instances {text!r}", "is not KIND:COUNT", expected="cpu:N or gpu:N (N >= 1)", got=text)
    return INSTANCE_KINDS[kind], int(count)


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    shape = spec.shape[1:] if batched else spec.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor(name: str, spec: TensorSpec, batched: bool) -> str:
    dims = ", ".join(str(d) for d in _dims(spec, batched))
    return f"  {{\n    name: {json.dumps(name)}\n    data_type: {TRITON_TYPES[spec.dtype]}\n    dims: [ {dims} ]\n  }}"


def _config_names(signature: Signature, backend: str) -> dict[str, str]:
    if backend != "pytorch":
        return {s.name: s.name for s in [*signature.inputs, *signature.outputs]}
    names = {s.name: f"{re.sub(r'[^A-Za-z0-9_]', '_', s.name)}__{i}" for i, s in enumerate(signature.inputs)}
    names.update({s.name: f"{re.sub(r'[^A-Za-z0-9_]', '_', s.name)}__{i}" for i, s in enumerate(signature.outputs)})
    return names


def render_config(name: str, backend: str, signature: Signature, *, max_batch: int, batching_why: str,
                  dynamic: bool, max_delay_us: int, instances: tuple[str, int], warmup: list[tuple[str, TensorSpec, list[int], str]],
                  model_file: str | None, names: dict[str, str], note: str) -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ModelConfig)."""
    platform, default_file = BACKENDS[backend]
    batched = max_batch > 0
    lines = [f"# Written by packager from {note}.", f"name: {json.dumps(name)}", f"backend: {json.dumps(backend)}"]
    if platform:
        lines.append(f"platform: {json.dumps(platform)}")
    if model_file and model_file != default_file:
        lines.append(f"default_model_filename: {json.dumps(model_file)}")
    lines.append(f"max_batch_size: {max_batch}")
    if not batched:
        lines.append(f"# max_batch_size 0 (full dims, no batching by Triton): {batching_why}")
    lines.append("input [\n" + ",\n".join(_tensor(names[s.name], s, batched) for s in signature.inputs)
                 + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(names[s.name], s, batched) for s in signature.outputs)
                 + "\n]")
    if dynamic:
        lines.append(f"# dynamic batching on: {batching_why}")
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_delay_us}\n}}")
    elif batched:
        lines.append(f"# dynamic batching off: {batching_why}")
    kind, count = instances
    lines.append(f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]")
    if warmup:
        entries = []
        for config_name, spec, dims, file in warmup:
            entries.append(f"    inputs {{\n      key: {json.dumps(config_name)}\n      value {{\n        data_type: "
                           f"{TRITON_TYPES[spec.dtype]}\n        dims: [ {', '.join(map(str, dims))} ]\n        "
                           f"input_data_file: {json.dumps(file)}\n      }}\n    }}")
        lines.append("model_warmup [\n  {\n    name: \"golden\"\n    batch_size: " + ("1" if batched else "0")
                     + "\n" + "\n".join(entries) + "\n  }\n]")
    return "\n".join(lines) + "\n"


PYTHON_MODEL = '''"""Triton python backend for a packager package (generated by `packager triton`).

Triton's Python environment needs packager and the runtime of this format installed
(pip install "packager[{extra}]"); the package copy beside this file is checked before loading.
"""

import os

import triton_python_backend_utils as pb_utils

import runtimes

FORMAT = {format!r}
RUNTIME = {runtime!r}
INPUTS = {inputs!r}
OUTPUTS = {outputs!r}


class TritonPythonModel:
    def initialize(self, args):
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = "cuda:" + str(args.get("model_instance_device_id", 0))
        package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "package")
        self.runner = runtimes.load(package, format=FORMAT, runtime=RUNTIME, device=device)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in INPUTS}}
                results = self.runner.run(feeds)
                tensors = [pb_utils.Tensor(name, results[name]) for name in OUTPUTS]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # one bad request fails alone
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self):
        self.runner.close()
'''


def _copy_artifact(package: Any, artifact: Any, version_dir: Path, backend: str) -> str | None:
    """Copy the artifact's files into the version folder; the file name Triton must load."""
    if backend == "python":
        # The whole package (manifest, checksums, golden data): model.py loads it through runtimes.
        shutil.copytree(package.root, version_dir / "package", symlinks=False,
                        ignore=shutil.ignore_patterns(".*"))
        return None
    root = package.resolve(artifact.path)
    base = root.parent
    for entry in artifact.files:
        src = package.resolve(entry.path)
        dest = version_dir / src.relative_to(base)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    if backend == "openvino":  # the backend loads model.xml + model.bin
        xml = version_dir / root.relative_to(base)
        xml.rename(version_dir / "model.xml")
        xml.with_suffix(".bin").rename(version_dir / "model.bin")
        return "model.xml"
    return str(root.relative_to(base))


def _warmup(model_dir: Path, package: Any, signature: Signature, names: dict[str, str],
            batched: bool) -> list[tuple[str, TensorSpec, list[int], str]]:
    """Golden inputs as raw row-major files under ``warmup/`` (one row when batched)."""
    try:
        inputs, _ = package.golden()
    except Exception:
        return []
    (model_dir / "warmup").mkdir()
    entries = []
    for i, spec in enumerate(signature.inputs):
        array = inputs.get(spec.name)
        if array is None:
            return []
        array = np.ascontiguousarray(array[:1] if batched else array)
        dims = list(array.shape[1:] if batched else array.shape)
        file = f"input_{i}"
        (model_dir / "warmup" / file).write_bytes(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        entries.append((names[spec.name], spec, dims, file))
    return entries


def write_repository(package: str | Path, out: str | Path, *, name: str | None = None, version: int = 1,
                     formats: list[str] | None = None, instances: str = "cpu:1", max_batch: int = 32,
                     max_delay_us: int = 5000, overwrite: bool = False, verify: bool = True,
                     device: str = "cpu") -> list[TritonModel]:
    """Write one Triton model folder per artifact format of ``package`` into repository ``out``.

    Each folder is built beside its destination and renamed into place, so a model folder is
    complete or absent; other models already in the repository are kept.

    Args:
        package: Package folder or archive.
        out: Model repository folder (created if missing).
        name: Model name (default: the package's; ``NAME_FORMAT`` each with several formats).
        version: Version folder number.
        formats: Artifact formats (default: the one ``packager run`` would pick).
        instances: ``cpu:N`` or ``gpu:N``.
        max_batch: ``max_batch_size`` when every tensor has its batch axis first.
        max_delay_us: ``dynamic_batching`` queue delay.
        overwrite: Replace model folders of the same name.
        verify: Check the package's checksums before copying.
        device: Where batch consistency is measured (the evidence for ``dynamic_batching``).
    """
    from packager.atomic import replace_dir, temp_prefix
    from packager.package import Package
    from packager.registry import FORMAT_PREFERENCE, FORMAT_RUNTIMES
    from packager.serving.evidence import batch_axis_problem, batching_evidence

    if not isinstance(version, int) or version < 1:
        raise UsageError(f"--version {version}", "must be a positive integer (Triton's version folders)",
                         expected=">= 1", got=version)
    if max_batch < 0:
        raise UsageError(f"--max-batch {max_batch}", "must not be negative", expected=">= 0", got=max_batch)
    group = _instances(instances)
    pkg = Package(package, verify=verify)
    manifest = pkg.manifest
    held = [a.format for a in manifest.artifacts]
    if formats is None:
        formats = [next(f for f in FORMAT_PREFERENCE if f in held)]
    for fmt in formats:
        if fmt not in held:
            raise UsageError(f"--format {fmt}", "is not an artifact of the package", expected=", ".join(held), got=fmt)
    base = name or manifest.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", base):
        raise UsageError(f"model name {base!r}", "is not a safe folder name",
                         expected="letters, digits, '_', '.', '-'", fix="pass --name")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = {fmt: base if len(formats) == 1 else f"{base}_{fmt}" for fmt in formats}
    for model in targets.values():
        if (out / model).exists() and not overwrite:
            raise ExistsError(str(out / model), "already exists", fix="pass --overwrite to replace it, or --name")
    written = []
    signature = manifest.signature
    axis_problem = batch_axis_problem(signature)
    for fmt, model in targets.items():
        artifact = manifest.artifact(fmt)
        backend = FORMATS[fmt].triton_backend
        runtime = artifact.runtimes[0] if artifact.runtimes else FORMAT_RUNTIMES[fmt][0]
        batched = axis_problem is None and max_batch > 0
        if axis_problem is not None:
            evidence_safe, why = False, axis_problem
        elif max_batch == 0:
            evidence_safe, why = False, "--max-batch 0"
        else:
            evidence = batching_evidence(pkg.root, fmt, runtime, device, signature)
            evidence_safe, why = evidence.safe, evidence.why
        names = _config_names(signature, backend)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out / model), dir=out))
        try:
            (tmp / str(version)).mkdir()
            model_file = _copy_artifact(pkg, artifact, tmp / str(version), backend)
            if backend == "python":
                from packager.registry import RUNTIMES

                (tmp / str(version) / "model.py").write_text(PYTHON_MODEL.format(
                    extra=RUNTIMES[runtime].extra or "all", format=fmt, runtime=runtime,
                    inputs=[s.name for s in signature.inputs], outputs=[s.name for s in signature.outputs]))
            warmup = _warmup(tmp, pkg, signature, names, batched)
            text = render_config(model, backend, signature, max_batch=max_batch if batched else 0, batching_why=why,
                                 dynamic=evidence_safe and batched, max_delay_us=max_delay_us, instances=group,
                                 warmup=warmup, model_file=model_file, names=names,
                                 note=f"package {manifest.name} ({fmt}, {manifest.source.framework})")
            (tmp / "config.pbtxt").write_text(text)
            replace_dir(tmp, out / model, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written.append(TritonModel(model, fmt, backend, out / model, max_batch if batched else 0,
                                   evidence_safe and batched, why,
                                   {k: v for k, v in names.items() if k != v}))
    return written


# --- checking -----------------------------------------------------------------------------
def model_config_class() -> Any:
    """Triton's ``ModelConfig`` message class, from the ``model_config_pb2`` tritonclient ships.

    Loaded from its file: ``tritonclient.grpc``'s package import needs grpcio, which the
    [triton] extra does not install.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("module 'tritonclient'", "is needed to parse config.pbtxt as Triton's ModelConfig",
                              fix="pip install 'packager[triton]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("packager_triton_model_config_pb2", path)
    if module_spec is None or module_spec.loader is None or not path.exists():
        raise DependencyError(str(path), "is missing from the tritonclient install",
                              fix="pip install --force-reinstall 'packager[triton]'")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as exc:
        raise DependencyError("module 'google.protobuf'", f"is needed to parse config.pbtxt ({exc})",
                              fix="pip install 'packager[triton]'") from exc
    return module.ModelConfig


def _onnx_problems(model: str, config: Any, file: Path) -> list[Problem]:
    """The config against the ONNX graph it serves: names, ranks, fixed sizes, the batch axis."""
    import onnx

    try:
        graph = onnx.load(str(file), load_external_data=False).graph
    except Exception as exc:
        return [Problem(model, f"{file.name} is not a readable ONNX model ({exc})")]
    initializers = {i.name for i in graph.initializer}
    tensors = {v.name: v for v in graph.input if v.name not in initializers}
    tensors.update({v.name: v for v in graph.output})
    problems = []
    for kind, entries in (("input", config.input), ("output", config.output)):
        for entry in entries:
            value = tensors.get(entry.name)
            if value is None:
                problems.append(Problem(model, f"{kind} {entry.name!r} is not a tensor of {file.name}"))
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            want = list(entry.dims)
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    problems.append(Problem(model, f"{kind} {entry.name!r}: max_batch_size {config.max_batch_size} "
                                            f"needs a dynamic first axis, but {file.name} has {dims}"))
                    continue
                dims = dims[1:]
            if len(dims) != len(want) or any(w != -1 and d != -1 and w != d for w, d in zip(want, dims)):
                problems.append(Problem(model, f"{kind} {entry.name!r}: dims {want} do not fit {file.name}'s "
                                        f"shape {dims}" + (" (batch axis left out)" if config.max_batch_size else "")))
    return problems


def _model_problems(folder: Path, ModelConfig: Any) -> list[Problem]:
    from google.protobuf import text_format

    model = folder.name
    try:
        config = text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        return [Problem(model, f"config.pbtxt is not a valid ModelConfig ({exc})")]
    problems = []
    if config.name and config.name != model:
        problems.append(Problem(model, f"name {config.name!r} differs from its folder {model!r} (Triton refuses it)"))
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name not in ("warmup",)]
    bad = [p.name for p in versions if not p.name.isdigit() or int(p.name) < 1]
    if bad:
        problems.append(Problem(model, f"version folders must be positive integers, got {bad}"))
    good = sorted((p for p in versions if p.name.isdigit() and int(p.name) >= 1), key=lambda p: int(p.name))
    if not good:
        problems.append(Problem(model, "has no version folder (1/, 2/, ...)"))
    backend = config.backend or {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}.get(config.platform, "")
    if backend not in BACKENDS:
        problems.append(Problem(model, f"backend {backend or config.platform!r} is not one packager writes or checks",
                                severity="warning"))
    types = ModelConfig.DESCRIPTOR.fields_by_name["input"].message_type
    format_enum = types.fields_by_name["format"].enum_type
    for kind, entries in (("input", config.input), ("output", config.output)):
        if not entries and backend == "openvino":
            problems.append(Problem(model, f"lists no {kind}s: the openvino backend does not auto-complete configs"))
        for entry in entries:
            where = f"{kind} {entry.name!r}"
            if entry.data_type == 0:
                problems.append(Problem(model, f"{where} has no data_type"))
            if not entry.dims and not entry.HasField("reshape"):
                problems.append(Problem(model, f"{where} has no dims"))
            if any(d == 0 or d < -1 for d in entry.dims):
                problems.append(Problem(model, f"{where} has dims {list(entry.dims)}: sizes are >= 1, or -1"))
            if kind == "input" and entry.format != 0:
                problems.append(Problem(model, f"{where} sets format: {format_enum.values_by_number[entry.format].name}"
                                        "; Triton refuses a format on inputs that are not 3-D image tensors, and "
                                        "none is needed: drop it"))
            if backend == "pytorch" and kind == "output" and not LIBTORCH_NAME.match(entry.name):
                problems.append(Problem(model, f"{where}: libtorch outputs must be named NAME__INDEX"))
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        problems.append(Problem(model, "dynamic_batching needs max_batch_size > 0"))
    for size in config.dynamic_batching.preferred_batch_size:
        if size > config.max_batch_size:
            problems.append(Problem(model, f"preferred_batch_size {size} exceeds max_batch_size {config.max_batch_size}"))
    if good:
        latest = good[-1]
        default = config.default_model_filename or BACKENDS.get(backend, (None, ""))[1]
        if default and not (latest / default).exists():
            problems.append(Problem(model, f"{latest.name}/{default} is missing (the file the {backend} backend loads)"))
        elif backend == "openvino" and not (latest / "model.bin").exists():
            problems.append(Problem(model, f"{latest.name}/model.bin is missing (the IR's weights)"))
        elif backend == "onnxruntime" and default:
            problems += _onnx_problems(model, config, latest / default)
        elif backend == "python" and not (latest / "package").is_dir():
            problems.append(Problem(model, f"{latest.name}/package is missing (what model.py loads)", "warning"))
    for warm in config.model_warmup:
        for key, value in warm.inputs.items():
            if not value.input_data_file:
                continue
            path = folder / "warmup" / value.input_data_file
            type_name = ModelConfig.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number[value.data_type].name
            want = math.prod(value.dims) * TYPE_SIZES.get(type_name, 0)
            if not path.is_file():
                problems.append(Problem(model, f"warmup input {key!r}: warmup/{value.input_data_file} is missing"))
            elif want and path.stat().st_size != want:
                problems.append(Problem(model, f"warmup input {key!r}: warmup/{value.input_data_file} holds "
                                        f"{path.stat().st_size} bytes, dims {list(value.dims)} need {want}"))
    return problems


def check_repository(repo: str | Path, models: list[str] | None = None) -> list[Problem]:
    """Parse every ``config.pbtxt`` of ``repo`` as Triton's ModelConfig and apply the lints.

    Args:
        repo: Model repository folder.
        models: Only these model folders (default: all).

    Raises:
        InputError: ``repo`` is not a folder; DependencyError: tritonclient/protobuf missing.
    """
    from packager.errors import InputError

    repo = Path(repo)
    if not repo.is_dir():
        raise InputError(str(repo), "is not a folder", fix="pass a Triton model repository folder")
    ModelConfig = model_config_class()
    folders = [repo / m for m in models] if models else sorted(p for p in repo.iterdir()
                                                                if p.is_dir() and not p.name.startswith("."))
    problems: list[Problem] = []
    for folder in folders:
        if not (folder / "config.pbtxt").is_file():
            problems.append(Problem(folder.name, "has no config.pbtxt (packager writes full configs; Triton's "
                                    "auto-complete cannot infer every backend's)"))
            continue
        problems += _model_problems(folder, ModelConfig)
    if not folders:
        problems.append(Problem(str(repo), "holds no model folder"))
    return problems
