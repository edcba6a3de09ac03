"""PaddlePaddle exporter: every training-time save in; Paddle inference models and ONNX out.

Sources: an in-memory ``paddle.nn.Layer`` (or ``paddle.Model``); ``paddle.save`` files — a
state_dict ``.pdparams`` (plus ``--builder``), a checkpoint dict (``model_state_dict``, ...,
``--state-key``), a ``paddle.Model.save`` prefix (``.pdparams`` + ``.pdopt``); an inference
model — PIR ``.json`` / legacy ``.pdmodel`` + ``.pdiparams`` (``paddle.jit.save``,
``paddle.static.save_inference_model``, ``paddle.Model.save(training=False)``) or a Paddle 1.x
folder (``__model__`` + one file per parameter). Pickled files go through
:mod:`packager.safe_pickle`; anything else needs ``--trust``.

Formats: ``paddle_inference`` (``paddle.jit.save``, PIR), ``paddle_legacy`` (``.pdmodel``,
written under ``OldIrGuard``), ``paddle_static`` (``paddle.static.save_inference_model``) and
``onnx`` (paddle2onnx, run in a worker process: it aborts the process on unsupported ops and
can segfault on some legacy programs; each attempt is converted, checked, run and compared,
and the known workarounds are tried before giving up with a diagnosis).

paddle is imported inside functions only: this module is imported to ask ``claims``/``owns``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import Field

from packager.exporters._checkpoint import find_state
from packager.errors import ExportError, SourceError, TrustRequiredError, UsageError
from packager.exporters import (ArtifactSpec, ExportContext, ExporterOptions, LoadedModel, SourceOptions,
                                forward_parameters, parse_exporter_options)
from packager.exporters._onnx import name_dynamic_dims
from runtimes._paddle import first_line, flatten

FRAMEWORK = "paddle"
FORMATS = ("paddle_inference", "paddle_legacy", "paddle_static", "onnx")
DEFAULT_FORMATS = ("paddle_inference", "onnx")
DEFAULT_OPSET = 13
#: The other opset tried when a conversion fails at the requested one.
ALT_OPSETS = (17, 11)


class Options(ExporterOptions):
    """Options of the paddle exporter (``--option KEY=VALUE``)."""

    #: Seconds per paddle2onnx attempt; a hung converter is killed.
    paddle2onnx_timeout: float = Field(600.0, gt=0)


PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".pdckpt", ".pkl", ".pickle")
#: Keys under which training scripts commonly keep the weights in a checkpoint dict.
STATE_KEYS = ("model_state_dict", "state_dict", "model_state", "model", "net", "network", "params", "weights",
              "ema_state_dict")
#: Keys paddle.save adds to a state_dict for its own bookkeeping.
_BOOKKEEPING = ("StructuredToParameterName@@", "UnpackBigParamInfor@@")

log = logging.getLogger("packager.paddle")


# --- contract: ownership -----------------------------------------------------------------
def owns(obj: Any) -> bool:
    """True for a ``paddle.nn.Layer`` or ``paddle.Model`` (checked without importing paddle)."""
    if "paddle" not in sys.modules:
        return False
    import paddle

    return isinstance(obj, paddle.nn.Layer) or isinstance(obj, paddle.Model)


def claims(path: Path) -> bool:
    """Paddle saves: ``.pdparams``/``.pdopt``, inference models (prefix, file or folder)."""
    from runtimes._paddle import find_model_files

    path = Path(path)
    try:
        if find_model_files(path) is not None:
            return True
    except Exception:  # an ambiguous folder is still Paddle's: load_source explains
        return True
    if path.is_file():
        return path.suffix.lower() in (".pdparams", ".pdopt", ".pdckpt")
    return not path.exists() and Path(str(path) + ".pdparams").is_file()


def framework_version() -> str:
    from runtimes._paddle import paddle_version

    return paddle_version()


# --- loading -----------------------------------------------------------------------------
def load_source(source: Any, options: SourceOptions) -> LoadedModel:
    """Turn a Layer, a ``paddle.save`` file or an inference model into a LoadedModel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Paddle's UserWarnings are noise for packaging users
        return _load_source(source, options)


def _load_source(source: Any, options: SourceOptions) -> LoadedModel:
    from runtimes._paddle import find_model_files, paddle_module

    paddle = paddle_module()
    if isinstance(source, paddle.Model):
        source = source.network
    if isinstance(source, paddle.nn.Layer):
        return _layer_loaded(source, "in_memory", None, None)
    path = Path(source)
    try:
        files = find_model_files(path)
    except Exception as exc:
        raise SourceError(str(path), str(getattr(exc, "problem", exc)), got=getattr(exc, "got", None),
                          fix="pass the model file (or its prefix) itself") from None
    if files is not None:
        return _load_inference(files, path)
    weights = path if path.is_file() else Path(str(path) + ".pdparams")
    if not weights.is_file():
        raise SourceError(str(path), "does not exist", fix="check the path (a prefix like out/model is fine when "
                          "out/model.pdparams or out/model.json exists)")
    return _load_weights_source(weights, options)


