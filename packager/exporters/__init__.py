"""Framework exporters: one module per framework, the same small contract in each.

Every module ``packager.exporters.<framework>`` defines:

- ``FRAMEWORK`` (str), ``FORMATS`` (tuple of format names it writes), ``DEFAULT_FORMATS``;
  optionally ``default_formats(loaded) -> (formats, notes)`` when some loaded sources cannot
  reach every default (torch: a TorchScript module has no torch.export);
- ``owns(obj) -> bool``: whether an in-memory object is a model of this framework (by type
  module name, without importing the framework);
- ``claims(path) -> bool``: whether a file/folder looks like this framework's save;
- ``framework_version() -> str``;
- ``load_source(source, options: SourceOptions) -> LoadedModel``;
- ``run_eager(loaded, feeds: dict[str, np.ndarray]) -> list[np.ndarray]`` (inference mode);
- ``export_format(fmt, loaded, ctx: ExportContext, dest: Path) -> ArtifactSpec``.
- ``Options``: the exporter options it reads (``--option KEY=VALUE``, ``options={...}``), a
  subclass of :class:`ExporterOptions` declaring each with its type and default.

Modules are imported lazily through :data:`FRAMEWORKS`.

Formats converted from another artifact of the package (``openvino`` from ``onnx``, ``tflite``
from ``saved_model``) are written by one module each, named by the format's record in
:mod:`packager.registry` (``FormatRecord.converter``) and found through :func:`converter`;
its ``convert(source, ctx, dest) -> ArtifactSpec`` reads the source artifact's file instead of
the model, so every framework that writes the source format gets the converted one too.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import numpy as np

from packager import registry
from packager.errors import DependencyError, UsageError
from packager.options import TypedOptions, parse_options
from packager.signature import Signature

#: Frameworks in detection order (records in packager/registry.py).
FRAMEWORKS = registry.FRAMEWORKS


class ExporterOptions(TypedOptions):
    """A framework exporter's options, declared with types: values given as strings (``--option
    torchscript_freeze=false``) parse by the declared type, a bad value is an error naming the
    option, and an unknown option is refused (a typo must not be ignored)."""


def parse_exporter_options(framework: str, declared: type[ExporterOptions],
                           options: Mapping[str, Any] | None) -> ExporterOptions:
    """Validate ``options`` against an exporter's ``Options`` (strings parse by the declared type).

    Raises:
        UsageError: An unknown option or a value of the wrong type (exit 2), naming the
            accepted options with their types.
    """
    return parse_options(declared, options, subject=f"{framework} exporter options", owner=f"the {framework} exporter",
                         fix_suffix=" (--option KEY=VALUE, or options={...} in the API)")


@dataclass
class SourceOptions:
    """How to turn a training-time save into a model."""

    builder: str | None = None
    state_key: str | None = None
    trust: bool = False
    signature_key: str | None = None  # e.g. a SavedModel signature
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A model ready for eager inference and export."""

    model: Any
    kind: str  # in_memory, state_dict, checkpoint, full_model, inference_model, ...
    framework: str
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    #: Signature read from the source itself (inference models); dims may be partly unknown.
    signature: Signature | None = None
    path: str | None = None
    builder: str | None = None
    #: What produced the reference outputs, for the manifest ("torch eager").
    reference: str = "eager"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportContext:
    """What a format exporter needs besides the model."""

    signature: Signature
    example_inputs: dict[str, np.ndarray]
    opset: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: Messages to keep in the report (captured converter logs, workarounds tried).
    log: list[str] = field(default_factory=list)
    #: The export's judge (packager.fidelity.judge.Judge: --atol/--rtol and the noise record), for
    #: exporters that compare conversion attempts themselves; None: the default rules.
    judge: Any = None


@dataclass
class ArtifactSpec:
    """What a format exporter wrote, relative to its ``dest`` folder's parent (the package)."""

    path: str
    runtimes: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def exporter(framework: str) -> ModuleType:
    """Import the exporter module of ``framework``."""
    if framework not in FRAMEWORKS:
        raise UsageError(f"framework {framework!r}", "is unknown", expected=", ".join(FRAMEWORKS), got=framework)
    try:
        # The framework itself first: exporter modules import it lazily, so a missing torch
        # would otherwise surface mid-export as an internal error.
        if importlib.util.find_spec(FRAMEWORKS[framework].module) is None:
            raise ImportError(f"No module named {FRAMEWORKS[framework].module!r}")
        return importlib.import_module(FRAMEWORKS[framework].exporter)
    except (ImportError, ValueError) as exc:  # ValueError: a module set to None in sys.modules
        raise DependencyError(f"framework {framework!r}", f"cannot be imported ({exc})",
                              fix=f"pip install 'packager[{FRAMEWORKS[framework].extra}]'") from exc


