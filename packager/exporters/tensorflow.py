"""TensorFlow/Keras exporter: every training-time save in, SavedModel and ONNX out.

Sources: an in-memory Keras model or ``tf.Module``, a ``.keras`` file, a legacy ``.h5`` full
model, weights only (``.weights.h5``/``.h5``) plus ``--builder``, a ``ModelCheckpoint`` file or
folder, and a SavedModel folder (``--signature`` picks its signature).

Both formats are written from one serving ``tf.function`` whose inputs carry the Keras input
names with a dynamic batch axis and whose outputs are a dict keyed by the output names, so the
SavedModel signature, the ONNX graph and the manifest all use the same names.

TensorFlow is imported inside functions only: this module is imported to ask ``claims``/``owns``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from packager.errors import ExportError, SourceError, TrustRequiredError, UsageError
from packager.exporters import (ArtifactSpec, ExportContext, ExporterOptions, LoadedModel, SourceOptions,
                                parse_exporter_options)
from packager.exporters._onnx import name_dynamic_dims
from packager.signature import BATCH, Signature, TensorSpec, dtype_name

FRAMEWORK = "tensorflow"
FORMATS = ("saved_model", "onnx")
DEFAULT_FORMATS = FORMATS
#: tf2onnx 1.17 writes opsets up to 18; 17 is what ONNX Runtime builds of the last years all run.
DEFAULT_OPSET = 17
#: Oldest opset ONNX Runtime still runs.
MIN_OPSET = 7
DEFAULT_SIGNATURE = "serving_default"
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
#: Files ModelCheckpoint writes (full model, legacy HDF5, weights only).
CHECKPOINT_GLOBS = ("*.keras", "*.h5", "*.hdf5")


class Options(ExporterOptions):
    """Options of the tensorflow exporter (``--option KEY=VALUE``): which file of a
    ModelCheckpoint folder to export."""

    #: Metric in the checkpoint file names that decides (``val_loss``); None: the newest file.
    monitor: str | None = None
    #: Whether a lower (min) or higher (max) ``monitor`` is better (default: max for
    #: acc/auc/f1 metrics, else min).
    mode: Literal["min", "max"] | None = None


log = logging.getLogger("packager.tensorflow")


# --- detection ---------------------------------------------------------------------------
def owns(obj: Any) -> bool:
    """True for a Keras model or a ``tf.Module`` (never imports TensorFlow to answer)."""
    if "keras" in sys.modules:
        keras = sys.modules["keras"]
        if isinstance(obj, keras.Model):
            return True
    if "tensorflow" in sys.modules:
        return isinstance(obj, sys.modules["tensorflow"].Module)
    return False


def claims(path: Path) -> bool:
    """Keras files, SavedModel folders and folders of ModelCheckpoint files."""
    if path.is_file():
        return path.suffix.lower() in KERAS_SUFFIXES
    if path.is_dir():
        return _is_saved_model(path) or bool(_checkpoint_files(path))
    return False


def framework_version() -> str:
    from runtimes._tf import import_tf

    return import_tf().__version__


def _is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def _checkpoint_files(folder: Path) -> list[Path]:
    files = {p for pattern in CHECKPOINT_GLOBS for p in folder.glob(pattern) if p.is_file()}
    return sorted(files)


# --- sources -----------------------------------------------------------------------------
def load_source(source: Any, options: SourceOptions) -> LoadedModel:
    """Turn a Keras model, ``tf.Module`` or a TensorFlow/Keras save into a runnable model."""
    from runtimes._tf import import_keras, import_tf

    tf = import_tf()
    keras = import_keras()
    if isinstance(source, keras.Model):
        return _from_keras(source, "in_memory", None, None)
    if isinstance(source, tf.Module):
        return _from_module(source, options.signature_key)
    if not isinstance(source, (str, Path)):
        raise SourceError(f"model object of type {type(source).__name__}", "is not a Keras model or tf.Module",
                          expected="keras.Model, tf.Module, or a path to a TensorFlow/Keras save",
                          got=type(source).__name__, fix="pass the model itself or the path of its save")
    path = Path(source)
    if not path.exists():
        raise SourceError(str(path), "does not exist", fix="check the path")
    if path.is_dir():
        if _is_saved_model(path):
            return _from_saved_model(path, options.signature_key)
        chosen, note = _pick_checkpoint(path, options)
        loaded = _from_file(chosen, options)
        loaded.kind = f"checkpoint ({loaded.kind})"
        loaded.extra.setdefault("notes", []).append(note)
        return loaded
    if options.signature_key:
        raise UsageError("--signature", "only applies to a SavedModel folder or a tf.Module",
                         expected="a SavedModel folder", got=f"{path.name} (a Keras file)", fix="drop --signature")
    return _from_file(path, options)


def _from_file(path: Path, options: SourceOptions) -> LoadedModel:
    """A ``.keras``, ``.h5`` or ``.weights.h5`` file."""
    name = path.name.lower()
    if name.endswith(".weights.h5"):
        return _from_weights(path, options, kind="weights")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise SourceError(str(path), "is not a Keras archive (a .keras file is a zip)",
                              fix="check that the file is complete and was written by model.save('x.keras')")
        if options.builder:  # the builder supplies the code; the file supplies the weights
            return _from_weights(path, options, kind="keras_weights")
        with zipfile.ZipFile(path) as zf:
            try:
                config = json.loads(zf.read("config.json"))
            except (KeyError, json.JSONDecodeError) as exc:
                raise SourceError(str(path), f"has no readable config.json ({exc})",
                                  fix="re-save it with model.save('x.keras')") from None
        return _load_keras_model(path, config, options, kind="full_model")
    if suffix in (".h5", ".hdf5"):
        config = _h5_model_config(path)
        if config is None:  # no architecture inside: weights saved with save_weights
            return _from_weights(path, options, kind="weights")
        if options.builder:
            return _from_weights(path, options, kind="legacy_h5_weights")
        return _load_keras_model(path, config, options, kind="legacy_h5")
    raise SourceError(str(path), "is not a TensorFlow/Keras save", expected=".keras, .h5, .weights.h5, a SavedModel "
                      "folder or a ModelCheckpoint folder", got=suffix or "no suffix")


def _h5_model_config(path: Path) -> dict | None:
    h5py = importlib.import_module("h5py")
    try:
        with h5py.File(path, "r") as fh:
            raw = fh.attrs.get("model_config")
    except OSError as exc:
        raise SourceError(str(path), f"cannot be read as HDF5 ({exc})",
                          fix="check that the file is complete and was written by Keras") from None
    if raw is None:
        return None
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def _code_objects(config: Any) -> tuple[list[str], list[str], set[str]]:
    """Lambda layers, custom classes and their modules in a serialized Keras config."""
    lambdas: list[str] = []
    custom: list[str] = []
    modules: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            cls = node.get("class_name")
            if isinstance(cls, str):
                module = node.get("module")
                if cls == "Lambda" or cls == "TFOpLambda":
                    lambdas.append(str(node.get("config", {}).get("name", cls)))
                elif node.get("registered_name") and "config" in node and not str(module or "").startswith("keras"):
                    custom.append(str(node["registered_name"]))
                    if module and module not in ("__main__", "builtins"):
                        modules.add(str(module))
            for key, value in node.items():
                if key != "compile_config":  # loaded with compile=False: losses/metrics never run
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return lambdas, sorted(set(custom)), modules


def _load_keras_model(path: Path, config: dict, options: SourceOptions, kind: str) -> LoadedModel:
    from runtimes._tf import import_keras

    keras = import_keras()
    lambdas, custom, modules = _code_objects(config)
    if (lambdas or custom) and not options.trust:
        what = []
        if lambdas:
            what.append(f"Lambda layers {lambdas[:5]} (Python code stored in the file)")
        if custom:
            what.append(f"custom objects {custom[:5]} (code imported from {sorted(modules) or 'your modules'})")
        raise TrustRequiredError(
            str(path), "needs code to load: " + " and ".join(what) + "; Keras safe mode refuses to run it",
            fix="pass --trust (trust=True) if you trust the file's origin (custom classes must be importable), "
                "or pass --builder module:function that builds the architecture; its weights are then read "
                "from the file")
    for module in sorted(modules) if options.trust else ():
        # Importing the module runs its @register_keras_serializable decorators.
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SourceError(str(path), f"uses custom objects from module {module!r}, which cannot be imported "
                              f"({exc})", fix="make the module importable (PYTHONPATH), or pass --builder") from None
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=not options.trust)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safe_mode" in str(exc):
            raise TrustRequiredError(str(path), f"needs code to load ({text[:200]})",
                                     fix="pass --trust if you trust the file's origin") from None
        if "Could not locate" in str(exc) or "Unknown" in str(exc):
            raise SourceError(str(path), f"uses a class Keras cannot find: {text[:300]}",
                              fix="import the module that defines (and registers with "
                                  "@keras.saving.register_keras_serializable) the class, with --trust, or pass "
                                  "--builder module:function") from None
        raise SourceError(str(path), f"cannot be loaded by Keras: {type(exc).__name__}: {text[:300]}",
                          fix="check that the file is complete and was written by Keras 3 "
                              "(model.save('x.keras') or model.save('x.h5'))") from None
    return _from_keras(model, kind, str(path), None)


def _from_weights(path: Path, options: SourceOptions, kind: str) -> LoadedModel:
    """Build the architecture with ``--builder`` and load weights from ``path``."""
    from packager.exporters.pytorch import import_builder  # framework-free helper
    from runtimes._tf import import_keras

    keras = import_keras()
    if not options.builder:
        raise UsageError(str(path), "holds weights only (model.save_weights / ModelCheckpoint with "
                         "save_weights_only=True), not an architecture",
                         fix="pass --builder module:function that returns the Keras model")
    model = import_builder(options.builder)()
    if not isinstance(model, keras.Model):
        raise UsageError(f"builder {options.builder!r}", "did not return a Keras model", expected="keras.Model",
                         got=type(model).__name__)
    try:
        model.load_weights(str(path))
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"weights {str(path)!r}", f"do not fit the builder's architecture: {text[:300]}",
                          fix="check that --builder builds the same architecture (layers, sizes) as was "
                              "trained") from None
    return _from_keras(model, kind, str(path), options.builder)


_NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"


def _pick_checkpoint(folder: Path, options: SourceOptions) -> tuple[Path, str]:
    """The best file in a ModelCheckpoint folder.

    With ``monitor`` (``--option monitor=val_loss``) the metric value in each file name
    (``...val_loss=0.12...`` / ``..._0.12``) decides, lower is better unless ``mode=max``
    (``acc``/``auc`` metrics default to max). Without it the newest file wins: with
    ``save_best_only`` ModelCheckpoint only writes when the metric improved.
    """
    files = _checkpoint_files(folder)
    if not files:
        raise SourceError(str(folder), "is neither a SavedModel nor a folder with ModelCheckpoint files",
                          expected="saved_model.pb, or *.keras / *.h5 / *.weights.h5 files", got="none of them",
                          fix="point at the SavedModel folder or at one checkpoint file")
    picked = parse_exporter_options(FRAMEWORK, Options, options.extra)
    monitor = picked.monitor  # type: ignore[attr-defined]
    if monitor:
        pattern = re.compile(re.escape(str(monitor)) + r"[=_:-]?" + _NUMBER)
        scored = []
        for file in files:
            found = pattern.findall(file.name.replace(".keras", "").replace(".weights.h5", "").replace(".h5", ""))
            if found:
                scored.append((float(found[-1]), file))
        if not scored:
            raise SourceError(str(folder), f"has no checkpoint file whose name carries {monitor!r}",
                              expected=f"names like 'ckpt-{{epoch:02d}}-{{{monitor}:.4f}}.keras'",
                              got=[f.name for f in files[:5]], fix="drop --option monitor=..., or point at one file")
        mode = picked.mode or ("max" if any(k in str(monitor) for k in ("acc", "auc", "f1")) else "min")
        if mode not in ("min", "max"):
            raise UsageError("--option mode", "is unknown", expected="min or max", got=mode)
        value, best = (max if mode == "max" else min)(scored, key=lambda item: item[0])
        return best, f"checkpoint folder {folder}: picked {best.name} ({monitor}={value:g}, {mode}) of {len(files)} files"
    best = max(files, key=lambda f: (f.stat().st_mtime_ns, f.name))
    return best, f"checkpoint folder {folder}: picked the newest file {best.name} of {len(files)}"


# --- Keras models and tf.Modules -----------------------------------------------------------
def _spec_from_tf(name: str, shape: Any, dtype: Any) -> TensorSpec:
    dims: list[int | str] = []
    for axis, dim in enumerate(list(shape)):
        if dim is None:
            dims.append(BATCH if axis == 0 else f"{name}_dim{axis}")
        else:
            dims.append(int(dim))
    return TensorSpec(name=name, dtype=dtype_name(getattr(dtype, "name", dtype)), shape=tuple(dims))


def _layout(model: Any, specs: list[TensorSpec]) -> dict[str, str]:
    """Per-input layout (NHWC/NCHW family) for image-like inputs, from the layers' data_format."""
    from runtimes._tf import import_keras

    keras = import_keras()
    formats = set()
    for layer in model._flatten_layers(include_self=False, recursive=True) if hasattr(model, "_flatten_layers") else []:
        fmt = getattr(layer, "data_format", None)
        if fmt in ("channels_last", "channels_first"):
            formats.add(fmt)
    fmt = formats.pop() if len(formats) == 1 else keras.config.image_data_format()
    names = {3: ("NWC", "NCW"), 4: ("NHWC", "NCHW"), 5: ("NDHWC", "NCDHW")}
    return {s.name: names[s.rank][fmt == "channels_first"] for s in specs if s.rank in names}


