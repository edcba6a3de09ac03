"""``packager serve``: an Open Inference Protocol (KServe V2) REST server for one package.

Built on FastAPI/Starlette and uvicorn; metrics through ``prometheus-client``. The artifact is
loaded (and its checksums checked) before the socket opens, so a bad package fails as any
command does. Requests are decoded (:mod:`packager.serving.protocol`), validated by the
runner's own feed checks (HTTP 400 with the same message as ``packager run``), then queued to
the :class:`~packager.serving.batcher.Batcher`, which merges rows only with batching evidence.
SIGTERM or Ctrl-C stops accepting connections, finishes the requests in flight, then exits 0.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request)
# as objects, and Request is imported only when a server is created.
import asyncio
import signal
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from packager.errors import PackagerError, UsageError, require
from packager.serving.batcher import Batcher, BatchStats, QueueFull
from packager.serving.evidence import BatchingEvidence
from packager.serving.protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response, tensor_metadata
from packager.signature import Signature

#: The protocol extensions this server implements (``GET /v2``).
EXTENSIONS = ["binary_tensor_data"]


@dataclass
class ServeConfig:
    """How the server listens and batches."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Most rows merged into one runtime call (1: no merging).
    max_batch: int = 32
    #: How long the oldest queued request waits for others to join its batch.
    max_delay_ms: float = 5.0
    #: Requests waiting beyond this get HTTP 503.
    max_queue: int = 256
    #: Threads calling the runner (more than one only helps thread-safe runtimes).
    workers: int = 1
    #: Seconds to finish in-flight requests after SIGTERM before connections are dropped.
    graceful_seconds: float = 30.0

    def check(self) -> None:
        for flag, value, low in (("--max-batch", self.max_batch, 1), ("--max-queue", self.max_queue, 1),
                                 ("--workers", self.workers, 1), ("--port", self.port, 0)):
            if value < low:
                raise UsageError(f"{flag} {value}", f"must be at least {low}", expected=f">= {low}", got=value)
        if self.max_delay_ms < 0:
            raise UsageError(f"--max-delay-ms {self.max_delay_ms}", "must not be negative", expected=">= 0",
                             got=self.max_delay_ms)


class _Metrics:
    """Prometheus series of one server (its own registry: two servers in a process never mix)."""

    def __init__(self, model: str, max_batch: int) -> None:
        prom = require("prometheus_client", purpose="serve /metrics")
        self.registry = prom.CollectorRegistry()
        self.prom = prom
        labels = {"model": model}
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch})
        self.requests = prom.Counter("packager_requests", "Inference requests, by HTTP status.", ["model", "code"],
                                     registry=self.registry)
        self.rows = prom.Counter("packager_rows", "Rows inferred.", ["model"], registry=self.registry).labels(**labels)
        self.batches = prom.Counter("packager_batches", "Runtime calls.", ["model"],
                                    registry=self.registry).labels(**labels)
        self.batch_rows = prom.Histogram("packager_batch_rows", "Rows per runtime call.", ["model"], buckets=buckets,
                                         registry=self.registry).labels(**labels)
        self.batch_requests = prom.Histogram("packager_batch_requests", "Requests merged per runtime call.",
                                             ["model"], buckets=buckets, registry=self.registry).labels(**labels)
        self.queue = prom.Histogram("packager_queue_seconds", "Time a request waited before its runtime call.",
                                    ["model"], registry=self.registry).labels(**labels)
        self.inference = prom.Histogram("packager_inference_seconds", "Time of each runtime call.", ["model"],
                                        registry=self.registry).labels(**labels)
        self.in_flight = prom.Gauge("packager_requests_in_flight", "Requests accepted and not yet answered.",
                                    ["model"], registry=self.registry).labels(**labels)
        self.model = model

    def observe(self, stats: BatchStats) -> None:
        self.batches.inc()
        self.rows.inc(stats.rows)
        self.batch_rows.observe(stats.rows)
        self.batch_requests.observe(stats.requests)
        self.inference.observe(stats.run_seconds)
        for wait in stats.queue_seconds:
            self.queue.observe(wait)

    def count(self, code: int) -> None:
        self.requests.labels(model=self.model, code=str(code)).inc()

    def render(self) -> tuple[bytes, str]:
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST


