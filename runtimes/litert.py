"""LiteRT runner (formerly TensorFlow Lite): a ``.tflite`` flatbuffer in ``ai_edge_litert``'s interpreter.

XNNPACK, LiteRT's default CPU delegate, is on unless ``xnnpack=False``: it is what deployments
run, and it may round differently from the reference kernels, which the judge then sees.
Dynamic axes (``-1`` in a tensor's shape signature) are resized with ``resize_tensor_input``
(strict: a fixed axis is never resized) when a call's shape differs from the last one. One
interpreter holds its tensors, so calls are serialised (``thread_safe`` is false).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import PositiveInt

from packager.errors import ContractError, RuntimeLoadError, require
from packager.signature import BATCH, Signature, TensorSpec, dtype_name
from runtimes.base import Runner, RunnerOptions

DEFAULT_SIGNATURE = "serving_default"


class LiteRtRunner(Runner):
    """Runs one signature of a ``.tflite`` model on the CPU.

    Options:
        xnnpack: Apply the XNNPACK delegate (default True); False runs TFLite's builtin kernels.
        num_threads: Interpreter threads (default: LiteRT's choice).
        signature_key: The signature to run (default ``serving_default``; a model with one
            signature runs that one).
    """

    class Options(RunnerOptions):
        xnnpack: bool = True
        num_threads: PositiveInt | None = None
        signature_key: str = DEFAULT_SIGNATURE

    runtime = "litert"
    device_fix = "LiteRT runs here on the CPU (its GPU delegates are for mobile GPUs): pass --device cpu"

    def _load(self) -> None:
        lite = require("ai_edge_litert.interpreter", purpose="run TFLite (LiteRT) artifacts")
        resolver = (lite.OpResolverType.AUTO if self.options.xnnpack
                    else lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        try:
            self._interpreter = lite.Interpreter(model_path=str(self.path), num_threads=self.options.num_threads,
                                                 experimental_op_resolver_type=resolver)
            self._interpreter.allocate_tensors()
        except Exception as exc:  # ValueError / RuntimeError with the interpreter's own text
            text = " ".join(str(exc).split())
            # Flex (TensorFlow) kernels, ReadFile among them, are not linked into this interpreter:
            # such a flatbuffer never runs here, --trust or not.
            fix = ("this flatbuffer needs TensorFlow (Flex) kernels, which the LiteRT interpreter does not have; "
                   "packager exports builtin ops only" if "Flex" in text or "Select TensorFlow op" in text else
                   "re-export the package (packager export ... --formats tflite)")
            raise RuntimeLoadError(f"TFLite model {str(self.path)!r}", f"LiteRT refused to load it: {text[:400]}",
                                   fix=fix) from exc
        signatures = self._interpreter.get_signature_list()
        key = self.options.signature_key
        if key not in signatures and len(signatures) == 1:
            key = next(iter(signatures))
        if key not in signatures:
            raise RuntimeLoadError(f"TFLite model {str(self.path)!r}", f"has no signature {key!r}",
                                   expected=sorted(signatures) or "a signature", got=key,
                                   fix=f"pass signature_key= one of {sorted(signatures)}")
        runner = self._interpreter.get_signature_runner(key)
        if getattr(runner, "_subgraph_index", 0) != 0:
            raise RuntimeLoadError(f"TFLite model {str(self.path)!r}", f"signature {key!r} is not the main subgraph",
                                   fix="convert a model with that signature alone")
        self.signature_key = key
        #: name -> tensor details (index, dtype, shape_signature), in the signature's order.
        self._in = runner.get_input_details()
        self._out = runner.get_output_details()
        self._shapes: dict[int, tuple[int, ...]] = {d["index"]: tuple(d["shape"]) for d in self._in.values()}
        self._allocate = False
        self.notes.append(f"signature {key!r}, XNNPACK {'on' if self.options.xnnpack else 'off'}")

    def _ready(self) -> None:
        missing = [n for n in self.signature.output_names if n not in self._out]
        if missing and len(self.signature.output_names) != len(self._out):
            raise ContractError(f"TFLite signature {self.signature_key!r}", "outputs differ from the package signature",
                                expected=self.signature.output_names, got=list(self._out), fix="re-export the package")
        # Unnamed outputs (a bare model's generic names) map by position.
        self._order = [(n, self._out[n]["index"] if n in self._out else d["index"])
                       for n, d in zip(self.signature.output_names, self._out.values())]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(feeds) != set(self._in):
            raise ContractError(f"TFLite signature {self.signature_key!r}", "inputs differ from the package "
                                "signature", expected=list(self._in), got=list(feeds), fix="re-export the package")
        interpreter = self._interpreter
        try:
            for name, value in feeds.items():
                index = self._in[name]["index"]
                if self._shapes[index] != value.shape:
                    self._allocate = True  # set first: a failed resize must not leave stale buffers
                    interpreter.resize_tensor_input(index, list(value.shape), strict=True)
                    self._shapes[index] = value.shape
            if self._allocate:
                interpreter.allocate_tensors()
                self._allocate = False
            for name, value in feeds.items():
                interpreter.set_tensor(self._in[name]["index"], value)
            interpreter.invoke()
            return {name: interpreter.get_tensor(index) for name, index in self._order}  # get_tensor copies
        except Exception as exc:
            raise RuntimeLoadError(f"TFLite model {self.path.name!r}", f"failed to run: "
                                   f"{' '.join(str(exc).split())[:400]}") from exc

    def _close(self) -> None:
        self._interpreter = None

    def _native_signature(self) -> Signature:
        return Signature(inputs=[_spec(n, d) for n, d in self._in.items()],
                         outputs=[_spec(n, d) for n, d in self._out.items()])


def _spec(name: str, details: dict[str, Any]) -> TensorSpec:
    if np.dtype(details["dtype"]).kind not in "biuf":  # strings, resources: no signature dtype for them
        raise ContractError(f"TFLite tensor {name!r}", f"has type {np.dtype(details['dtype']).name}, which a package "
                            "signature cannot carry", expected="a numeric or bool tensor",
                            got=np.dtype(details["dtype"]).name)
    dims = details.get("shape_signature", details["shape"])
    shape = tuple(int(d) if d >= 0 else (BATCH if axis == 0 else f"{name}_dim{axis}") for axis, d in enumerate(dims))
    return TensorSpec(name=name, dtype=dtype_name(np.dtype(details["dtype"]).name), shape=shape)
