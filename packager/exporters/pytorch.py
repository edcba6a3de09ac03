"""PyTorch exporter: state_dict, checkpoint, full-model and TorchScript/.pt2 sources;
TorchScript, ONNX and torch.export formats.

torch is imported inside functions only: this module is imported to ask ``claims``/``owns``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import logging
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from packager.exporters._checkpoint import find_state
from packager.errors import ExportError, SourceError, TrustRequiredError, UsageError, did_you_mean
from packager.exporters import (ArtifactSpec, ExportContext, ExporterOptions, LoadedModel, SourceOptions,
                                forward_parameters, parse_exporter_options)
from packager.exporters._onnx import name_dynamic_dims
from runtimes._torch import flatten

FRAMEWORK = "torch"
FORMATS = ("torchscript", "onnx", "torch_export")
DEFAULT_FORMATS = FORMATS
DEFAULT_OPSET = 18
SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt", ".tar")


class Options(ExporterOptions):
    """Options of the torch exporter (``--option KEY=VALUE``; ``--torchscript-mode``)."""

    #: How the torchscript artifact is made: ``torch.jit.trace`` or ``torch.jit.script``.
    torchscript_mode: Literal["trace", "script"] = "trace"
    #: ``torch.jit.freeze`` the TorchScript module (weights inlined as constants).
    torchscript_freeze: bool = False


def _options(ctx: ExportContext) -> Options:
    return parse_exporter_options(FRAMEWORK, Options, ctx.options)  # type: ignore[return-value]


#: Keys under which training scripts commonly keep the weights in a checkpoint dict.
STATE_KEYS = ("model_state_dict", "state_dict", "model_state", "model", "net", "weights", "ema_state_dict")

log = logging.getLogger("packager.torch")


def owns(obj: Any) -> bool:
    """True for a ``torch.nn.Module`` (checked without importing torch when it is not loaded)."""
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(obj, torch.nn.Module)


def claims(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def framework_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def import_builder(spec: str) -> Any:
    """Resolve ``module:function`` or ``path/to/file.py:function`` to a callable.

    A module is looked up with the current folder on the import path (also when packager runs
    from its console script); a file's own folder is on the import path while it is imported and
    while the builder runs, so it can import the modules beside it, as ``python file.py`` can.
    """
    if ":" not in spec:
        raise UsageError(f"builder {spec!r}", "is not of the form module:function",
                         expected="package.module:function or file.py:function", got=spec)
    module_name, _, attr = spec.rpartition(":")
    folder: str | None = None
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise UsageError(f"builder {spec!r}", f"file {module_name!r} does not exist",
                                 fix=f"check the path (relative to the current folder {str(Path.cwd())!r})")
            folder = str(file.resolve().parent)
            mod_spec = importlib.util.spec_from_file_location(file.stem, file)
            if mod_spec is None:
                raise ImportError(f"{module_name} is not a Python file")
            module = importlib.util.module_from_spec(mod_spec)
            with _on_import_path(folder):
                mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")  # let users name modules of the current directory
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"builder {spec!r}", f"module {module_name!r} cannot be imported ({exc})",
                         fix="check the module path, or run from the folder that contains it") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        functions = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
        raise UsageError(f"builder {spec!r}", f"module {module_name!r} has no attribute {attr!r}",
                         fix=f"{did_you_mean(attr, functions)}name a function the module defines") from None
    if folder is None or not callable(fn):
        return fn

    @functools.wraps(fn)
    def build(*args: Any, **kwargs: Any) -> Any:
        with _on_import_path(folder):  # imports inside the builder find the file's siblings too
            return fn(*args, **kwargs)

    return build


@contextlib.contextmanager
def _on_import_path(folder: str) -> Any:
    """``folder`` first on ``sys.path`` for the block (left as it was if already there)."""
    if folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass


def _build(options: SourceOptions, path: Path) -> Any:
    import torch

    if not options.builder:
        raise UsageError(str(path), "holds weights only (a state_dict), not an architecture",
                         fix="pass --builder module:function that returns the nn.Module")
    model = import_builder(options.builder)()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"builder {options.builder!r}", "did not return a torch.nn.Module",
                         expected="torch.nn.Module", got=type(model).__name__)
    return model


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())




def _load_weights(model: Any, state: dict, subject: str) -> None:
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as exc:  # size mismatches
        raise SourceError(subject, f"does not fit the builder's architecture: {str(exc).splitlines()[-1].strip()}",
                          fix="check that --builder builds the same architecture (sizes, layers) as was trained") from None
    if missing or unexpected:
        raise SourceError(subject, "does not fit the builder's architecture",
                          expected=f"no missing keys (missing: {missing[:5]})",
                          got=f"unexpected keys {unexpected[:5]}",
                          fix="check --builder, or --state-key; a 'module.' prefix means it was saved from "
                              "DataParallel (strip it)")


def _refuse_source(path: Path, findings: list[str]) -> None:
    if findings:
        raise TrustRequiredError(str(path), "holds what would run code or touch files when loaded or run: "
                                 + "; ".join(findings[:8]),
                                 fix="pass --trust only if you trust its origin")


def load_source(source: Any, options: SourceOptions) -> LoadedModel:
    """Turn an nn.Module or a torch save into an eval-mode module."""
    import torch

    if isinstance(source, torch.nn.Module):
        return _loaded(source, "in_memory", None, None)
    path = Path(source)
    if not path.is_file():
        raise SourceError(str(path), "does not exist", fix="check the path")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        # TorchScript archives carry their code (ARCHIVE/code/...); plain torch.save zips do not.
        if any(n.split("/", 1)[-1].startswith("code/") for n in names):
            from runtimes._graphscan import torchscript_module_findings, torchscript_source_findings

            if not options.trust:  # loading runs __setstate__ code: scan the archive first
                _refuse_source(path, torchscript_source_findings(path))
            module = torch.jit.load(str(path), map_location="cpu")
            if not options.trust:
                _refuse_source(path, torchscript_module_findings(module))
            return _loaded(module, "torchscript", str(path), None)
        if path.suffix == ".pt2" or any("serialized_exported_program" in n for n in names):
            from runtimes._graphscan import exported_program_findings, pt2_findings
            from runtimes._torch import is_unpickling_refusal, weights_only_loads

            if not options.trust:  # torch.export.load unpickles and exec()s parts of the file
                _refuse_source(path, pt2_findings(path))

            try:
                # torch.export.load unpickles parts of a .pt2 with weights_only=False: without
                # --trust every torch.load inside it is forced to weights_only.
                with weights_only_loads() if not options.trust else contextlib.nullcontext():
                    program = torch.export.load(str(path))
            except Exception as exc:
                if is_unpickling_refusal(exc):
                    raise TrustRequiredError(
                        str(path), "is a torch.export program with pickled Python objects; loading it runs code "
                        "from the file", fix="pass --trust if you trust its origin, or re-export it with plain "
                        "tensor weights") from None
                raise SourceError(str(path), f"cannot be loaded as a torch.export program ({exc})") from None
            if not options.trust:
                _refuse_source(path, exported_program_findings(program))
            loaded = _loaded(program.module(), "torch_export", str(path), None)
            # Re-tracing an ExportedProgram's module fails; exporters take the program itself.
            loaded.extra["program"] = program
            loaded.extra["call_positional"] = True
            return loaded
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _needs_pickle(exc):
            raise SourceError(str(path), f"cannot be read by torch.load ({str(exc).splitlines()[0]})",
                              fix="check that the file is a torch save and not truncated") from None
        if not options.trust:
            raise TrustRequiredError(
                str(path), "contains pickled Python objects (a full model saved with torch.save(model)); "
                "loading it runs code from the file",
                fix="pass --trust if you trust its origin (the model's classes must be importable), or save "
                    "model.state_dict() instead and pass --builder") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError) as exc2:
            raise SourceError(str(path), f"is a pickled model whose class cannot be imported ({exc2})",
                              fix="make the model's module importable (PYTHONPATH), or use a state_dict + "
                                  "--builder") from None
        if isinstance(obj, torch.nn.Module):
            return _loaded(obj, "full_model", str(path), None)
    if isinstance(obj, torch.nn.Module):
        return _loaded(obj, "full_model", str(path), None)
    if _is_state_dict(obj):
        model = _build(options, path)
        _load_weights(model, obj, f"state_dict {str(path)!r}")
        return _loaded(model, "state_dict", str(path), options.builder)
    if isinstance(obj, dict):
        state, key = find_state(obj, path, options.state_key, keys=STATE_KEYS, is_state_dict=_is_state_dict)
        model = _build(options, path)
        _load_weights(model, state, f"checkpoint {str(path)!r} key {key!r}")
        loaded = _loaded(model, "checkpoint", str(path), options.builder)
        loaded.extra["state_key"] = key
        loaded.extra["epoch"] = obj.get("epoch") if isinstance(obj.get("epoch"), (int, float)) else None
        return loaded
    raise SourceError(str(path), "holds neither a model, a state_dict nor a checkpoint dict",
                      got=type(obj).__name__)


def _needs_pickle(exc: Exception) -> bool:
    text = str(exc)
    return "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in type(exc).__name__


def _eval(model: Any) -> None:
    """Dropout off, BatchNorm on running statistics. A torch.export module cannot switch modes
    (it was captured in the mode it was exported in), so it is left as is."""
    try:
        model.eval()
    except NotImplementedError:
        pass


def _loaded(model: Any, kind: str, path: str | None, builder: str | None) -> LoadedModel:
    _eval(model)
    names, var_keyword = forward_parameters(getattr(model, "forward", None))
    loaded = LoadedModel(model=model, kind=kind, framework=FRAMEWORK, input_names=names, path=path, builder=builder,
                         reference="torch eager (eval, no_grad)")
    loaded.extra["var_keyword"] = var_keyword
    return loaded


def _by_keyword(loaded: LoadedModel, names: list[str]) -> Any:
    """The model as a module taking ``names`` positionally, calling the model by keyword and
    returning a flat tuple of tensors.

    Exporters trace positional arguments; binding them by name here keeps a feed from reaching
    another parameter, and a flat tuple keeps the artifact loadable without the model's own
    output classes (a ``.pt2`` of a ``ModelOutput`` needs ``transformers`` to load otherwise).
    ``forward`` gets an explicit signature (i0, i1, ...) so torch.export can bind dynamic shapes.
    """
    import torch

    def forward(self: Any, *args: Any) -> tuple[Any, ...]:
        output = self.model(**dict(zip(self.names, args))) if self.keywords else self.model(*args)
        return output if isinstance(output, torch.Tensor) else tuple(flatten(output))

    P = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(f"i{k}", P.POSITIONAL_OR_KEYWORD) for k in range(len(names))])
    module = type("KeywordCall", (torch.nn.Module,), {"forward": forward})()
    module.model, module.names, module.keywords = loaded.model, tuple(names), bool(loaded.input_names)
    return module.eval()


def _traceable(loaded: LoadedModel, ctx: ExportContext, always: bool = False) -> Any:
    """What exporters trace: the model itself, or :func:`_by_keyword` when inputs are bound by
    keyword out of ``forward``'s order (or ``always``: flat outputs)."""
    if loaded.extra.get("keyword_call") and loaded.extra.get("call_positional"):
        raise UsageError("example inputs", "skip parameters of a torch.export program, which takes its inputs "
                         "positionally", expected=loaded.input_names, got=list(ctx.example_inputs),
                         fix="feed every parameter up to the last one you feed, in forward()'s order")
    if always or (loaded.input_names and loaded.extra.get("keyword_call")):
        return _by_keyword(loaded, list(ctx.example_inputs))
    return loaded.model