def _input_names(inputs: list[Any]) -> list[str]:
    """Names of a Keras model's inputs: their Input layers' names, never ``keras_tensor_N``."""
    names: list[str] = []
    for i, tensor in enumerate(inputs):
        # A Sequential built from keras.Input((5,)) names the tensor "keras_tensor_5" but its
        # InputLayer "input_layer": the layer is what the user (and model.summary) sees.
        history = getattr(tensor, "_keras_history", None)
        layer = getattr(history, "operation", None) if history is not None else None
        name = str(getattr(layer, "name", None) or tensor.name)
        if name.startswith("keras_tensor"):
            name = "input" if len(inputs) == 1 else f"input_{i}"
        names.append(name)
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def _from_keras(model: Any, kind: str, path: str | None, builder: str | None) -> LoadedModel:
    input_names = output_names = None
    signature = None
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):  # subclassed models have no symbolic inputs
        inputs = []
    if inputs:
        # Functional/Sequential inputs are named after their Input layers ("image"); the
        # symbolic tensors inside ("keras_tensor_12") never reach the manifest.
        input_names = _input_names(inputs)
        specs = [_spec_from_tf(n, t.shape, t.dtype) for n, t in zip(input_names, inputs)]
        signature = Signature(inputs=specs)
    try:
        names = list(model.output_names or [])
        output_names = names or None
    except (AttributeError, ValueError):
        pass

    def call(tensors: list[Any]) -> Any:
        # training=False: Dropout off, BatchNormalization uses its moving statistics.
        return model(tensors[0] if len(tensors) == 1 else list(tensors), training=False)

    loaded = LoadedModel(model=model, kind=kind, framework=FRAMEWORK, input_names=input_names,
                         output_names=output_names, signature=signature, path=path, builder=builder,
                         reference="keras model(x, training=False)")
    loaded.extra["call"] = call
    loaded.extra["layout"] = _layout(model, signature.inputs) if signature else {}
    loaded.extra["keras"] = True
    return loaded