class ModelService:
    """One loaded artifact behind the protocol: metadata, validation, batching, metrics."""

    def __init__(self, runner: Any, signature: Signature, *, name: str, version: str, platform: str,
                 evidence: BatchingEvidence, config: ServeConfig) -> None:
        self.runner = runner
        self.signature = signature
        self.name = name
        self.version = version
        self.platform = platform
        self.evidence = evidence
        self.config = config
        self.metrics = _Metrics(name, config.max_batch)
        self.batcher = Batcher(runner.run, signature, batching=evidence.safe, max_batch=config.max_batch,
                               max_delay=config.max_delay_ms / 1000.0, max_queue=config.max_queue,
                               workers=config.workers if runner.thread_safe else 1, observe=self.metrics.observe)
        queued = self.metrics.prom.Gauge("packager_queue_depth", "Requests waiting to join a batch.", ["model"],
                                         registry=self.metrics.registry).labels(model=name)
        queued.set_function(lambda: self.batcher.depth)

    @property
    def batching(self) -> bool:
        return self.batcher.batching

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [tensor_metadata(s) for s in self.signature.inputs],
                "outputs": [tensor_metadata(s) for s in self.signature.outputs],
                "parameters": {"dynamic_batching": self.batching, "max_batch": self.config.max_batch,
                               "batching_evidence": self.evidence.why}}

    def feeds(self, body: bytes, header_length: str | None) -> tuple[Any, dict[str, np.ndarray]]:
        """Decode and validate one request (raises ProtocolError / FeedError: HTTP 400)."""
        request = decode_request(body, header_length, self.signature)
        feeds = self.runner.validate(request.inputs)
        if self.batching:
            rows = {name: a.shape[0] for name, a in feeds.items()}
            if len(set(rows.values())) > 1:
                raise ProtocolError("request inputs", "have different batch sizes (axis 0)", got=rows,
                                    fix="send the same number of rows in every input")
            if 0 in rows.values():
                raise ProtocolError("request inputs", "hold no rows (axis 0 is 0)", fix="send at least one row")
        return request, feeds

    def close(self) -> None:
        """Finish queued requests, then release the runtime (idempotent)."""
        self.batcher.stop()
        self.runner.close()


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def create_app(service: ModelService) -> Any:
    """The FastAPI application serving ``service`` over the Open Inference Protocol."""
    fastapi = require("fastapi", purpose="serve a package")
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    from packager import __version__

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        # uvicorn runs this after the last in-flight request was answered.
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = fastapi.FastAPI(title=f"packager serve {service.name}", version=__version__, lifespan=lifespan,
                          docs_url=None, redoc_url=None, openapi_url=None)

    def known(model: str, version: str | None) -> Any:
        if model != service.name:
            return _error(404, f"model {model!r} is not served here (this server serves {service.name!r})")
        if version is not None and version != service.version:
            return _error(404, f"model {model!r} has no version {version!r} (versions: {service.version})")
        return None

    @app.get("/v2/health/live")
    async def live() -> Any:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Any:
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata() -> Any:
        return {"name": "packager", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str | None = None) -> Any:
        return known(model, version) or service.metadata()

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None) -> Any:
        return known(model, version) or {"name": service.name, "ready": True}

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None) -> Any:
        missing = known(model, version)
        if missing is not None:
            service.metrics.count(404)
            return missing
        body = await request.body()
        try:
            decoded, feeds = service.feeds(body, request.headers.get(HEADER_LENGTH))
            future = service.batcher.submit(feeds)
        except PackagerError as exc:  # ProtocolError, FeedError: the request's fault
            service.metrics.count(400)
            return _error(400, exc.message)
        except QueueFull as exc:
            service.metrics.count(503)
            return _error(503, f"the server is busy: {exc}; retry later")
        service.metrics.in_flight.inc()
        try:
            results = await asyncio.wrap_future(future)
        except PackagerError as exc:
            service.metrics.count(500)
            return _error(500, exc.message)
        except Exception as exc:
            service.metrics.count(500)
            return _error(500, f"{service.name}: inference failed ({type(exc).__name__}: {exc})")
        finally:
            service.metrics.in_flight.dec()
        content, headers = encode_response(service.name, service.version, decoded, results, service.signature)
        service.metrics.count(200)
        return Response(content=content, headers={k: v for k, v in headers.items() if k != "content-type"},
                        media_type=headers["content-type"])

    @app.get("/metrics")
    async def metrics() -> Any:
        content, media = service.metrics.render()
        return Response(content=content, media_type=media)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Any:
        return JSONResponse({"error": f"{request.url.path}: no such endpoint of the Open Inference Protocol"},
                            status_code=404)

    return app


