"""Helpers shared by the TensorFlow exporter, runner and Keras callback.

TensorFlow prints C++ banners (oneDNN, CUDA stubs, CPU instructions) to file descriptor 2
while it is imported, before its own logging is configured; ``TF_CPP_MIN_LOG_LEVEL`` does not
silence them all. :func:`import_tf` imports it once with stderr captured, so batch jobs and
CLI output stay clean; the captured text is kept in :data:`IMPORT_LOG` for ``--debug``.
"""

from __future__ import annotations

import logging
import importlib.util
import os
import sys
import tempfile
from typing import Any

from packager.errors import require

#: What TensorFlow printed to stderr while it was imported (for debugging).
IMPORT_LOG: list[str] = []


def _quiet_python_loggers() -> None:
    # Keras and tf2onnx log through absl / the "tensorflow" logger: warnings such as "HDF5 is a
    # legacy format" are useful to a developer, noise to a packaging job.
    for name in ("tensorflow", "tf2onnx", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def _paddle_first() -> None:
    """Import paddle before TensorFlow when both are installed.

    With paddlepaddle 3.3 and TensorFlow 2.21, importing paddle after TensorFlow crashes the
    process (SIGSEGV); the other order works. A process that may use both (``packager demo``,
    a verification matrix, a test session) must never pay for the order it happened to use.
    """
    if "paddle" in sys.modules:
        return
    try:
        if importlib.util.find_spec("paddle") is None:
            return
        from runtimes._paddle import paddle_module

        paddle_module()
    except Exception:  # a broken or blocked paddle install must not stop TensorFlow users
        pass


def import_tf() -> Any:
    """Import and return ``tensorflow`` with its console noise silenced.

    Raises:
        DependencyError: TensorFlow is not installed.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    _paddle_first()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = None
    capture = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        capture = tempfile.TemporaryFile(mode="w+b")
        os.dup2(capture.fileno(), 2)
    except (OSError, ValueError):  # no real fd 2 (some notebooks): import without capturing
        saved = None
    try:
        tf = require("tensorflow", purpose="load TensorFlow/Keras models")
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        if capture is not None:
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            capture.close()
            if text.strip():
                IMPORT_LOG.append(text[-8000:])
    _quiet_python_loggers()
    return tf


def import_keras() -> Any:
    """Import Keras 3 (the one TensorFlow ships with), after a quiet TensorFlow import."""
    import_tf()
    return require("keras", purpose="load Keras models")


def flatten(output: Any) -> tuple[list[Any], list[str] | None]:
    """Tensors of a model output (tensor, list/tuple, or dict), and the dict keys if any."""
    if isinstance(output, dict):
        return list(output.values()), [str(k) for k in output]
    if isinstance(output, (list, tuple)):
        tensors: list[Any] = []
        for item in output:
            tensors.extend(flatten(item)[0])
        return tensors, None
    return [output], None


def natural_key(name: str) -> list:
    """Sort key that puts ``output_2`` before ``output_10``."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def signature_inputs(fn: Any) -> list[tuple[str, Any]]:
    """(name, TensorSpec) of a signature function's keyword inputs, in declaration order.

    ``structured_input_signature`` is a dict whose order is not the declaration order
    (``inputs_1`` may come before ``inputs``); the function type keeps the real order.
    """
    _, kwargs = fn.structured_input_signature
    order: list[str] = []
    function_type = getattr(fn, "function_type", None)
    if function_type is not None:
        order = [name for name in function_type.parameters if name in kwargs]
    if sorted(order) != sorted(kwargs):
        order = sorted(kwargs, key=natural_key)
    return [(name, kwargs[name]) for name in order]


def signature_outputs(fn: Any) -> list[tuple[str, Any]]:
    """(name, TensorSpec) of a signature function's dict outputs, naturally sorted."""
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict):
        return []
    return [(str(k), outputs[k]) for k in sorted(outputs, key=lambda k: natural_key(str(k)))]


def read_saved_model(folder: Any) -> Any:
    """The parsed ``saved_model.pb`` of a SavedModel folder (for the graph scan before loading)."""
    from pathlib import Path

    from packager.errors import RuntimeLoadError

    import_tf()
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    path = Path(folder) / "saved_model.pb"
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or a text-format SavedModel
        raise RuntimeLoadError(f"SavedModel {str(folder)!r}", f"saved_model.pb cannot be parsed ({exc})",
                               fix="re-export the SavedModel") from None
    return proto