def _concrete_signature(fn: Any, subject: str) -> tuple[list[str], list[TensorSpec], Callable[[list[Any]], Any]]:
    """Input names, specs and a positional caller of a concrete (signature) function."""
    args, kwargs = fn.structured_input_signature
    names: list[str] = []
    specs: list[TensorSpec] = []
    positional = [a for a in args]
    # Unnamed TensorSpecs take the Python argument's name ("features"), not "input_0".
    function_type = getattr(fn, "function_type", None)
    params = [p for p in function_type.parameters if p != "self"] if function_type is not None else []
    for i, spec in enumerate(positional):
        if not hasattr(spec, "shape"):
            raise SourceError(subject, "takes a nested input structure packager cannot name",
                              fix="give the tf.function flat tf.TensorSpec inputs")
        name = spec.name or (params[i] if i < len(params) else f"input_{i}")
        names.append(name)
        specs.append(_spec_from_tf(name, spec.shape, spec.dtype))
    from runtimes._tf import signature_inputs

    for key, spec in signature_inputs(fn) if kwargs else []:
        names.append(str(key))
        specs.append(_spec_from_tf(str(key), spec.shape, spec.dtype))
    n_pos = len(positional)
    kw_names = names[n_pos:]

    def call(tensors: list[Any]) -> Any:
        return fn(*tensors[:n_pos], **dict(zip(kw_names, tensors[n_pos:])))

    return names, specs, call