def converter(fmt: str) -> Callable[[Path, "ExportContext", Path], "ArtifactSpec"]:
    """The ``convert`` function of a format converted from another artifact (its registry record's
    ``converter``); the module imports its converter library itself, when called."""
    record = registry.FORMATS[fmt]
    if record.converter is None:
        raise UsageError(f"format {fmt!r}", "is written by the framework exporters, not converted from an artifact")
    module, function = record.converter.split(":")
    return getattr(importlib.import_module(module), function)


def detect_framework(source: Any) -> str:
    """Which framework owns an in-memory model or a saved file/folder."""
    from packager.errors import SourceError

    if isinstance(source, (str, Path)):
        path = Path(source)
        missing = []
        for name in FRAMEWORKS:
            try:
                if exporter(name).claims(path):
                    return name
            except DependencyError:
                missing.append(name)
        if not path.exists():  # a mistyped path: say so, not that its suffix is unknown
            prefix = ("; a Paddle prefix like out/model needs out/model.json, .pdmodel or .pdparams"
                      if not path.suffix else "")
            raise SourceError(str(path), "does not exist",
                              fix=f"check the path (relative to the current folder {str(Path.cwd())!r}){prefix}")
        install = "; ".join(f"{n} is not installed here (pip install 'packager[{FRAMEWORKS[n].extra}]')" for n in missing)
        raise SourceError(str(path), "is not a model save packager recognises",
                          expected=".pt/.pth/.pt2 (torch), .keras/.h5/SavedModel (tensorflow), "
                          ".pdparams/.pdmodel/.json (paddle)",
                          got=path.suffix or ("a folder" if path.is_dir() else "a file without a suffix"),
                          fix="pass --framework to say which framework saved it" + (f"; {install}" if install else ""))
    module = type(source).__module__.split(".")[0]
    for name in FRAMEWORKS:
        try:
            if exporter(name).owns(source):
                return name
        except DependencyError:
            continue
    raise SourceError(f"model object of type {type(source).__name__}", f"(from module {module!r}) is not a "
                      "torch.nn.Module, Keras model / tf.Module or paddle.nn.Layer",
                      fix="pass a model object of a supported framework, or framework=...")


def forward_parameters(fn: Any) -> tuple[list[str] | None, bool]:
    """The positional-or-keyword parameter names of a model's ``forward`` (None when it takes
    only ``*args`` or a lone ``input``), and whether it also takes ``**kwargs``."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None, False
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    if len(names) == 1 and names[0] in ("args", "input", "inputs"):
        return None, var_keyword
    return names or None, var_keyword


def bind_by_name(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Order ``feeds`` like the model's ``forward`` parameters and say how they are bound.

    A tokenizer returns ``input_ids, token_type_ids, attention_mask`` while ``BertModel.forward``
    takes ``input_ids, attention_mask, token_type_ids``: a positional call would feed one to the
    other, and golden data computed the same wrong way would hide it. Returns the feeds in
    parameter order and the manifest's binding record; ``loaded.extra["keyword_call"]`` is set
    when the fed parameters are not a leading run of ``forward``'s (the exporter then calls the
    model by keyword).

    Raises:
        UsageError: A feed name matches no parameter (and ``forward`` takes no ``**kwargs``).
    """
    params = loaded.input_names
    if not params or not feeds:
        return feeds, {"mode": "positional", "order": list(feeds)}
    unknown = [name for name in feeds if name not in params]
    if unknown and not loaded.extra.get("var_keyword"):
        what = "the model's inputs" if loaded.framework == "tensorflow" else "forward()'s parameters"
        raise UsageError(f"example inputs {unknown}", "are not named like the model's inputs"
                         + ("" if loaded.framework == "tensorflow" else f" ({what})"),
                         expected=params, got=list(feeds),
                         fix=f"name the example arrays (and --input-spec) after {what}")
    order = [name for name in params if name in feeds] + unknown
    loaded.extra["keyword_call"] = order != params[:len(order)]
    return {name: feeds[name] for name in order}, {"mode": "keyword", "order": order,
                                                     "given_order": list(feeds)}