def _load_weights_source(path: Path, options: SourceOptions) -> LoadedModel:
    if path.suffix == ".pdopt":
        beside = path.with_suffix(".pdparams")
        raise SourceError(str(path), "holds optimizer state (moments, learning rate), not model weights",
                          fix=f"pass {beside.name} instead" if beside.is_file() else
                          "pass the .pdparams file saved with it")
    obj = _read_pickle(path, options.trust)
    optimizer = path.with_suffix(".pdopt")
    if _is_state_dict(obj):
        state, key, kind = _clean_state(obj), None, "paddle_model_save" if optimizer.is_file() else "state_dict"
    elif isinstance(obj, dict):
        state, key = find_state(obj, path, options.state_key, keys=STATE_KEYS, is_state_dict=_is_state_dict,
                                clean=_clean_state, values="array")
        kind = "checkpoint"
    else:
        raise SourceError(str(path), "holds neither a state_dict nor a checkpoint dict",
                          expected="dict of parameter name -> array", got=type(obj).__name__)
    model = _build(options, path)
    _load_weights(model, state, f"{kind} {str(path)!r}" + (f" key {key!r}" if key else ""))
    loaded = _layer_loaded(model, kind, str(path), options.builder)
    if key:
        loaded.extra["state_key"] = key
    if isinstance(obj, dict) and isinstance(obj.get("epoch"), (int, float)) and not _is_state_dict(obj):
        loaded.extra["epoch"] = obj["epoch"]
    if optimizer.is_file():
        loaded.extra["optimizer_file"] = str(optimizer)
    return loaded


def _read_pickle(path: Path, trust: bool) -> Any:
    from packager.safe_pickle import UnsafePickleError, is_pickle, safe_load

    if not is_pickle(path):
        raise SourceError(str(path), "is not a paddle.save file (no pickle header)",
                          fix="check that the file is complete; inference models are .json/.pdmodel + .pdiparams")
    try:
        return safe_load(path)
    except UnsafePickleError as exc:
        if not trust:
            raise TrustRequiredError(
                str(path), f"references {exc.module}.{exc.name}, which the safe loader refuses (it admits only "
                "arrays, tensors and plain containers); loading it would run code from the file",
                fix="pass --trust if you trust its origin (its classes must be importable), or save only "
                    "state_dict() and plain values") from None
    except Exception as exc:
        raise SourceError(str(path), f"cannot be unpickled ({type(exc).__name__}: {exc})",
                          fix="check that the file is a complete paddle.save output") from None
    from runtimes._paddle import paddle_module, quiet

    paddle = paddle_module()
    try:
        with quiet():
            return paddle.load(str(path))
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise SourceError(str(path), f"needs a class that cannot be imported ({exc})",
                          fix="make the module that defines it importable (PYTHONPATH)") from None


