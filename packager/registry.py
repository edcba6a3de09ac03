"""The one registry of frameworks, runtimes and artifact formats.

Every other table (which runner loads a format, which artifact a package runs by default,
which artifact is the live reference, which distribution a manifest version refers to,
which pip extra fixes a missing import) is derived from the records below. Adding a runtime
is one :class:`RuntimeRecord` plus one runner module under ``runtimes/``; adding a format that
is converted from another artifact of the package (OpenVINO IR from ONNX, TFLite from the
SavedModel) is one :class:`FormatRecord` naming its source format and converter module.
``tests/test_registry.py`` checks the records against ``pyproject.toml``'s extras and
against every runner class.

This module imports nothing but the standard library: ``packager --help`` and the runtime
layer read it without importing a framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Devices a runner may be asked for ("cuda" covers "cuda:N").
DeviceKind = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class FrameworkRecord:
    """A training framework packager exports from."""

    name: str
    #: Exporter module (``packager.exporters.<module>``), imported when a model of it is exported.
    exporter: str
    #: Importable module whose presence means the framework is installed.
    module: str
    #: Installed distribution that carries its version.
    distribution: str
    #: pip extra of packager that installs it.
    extra: str


@dataclass(frozen=True)
class RuntimeRecord:
    """A runtime that loads artifacts: one runner class under ``runtimes/``."""

    name: str
    #: ``"module:Class"`` of the runner (imported lazily).
    runner: str
    #: Formats it loads (its runner class reads them from here).
    formats: tuple[str, ...]
    #: Importable module it needs.
    module: str
    #: Distribution whose version the manifest records for it.
    distribution: str
    #: pip extra that installs it; ``None``: a core dependency (``pip install packager``).
    extra: str | None
    #: Whether one runner instance may be called from several threads at once.
    thread_safe: bool
    devices: tuple[DeviceKind, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class FormatRecord:
    """An artifact format a package may hold."""

    name: str
    #: File suffixes of a bare artifact of this format (lower case).
    suffixes: tuple[str, ...]
    #: ``"native"``: the framework's own runtime executes the traced graph (TorchScript,
    #: torch.export, SavedModel); ``"converted"``: another runtime runs a translation (ONNX,
    #: Paddle programs), judged with the wider tolerance (packager/fidelity/judge.py).
    conversion: Literal["native", "converted"]
    #: Rank as the live reference of ``verify`` when no eager model is at hand (0: closest to
    #: eager); ONNX after the framework formats, since it is what is usually being checked, and
    #: the formats converted from an artifact (TFLite, OpenVINO) last: one conversion further away.
    reference_rank: int
    #: The package artifacts this format can be converted from, preferred first, once the
    #: framework's exporter has written one (every framework that writes such a format can then
    #: write this one); empty: the framework exporters write it themselves.
    derived_from: tuple[str, ...] = ()
    #: ``"module:function"`` that converts the ``derived_from`` artifact (imported lazily), called
    #: as ``convert(source: Path, ctx: ExportContext, dest: Path) -> ArtifactSpec`` like a
    #: framework exporter's ``export_format``.
    converter: str | None = None
    #: Triton backend that serves the artifact (``packager triton``): ``onnxruntime``,
    #: ``pytorch``, ``openvino``, or ``python`` (a generated model.py that loads it with ``runtimes``).
    triton_backend: Literal["onnxruntime", "pytorch", "openvino", "python"] = "python"
    #: ``"float16"`` / ``"int8"``: an optimised variant of its ``derived_from`` artifact, written by
    #: ``packager optimize`` under an accuracy budget (never by ``export``, never an automatic
    #: choice of ``run``); None: a full-precision artifact.
    precision: Literal["float16", "int8"] | None = None


#: Frameworks, in detection order.
FRAMEWORKS: dict[str, FrameworkRecord] = {r.name: r for r in (
    FrameworkRecord("torch", "packager.exporters.pytorch", "torch", "torch", "torch"),
    FrameworkRecord("tensorflow", "packager.exporters.tensorflow", "tensorflow", "tensorflow", "tensorflow"),
    FrameworkRecord("paddle", "packager.exporters.paddle", "paddle", "paddlepaddle", "paddle"),
)}

#: Runtimes; for a format with several, the first listed is the default.
RUNTIMES: dict[str, RuntimeRecord] = {r.name: r for r in (
    RuntimeRecord("onnxruntime", "runtimes.onnxruntime:OnnxRuntimeRunner", ("onnx", "onnx_fp16", "onnx_int8"),
                  "onnxruntime",
                  "onnxruntime", None, thread_safe=True),  # InferenceSession.run is documented thread-safe
    RuntimeRecord("torchscript", "runtimes.torchscript:TorchScriptRunner", ("torchscript",), "torch", "torch",
                  "torch", thread_safe=True),  # loaded modules keep no per-call state (test_concurrency.py)
    RuntimeRecord("torch_export", "runtimes.torch_export:TorchExportRunner", ("torch_export",), "torch", "torch",
                  "torch", thread_safe=True),
    RuntimeRecord("tensorflow", "runtimes.tensorflow:TensorFlowRunner", ("saved_model",), "tensorflow",
                  "tensorflow", "tensorflow", thread_safe=True),  # concrete functions are re-entrant
    # A predictor is not re-entrant; thread_mode="clone" makes one per thread (instance-level).
    RuntimeRecord("paddle_inference", "runtimes.paddle_inference:PaddleInferenceRunner",
                  ("paddle_inference", "paddle_legacy", "paddle_static"), "paddle", "paddlepaddle", "paddle",
                  thread_safe=False),
    RuntimeRecord("paddle_jit", "runtimes.paddle_jit:PaddleJitRunner", ("paddle_inference",), "paddle",
                  "paddlepaddle", "paddle", thread_safe=False),
    # A CompiledModel is thread-safe and an InferRequest is not: the runner keeps one request per thread.
    RuntimeRecord("openvino", "runtimes.openvino:OpenVinoRunner", ("openvino", "openvino_int8"), "openvino",
                  "openvino",
                  "openvino", thread_safe=True, devices=("cpu",)),
    # An Interpreter holds its tensors: calls are serialised (runtimes/base.py).
    RuntimeRecord("litert", "runtimes.litert:LiteRtRunner", ("tflite",), "ai_edge_litert", "ai-edge-litert",
                  "litert", thread_safe=False, devices=("cpu",)),
)}

#: Formats, in the order a package picks its artifact when none is asked for (ONNX first:
#: the lightest runtime, a core dependency).
FORMATS: dict[str, FormatRecord] = {r.name: r for r in (
    FormatRecord("onnx", (".onnx",), "converted", reference_rank=6, triton_backend="onnxruntime"),
    FormatRecord("torchscript", (".pt", ".pth", ".jit", ".ts", ".torchscript"), "native", reference_rank=0,
                 triton_backend="pytorch"),
    FormatRecord("torch_export", (".pt2",), "native", reference_rank=1),
    FormatRecord("saved_model", (), "native", reference_rank=2),  # a folder with saved_model.pb
    FormatRecord("paddle_inference", (".json", ".pdiparams"), "converted", reference_rank=3),
    FormatRecord("paddle_static", (), "converted", reference_rank=4),
    FormatRecord("paddle_legacy", (".pdmodel",), "converted", reference_rank=5),
    FormatRecord("tflite", (".tflite",), "converted", reference_rank=7, derived_from=("saved_model",),
                 converter="packager.exporters.tflite:convert"),
    # .xml + .bin; OpenVINO also reads Paddle's legacy .pdmodel, which some programs need
    # (paddle2onnx cannot convert PP-OCRv4's, OpenVINO's Paddle frontend can).
    FormatRecord("openvino", (".xml",), "converted", reference_rank=8, derived_from=("onnx", "paddle_legacy"),
                 converter="packager.exporters.openvino:convert", triton_backend="openvino"),
    # Optimised variants (packager optimize), judged by the accuracy budget they were made under.
    FormatRecord("onnx_fp16", (), "converted", reference_rank=9, derived_from=("onnx",),
                 converter="packager.optimizing.onnx_fp16:convert", triton_backend="onnxruntime",
                 precision="float16"),
    FormatRecord("onnx_int8", (), "converted", reference_rank=10, derived_from=("onnx",),
                 converter="packager.optimizing.onnx_int8:convert", triton_backend="onnxruntime",
                 precision="int8"),
    FormatRecord("openvino_int8", (), "converted", reference_rank=11, derived_from=("openvino",),
                 converter="packager.optimizing.openvino_int8:convert", triton_backend="openvino",
                 precision="int8"),
)}

#: Importable module -> pip extra that installs it (None: a core dependency). What
#: :func:`packager.errors.require` tells users to install.
MODULE_EXTRAS: dict[str, str | None] = {
    "numpy": None, "pydantic": None, "onnx": None, "onnxruntime": None,
    "torch": "torch", "onnxscript": "torch",
    "tensorflow": "tensorflow", "keras": "tensorflow", "tf2onnx": "tensorflow",
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "tritonclient": "triton",
    "paddle": "paddle", "paddle2onnx": "paddle", "onnx_graphsurgeon": "paddle", "polygraphy": "paddle",
    "pyarrow": "data", "ray": "ray", "matplotlib": "report", "model_signing": "sign",
    "openvino": "openvino", "ai_edge_litert": "litert",
    "onnxconverter_common": "optimize", "nncf": "optimize",
}

#: Distribution of each importable module whose name differs from it.
MODULE_DISTRIBUTIONS: dict[str, str] = {"paddle": "paddlepaddle", "onnx_graphsurgeon": "onnx-graphsurgeon",
                                        "model_signing": "model-signing", "ai_edge_litert": "ai-edge-litert",
                                        "prometheus_client": "prometheus-client",
                                        "onnxconverter_common": "onnxconverter-common"}


# --- derived tables --------------------------------------------------------------------
#: format -> runtimes that load it, default first.
FORMAT_RUNTIMES: dict[str, tuple[str, ...]] = {
    f: tuple(r.name for r in RUNTIMES.values() if f in r.formats) for f in FORMATS}
#: Which artifact a package runs when no format is asked for.
#: Optimised variants are run only when asked for by name (``--format onnx_int8``).
FORMAT_PREFERENCE: tuple[str, ...] = tuple(f for f, r in FORMATS.items() if r.precision is None)
#: Which artifact serves as the live reference, closest to eager first; never an optimised variant,
#: whose error is by design larger than the artifacts it would judge.
REFERENCE_PREFERENCE: tuple[str, ...] = tuple(sorted(FORMAT_PREFERENCE, key=lambda f: FORMATS[f].reference_rank))
#: Formats the framework's own runtime executes.
NATIVE_FORMATS: frozenset[str] = frozenset(f for f, r in FORMATS.items() if r.conversion == "native")
#: bare-artifact suffix -> format.
SUFFIX_FORMATS: dict[str, str] = {s: f for f, r in FORMATS.items() for s in r.suffixes}
#: source format -> the full-precision formats ``export`` converts from it.
DERIVED_FORMATS: dict[str, tuple[str, ...]] = {
    f: tuple(d for d, r in FORMATS.items() if f in r.derived_from and r.precision is None) for f in FORMATS}
#: Optimised formats (``packager optimize``) -> their precision.
OPTIMIZED_FORMATS: dict[str, str] = {f: r.precision for f, r in FORMATS.items() if r.precision}
#: Formats that are ONNX graphs (ONNX Runtime loads them): the ONNX structural checks apply.
ONNX_FORMATS: frozenset[str] = frozenset(RUNTIMES["onnxruntime"].formats)


def writable_formats(written: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """What an exporter that writes ``written`` can put in a package: those formats, then the
    formats converted from them."""
    return tuple(dict.fromkeys((*written, *(d for f in written for d in DERIVED_FORMATS[f]))))


def conversion_source(fmt: str, formats: list[str] | tuple[str, ...], written: tuple[str, ...] = ()) -> str | None:
    """The artifact ``fmt`` is converted from: its first source among ``formats`` (those the
    package holds or will hold), else the first that the exporter writes (``written``); None for
    a format the exporters write themselves."""
    sources = FORMATS[fmt].derived_from
    return next((s for s in sources if s in formats), next((s for s in sources if s in written), None))


def extra_of(module: str) -> str | None:
    """The pip extra that installs an importable module (top-level name), None for a core one."""
    return MODULE_EXTRAS.get(module.split(".")[0])


def install_fix(module: str) -> str:
    """The command that installs ``module``, for error messages."""
    extra = extra_of(module)
    if extra is None and module.split(".")[0] in MODULE_EXTRAS:
        return f"pip install --force-reinstall packager ({module} is a core dependency that is missing or broken)"
    return f"pip install 'packager[{extra}]'" if extra else f"pip install {module}"


def distribution_of(key: str) -> str:
    """Distribution that carries the version of a ``manifest.versions`` key (framework or runtime)."""
    if key in RUNTIMES:
        return RUNTIMES[key].distribution
    if key in FRAMEWORKS:
        return FRAMEWORKS[key].distribution
    return MODULE_DISTRIBUTIONS.get(key, key)