def _output_names(fn: Any) -> list[str] | None:
    from runtimes._tf import signature_outputs

    return [name for name, _ in signature_outputs(fn)] or None


def _from_saved_model(path: Path, signature_key: str | None) -> LoadedModel:
    from runtimes._tf import import_tf

    tf = import_tf()
    try:
        obj = tf.saved_model.load(str(path))
    except Exception as exc:
        raise SourceError(str(path), f"cannot be loaded as a SavedModel: {str(exc).splitlines()[0][:300]}",
                          fix="check that the folder is complete (saved_model.pb and variables/)") from None
    key = signature_key or DEFAULT_SIGNATURE
    available = sorted(getattr(obj, "signatures", {}) or {})
    if key not in available:
        raise SourceError(f"SavedModel {str(path)!r}", f"has no signature {key!r}", expected=available or
                          "at least one serving signature", got=key,
                          fix=f"pass --signature with one of {available}" if available else
                          "re-save it with signatures={'serving_default': fn.get_concrete_function()}")
    fn = obj.signatures[key]
    names, specs, call = _concrete_signature(fn, f"SavedModel signature {key!r}")
    loaded = LoadedModel(model=obj, kind="saved_model", framework=FRAMEWORK, input_names=names,
                         output_names=_output_names(fn), signature=Signature(inputs=specs), path=str(path),
                         reference=f"tensorflow SavedModel signature {key!r}")
    loaded.extra.update(call=call, signature_key=key, layout={})
    return loaded


