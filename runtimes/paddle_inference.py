"""Paddle Inference runner (``paddle.inference.Config`` / ``create_predictor``).

CPU with oneDNN and memory optimisation on by default, GPU via ``enable_use_gpu`` for
``cuda[:N]`` (a CPU-only build is a DeviceError, never a fallback). Configurations that the
installed Paddle rejects are retried with the feature off, and ``runner.notes`` says which
configuration ran:

- memory optimisation on a PIR (``.json``) program needs the new executor; if the predictor
  still refuses it, it is switched off;
- oneDNN rejects some PIR ops on CPU (at load or at the first run): the predictor is rebuilt
  without oneDNN.

A predictor is not thread-safe. ``thread_mode="lock"`` (default) serialises calls through the
base class's lock; ``thread_mode="clone"`` gives each thread its own ``predictor.clone()``
(weights shared). The Python binding of ``Predictor.run`` holds the GIL on CPU and CUDA builds
(it releases it only for Ascend), so clones cannot run in parallel: measured, they are no
faster than the lock and cost a clone per thread (see docs/paddle.md). Use ``threads=N`` to
give one predictor more cores.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np
from pydantic import PositiveInt

from packager.errors import RuntimeLoadError
from packager.signature import Signature
from runtimes._paddle import (check_gpu, check_program, first_line, paddle_module, quiet,
                              read_program_signature, resolve_model_files)
from runtimes.base import Runner, RunnerOptions


class PaddleInferenceRunner(Runner):
    """Runs a Paddle inference model (PIR ``.json``, legacy ``.pdmodel`` or a 1.x folder).

    Options:
        threads: CPU math threads per predictor (default 1: batch jobs parallelise across calls).
        onednn: Use oneDNN on CPU (default True; retried without it if it rejects an op).
        memory_optim: Reuse intermediate buffers (default True).
        ir_optim: Paddle Inference graph passes (default True).
        new_executor: Use the new executor for PIR programs (default True; memory optimisation
            needs it there).
        thread_mode: ``"lock"`` (default: calls serialised) or ``"clone"`` (a predictor per thread).
        gpu_memory_mb: Initial GPU memory pool for ``cuda[:N]`` (default 256).
    """

    class Options(RunnerOptions):
        threads: PositiveInt = 1
        onednn: bool = True
        memory_optim: bool = True
        ir_optim: bool = True
        new_executor: bool = True
        thread_mode: Literal["lock", "clone"] = "lock"
        gpu_memory_mb: PositiveInt = 256

    runtime = "paddle_inference"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._local = threading.local()
        self._clone_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    # --- loading ------------------------------------------------------------------------
    def _load(self) -> None:
        # Instance attribute: the base class reads self.thread_safe to skip its lock.
        self.thread_safe = self.options.thread_mode == "clone"  # type: ignore[misc]
        paddle_module()
        check_gpu(self.device, "Paddle Inference")
        self.files = resolve_model_files(self.path)
        check_program(self.files, self.trust)
        self._onednn = self.options.onednn and not self.device.is_cuda
        self._memory_optim = self.options.memory_optim
        self._predictor = self._create_with_fallbacks()
        self._generation = 0
        self._input_names = list(self._predictor.get_input_names())
        self._output_names = list(self._predictor.get_output_names())

    def _config(self) -> Any:
        from paddle import inference

        files = self.files
        if files.program == "v1":
            config = inference.Config(str(files.model))
        else:
            config = inference.Config(str(files.model), str(files.params) if files.params else "")
        if self.device.is_cuda:
            config.enable_use_gpu(self.options.gpu_memory_mb, self.device.index)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(self.options.threads)
            if self._onednn:
                config.enable_onednn()
            else:
                config.disable_onednn()
        config.switch_ir_optim(self.options.ir_optim)
        if self._memory_optim:
            config.enable_memory_optim()
            if files.program == "pir" and self.options.new_executor:
                # Paddle 3.x: the PIR memory pass registers its result only for the new executor
                # ("Not find predictor_id N and pass_name memory_optimize_pass" otherwise).
                config.enable_new_executor(True)
        config.disable_glog_info()
        return config

    def _create(self) -> Any:
        from paddle import inference

        with quiet() as log:
            try:
                return inference.create_predictor(self._config())
            except Exception as exc:
                exc.add_note(log.tail(2000)) if hasattr(exc, "add_note") else None
                raise

    def _create_with_fallbacks(self) -> Any:
        tried: list[str] = []
        while True:
            try:
                predictor = self._create()
                break
            except Exception as exc:
                message = first_line(exc)
                tried.append(f"{self._describe()}: {message}")
                if self._memory_optim and "memory_optim" in str(exc):
                    self._memory_optim = False
                    self.notes.append(f"memory optimisation disabled: Paddle Inference refused it ({message})")
                    continue
                if self._onednn:
                    self._onednn = False
                    self.notes.append(f"oneDNN disabled: the predictor failed with it ({message})")
                    continue
                if self.device.is_cuda:
                    from packager.errors import DeviceError

                    raise DeviceError(f"device {self.device}", f"Paddle Inference could not start on the GPU "
                                      f"({message})", fix="check the CUDA/cuDNN versions paddlepaddle-gpu needs, "
                                      "or use --device cpu", details="\n".join(tried)) from exc
                raise RuntimeLoadError(f"Paddle inference model {str(self.path)!r}",
                                       f"Paddle Inference could not load it (step: load): {message}",
                                       expected="a predictor", got="; ".join(tried),
                                       fix="check that the .pdiparams file belongs to this program and that "
                                           f"paddlepaddle {paddle_module().__version__} can read it",
                                       details="\n".join(tried)) from exc
        self.notes.append(f"configuration: {self._describe()}")
        return predictor

    def _describe(self) -> str:
        if self.device.is_cuda:
            return f"GPU {self.device.index}, memory optim {'on' if self._memory_optim else 'off'}"
        return (f"CPU, oneDNN {'on' if self._onednn else 'off'}, memory optim {'on' if self._memory_optim else 'off'}"
                f", {self.options.threads} thread(s)")

    # --- running ------------------------------------------------------------------------
    def _thread_predictor(self) -> Any:
        if not self.thread_safe:
            return self._predictor
        local = self._local
        if getattr(local, "generation", -1) != self._generation:
            with self._clone_lock:  # clone() reads the shared predictor's state
                local.predictor = self._predictor.clone()
                local.generation = self._generation
        return local.predictor

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._run_on(self._thread_predictor(), feeds)
        except Exception as exc:
            if not self._onednn:
                raise RuntimeLoadError(f"Paddle inference model {self.path.name!r}",
                                       f"failed to run (step: run): {first_line(exc)}",
                                       fix="check the input shapes against the model's signature") from exc
            # oneDNN kernels can reject an op only when they first see real shapes.
            with self._clone_lock:
                if self._onednn:
                    self._onednn = False
                    self.notes.append(f"oneDNN disabled: the first run failed with it ({first_line(exc)})")
                    self._predictor = self._create_with_fallbacks()
                    self._generation += 1
            return self._run(feeds)
        names = self.signature.output_names or self._output_names
        return dict(zip(names, outputs))

    def _run_on(self, predictor: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # By name when the signature uses the program's feed names, else by position.
        names = list(feeds) if set(feeds) == set(self._input_names) else self._input_names
        for name, array in zip(names, feeds.values()):
            handle = predictor.get_input_handle(name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(np.ascontiguousarray(array))
        predictor.run()
        return [predictor.get_output_handle(n).copy_to_cpu() for n in self._output_names]

    def _close(self) -> None:
        self._predictor = None
        self._local = threading.local()

    def _native_signature(self) -> Signature:
        try:
            return read_program_signature(self.files)
        except Exception as exc:
            raise RuntimeLoadError(f"Paddle inference model {str(self.path)!r}",
                                   f"its inputs cannot be read from the program: {first_line(exc)}") from exc
