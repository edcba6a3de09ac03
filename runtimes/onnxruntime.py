"""ONNX Runtime runner: CPU EP, or the CUDA EP for ``cuda[:N]`` (checked, never a silent fallback)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import NonNegativeInt

from packager.errors import DeviceError, RuntimeLoadError, require
from packager.signature import Signature, TensorSpec
from runtimes.base import Runner, RunnerOptions

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


class OnnxRuntimeRunner(Runner):
    """Runs an ``.onnx`` file with ONNX Runtime.

    Options:
        intra_op_num_threads: Threads per operator (default: ONNX Runtime's choice).
        inter_op_num_threads: Threads across operators.
        graph_optimization_level: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disabled"``.
    """

    class Options(RunnerOptions):
        intra_op_num_threads: NonNegativeInt = 0  # 0: ONNX Runtime's choice
        inter_op_num_threads: NonNegativeInt = 0
        graph_optimization_level: Literal["all", "extended", "basic", "disabled"] = "all"

    runtime = "onnxruntime"

    def _load(self) -> None:
        ort = require("onnxruntime", purpose="run ONNX artifacts")
        options = ort.SessionOptions()
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        options.graph_optimization_level = levels[self.options.graph_optimization_level]
        options.intra_op_num_threads = self.options.intra_op_num_threads
        options.inter_op_num_threads = self.options.inter_op_num_threads
        # ONNX Runtime's own log lines (coloured, on stderr) would break packager's JSON-lines
        # progress stream. Warnings: the process-wide default logger (model load) at ERROR.
        # The session's logger goes to FATAL: its ERROR lines ("Non-zero status code returned
        # while running ...") only repeat the exception, which packager reports (or, with
        # --on-error skip, turns into rejects) with that same text.
        ort.set_default_logger_severity(3)
        options.log_severity_level = 4
        if self.device.is_cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeviceError(f"device {self.device}", "needs ONNX Runtime's CUDA execution provider, which this "
                                  "onnxruntime build does not have", expected="CUDAExecutionProvider",
                                  got=ort.get_available_providers(),
                                  fix="pip install onnxruntime-gpu (matching your CUDA/cuDNN), or use --device cpu")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": self.device.index})]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... classes
            if self.device.is_cuda:
                raise DeviceError(f"device {self.device}", f"ONNX Runtime's CUDA provider failed to start ({exc})",
                                  fix="check the CUDA/cuDNN versions onnxruntime-gpu needs, or use --device cpu") from exc
            raise RuntimeLoadError(f"ONNX model {str(self.path)!r}", f"ONNX Runtime refused to load it: {exc}",
                                   fix="re-export with another opset, or check 'packager verify' for the failing node") from exc
        active = self.session.get_providers()
        if self.device.is_cuda and active[0] != "CUDAExecutionProvider":
            # ORT falls back to CPU silently when the CUDA EP cannot start: make that an error.
            raise DeviceError(f"device {self.device}", "ONNX Runtime fell back to the CPU",
                              expected="CUDAExecutionProvider", got=active,
                              fix="check that CUDA and cuDNN libraries match onnxruntime-gpu, or use --device cpu")
        self._output_names = [o.name for o in self.session.get_outputs()]
        # The bound C++ session skips InferenceSession.run's Python-side re-validation (done
        # once already by FeedValidator) and its EP-failure fallback to CPU, which we never want.
        self._sess_run = getattr(getattr(self.session, "_sess", None), "run", None) or self.session.run

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._sess_run(self._output_names, feeds, None)
        except Exception as exc:
            raise RuntimeLoadError(f"ONNX model {self.path.name!r}", f"failed to run: {exc}") from exc
        return dict(zip(self._output_names, results))

    def _close(self) -> None:
        self.session = None

    def _native_signature(self) -> Signature:
        def spec(arg: Any) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) else (d or f"{arg.name}_dim{i}") for i, d in enumerate(arg.shape))
            shape = tuple("batch" if i == 0 and isinstance(d, str) else d for i, d in enumerate(shape))
            return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, "float32"), shape=shape)

        return Signature(inputs=[spec(a) for a in self.session.get_inputs()],
                         outputs=[spec(a) for a in self.session.get_outputs()])