def _from_module(module: Any, attr: str | None) -> LoadedModel:
    """A ``tf.Module`` with a ``tf.function`` that has an ``input_signature``."""
    from runtimes._tf import import_tf

    tf = import_tf()
    candidates: dict[str, Any] = {}
    for name in ([attr] if attr else ["__call__", "serve", "serving_default", *dir(module)]):
        if name in candidates or name.startswith("_") and name != "__call__":
            continue
        fn = getattr(module, name, None)
        if isinstance(fn, tf.types.experimental.GenericFunction) and fn.input_signature is not None:
            candidates[name] = fn
        elif attr:
            raise UsageError(f"tf.Module attribute {attr!r}", "is not a tf.function with an input_signature",
                             expected="@tf.function(input_signature=[...])", got=type(fn).__name__, fix="decorate it with @tf.function(input_signature=[...])")
    if not candidates:
        raise SourceError(f"tf.Module {type(module).__name__}", "has no tf.function with an input_signature",
                          fix="decorate the serving method with @tf.function(input_signature=[tf.TensorSpec("
                              "[None, ...], tf.float32, name='x')])")
    if len(candidates) > 1 and not attr and "__call__" not in candidates and "serve" not in candidates:
        raise UsageError(f"tf.Module {type(module).__name__}", "has several tf.functions with a signature",
                         expected="one chosen with signature_key", got=sorted(candidates), fix="pass signature_key=NAME (--signature NAME)")
    name = attr or next(iter(candidates))
    fn = candidates[name].get_concrete_function()
    names, specs, call = _concrete_signature(fn, f"tf.Module function {name!r}")
    loaded = LoadedModel(model=module, kind="in_memory", framework=FRAMEWORK, input_names=names,
                         output_names=_output_names(fn), signature=Signature(inputs=specs),
                         reference=f"tf.Module.{name}")
    loaded.extra.update(call=call, signature_key=name, layout={})
    return loaded