def _as_array(value: Any) -> np.ndarray | None:
    """The array a state_dict value carries: ndarray, paddle Tensor or paddle.save's (name, ndarray)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], np.ndarray):
        return value[1]
    if type(value).__name__ in ("Tensor", "EagerParamBase", "ParamBase") and hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    return None


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, dict) or not obj:
        return False
    values = [v for k, v in obj.items() if k not in _BOOKKEEPING]
    return bool(values) and all(_as_array(v) is not None for v in values)


def _clean_state(obj: dict) -> dict[str, np.ndarray]:
    return {str(k): _as_array(v) for k, v in obj.items() if k not in _BOOKKEEPING}  # type: ignore[misc]




def _build(options: SourceOptions, path: Path) -> Any:
    from packager.exporters.pytorch import import_builder
    from runtimes._paddle import paddle_module

    paddle = paddle_module()
    if not options.builder:
        raise UsageError(str(path), "holds weights only (a state_dict), not an architecture",
                         fix="pass --builder module:function that returns the paddle.nn.Layer")
    model = import_builder(options.builder)()
    if isinstance(model, paddle.Model):
        model = model.network
    if not isinstance(model, paddle.nn.Layer):
        raise UsageError(f"builder {options.builder!r}", "did not return a paddle.nn.Layer",
                         expected="paddle.nn.Layer or paddle.Model", got=type(model).__name__)
    return model


def _load_weights(model: Any, state: dict[str, np.ndarray], subject: str) -> None:
    own = model.state_dict()
    if all(k.startswith("_layers.") for k in state) and not any(k.startswith("_layers.") for k in own):
        state = {k[len("_layers."):]: v for k, v in state.items()}  # saved from paddle.DataParallel
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise SourceError(subject, "does not fit the builder's architecture",
                          expected=f"no missing keys (missing: {missing[:5]})", got=f"unexpected keys {unexpected[:5]}",
                          fix="check that --builder builds the architecture that was trained, or pass --state-key")
    wrong = [f"{k}: {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
             if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise SourceError(subject, "does not fit the builder's architecture (shapes differ)",
                          expected="the trained shapes", got="; ".join(wrong[:5]),
                          fix="check that --builder builds the same sizes as were trained")
    model.set_state_dict({k: state[k].astype(str(own[k].numpy().dtype), copy=False) for k in own})


def _layer_loaded(layer: Any, kind: str, path: str | None, builder: str | None) -> LoadedModel:
    layer.eval()  # Dropout off, BatchNorm uses running statistics
    names, var_keyword = forward_parameters(layer.forward)
    loaded = LoadedModel(model=layer, kind=kind, framework=FRAMEWORK, input_names=names, path=path, builder=builder,
                         reference="paddle dygraph (eval, no_grad)")
    loaded.extra["var_keyword"] = var_keyword
    return loaded


def _load_inference(files: Any, path: Path) -> LoadedModel:
    from runtimes._paddle import paddle_version, read_program_signature

    try:
        signature = read_program_signature(files)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if files.program == "v1":
            raise SourceError(str(path), f"is a Paddle 1.x model folder that paddlepaddle {paddle_version()} "
                              f"cannot load (step: load): {text}",
                              fix="load it with the Paddle 2.x that can still read it and re-save it with "
                                  "paddle.static.save_inference_model (one .pdmodel + .pdiparams), then export "
                                  "that") from None
        raise SourceError(str(path), f"cannot be loaded as a Paddle inference model (step: load): {text}",
                          fix="check that the .pdiparams file belongs to this program and that it was written by "
                              f"a Paddle that paddlepaddle {paddle_version()} can read") from None
    kind = {"pir": "inference_model", "legacy": "inference_model_legacy", "v1": "inference_model_v1"}[files.program]
    return LoadedModel(model=files, kind=kind, framework=FRAMEWORK, input_names=signature.input_names,
                       output_names=signature.output_names, signature=signature, path=str(path),
                       reference="paddle inference (imported model)", extra={"program": files.program})


# --- eager reference ---------------------------------------------------------------------
def _is_layer(loaded: LoadedModel) -> bool:
    return not hasattr(loaded.model, "program")


def run_eager(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Dygraph outputs in eval mode under no_grad; an inference model runs in Paddle Inference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_eager(loaded, feeds)


def _run_eager(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from runtimes._paddle import paddle_module

    paddle = paddle_module()
    if not _is_layer(loaded):
        runner = loaded.extra.get("runner")
        if runner is None:
            from runtimes.paddle_inference import PaddleInferenceRunner

            runner = PaddleInferenceRunner(loaded.model.model, signature=None)
            loaded.extra["runner"] = runner
        return list(runner.run(feeds).values())
    loaded.model.eval()
    with paddle.no_grad():
        tensors = [paddle.to_tensor(np.ascontiguousarray(a)) for a in feeds.values()]
        # Bound by name (packager.exporters.bind_by_name): a keyword call, as users call forward.
        output = loaded.model(**dict(zip(feeds, tensors))) if loaded.input_names else loaded.model(*tensors)
    if isinstance(output, dict) and loaded.output_names is None:
        loaded.output_names = [str(k) for k in output]
    leaves = flatten(output)
    if not all(hasattr(t, "numpy") for t in leaves):
        raise ExportError("model output", "is not a tensor, tuple, list or dict of tensors",
                          got=", ".join(sorted({type(t).__name__ for t in leaves})))
    return [np.asarray(t.numpy()) for t in leaves]




# --- formats -----------------------------------------------------------------------------
def export_format(fmt: str, loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    """Write ``fmt`` into ``dest`` (the package's ``<fmt>/`` folder)."""
    writers: dict[str, Callable[[LoadedModel, ExportContext, Path], ArtifactSpec]] = {
        "paddle_inference": _paddle_inference, "paddle_legacy": _paddle_legacy, "paddle_static": _paddle_static,
        "onnx": _onnx}
    if loaded.extra.get("keyword_call"):  # paddle.jit.save binds InputSpecs to forward() by position
        raise UsageError(f"format {fmt}", "cannot bind these inputs by name",
                         expected=f"inputs that are the first parameters of forward(), in order: {loaded.input_names}",
                         got=list(ctx.example_inputs), fix="feed forward()'s leading parameters (all up to the "
                         "last one you feed)")
    return writers[fmt](loaded, ctx, dest)


def _input_specs(ctx: ExportContext) -> list[Any]:
    import paddle

    return [paddle.static.InputSpec([None if isinstance(d, str) else d for d in s.shape], s.dtype, s.name)
            for s in ctx.signature.inputs]


def _logged(ctx: ExportContext, step: str, fn: Callable[[], Any]) -> Any:
    from runtimes._paddle import quiet

    captured = None
    try:
        with quiet() as captured:
            return fn()
    finally:
        if captured is not None and captured.text.strip():
            ctx.log.append(f"[{step}] " + captured.tail(3000))


def _jit_save(loaded: LoadedModel, ctx: ExportContext, prefix: Path, legacy: bool) -> None:
    import paddle

    def save() -> None:
        if legacy:
            with paddle.pir_utils.OldIrGuard():
                paddle.jit.save(loaded.model, str(prefix), input_spec=_input_specs(ctx))
        else:
            with paddle.pir_utils.IrGuard():
                paddle.jit.save(loaded.model, str(prefix), input_spec=_input_specs(ctx))

    try:
        _logged(ctx, "paddle.jit.save", save)
    except Exception as exc:
        raise ExportError("paddle.jit.save", f"failed to trace the Layer: {first_line(exc)}",
                          fix="check --input-spec (shapes, dtypes) and that forward() is convertible by "
                              "paddle.jit.to_static", details="\n".join(ctx.log[-3:])) from None
    finally:
        loaded.model.eval()


def _finish(dest: Path, prefix: Path, options: dict[str, Any]) -> ArtifactSpec:
    model = next((p for p in (prefix.with_suffix(".json"), prefix.with_suffix(".pdmodel")) if p.is_file()), None)
    if model is None:
        raise ExportError(f"format {dest.name}", "Paddle wrote no program file", expected=f"{prefix.name}.json or "
                          f"{prefix.name}.pdmodel", got=sorted(p.name for p in dest.iterdir()))
    options = {"program": "pir" if model.suffix == ".json" else "legacy", **options}
    return ArtifactSpec(path=f"{dest.name}/{model.name}", options=options)


def _paddle_inference(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    prefix = dest / "model"
    if _is_layer(loaded):
        _jit_save(loaded, ctx, prefix, legacy=False)
        return _finish(dest, prefix, {"writer": "paddle.jit.save"})
    resave(loaded.model, prefix, "pir", ctx)
    spec = _finish(dest, prefix, {"writer": f"re-saved from the {loaded.model.program} program"})
    if loaded.model.program != "pir":
        spec.runtimes = _jit_loadable(dest / spec.path.split("/", 1)[1], ctx)
    return spec


def _jit_loadable(model: Path, ctx: ExportContext) -> tuple[str, ...]:
    """Runtimes for a program translated from legacy: paddle.jit.load reads only some of them."""
    from runtimes.paddle_jit import PaddleJitRunner

    try:
        PaddleJitRunner(model, signature=ctx.signature).close()
    except Exception as exc:
        ctx.log.append(f"paddle_inference: the paddle_jit runtime is not listed: paddle.jit.load cannot read the "
                       f"program translated to PIR ({getattr(exc, 'problem', exc)})")
        return ("paddle_inference",)
    return ("paddle_inference", "paddle_jit")


def _paddle_legacy(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    import paddle

    prefix = dest / "model"
    if not _is_layer(loaded):
        files = loaded.model
        if files.program == "pir":
            raise ExportError("format paddle_legacy", "cannot be written from a PIR (.json) program: Paddle "
                              "translates legacy programs to PIR, not back",
                              fix="use paddle_inference or paddle_static, or export from the dygraph model "
                                  "(.pdparams + --builder)")
        if files.program == "legacy":
            shutil.copy2(files.model, prefix.with_suffix(".pdmodel"))
            if files.params:
                shutil.copy2(files.params, prefix.with_suffix(".pdiparams"))
            return _finish(dest, prefix, {"writer": "copied"})
        resave(files, prefix, "legacy", ctx)
        return _finish(dest, prefix, {"writer": "re-saved from the Paddle 1.x folder"})
    if not hasattr(getattr(paddle, "pir_utils", None), "OldIrGuard"):
        raise ExportError("format paddle_legacy", f"is not available with Paddle {paddle.__version__} (no "
                          "OldIrGuard to switch the PIR API off)", fix="use paddle_inference or paddle_static")
    try:
        _jit_save(loaded, ctx, prefix, legacy=True)
    except ExportError as exc:
        raise ExportError("format paddle_legacy", f"is not available with Paddle {paddle.__version__}: "
                          f"{exc.problem}", fix="use paddle_inference (PIR) or paddle_static") from None
    if not prefix.with_suffix(".pdmodel").is_file():
        raise ExportError("format paddle_legacy", f"is not available with Paddle {paddle.__version__}: it wrote "
                          f"{sorted(p.name for p in dest.iterdir())} instead of model.pdmodel",
                          fix="use paddle_inference (PIR) or paddle_static")
    return _finish(dest, prefix, {"writer": "paddle.jit.save (PIR API off)"})


def _paddle_static(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    prefix = dest / "model"
    if not _is_layer(loaded):
        resave(loaded.model, prefix, "pir" if loaded.model.program == "pir" else "legacy", ctx)
        return _finish(dest, prefix, {"writer": "paddle.static.save_inference_model"})
    from runtimes._paddle import ModelFiles

    with tempfile.TemporaryDirectory(prefix="packager-paddle-") as tmp:
        tmp_prefix = Path(tmp) / "model"
        _jit_save(loaded, ctx, tmp_prefix, legacy=False)
        files = ModelFiles(tmp_prefix.with_suffix(".json"), tmp_prefix.with_suffix(".pdiparams"), "pir")
        resave(files, prefix, "pir", ctx)
    return _finish(dest, prefix, {"writer": "paddle.static.save_inference_model"})


def resave(files: Any, prefix: Path, target: str, ctx: ExportContext | None = None) -> None:
    """Load an inference model in static mode and save it again with ``save_inference_model``.

    ``target="pir"`` translates legacy/1.x programs to PIR (the installed Paddle's own
    translator); ``"legacy"`` writes a combined ``.pdmodel`` + ``.pdiparams`` (legacy/1.x only).

    Raises:
        ExportError: Naming the step (load, translate, save) that failed.
    """
    import paddle

    from runtimes._paddle import load_program, static_mode

    step = "load"

    def work() -> None:
        nonlocal step
        with static_mode() as exe:
            program, feed_names, fetches = load_program(files, exe)
            if files.program == "pir" or target == "legacy":
                step = "save"
                guard = paddle.pir_utils.IrGuard() if files.program == "pir" else paddle.pir_utils.OldIrGuard()
                with guard:
                    if files.program == "pir":
                        data = {op.attrs().get("name"): op.result(0) for op in program.global_block().ops
                                if op.name() in ("pd_op.data", "pd_op.feed")}
                        feeds = [data[n] for n in feed_names]
                    else:
                        feeds = [program.global_block().var(n) for n in feed_names]
                    paddle.static.save_inference_model(str(prefix), feeds, fetches, exe, program=program)
                return
            step = "translate"
            pir_program = paddle.pir.translate_to_pir(program.desc)
            params = [v for v in pir_program.list_vars()
                      if v.persistable and (v.is_parameter or v.get_defining_op().name() == "builtin.parameter")]
            # The loaded values sit in the scope under their legacy names; bind them to the PIR values.
            paddle.base.libpaddle.pir.create_loaded_parameter(params, paddle.static.global_scope(),
                                                              exe._default_executor)
            step = "save"
            feeds, fetch = [], []
            for op in pir_program.global_block().ops:
                if op.name() in ("pd_op.feed", "pd_op.data"):
                    feeds.extend(op.results())
                if op.name() in ("pd_op.fetch", "builtin.shadow_output"):
                    fetch.extend(op.operands_source())
            with paddle.pir_utils.IrGuard():
                paddle.static.save_inference_model(str(prefix), feeds, fetch, exe, program=pir_program)

    try:
        if ctx is not None:
            _logged(ctx, f"re-save ({target})", work)
        else:
            from runtimes._paddle import quiet

            with quiet():
                work()
    except Exception as exc:
        raise ExportError(f"Paddle program {str(files.model)!r}", f"re-saving it through paddlepaddle "
                          f"{paddle.__version__} failed (step: {step}): {first_line(exc)}",
                          fix="re-export the model from its dygraph Layer (.pdparams + --builder) instead",
                          details="\n".join(ctx.log[-2:]) if ctx else None) from None


#: How ONNX Runtime names the failing node in its load and run errors.
_ORT_NODE = re.compile(r"[Nn]ode \(([^)]+)\)|node name: ([\w./:-]+)\)?|Node:\s*([\w./-]+)")


def _ort_node(exc: BaseException) -> str | None:
    """``node NAME`` from an ONNX Runtime error, when it names one."""
    found = _ORT_NODE.search(str(exc))
    return f"node {next(g for g in found.groups() if g)}" if found else None




# --- ONNX --------------------------------------------------------------------------------
@dataclass
class Attempt:
    """One paddle2onnx conversion attempt and how far it got."""

    label: str
    files: Any
    opset: int
    optimize: bool
    step: str = "convert"
    ok: bool = False
    reason: str = ""
    node: str | None = None
    onnx_path: Path | None = None
    probed: bool = False

    def describe(self) -> str:
        text = f"{self.label} (opset {self.opset}{', no optimiser' if not self.optimize else ''})"
        if self.ok:
            return f"{text}: passed"
        node = f" at {self.node}" if self.node else ""
        return f"{text}: {self.step} failed{node}: {self.reason}"


#: Keys of a worker job that hold file paths (made absolute before they cross to the worker).
_PATH_KEYS = ("model", "params", "out")


@dataclass
class _Worker:
    """A paddle2onnx worker process (paddle2onnx aborts its process on some failures)."""

    log_path: Path
    proc: subprocess.Popen | None = None
    crashes: list[str] = field(default_factory=list)

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0", "GLOG_minloglevel": "2", "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log_file = open(self.log_path, "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", "packager.exporters.paddle", "--p2o-worker"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env,
                                    text=True, cwd=root)
        finally:
            log_file.close()

    def call(self, job: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """Send one job; a crashed or hung worker gives an error result (and is restarted next time).

        Paths are made absolute here: the worker runs in another working directory.

        Raises:
            SourceError: A model file the job names does not exist (not a conversion failure).
        """
        job = {k: (str(Path(v).absolute()) if k in _PATH_KEYS and v else v) for k, v in job.items()}
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        result = self._call(job, timeout)
        if result.get("missing"):
            raise SourceError(result["missing"], "does not exist (it was there when the export started)",
                              fix="keep the model files in place until the export finishes")
        if not result.get("ok") and not result.get("crashed"):
            # paddle2onnx logs the real error and raises something generic: add the log's error lines.
            try:
                with open(self.log_path, "rb") as handle:
                    handle.seek(start)
                    new = handle.read().decode("utf-8", "replace")
            except OSError:
                new = ""
            from runtimes._paddle import _strip_ansi

            errors = _log_errors(_strip_ansi(new))
            if errors:
                result["error"] = f"{result.get('error', '')}: {errors}"
        return result

    def _call(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline() if ready else None
        except (BrokenPipeError, OSError):
            line = ""
        if line is None:  # a hung conversion: give up on this attempt, not on the export
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"ok": False, "timeout": True,
                    "error": f"paddle2onnx did not finish within {timeout:g} s (worker killed)"}
        if line.strip():
            return json.loads(line)
        code = self.proc.wait(timeout=60)
        self.proc = None
        signal = {-6: "SIGABRT (abort)", -11: "SIGSEGV (segmentation fault)", -9: "SIGKILL"}.get(code, f"exit {code}")
        tail = _log_errors(self.log_tail())
        return {"ok": False, "crashed": True, "error": f"paddle2onnx crashed the converter process with {signal}"
                + (f": {tail}" if tail else "")}

    def log_tail(self, limit: int = 6000) -> str:
        try:
            from runtimes._paddle import _strip_ansi

            return _strip_ansi(self.log_path.read_text(errors="replace"))[-limit:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        self.proc = None


def _log_errors(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()
             if "[ERROR]" in ln or "Error" in ln.split(":")[0] or "not supported" in ln or "unsupported" in ln]
    lines = [ln for ln in lines if "Error Message Summary" not in ln and "FatalError" not in ln]
    return " | ".join(dict.fromkeys(lines))[-600:]


def _onnx(loaded: LoadedModel, ctx: ExportContext, dest: Path) -> ArtifactSpec:
    import onnx

    from runtimes._paddle import ModelFiles

    opset = ctx.opset or DEFAULT_OPSET
    alt = next(o for o in ALT_OPSETS if o != opset)
    # --option paddle2onnx_timeout=SECONDS: per attempt; a hung converter is killed.
    timeout = parse_exporter_options(FRAMEWORK, Options, ctx.options).paddle2onnx_timeout  # type: ignore[attr-defined]
    target = dest / "model.onnx"
    reference = None
    with tempfile.TemporaryDirectory(prefix="packager-p2o-") as tmp_name:
        tmp = Path(tmp_name)
        sources: list[tuple[str, Callable[[], Any]]] = []
        if _is_layer(loaded):
            def traced() -> Any:
                _jit_save(loaded, ctx, tmp / "traced" / "model", legacy=False)
                return ModelFiles(tmp / "traced" / "model.json", tmp / "traced" / "model.pdiparams", "pir")
            sources.append(("the traced PIR program", traced))
        else:
            files = loaded.model
            if files.program != "v1":
                sources.append((f"the {files.program} program as given", lambda: files))

            def resaved() -> Any:
                resave(files, tmp / "resaved" / "model", "pir", ctx)
                return ModelFiles(tmp / "resaved" / "model.json", tmp / "resaved" / "model.pdiparams", "pir")
            if files.program != "pir":
                sources.append((f"the {files.program} program re-saved as PIR by paddlepaddle", resaved))
        plan = [(label, make, o, opt) for o, opt in ((opset, True), (alt, True), (opset, False))
                for label, make in sources]
        worker = _Worker(tmp / "paddle2onnx.log")
        attempts: list[Attempt] = []
        chosen: Attempt | None = None
        made: dict[str, Any] = {}
        hopeless: set[str] = set()  # sources with ops paddle2onnx has no converter for
        try:
            for i, (label, make, o, opt) in enumerate(plan):
                if label in hopeless:
                    continue
                if label not in made:
                    try:
                        made[label] = make()
                    except ExportError as exc:
                        made[label] = exc
                        attempts.append(Attempt(label, None, o, opt, step="load", reason=exc.problem))
                if isinstance(made[label], ExportError):
                    continue
                attempt = Attempt(label, made[label], o, opt)
                attempts.append(attempt)
                out = tmp / f"attempt{i}.onnx"
                result = worker.call({"cmd": "convert", "model": str(attempt.files.model),
                                      "params": str(attempt.files.params or ""), "opset": o, "optimize": opt,
                                      "out": str(out)}, timeout=timeout)
                if not result.get("ok"):
                    attempt.reason = result.get("error", "unknown error")
                    op = re.search(r"\[OP: ([\w.]+)\]", attempt.reason)
                    attempt.node = f"op {op.group(1)}" if op else None
                    if not result.get("timeout") and not any(a.label == label and a.probed for a in attempts):
                        attempt.probed = True
                        probe = worker.call({"cmd": "probe", "model": str(attempt.files.model),
                                             "params": str(attempt.files.params or "")})
                        if probe.get("unsupported"):
                            # No opset or optimiser setting adds a converter: skip the source.
                            hopeless.add(label)
                            attempt.node = "op(s) " + ", ".join(probe["unsupported"])
                            attempt.reason += f"; paddle2onnx has no converter for {', '.join(probe['unsupported'])}"
                    continue
                attempt.onnx_path = out
                if reference is None:
                    reference = run_eager(loaded, ctx.example_inputs)
                _check_onnx(attempt, ctx, reference)
                if attempt.ok:
                    chosen = attempt
                    break
        finally:
            worker.close()
            log_text = worker.log_tail()
            if log_text.strip():
                ctx.log.append("[paddle2onnx] " + log_text[-3000:])
        ctx.log.append("onnx attempts: " + _summarise(attempts))
        if chosen is None:
            # A model that converts and runs but differs numerically is still written: export
            # parity then reports the figures (and --allow-mismatch can keep it).
            chosen = next((a for a in attempts if a.step == "compare"), None)
            if chosen is None:
                raise _onnx_failure(loaded, attempts, ctx)
        shutil.copy2(chosen.onnx_path, target)  # type: ignore[arg-type]
    # paddle2onnx may raise the opset (auto_upgrade_opset) for ops that need a newer one.
    written = next((o.version for o in onnx.load(str(target), load_external_data=False).opset_import
                    if o.domain in ("", "ai.onnx")), chosen.opset)
    if len(attempts) > 1:
        ctx.log.append(f"onnx: used {chosen.describe()}")
    return ArtifactSpec(path=f"{dest.name}/model.onnx",
                        options={"opset": int(written), "requested_opset": chosen.opset, "converter": "paddle2onnx",
                                 "source": chosen.label, "optimize": chosen.optimize, "attempts": len(attempts)})


def _summarise(attempts: list[Attempt]) -> str:
    """Attempts grouped by outcome: "SOURCE [opset 13, opset 17, no optimiser]: STEP failed: WHY"."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for a in attempts:
        setting = f"opset {a.opset}" + ("" if a.optimize else " without the optimiser")
        outcome = "passed" if a.ok else f"{a.step} failed" + (f" at {a.node}" if a.node else "") + f": {a.reason}"
        groups.setdefault((a.label, outcome, a.step, a.node or ""), []).append(setting if a.step != "load" else "")
    parts = []
    for (label, outcome, _, _), settings in groups.items():
        tried = ", ".join(s for s in settings if s)
        parts.append(f"{label}{f' [{tried}]' if tried else ''}: {outcome}")
    return " || ".join(parts)


def _onnx_failure(loaded: LoadedModel, attempts: list[Attempt], ctx: ExportContext) -> ExportError:
    steps = sorted({a.step for a in attempts})
    nodes = sorted({a.node for a in attempts if a.node})
    fixes = []
    if any("no converter" in a.reason for a in attempts):
        fixes.append("replace the unsupported op(s) in the model, or register a paddle2onnx custom op")
    if not _is_layer(loaded) and loaded.model.program != "pir":
        fixes.append("export again from the dygraph model (.pdparams + --builder, or paddle.jit.save with the "
                     "PIR API on) and convert that")
        # OpenVINO's Paddle frontend reads legacy programs that paddle2onnx cannot (PP-OCRv4's).
        fixes.append("deploy with Paddle Inference, or with OpenVINO read from the legacy program (--formats "
                     "paddle_inference,paddle_legacy,openvino), which need no ONNX")
    else:
        fixes.append("deploy with Paddle Inference instead (--formats paddle_inference,paddle_static), which needs "
                     "no conversion")
    return ExportError("format onnx", f"paddle2onnx could not produce a working ONNX model (failed step(s): "
                       f"{', '.join(steps)}{'; ' + ', '.join(nodes) if nodes else ''}). Tried: "
                       + _summarise(attempts), fix="; or ".join(fixes),
                       details="\n".join(ctx.log[-3:]))


def _check_onnx(attempt: Attempt, ctx: ExportContext, reference: list[np.ndarray]) -> None:
    """check -> run -> compare one converted model; fills attempt.step/ok/reason/node."""
    import onnx
    import onnxruntime as ort

    from packager.fidelity.judge import Judge

    attempt.step = "check"
    try:
        model = onnx.load(str(attempt.onnx_path))
        _name_io(model, ctx)
        onnx.checker.check_model(model, full_check=True)
        fixed = [f"{s.name}[{axis}]" for s in ctx.signature.inputs for value in model.graph.input
                 if value.name == s.name for axis in s.dynamic_axes
                 if axis < len(value.type.tensor_type.shape.dim)
                 and value.type.tensor_type.shape.dim[axis].HasField("dim_value")]
        if fixed:
            raise ValueError(f"dynamic axes became fixed in the ONNX graph: {', '.join(fixed)}")
        onnx.save(model, str(attempt.onnx_path))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(attempt.onnx_path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        attempt.reason = first_line(exc)
        attempt.node = _ort_node(exc)
        return
    attempt.step = "run"
    try:
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, ctx.example_inputs)))
    except Exception as exc:
        attempt.reason = first_line(exc)
        attempt.node = _ort_node(exc)
        return
    attempt.step = "compare"
    # The export's own judge: --atol/--rtol and the noise record, exactly as parity and verify.
    results = (ctx.judge or Judge()).parity(dict(zip(ctx.signature.output_names, reference)), got)
    bad = [r for r in results if not r.passed]
    if bad:
        attempt.reason = "; ".join(f"output {r.name!r}: {r.problem or ''} max abs {r.max_abs}" for r in bad)
        return
    attempt.ok = True


def _name_io(model: Any, ctx: ExportContext) -> None:
    """Give the graph's outputs the signature's names (by position) and name the dynamic dims."""
    outputs = list(model.graph.output)
    wanted = ctx.signature.output_names
    if len(outputs) != len(wanted):
        raise ValueError(f"the ONNX graph has {len(outputs)} outputs, the model {len(wanted)}")
    rename = {o.name: w for o, w in zip(outputs, wanted) if o.name != w}
    taken = {v for node in model.graph.node for v in [*node.input, *node.output]} - set(rename)
    clash = [w for w in rename.values() if w in taken]
    if clash:
        raise ValueError(f"output names {clash} are already used inside the ONNX graph")
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for value in [*model.graph.output, *model.graph.value_info]:
        if value.name in rename:
            value.name = rename[value.name]
    missing = [s.name for s in ctx.signature.inputs if s.name not in {v.name for v in model.graph.input}]
    if missing:
        raise ValueError(f"the ONNX graph lacks the inputs {missing} (it has {[v.name for v in model.graph.input]})")
    name_dynamic_dims(model.graph, ctx.signature)


# --- worker process ----------------------------------------------------------------------
def _worker_main() -> None:
    """Serve conversion jobs (one JSON line in, one out) with paddle's noise sent to stderr."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever paddle/paddle2onnx prints goes to the log file (our stderr)
    sys.stdout = sys.stderr
    os.environ["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"
    import paddle  # noqa: F401  (import once, before the first job)
    import paddle2onnx

    for line in sys.stdin:
        job = json.loads(line)
        try:
            # Only the model file: a program without parameters has no .pdiparams, which
            # paddle2onnx accepts. A missing model is the parent's to report, not a converter failure.
            if job.get("model") and not Path(job["model"]).exists():
                result = {"ok": False, "missing": job["model"]}
            elif job["cmd"] == "probe":
                result = _probe(job)
            else:
                data = paddle2onnx.export(job["model"], job["params"], None, opset_version=int(job["opset"]),
                                          auto_upgrade_opset=True, enable_onnx_checker=True,
                                          enable_optimize=bool(job["optimize"]))
                if not data:
                    raise RuntimeError("paddle2onnx returned no model")
                Path(job["out"]).write_bytes(data)
                result = {"ok": True}
        except Exception as exc:
            # paddle2onnx logs the real error and then fails on an unbound variable: report both.
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if isinstance(exc, UnboundLocalError):
                result["error"] = "paddle2onnx failed"
        from runtimes._paddle import _flush_all

        print("", file=sys.stderr, flush=True)
        _flush_all()  # C++ std::cout output must reach the log before the parent reads it
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


def _probe(job: dict[str, Any]) -> dict[str, Any]:
    """Ops of the program that paddle2onnx has no converter for."""
    import paddle
    import paddle2onnx.paddle2onnx_cpp2py_export as c_p2o

    from runtimes._paddle import find_model_files, load_program, static_mode

    files = find_model_files(job["model"])
    supported = set(c_p2o.get_all_supported_operators_pir()) | set(c_p2o.get_all_supported_operators())
    with static_mode() as exe:
        program, _, _ = load_program(files, exe)
        if files.program != "pir":
            program = paddle.pir.translate_to_pir(program.desc)
        names = [op.name() for op in program.global_block().ops]
    ops = sorted({n.split(".", 1)[1] for n in names if n.startswith("pd_op.")} - {"data", "feed", "fetch"})
    return {"ok": True, "ops": ops, "unsupported": [o for o in ops if not _has_converter(o, supported)]}


#: PIR op name -> the (legacy) name paddle2onnx registers its converter under.
_P2O_ALIASES = {"add": "elementwise_add", "subtract": "elementwise_sub", "multiply": "elementwise_mul",
                "divide": "elementwise_div", "maximum": "elementwise_max", "minimum": "elementwise_min",
                "elementwise_pow": "elementwise_pow", "remainder": "elementwise_mod",
                "floor_divide": "elementwise_floordiv", "matmul": "matmul_v2", "flatten": "flatten_contiguous_range",
                "full": "fill_constant", "full_int_array": "fill_constant", "full_like": "fill_any_like",
                "mean": "reduce_mean", "sum": "reduce_sum", "max": "reduce_max", "min": "reduce_min",
                "prod": "reduce_prod", "shape64": "shape", "argmax": "arg_max", "argmin": "arg_min"}


def _has_converter(op: str, supported: set[str]) -> bool:
    base = op.rstrip("_")  # inplace variants (relu_) share the converter
    candidates = {base, _P2O_ALIASES.get(base, base), f"{base}_v2", f"{base}2", f"elementwise_{base}",
                  f"reduce_{base}"}
    return bool(candidates & supported)


if __name__ == "__main__" and "--p2o-worker" in sys.argv:
    _worker_main()
