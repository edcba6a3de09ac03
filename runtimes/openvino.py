"""OpenVINO runner: an IR (``model.xml`` + ``model.bin``) compiled for OpenVINO's CPU plugin.

Precision is explicit: the CPU plugin runs bf16 by default on CPUs that have it (AMX or
AVX-512 BF16), which would judge a fp32 artifact at bf16 accuracy without saying so. The
runner compiles with ``INFERENCE_PRECISION_HINT=f32`` unless told otherwise, reads back the
precision the compiled model really uses, and refuses one that differs.

Shape cache: the CPU plugin's per-shape primitive cache (``CPU_RUNTIME_CACHE_CAPACITY``) is off
unless ``shape_cache`` says otherwise. With it on, OpenVINO 2026.4 returned outputs off by 0.2 for
seq=64 on the sample transformer once its first call had seq=1 (``verify``'s call-order check
shows it: tests/runtimes/test_openvino.py); off, calls whose shape repeats cost the same and
alternating shapes ~2.3x more (measured: 32x16..64 ids, 0.43 vs 1.0 ms).

Threads: a ``CompiledModel`` may be shared, an ``InferRequest`` may not; each calling thread
gets its own request, so one runner serves the batch engine's threads in parallel (the
``throughput`` mode sizes the plugin's streams for that).
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np
from pydantic import NonNegativeInt

from packager.errors import ContractError, RuntimeLoadError, require
from packager.signature import BATCH, Signature, TensorSpec, dtype_name
from runtimes.base import Runner, RunnerOptions


class OpenVinoRunner(Runner):
    """Runs an OpenVINO IR on the CPU.

    Options:
        inference_precision: ``"f32"`` (default), or ``"bf16"`` / ``"f16"`` to allow the plugin's
            lower-precision kernels (then judged as such: expect wider errors).
        performance_mode: ``"latency"`` (default: one stream, all cores per call) or
            ``"throughput"`` (several streams, for several threads calling at once).
        num_threads: CPU threads for inference (0: OpenVINO's choice).
        shape_cache: Entries of the plugin's per-shape primitive cache (default 0: off; see the
            module's docstring before turning it on).
    """

    class Options(RunnerOptions):
        inference_precision: Literal["f32", "bf16", "f16"] = "f32"
        performance_mode: Literal["latency", "throughput"] = "latency"
        num_threads: NonNegativeInt = 0
        shape_cache: NonNegativeInt = 0

    runtime = "openvino"
    device_fix = ("OpenVINO runs on Intel CPUs, GPUs and NPUs (devices CPU, GPU, NPU), not on CUDA; packager runs "
                  "its CPU plugin: pass --device cpu, or run the package's onnx artifact with onnxruntime on cuda")

    def _load(self) -> None:
        ov = require("openvino", purpose="run OpenVINO IR artifacts")
        weights = self.path.with_suffix(".bin")
        if self.path.suffix.lower() != ".xml" or not weights.is_file():
            raise RuntimeLoadError(f"OpenVINO IR {str(self.path)!r}", "is not an .xml file with its .bin beside it",
                                   expected="model.xml + model.bin", got=self.path.name,
                                   fix="point at the IR's .xml file, with its .bin in the same folder")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path), str(weights))
        except Exception as exc:  # openvino raises RuntimeError subclasses of its own
            raise RuntimeLoadError(f"OpenVINO IR {str(self.path)!r}", f"OpenVINO refused to read it: "
                                   f"{' '.join(str(exc).split())[:400]}",
                                   fix="re-export the package (packager export ... --formats openvino)") from exc
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.options.inference_precision,
                                  "PERFORMANCE_HINT": self.options.performance_mode.upper(),
                                  "CPU_RUNTIME_CACHE_CAPACITY": self.options.shape_cache}
        if self.options.num_threads:
            config["INFERENCE_NUM_THREADS"] = self.options.num_threads
        try:
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise RuntimeLoadError(f"OpenVINO IR {str(self.path)!r}", f"the CPU plugin failed to compile it: "
                                   f"{' '.join(str(exc).split())[:400]}") from exc
        precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if precision != self.options.inference_precision:
            raise RuntimeLoadError(f"OpenVINO IR {str(self.path)!r}", "the CPU plugin compiled it at another "
                                   "precision than asked", expected=self.options.inference_precision, got=precision,
                                   fix="pass inference_precision= a precision this CPU supports")
        self._inputs = list(self._compiled.inputs)
        self._outputs = list(self._compiled.outputs)
        self._local = threading.local()
        self.notes.append(f"OpenVINO {ov.__version__.split('-')[0]} CPU plugin, inference precision {precision}, "
                          f"{self.options.performance_mode} mode")

    def _ready(self) -> None:
        # Signature output name -> index among the compiled model's outputs (an IR output has
        # several tensor names; the ONNX output name is one of them).
        index = {name: i for i, port in enumerate(self._outputs) for name in port.get_names()}
        names = self.signature.output_names
        if all(n in index for n in names):
            self._order = [(n, index[n]) for n in names]
        elif len(names) == len(self._outputs):  # unnamed outputs: by position, as ONNX Runtime does
            self._order = list(zip(names, range(len(names))))
        else:
            raise ContractError(f"OpenVINO IR {self.path.name!r}", "outputs differ from the package signature",
                                expected=names, got=[p.get_any_name() for p in self._outputs],
                                fix="re-export the package")

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        return request

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            # share_outputs=False (the default): the arrays are copies, the next call cannot overwrite them.
            results = self._request().infer(feeds).to_tuple()
        except Exception as exc:
            raise RuntimeLoadError(f"OpenVINO IR {self.path.name!r}", f"failed to run: "
                                   f"{' '.join(str(exc).split())[:400]}") from exc
        return {name: results[i] for name, i in self._order}

    def _close(self) -> None:
        self._local = threading.local()  # other threads' requests go with the old one
        self._compiled = None

    def _native_signature(self) -> Signature:
        return Signature(inputs=[_spec(p) for p in self._inputs], outputs=[_spec(p) for p in self._outputs])


def _spec(port: Any) -> TensorSpec:
    name = port.get_any_name()
    shape = tuple(d.get_length() if d.is_static else (BATCH if axis == 0 else f"{name}_dim{axis}")
                  for axis, d in enumerate(port.get_partial_shape()))
    return TensorSpec(name=name, dtype=dtype_name(np.dtype(port.get_element_type().to_dtype()).name), shape=shape)