# --- eager reference -----------------------------------------------------------------------
def _feed_list(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> list[Any]:
    from runtimes._tf import import_tf

    tf = import_tf()
    names = loaded.input_names
    if names and set(names) != set(feeds):
        raise UsageError("example inputs", "are not named like the model's inputs", expected=names,
                         got=list(feeds), fix="name the arrays after the model's inputs (np.savez(path, "
                         + ", ".join(f"{n}=..." for n in names) + "))")
    order = names or list(feeds)
    return [tf.constant(np.ascontiguousarray(feeds[n])) for n in order]


def run_eager(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model in inference mode (``training=False``); outputs flattened in order."""
    from runtimes._tf import flatten

    output = loaded.extra["call"](_feed_list(loaded, feeds))
    tensors, keys = flatten(output)
    if keys is not None:
        if loaded.output_names and sorted(loaded.output_names) == sorted(keys):
            # dict outputs come back in key order; keep the model's declared output order.
            by_key = dict(zip(keys, tensors))
            tensors = [by_key[k] for k in loaded.output_names]
        else:
            loaded.output_names = keys
    return [np.asarray(t.numpy() if hasattr(t, "numpy") else t) for t in tensors]


# --- formats -----------------------------------------------------------------------------
def export_format(fmt: str, loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    """Write ``fmt`` into ``dest`` (the package's ``<fmt>/`` folder)."""
    notes = loaded.extra.pop("notes", None)
    if notes:  # source notes (which checkpoint was picked) go to the manifest's export log once
        ctx.log.extend(notes)
    writers = {"saved_model": _saved_model, "onnx": _onnx}
    return writers[fmt](loaded, ctx, dest)


def _serving_function(loaded: LoadedModel, ctx: ExportContext) -> tuple[Any, dict[str, Any]]:
    """A ``tf.function`` taking ``{input name: tensor}`` and returning ``{output name: tensor}``."""
    from runtimes._tf import flatten, import_tf

    tf = import_tf()
    specs = {s.name: tf.TensorSpec([None if isinstance(d, str) else d for d in s.shape], tf.as_dtype(s.dtype),
                                   name=_op_name(s.name))
             for s in ctx.signature.inputs}
    order = loaded.input_names if loaded.input_names and set(loaded.input_names) == set(specs) else list(specs)
    out_names = ctx.signature.output_names
    declared = loaded.output_names
    call = loaded.extra["call"]

    # The argument's name prefixes graph placeholder names when a key clashes with it
    # ("inputs" -> "inputs_inputs"); an unlikely name keeps the placeholders named by key.
    @tf.function(input_signature=[specs], autograph=False)
    def serve(packager_feeds: dict[str, Any]) -> dict[str, Any]:
        tensors, keys = flatten(call([packager_feeds[n] for n in order]))
        if keys is not None and declared and sorted(declared) == sorted(keys):
            by_key = dict(zip(keys, tensors))
            tensors = [by_key[k] for k in declared]
        return {name: tf.identity(t) for name, t in zip(out_names, tensors)}

    return serve, specs


def _op_name(name: str) -> str:
    # TensorSpec names become graph op names; the signature keys keep the real names.
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name) if re.match(r"^[A-Za-z0-9.]", name) else "x_" + re.sub(
        r"[^A-Za-z0-9_.\-/]", "_", name)


def _layout_options(loaded: LoadedModel) -> dict[str, Any]:
    layout = loaded.extra.get("layout") or {}
    return {"layout": layout} if layout else {}


def _saved_model(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    from runtimes._tf import import_tf

    tf = import_tf()
    serve, _ = _serving_function(loaded, ctx)
    module = tf.Module()
    # Keep the model reachable from the saved object so its variables are saved with it.
    module.model = loaded.model
    module.serve = serve
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            tf.saved_model.save(module, str(dest), signatures={DEFAULT_SIGNATURE: serve.get_concrete_function()})
    except Exception as exc:
        ctx.log.append(buf.getvalue()[-4000:])
        raise ExportError("format saved_model", f"tf.saved_model.save failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                          fix="check that the model runs under tf.function (no Python-side state)",
                          details="\n".join(ctx.log)) from None
    return ArtifactSpec(path=dest.name, options={"signature_key": DEFAULT_SIGNATURE,
                                                 "runner": {"signature_key": DEFAULT_SIGNATURE},
                                                 **_layout_options(loaded)})


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}"[:500])


def _onnx(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    from packager.errors import require

    tf2onnx = require("tf2onnx", purpose="convert TensorFlow models to ONNX")
    onnx = require("onnx", purpose="check ONNX models")
    opset = int(ctx.opset or DEFAULT_OPSET)
    supported = sorted(getattr(importlib.import_module("tf2onnx.constants"), "OPSET_TO_IR_VERSION", {}) or [18])
    if not MIN_OPSET <= opset <= supported[-1]:
        raise UsageError(f"--opset {opset}", f"is not supported by tf2onnx {tf2onnx.__version__}",
                         expected=f"{MIN_OPSET}..{supported[-1]}", got=opset, fix=f"pass --opset {DEFAULT_OPSET}")
    serve, specs = _serving_function(loaded, ctx)
    target = dest / "model.onnx"
    capture = _LogCapture()
    tf_log = logging.getLogger("tf2onnx")
    tf_log.addHandler(capture)
    buf = io.StringIO()
    try:
        # tf2onnx keeps the graph's layout (NHWC for Keras' channels_last): no transposes are
        # inserted, so the ONNX inputs have the same shapes as the SavedModel's.
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            model_proto, _ = tf2onnx.convert.from_function(serve, input_signature=[specs], opset=opset)
    except Exception as exc:
        ctx.log.extend(capture.lines[-20:])
        raise ExportError("format onnx", f"tf2onnx failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                          fix="try another --opset (tf2onnx supports up to 18), or export saved_model only",
                          details="\n".join(ctx.log + [buf.getvalue()[-4000:]])) from None
    finally:
        tf_log.removeHandler(capture)
    if capture.lines:
        ctx.log.append("tf2onnx: " + " | ".join(capture.lines[-10:]))
    _freeze_captured_constants(model_proto, serve, specs, ctx)
    _rename_onnx(model_proto, ctx, specs)
    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except Exception as exc:
        raise ExportError("format onnx", f"the ONNX checker rejected tf2onnx's model: {str(exc)[:300]}",
                          fix="try another --opset") from None
    onnx.save(model_proto, str(target))
    _ort_loads(target)
    return ArtifactSpec(path=f"{dest.name}/model.onnx",
                        options={"opset": opset, "converter": f"tf2onnx {tf2onnx.__version__}",
                                 **_layout_options(loaded)})


def _freeze_captured_constants(model: Any, serve: Any, specs: dict[str, Any], ctx: ExportContext) -> None:
    """Turn graph inputs that are captured constant tensors into initializers.

    Keras 3 keeps some layer state as plain tensors, not variables (a ``Normalization`` layer's
    mean and variance, as in EfficientNet); a ``tf.function`` captures them as placeholders,
    which tf2onnx's variable freezing leaves as extra graph inputs. Their values are the
    captured tensors themselves, so they become constants of the ONNX graph.
    """
    from onnx import numpy_helper

    from runtimes._tf import import_tf

    tf = import_tf()
    # The same input signature returns tf2onnx's (cached) concrete function, so the names match.
    graph = serve.get_concrete_function(specs).graph
    values = {internal.name: external for external, internal in graph.captures
              if external.dtype != tf.resource and hasattr(external, "numpy")}
    frozen = [value for value in model.graph.input if value.name in values]
    for value in frozen:
        model.graph.initializer.append(numpy_helper.from_array(values[value.name].numpy(), value.name))
        model.graph.input.remove(value)
    if frozen:
        ctx.log.append(f"tf2onnx: {len(frozen)} captured constant tensor(s) frozen into the graph: "
                       + ", ".join(v.name for v in frozen)[:300])


def _rename_onnx(model: Any, ctx: ExportContext, specs: dict[str, Any]) -> None:
    """Name ONNX inputs/outputs after the signature and its dynamic dimensions."""
    renames = {_op_name(name): name for name in specs}
    renames.update({f"packager_feeds_{k}": v for k, v in list(renames.items())})
    renames.update({f"{k}:0": v for k, v in list(renames.items())})
    graph = model.graph
    for value in graph.input:
        new = renames.get(value.name)
        if new and new != value.name:
            old = value.name
            value.name = new
            for node in graph.node:
                node.input[:] = [new if i == old else i for i in node.input]
    # Never guess which tensor is which: names that do not line up are an export error.
    # For old opsets tf2onnx also lists the weights as graph inputs; those are not feeds.
    weights = {init.name for init in graph.initializer}
    for kind, values, want in (("inputs", graph.input, ctx.signature.input_names),
                               ("outputs", graph.output, ctx.signature.output_names)):
        got = [v.name for v in values if v.name not in weights]
        if sorted(got) != sorted(want):
            raise ExportError("format onnx", f"tf2onnx named the graph {kind} differently from the signature",
                              expected=want, got=got, fix="rename the model's inputs/outputs to plain identifiers")
        # Keep the signature's order (tf2onnx sorts dict keys); weights listed as inputs go last.
        ordered = sorted(values, key=lambda v: want.index(v.name) if v.name in want else len(want))
        copies = [type(v)() for v in ordered]
        for copy, value in zip(copies, ordered):
            copy.CopyFrom(value)
        del values[:]
        values.extend(copies)
    name_dynamic_dims(graph, ctx.signature)


def _ort_loads(target: Path) -> None:
    from packager.errors import require

    ort = require("onnxruntime", purpose="check that the ONNX model loads")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.InferenceSession(str(target), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError("format onnx", f"ONNX Runtime refused tf2onnx's model: {str(exc)[:300]}",
                          fix="try another --opset") from None