def _tensors(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in feeds.values())


def run_eager(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the module in eval mode under no_grad; outputs flattened in order."""
    import torch

    _eval(loaded.model)
    with torch.no_grad():
        # Bound by name (packager.exporters.bind_by_name); a .pt2 program's module takes its
        # arguments only as they were exported: positionally, in forward()'s order.
        if loaded.input_names and not loaded.extra.get("call_positional"):
            output = loaded.model(**dict(zip(feeds, _tensors(loaded, feeds))))
        else:
            output = loaded.model(*_tensors(loaded, feeds))
    if isinstance(output, dict) and loaded.output_names is None:
        loaded.output_names = [str(k) for k in output]
    return [t.detach().cpu().numpy() for t in flatten(output)]


def export_format(fmt: str, loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    """Write ``fmt`` into ``dest`` (the package's ``<fmt>/`` folder)."""
    writers = {"torchscript": _torchscript, "onnx": _onnx, "torch_export": _torch_export}
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/exporter warnings go to the log, not the console
        return writers[fmt](loaded, ctx, dest)


def _torchscript(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    import torch

    options = _options(ctx)
    mode = options.torchscript_mode
    if loaded.kind == "torchscript":
        module = loaded.model
    elif mode == "script":
        if loaded.extra.get("keyword_call"):
            raise UsageError("--torchscript-mode script", "cannot bind these inputs by name",
                             expected=f"inputs that are the first parameters of forward(), in order: "
                                      f"{loaded.input_names}", got=list(ctx.example_inputs),
                             fix="use the default trace mode, or feed forward()'s leading parameters")
        try:
            module = torch.jit.script(loaded.model)
        except Exception as exc:
            raise ExportError("format torchscript", f"torch.jit.script failed: {str(exc).splitlines()[0]}",
                              fix="use the default trace mode, or make the model scriptable") from None
    else:
        module = torch.jit.trace(_traceable(loaded, ctx), _tensors(loaded, ctx.example_inputs), check_trace=False,
                                 strict=False)
    module = torch.jit.freeze(module.eval()) if options.torchscript_freeze else module
    target = dest / "model.pt"
    torch.jit.save(module, str(target))
    return ArtifactSpec(path=f"{dest.name}/model.pt", options={"mode": mode if loaded.kind != "torchscript" else "as-is"})


def _dynamic_shapes(ctx: ExportContext) -> dict[str, dict[int, Any]]:
    import torch

    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    for spec in ctx.signature.inputs:
        axes = {}
        for axis, name in spec.dynamic_axes.items():
            if name not in dims:
                info = ctx.signature.dim(name)
                # min 1 would let torch.export specialise on 0/1; Dim.DYNAMIC lets it decide.
                dims[name] = torch.export.Dim.DYNAMIC if info.max is None else torch.export.Dim(
                    name, min=max(info.min, 1), max=info.max)
            axes[axis] = dims[name]
        shapes[spec.name] = axes
    return shapes


#: Terminal colour codes torch's exporters put in their messages.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: torch.export's report of a dynamic axis the traced code fixed (torch 2.13 wording): an
#: unnamed axis as ``L['i0'].size()[1]``, a bounded one by its dim name.
_SPECIALISED = re.compile(r"You marked (L\['i(\d+)'\]\.size\(\)\[(\d+)\]|\w+) as dynamic but your code "
                          r"specialized it to be a constant \((\d+)\)")


def _specialised_axes(text: str, ctx: ExportContext) -> list[tuple[str, int, str, int]]:
    """``(input, axis, dim name, fixed size)`` for each axis torch.export says the code fixed
    (the traced wrapper names its inputs i0, i1, ... in signature order)."""
    found = []
    inputs = ctx.signature.inputs
    for marked, index, axis, value in _SPECIALISED.findall(text):
        if index and int(index) < len(inputs):
            spec = inputs[int(index)]
            found.append((spec.name, int(axis), str(spec.dynamic_axes.get(int(axis), "?")), int(value)))
        elif not index:
            found += [(spec.name, a, marked, int(value)) for spec in inputs
                      for a, dim in spec.dynamic_axes.items() if dim == marked]
    return list(dict.fromkeys(found))


def _positional_shapes(loaded: LoadedModel, ctx: ExportContext) -> tuple[dict[int, Any], ...]:
    shapes = _dynamic_shapes(ctx)
    return tuple(shapes[s.name] or None for s in ctx.signature.inputs)


def _onnx(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    import onnx
    import torch

    # torch.onnx logs through its own handlers (e.g. "torchvision is not installed"): keep it quiet.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    opset = ctx.opset or DEFAULT_OPSET
    target = dest / "model.onnx"
    args = _tensors(loaded, ctx.example_inputs)
    input_names = ctx.signature.input_names
    output_names = ctx.signature.output_names
    errors = []
    exporter_used = None
    # The TorchScript-based exporter is the known fallback, and the only one for a scripted
    # module (the dynamo exporter starts with torch.export, which cannot trace one).
    for dynamo in (False,) if _scripted(loaded) else (True, False):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                if dynamo and "program" in loaded.extra:  # its dynamic shapes are baked in already
                    torch.onnx.export(loaded.extra["program"], args, str(target), input_names=input_names,
                                      output_names=output_names, opset_version=opset, dynamo=True,
                                      external_data=False, optimize=True, verbose=False)
                elif dynamo:
                    torch.onnx.export(_traceable(loaded, ctx), args, str(target), input_names=input_names,
                                      output_names=output_names, opset_version=opset, dynamo=True,
                                      dynamic_shapes=_positional_shapes(loaded, ctx), external_data=False,
                                      optimize=True, verbose=False)
                else:
                    axes = {s.name: {a: n for a, n in s.dynamic_axes.items()}
                            for s in [*ctx.signature.inputs, *ctx.signature.outputs] if s.dynamic_axes}
                    torch.onnx.export(_traceable(loaded, ctx), args, str(target), input_names=input_names,
                                      output_names=output_names, opset_version=opset, dynamo=False,
                                      dynamic_axes=axes, do_constant_folding=True)
            exporter_used = "dynamo" if dynamo else "torchscript"
            break
        except Exception as exc:
            first = _ANSI.sub("", str(exc)).splitlines()[0] if str(exc) else ""
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {first}")
            if buf.getvalue().strip():
                ctx.log.append(_ANSI.sub("", buf.getvalue()[-4000:]))
            target.unlink(missing_ok=True)
    if exporter_used is None:
        raise ExportError("format onnx", "both torch ONNX exporters failed: " + " | ".join(errors),
                          fix="try another --opset, or export torchscript/torch_export only", details="\n".join(ctx.log))
    for extra in dest.iterdir():  # the dynamo exporter may leave a .data file next to small models
        if extra.name != "model.onnx":
            extra.unlink()
    model = onnx.load(str(target))
    name_dynamic_dims(model.graph, ctx.signature)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))
    if errors:
        ctx.log.append("onnx: " + "; ".join(errors) + f"; used the {exporter_used} exporter")
    return ArtifactSpec(path=f"{dest.name}/model.onnx", options={"opset": opset, "exporter": exporter_used})


def default_formats(loaded: LoadedModel) -> tuple[list[str], list[str]]:
    """The formats written when none are asked for, and a note on any default left out:
    ``torch.export`` cannot trace a TorchScript module (a ``torch.jit.load``-ed file, or
    a wheel's shipped ``.jit``), so its packages get TorchScript and ONNX."""
    if _scripted(loaded):
        return [f for f in DEFAULT_FORMATS if f != "torch_export"], [
            "torch_export left out: torch.export cannot trace a TorchScript module (export the Python "
            "nn.Module for a .pt2)"]
    return list(DEFAULT_FORMATS), []


def _scripted(loaded: LoadedModel) -> bool:
    import torch

    return isinstance(loaded.model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def _torch_export(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    import torch

    args = _tensors(loaded, ctx.example_inputs)
    if "program" in loaded.extra:
        torch.export.save(loaded.extra["program"], str(dest / "model.pt2"))
        return ArtifactSpec(path=f"{dest.name}/model.pt2", options={"from": "source program"})
    if _scripted(loaded):
        # torch.export refuses a ScriptModule, and through a wrapper it fails on the scripted
        # code's guards ("Constraints violated") or its non-Parameter weights: say what it is.
        raise ExportError("format torch_export", "cannot be written from a TorchScript module: torch.export "
                          "traces Python code, and a scripted module has none",
                          fix="export the Python nn.Module for a .pt2, or leave torch_export out "
                              "(--formats torchscript,onnx)")
    try:
        program = torch.export.export(_traceable(loaded, ctx, always=True), args,
                                      dynamic_shapes=_positional_shapes(loaded, ctx))
    except Exception as exc:
        fixed = _specialised_axes(str(exc), ctx)
        if fixed:
            raise ExportError("format torch_export", "the model's code fixes axes declared dynamic: "
                              + "; ".join(f"input {n!r} axis {a} ({d}) at {v}" for n, a, d, v in fixed),
                              fix="torch.export cannot keep these axes dynamic (nn.LSTM and nn.GRU fix the "
                                  "sequence length, for one); leave torch_export out "
                                  "(--formats torchscript,onnx), or declare the axes fixed in --input-spec") from None
        raise ExportError("format torch_export", f"torch.export failed: {str(exc).splitlines()[0]}",
                          fix="check the dynamic axes in --input-spec (a model that needs a fixed size cannot "
                              "export that axis as dynamic)") from None
    target = dest / "model.pt2"
    torch.export.save(program, str(target))
    return ArtifactSpec(path=f"{dest.name}/model.pt2")
