"""Helpers shared by the Paddle runners and the Paddle exporter.

- :func:`quiet` silences Paddle's console noise (Python *and* C-level stdout/stderr, which
  glog and paddle2onnx write straight to fds 1/2) and hands the captured text back;
- :func:`resolve_model_files` finds the model/params pair of an inference model from a
  prefix, a file or a directory;
- :func:`read_program_signature` reads feed/fetch names, dtypes and shapes from the program.

paddle is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from packager.errors import DeviceError, InputError, require
from packager.signature import BATCH, DimInfo, Signature, TensorSpec, dtype_name
from runtimes.device import Device

#: glog (Paddle's C++ logger) reads these when paddle is first imported: keep INFO lines out.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("FLAGS_print_ir", "0")

_FD_LOCK = threading.RLock()


def paddle_module() -> Any:
    """Import paddle (quietly), or raise a DependencyError with the pip extra."""
    if "paddle" in sys.modules:
        return sys.modules["paddle"]
    with quiet():
        return require("paddle", purpose="load and run PaddlePaddle models")


def paddle_version() -> str:
    return str(paddle_module().__version__)


class Captured:
    """Text captured by :func:`quiet` (available after the ``with`` block)."""

    def __init__(self) -> None:
        self.text = ""

    def tail(self, limit: int = 4000) -> str:
        return self.text[-limit:]


@contextlib.contextmanager
def quiet() -> Iterator[Captured]:
    """Redirect fds 1/2 and sys.stdout/stderr to a temp file; warnings off.

    Paddle and paddle2onnx print through C++ (glog, std::cout) as well as Python, so
    ``contextlib.redirect_stdout`` alone is not enough: the fds themselves are swapped. The
    lock keeps nested/parallel uses from restoring each other's fds out of order.
    """
    captured = Captured()
    with _FD_LOCK, tempfile.TemporaryFile(mode="w+b") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _flush_all()
        saved = []
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(tmp.fileno(), fd)
                except OSError:  # no such fd (embedded interpreters): Python-level capture only
                    pass
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield captured
        finally:
            _flush_all()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            raw = tmp.read().decode("utf-8", "replace")
            captured.text = _strip_ansi(raw + buf.getvalue())


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (ValueError, OSError):
            pass
    try:  # C stdio buffers (std::cout is synced with stdio by default)
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@dataclass(frozen=True)
class ModelFiles:
    """An inference model on disk.

    Attributes:
        model: ``.json`` (PIR), ``.pdmodel`` (legacy) or the directory of a Paddle 1.x model.
        params: ``.pdiparams`` (None for a 1.x directory with one file per parameter, or a
            program without weights).
        program: ``"pir"``, ``"legacy"`` or ``"v1"``.
    """

    model: Path
    params: Path | None
    program: str

    @property
    def prefix(self) -> Path:
        return self.model if self.program == "v1" else self.model.with_suffix("")


def _pair(model: Path, program: str) -> ModelFiles:
    params = model.with_suffix(".pdiparams")
    return ModelFiles(model, params if params.is_file() else None, program)


def _is_pir_json(path: Path) -> bool:
    """A PIR program file (a model without parameters has no .pdiparams beside it)."""
    if path.with_suffix(".pdiparams").is_file():
        return True
    try:
        with open(path, "rb") as handle:
            return b'"magic":"pir"' in handle.read(256)
    except OSError:
        return False


def find_model_files(path: str | Path) -> ModelFiles | None:
    """The inference model at ``path`` (prefix, model file, params file or folder), or None.

    Raises:
        InputError: The folder holds several models (ambiguous).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "__model__").is_file():
            return ModelFiles(path, None, "v1")
        models = sorted(p for p in path.iterdir() if p.suffix == ".pdmodel" or
                        (p.suffix == ".json" and _is_pir_json(p)))
        if len(models) > 1:
            raise InputError(str(path), "holds several Paddle inference models", expected="one model per folder",
                             got=[p.name for p in models], fix="pass the model file (or its prefix) itself")
        if not models:
            return None
        path = models[0]
    if path.is_file():
        name = path.name
        if name.endswith(".pdiparams.info"):
            path = path.with_name(name[: -len(".info")])
        if path.suffix == ".pdiparams":
            for suffix, program in ((".json", "pir"), (".pdmodel", "legacy")):
                if path.with_suffix(suffix).is_file():
                    return _pair(path.with_suffix(suffix), program)
            return None
        if path.suffix == ".pdmodel":
            return _pair(path, "legacy")
        if path.suffix == ".json" and _is_pir_json(path):
            return _pair(path, "pir")
        return None
    # A prefix: "out/model" for out/model.json + out/model.pdiparams.
    for suffix, program in ((".json", "pir"), (".pdmodel", "legacy")):
        candidate = Path(str(path) + suffix)
        if candidate.is_file() and (program == "legacy" or _is_pir_json(candidate)):
            return _pair(candidate, program)
    return None


def resolve_model_files(path: str | Path) -> ModelFiles:
    """Like :func:`find_model_files`, but a path that holds no model is an error."""
    files = find_model_files(path)
    if files is None:
        raise InputError(str(path), "is not a Paddle inference model",
                         expected="PREFIX(.json|.pdmodel) + PREFIX.pdiparams, or a folder with one of them "
                         "(or __model__ for Paddle 1.x)", got=sorted(p.name for p in Path(path).iterdir())
                         if Path(path).is_dir() else Path(path).name, fix="check the path")
    return files


