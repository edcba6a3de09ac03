"""TensorFlow SavedModel runner: one signature, named inputs/outputs, CPU or ``/GPU:N``."""

from __future__ import annotations

from typing import Any

import numpy as np

from packager.errors import ContractError, RuntimeLoadError
from packager.signature import BATCH, Signature, TensorSpec, dtype_name
from runtimes._graphscan import refuse, saved_model_findings
from runtimes._tf import import_tf, read_saved_model, signature_inputs, signature_outputs
from runtimes.base import Runner, RunnerOptions
from runtimes.device import require_gpu

DEFAULT_SIGNATURE = "serving_default"


class TensorFlowRunner(Runner):
    """Runs one signature of a SavedModel folder with TensorFlow.

    Options:
        signature_key: The signature to run (default ``serving_default``).

    ``device="cuda:N"`` places the model and every call on ``/GPU:N``; a GPU TensorFlow cannot
    see is a :class:`~packager.errors.DeviceError`, never a silent CPU fallback.
    """

    class Options(RunnerOptions):
        signature_key: str = DEFAULT_SIGNATURE

    runtime = "tensorflow"

    def _load(self) -> None:
        tf = import_tf()
        if self.device.is_cuda:
            gpus = tf.config.list_physical_devices("GPU")
            require_gpu(self.device, len(gpus), "tensorflow",
                        "install a CUDA build of TensorFlow (its and-cuda extra) and check "
                        "CUDA_VISIBLE_DEVICES")
            self._tf_device = f"/GPU:{self.device.index}"
        else:
            self._tf_device = "/CPU:0"
        if not (self.path / "saved_model.pb").is_file() and not (self.path / "saved_model.pbtxt").is_file():
            raise RuntimeLoadError(f"SavedModel {str(self.path)!r}", "has no saved_model.pb",
                                   expected="a SavedModel folder", got=sorted(p.name for p in self.path.iterdir())
                                   if self.path.is_dir() else "a file", fix="point at the folder tf.saved_model.save "
                                   "or model.export wrote")
        if not self.trust:  # before loading: the loader runs the model's init and restore functions
            refuse(f"SavedModel {str(self.path)!r}", saved_model_findings(read_saved_model(self.path)))
        try:
            with tf.device(self._tf_device):
                # Keep the loaded object: signature functions do not own their variables.
                self._loaded = tf.saved_model.load(str(self.path))
        except Exception as exc:
            raise RuntimeLoadError(f"SavedModel {str(self.path)!r}", f"cannot be loaded: "
                                   f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                                   fix="check that the folder is complete (saved_model.pb and variables/)") from exc
        key = self.options.signature_key or DEFAULT_SIGNATURE
        available = sorted(self._loaded.signatures)
        if key not in available:
            raise RuntimeLoadError(f"SavedModel {str(self.path)!r}", f"has no signature {key!r}",
                                   expected=available or "a serving signature", got=key,
                                   fix=f"pass signature_key= one of {available}" if available else
                                   "re-save it with signatures={'serving_default': ...}")
        self.signature_key = key
        self._fn = self._loaded.signatures[key]
        self._input_keys = [name for name, _ in signature_inputs(self._fn)]
        self._output_keys = [name for name, _ in signature_outputs(self._fn)]
        self.notes.append(f"signature {key!r} on {self._tf_device}")

    def _native_signature(self) -> Signature:
        return Signature(inputs=[_spec(k, s) for k, s in signature_inputs(self._fn)],
                         outputs=[_spec(k, s) for k, s in signature_outputs(self._fn)])

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = import_tf()
        if set(feeds) != set(self._input_keys):
            raise ContractError(f"SavedModel signature {self.signature_key!r}", "inputs differ from the package "
                                "signature", expected=self._input_keys, got=list(feeds),
                                fix="re-export the package")
        try:
            with tf.device(self._tf_device):
                result = self._fn(**{k: tf.constant(v) for k, v in feeds.items()})
        except Exception as exc:
            raise RuntimeLoadError(f"SavedModel {self.path.name!r}", f"failed to run: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
        names = self.signature.output_names or self._output_keys
        if all(n in result for n in names):
            return {n: result[n].numpy() for n in names}
        if len(names) == 1 and len(result) == 1:
            return {names[0]: next(iter(result.values())).numpy()}
        raise ContractError(f"SavedModel signature {self.signature_key!r}", "outputs differ from the package signature",
                            expected=names, got=sorted(result), fix="re-export the package")

    def _close(self) -> None:
        self._fn = None
        self._loaded = None


def _spec(name: str, spec: Any) -> TensorSpec:
    shape: list[Any] = []
    for axis, dim in enumerate(spec.shape.as_list() if spec.shape.rank is not None else []):
        shape.append(dim if dim is not None else (BATCH if axis == 0 else f"{name}_dim{axis}"))
    return TensorSpec(name=name, dtype=dtype_name(spec.dtype.name), shape=tuple(shape))
