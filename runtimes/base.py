"""The runner contract every runtime implements.

A runner loads one artifact on one device, exposes its input/output specs, validates feeds
once in :meth:`Runner.run` and delegates to the backend's :meth:`Runner._run`. Subclasses
override ``_load``, ``_run``, ``_close`` and (for bare artifacts) ``_native_signature``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Mapping

import numpy as np

from packager.errors import RuntimeLoadError, UsageError
from packager.options import TypedOptions, parse_options
from packager.registry import RUNTIMES, DeviceKind
from packager.signature import Signature, TensorSpec
from runtimes.device import Device, parse_device
from runtimes.feeds import FeedValidator


class RunnerOptions(TypedOptions):
    """A runner's options, declared with types: ``"false"`` parses as False, ``"lots"`` threads
    is an error naming the option, an unknown option is refused (a typo must not be ignored)."""


class Runner(ABC):
    """Base class of all runners.

    Args:
        path: The artifact (file or folder) to load.
        signature: The package signature; bare artifacts read their own (``_native_signature``).
        device: ``"cpu"`` or ``"cuda[:N]"``. A GPU that is absent is an error, never a fallback.
        cast: Feed dtype policy, ``"strict"`` or ``"safe"`` (lossless casts).
        options: Runtime-specific options (threads, providers, ...).
    """

    #: Registry name of the runtime ("onnxruntime"); its record in packager/registry.py sets
    #: the class's ``formats``, ``thread_safe`` and ``devices``.
    runtime: ClassVar[str]
    #: Artifact formats this runner loads.
    formats: ClassVar[tuple[str, ...]]
    #: Whether one instance may be called from several threads at once.
    thread_safe: ClassVar[bool] = False
    #: Device kinds it runs on.
    devices: ClassVar[tuple[DeviceKind, ...]] = ("cpu",)
    #: What to do instead when asked for a device it does not run on (the error's fix).
    device_fix: ClassVar[str | None] = None
    #: The options it accepts (a subclass of :class:`RunnerOptions`).
    Options: ClassVar[type[RunnerOptions]] = RunnerOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        runtime = cls.__dict__.get("runtime")
        if runtime is None:
            return  # a shared intermediate class (runtimes/_torch.py:TorchModuleRunner)
        if runtime not in RUNTIMES:
            raise TypeError(f"runner {cls.__name__}: runtime {runtime!r} has no record in packager/registry.py")
        record = RUNTIMES[runtime]
        cls.formats, cls.thread_safe, cls.devices = record.formats, record.thread_safe, record.devices

    def __init__(self, path: str | Path, *, signature: Signature | None = None, device: str | Device = "cpu",
                 cast: str = "strict", trust: bool | None = None, **options: Any) -> None:
        from runtimes._graphscan import trusted

        self.path = Path(path)
        self.device = parse_device(device)
        if self.device.kind not in self.devices:
            raise UsageError(f"device {self.device}", f"is not one the {self.runtime} runtime runs on",
                             expected=", ".join(self.devices), got=str(self.device), fix=self.device_fix)
        self.options = self.parse_options(options)
        #: Whether graphs that run code or touch files may load (runtimes/_graphscan.py). Never
        #: taken from a manifest's runner options: see :func:`manifest_options`.
        self.trust = trusted(trust)
        #: Human-readable facts about how the artifact runs (e.g. "oneDNN disabled after ...").
        self.notes: list[str] = []
        self._closed = False
        self._lock = threading.Lock()
        try:
            exists = self.path.exists()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise RuntimeLoadError(f"artifact {str(self.path)[:200]!r}", f"cannot be accessed ({exc.strerror})",
                                   fix="check the path") from None
        if not exists:
            raise RuntimeLoadError(f"artifact {str(self.path)!r}", "does not exist", fix="check the path")
        self._load()
        self.signature = signature if signature is not None else self._native_signature()
        self._validate = FeedValidator(self.signature.inputs, cast)
        self._ready()

    # --- public API -------------------------------------------------------------------
    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self.signature.inputs)

    @property
    def output_specs(self) -> list[TensorSpec]:
        return list(self.signature.outputs)

    def validate(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check ``feeds`` as :meth:`run` would, without running (a server checks each request
        before merging it into a batch, so one bad request fails alone).

        Raises:
            FeedError: Naming the input, what was expected, what was received, and the fix.
        """
        return self._validate(feeds)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` against the signature and run the artifact.

        Returns:
            Output name to array, in signature order.
        """
        if self._closed:
            raise UsageError(f"{self.runtime} runner", "is closed", fix="load the artifact again")
        arrays = self._validate(feeds)
        if self.thread_safe:
            return self._run(arrays)
        # Backends that are not thread-safe (TorchScript modules, Paddle predictors) are
        # serialised here; subclasses may do better (a predictor per thread) and set thread_safe.
        with self._lock:
            return self._run(arrays)

    def close(self) -> None:
        """Release the backend's resources; further :meth:`run` calls fail."""
        if not self._closed:
            self._closed = True
            self._close()

    def info(self) -> dict[str, Any]:
        """Runtime, device and notes, for reports."""
        return {"runtime": self.runtime, "device": str(self.device), "path": str(self.path), "notes": self.notes}

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:
            pass

    @classmethod
    def parse_options(cls, options: Mapping[str, Any], origin: str = "") -> RunnerOptions:
        """Validate ``options`` against :attr:`Options` (strings parse by the declared type).

        Args:
            options: Option name to value (``--option`` values arrive as strings).
            origin: Where they came from, for the message (default: the caller).

        Raises:
            UsageError: An unknown option or a value of the wrong type (exit 2).
        """
        return parse_options(cls.Options, options, subject=f"{cls.runtime} runner options{origin}",
                             owner="this runtime")

    # --- backend hooks ------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the artifact onto ``self.device``; raise RuntimeLoadError/DeviceError."""

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run validated feeds (in signature order) and return named outputs."""

    def _ready(self) -> None:
        """Called once the signature is known: precompute what the per-call path needs."""

    def _close(self) -> None:
        """Free backend resources."""

    def _native_signature(self) -> Signature:
        raise UsageError(f"{self.runtime} artifact {str(self.path)!r}", "carries no signature of its own",
                         fix="load it from its package (runtimes.load(PKG)) or pass signature=...")


def manifest_options(artifact: Any, runner: type[Runner]) -> dict[str, Any]:
    """An artifact's runner options from its manifest entry, checked against ``runner``'s.

    ``trust`` is dropped: whoever writes a package must not be able to trust it on the
    reader's behalf.

    Raises:
        ManifestError: The manifest holds options ``runner`` does not accept (exit 2).
    """
    from packager.errors import ManifestError

    options = artifact.options.get("runner", {})
    if not isinstance(options, Mapping):
        raise ManifestError(f"manifest artifact {artifact.format!r}", "has runner options that are not a mapping",
                            expected="an object of option name -> value", got=type(options).__name__,
                            fix="re-export the package, or fix options.runner in manifest.json")
    options = {k: v for k, v in options.items() if k != "trust"}
    try:
        runner.parse_options(options, origin=f" in the manifest (artifact {artifact.format!r})")
    except UsageError as exc:
        raise ManifestError(exc.subject, exc.problem, expected=exc.expected, got=exc.got,
                            fix="re-export the package, or fix options.runner in manifest.json") from None
    return options