@contextlib.contextmanager
def static_mode() -> Iterator[Any]:
    """Static-graph mode with a private scope and executor; dygraph mode is restored after.

    A private scope keeps parameter names of two loaded models ("linear_0.w_0") from clashing.
    """
    paddle = paddle_module()
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        with paddle.static.scope_guard(paddle.static.Scope()):
            yield paddle.static.Executor(paddle.CPUPlace())
    finally:
        if was_dynamic:
            paddle.disable_static()


def load_program(files: ModelFiles, exe: Any) -> tuple[Any, list[str], list[Any]]:
    """``paddle.static.load_inference_model`` for any of the three program kinds (in static mode).

    Legacy and 1.x programs are loaded under ``OldIrGuard``: the PIR loader reads only ``.json``.
    """
    paddle = paddle_module()
    if files.program == "pir":
        with paddle.pir_utils.IrGuard():
            return paddle.static.load_inference_model(str(files.prefix), exe)
    kwargs: dict[str, Any] = {}
    if files.program == "v1":
        kwargs = {"model_filename": "__model__", "params_filename": None}
    elif files.params is None:
        kwargs = {"params_filename": None}
    with paddle.pir_utils.OldIrGuard():
        return paddle.static.load_inference_model(str(files.prefix), exe, **kwargs)


def _dims(shape: Any, name: str) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for axis, size in enumerate(list(shape)):
        size = int(size)
        dims.append(size if size >= 0 else (BATCH if axis == 0 else f"{name}_dim{axis}"))
    return tuple(dims)


def read_program_signature(files: ModelFiles) -> Signature:
    """Inputs and outputs (names, dtypes, shapes; -1 axes named) read from the program itself."""
    paddle = paddle_module()
    with quiet(), static_mode() as exe:
        program, feed_names, fetches = load_program(files, exe)
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        if files.program == "pir":
            data = {op.attrs().get("name"): op.result(0) for op in program.global_block().ops
                    if op.name() in ("pd_op.data", "pd_op.feed")}
            for name in feed_names:
                value = data[name]
                inputs.append(TensorSpec(name=name, dtype=dtype_name(value.dtype), shape=_dims(value.shape, name)))
            fetch_names = [op.attrs().get("name") for op in program.global_block().ops
                           if op.name() in ("pd_op.fetch", "builtin.shadow_output")]
            for i, value in enumerate(fetches):
                name = fetch_names[i] if i < len(fetch_names) and fetch_names[i] else f"output_{i}"
                outputs.append(TensorSpec(name=name, dtype=dtype_name(value.dtype), shape=_dims(value.shape, name)))
        else:
            with paddle.pir_utils.OldIrGuard():
                block = program.global_block()
                for name in feed_names:
                    var = block.var(name)
                    inputs.append(TensorSpec(name=name, dtype=dtype_name(var.dtype), shape=_dims(var.shape, name)))
                for var in fetches:
                    outputs.append(TensorSpec(name=var.name, dtype=dtype_name(var.dtype),
                                              shape=_dims(var.shape, var.name)))
    dims = {d: DimInfo() for s in inputs for d in s.shape if isinstance(d, str)}
    return Signature(inputs=inputs, outputs=outputs, dims=dims)


def check_gpu(device: Device, runtime: str) -> None:
    """Raise DeviceError unless this Paddle build is compiled with CUDA and sees ``device``."""
    paddle = paddle_module()
    if not device.is_cuda:
        return
    if not paddle.device.is_compiled_with_cuda():
        raise DeviceError(f"device {device}", f"needs a CUDA build of PaddlePaddle, and {runtime} runs on "
                          f"paddlepaddle {paddle.__version__} built for CPU only", expected="paddlepaddle-gpu",
                          got=f"paddlepaddle {paddle.__version__} (CPU)",
                          fix="pip install paddlepaddle-gpu (matching your CUDA), or use --device cpu")
    count = paddle.device.cuda.device_count()
    if device.index >= count:
        raise DeviceError(f"device {device}", f"is not available to {runtime}",
                          expected=f"a visible CUDA GPU with index {device.index}", got=f"{count} CUDA device(s)",
                          fix="run with --device cpu, or check CUDA_VISIBLE_DEVICES")


def check_program(files: Any, trust: bool) -> None:
    """Refuse a program with file-touching ops (runtimes/_graphscan.py) unless trusted."""
    if trust or files.program == "v1":
        return
    from runtimes._graphscan import paddle_program_findings, refuse

    desc = None
    if Path(files.model).suffix != ".json":
        from paddle.base.proto import framework_pb2

        desc = framework_pb2.ProgramDesc()
    refuse(f"Paddle program {str(files.model)!r}", paddle_program_findings(files.model, desc))


def first_line(exc: BaseException) -> str:
    """``Type: first meaningful line`` of a Paddle exception (whose text opens with C++ banners)."""
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("-", "C++ Traceback", "Error Message Summary", "[Hint")):
            return f"{type(exc).__name__}: {line[:300]}"
    return type(exc).__name__


def flatten(output: Any) -> list[Any]:
    """Leaves of a (nested) tuple/list/dict output, in order."""
    if isinstance(output, dict):
        return [t for v in output.values() for t in flatten(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in flatten(v)]
    return [output]