def open_service(package: str | Path, *, format: str | None = None, runtime: str | None = None, device: str = "cpu",
                 cast: str = "strict", trust: bool | None = None, verify: bool = True,
                 public_key: str | Path | None = None, name: str | None = None, config: ServeConfig | None = None,
                 batching: bool = True) -> ModelService:
    """Load ``package`` and gather the batching evidence: everything ``serve`` does before listening.

    Args:
        package: Package folder or archive.
        format, runtime, device, cast, trust, verify, public_key: As for ``runtimes.load``.
        name: Model name in the URLs (default: the package's name).
        config: Listening and batching settings.
        batching: False turns dynamic batching off whatever the evidence.
    """
    from packager.serving.evidence import batching_evidence
    from runtimes import select

    config = config or ServeConfig()
    config.check()
    selection = select(package, format, runtime, verify=verify, public_key=public_key)
    runner = selection.open(device, cast, trust=trust)
    try:
        signature = runner.signature
        if not batching or config.max_batch == 1:
            evidence = BatchingEvidence(False, "turned off (--max-batch 1 or --no-batching)")
        else:
            evidence = batching_evidence(selection.package.root if selection.package else package, selection.format,
                                         selection.runtime.name, device, signature)
        model = name or (selection.manifest.name if selection.manifest is not None else Path(package).stem)
        return ModelService(runner, signature, name=model, version="1",
                            platform=f"{selection.format}/{selection.runtime.name}", evidence=evidence, config=config)
    except BaseException:
        runner.close()
        raise


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose connections send small writes at once (TCP_NODELAY)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
    # Without it, a keep-alive response written in two parts (headers, body) waits for the
    # client's delayed ACK: 40 ms per request. Set on the listener, accepted sockets inherit it.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(service: ModelService, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C; in-flight requests finish first.

    Args:
        service: From :func:`open_service`.
        on_ready: Called with the base URL once the socket listens (``--port 0`` picks a free port).
    """
    uvicorn = require("uvicorn", purpose="serve a package")
    config = service.config
    try:
        sock = listen_socket(config.host, config.port)
    except OSError as exc:
        service.close()
        raise UsageError(f"--host {config.host} --port {config.port}", f"cannot be listened on ({exc.strerror})",
                         fix="choose another --port (0: any free port), or stop what listens there") from None
    family = sock.family
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=config.graceful_seconds, lifespan="on"))
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers
    # that is a no-op, so a SIGTERM ends in a clean exit 0 rather than death by signal.
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    for sig in previous:
        signal.signal(sig, lambda *_: None)
    try:
        if on_ready is not None:
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            on_ready(f"http://{shown}:{port}")
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        service.close()  # when uvicorn never reached its lifespan shutdown
