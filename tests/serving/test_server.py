"""`packager serve`: the Open Inference Protocol over a real server, Triton's own HTTP client
(tritonclient.http) as the protocol oracle, plain HTTP for what a client library would never send."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import runtimes
from packager.fidelity.judge import judge_for
from packager.package import Package
from tests.conftest import run_cli
from tests.serving.conftest import start_server

th = pytest.importorskip("tritonclient.http")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.torch


def _http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _images(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 32, 32)).astype(np.float32)


def _infer(client, x: np.ndarray, binary: bool = True, request_id: str = "") -> np.ndarray:
    tensor = th.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("torch_cnn", [tensor], request_id=request_id,
                          outputs=[th.InferRequestedOutput("output", binary_data=binary)])
    if request_id:
        assert result.get_response()["id"] == request_id
    return result.as_numpy("output")


def _metric(url: str, name: str) -> float:
    _, _, body = _http(url + "/metrics")
    values = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values)


def test_every_endpoint_answers_as_the_protocol_says(cnn_server) -> None:
    client = th.InferenceServerClient(cnn_server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("torch_cnn") and client.is_model_ready("torch_cnn", "1")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("torch_cnn", "1")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["dynamic_batching"] is True
    assert "batch consistency passed" in meta["parameters"]["batching_evidence"]
    assert not client.is_model_ready("other")
    status, _, body = _http(cnn_server.url + "/v2/models/torch_cnn/versions/7")
    assert status == 404 and "no version '7'" in json.loads(body)["error"]
    status, _, body = _http(cnn_server.url + "/v2/nothing")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]


def test_responses_equal_packager_run_on_the_same_rows(cnn_server, torch_cnn_package: Path, tmp_path: Path) -> None:
    x = _images(1, 12)
    np.save(tmp_path / "in.npy", x)
    done = run_cli("run", str(torch_cnn_package), "-i", str(tmp_path / "in.npy"), "-o", str(tmp_path / "out.npz"))
    assert done.returncode == 0, done.stderr
    expected = np.load(tmp_path / "out.npz")["output"]
    client = th.InferenceServerClient(cnn_server.address)
    binary = np.concatenate([_infer(client, x[i:i + 4], True, f"req-{i}") for i in range(0, 12, 4)])
    as_json = np.concatenate([_infer(client, x[i:i + 3], False) for i in range(0, 12, 3)])
    judge = judge_for(Package(torch_cnn_package).manifest)
    for got in (binary, as_json):
        assert got.shape == (12, 10)
        # The same artifact and runtime at other batch sizes: the package's own judge and noise record decide.
        assert judge.compare({"output": expected}, {"output": got}).passed


def test_concurrent_clients_are_merged_and_get_their_own_rows(torch_cnn_package: Path) -> None:
    """16 clients x 2 rows with --max-batch 32: the batcher waits (up to 30 s) until the 32 rows
    are there, so exactly one runtime call answers them all, whatever the threads' timing."""
    server = start_server(torch_cnn_package, "--max-batch", "32", "--max-delay-ms", "30000")
    try:
        runner = runtimes.load(torch_cnn_package, format="onnx")
        judge = judge_for(Package(torch_cnn_package).manifest)
        inputs = [_images(100 + i, 2) for i in range(16)]
        barrier = threading.Barrier(16)

        def call(x: np.ndarray) -> np.ndarray:
            client = th.InferenceServerClient(server.address, network_timeout=120)
            barrier.wait()
            return _infer(client, x)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, inputs))
        for x, got in zip(inputs, results):
            assert got.shape == (2, 10)
            assert judge.compare(runner.run({"x": x}), {"output": got}).passed
        assert _metric(server.url, "packager_batches_total") == 1
        assert _metric(server.url, "packager_rows_total") == 32
        assert _metric(server.url, 'packager_batch_requests_sum') == 16
    finally:
        rc, _ = server.stop()
    assert rc == 0


BAD_REQUESTS = [
    (b"{not json", None, "is not valid JSON"),
    (b'{"inputs": 3}', None, "has no 'inputs' list"),
    (b'{"inputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "is not an input"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1, 2]}]}', None,
     "do not fill its shape"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "b", "c"]}]}', None, "BYTES"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}', None, "wrong rank"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "parameters": '
     b'{"binary_data_size": 12288}}]}', "95", "less binary data"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP64", "data": ' + json.dumps([0.0] * 3072).encode()
     + b'}]}', None, "float32"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ' + json.dumps([0.0] * 3072).encode()
     + b'}], "outputs": [{"name": "logits"}]}', None, "is not an output"),
]


@pytest.mark.parametrize("body, header, words", BAD_REQUESTS, ids=[w for _, _, w in BAD_REQUESTS])
def test_malformed_requests_get_400_with_the_reason(cnn_server, body: bytes, header: str | None, words: str) -> None:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Inference-Header-Content-Length"] = str(len(body))
    status, _, answer = _http(cnn_server.url + "/v2/models/torch_cnn/infer", body, headers)
    assert status == 400, answer
    assert words in json.loads(answer)["error"]


def test_a_bad_request_among_good_ones_fails_alone(cnn_server, torch_cnn_package: Path) -> None:
    runner = runtimes.load(torch_cnn_package, format="onnx")
    judge = judge_for(Package(torch_cnn_package).manifest)
    good = [_images(7 + i, 1) for i in range(6)]

    def call(i: int):
        client = th.InferenceServerClient(cnn_server.address)
        if i % 2:
            tensor = th.InferInput("x", [1, 3, 16, 16], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
            with pytest.raises(th.InferenceServerException, match="wrong size"):
                client.infer("torch_cnn", [tensor])
            return None
        return _infer(client, good[i])

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    for i in range(0, 6, 2):
        assert judge.compare(runner.run({"x": good[i]}), {"output": results[i]}).passed


def test_batching_stays_off_without_evidence(batch_dependent_package: Path) -> None:
    server = start_server(batch_dependent_package)
    try:
        assert "dynamic batching off: batch consistency failed" in server.line
        meta = th.InferenceServerClient(server.address).get_model_metadata("batch_centred")
        assert meta["parameters"]["dynamic_batching"] is False
        runner = runtimes.load(batch_dependent_package)
        x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
        tensor = th.InferInput("x", [5, 8], "FP32")
        tensor.set_data_from_numpy(x)
        got = th.InferenceServerClient(server.address).infer("batch_centred", [tensor]).as_numpy("output")
        assert judge_for(Package(batch_dependent_package).manifest).compare(runner.run({"x": x}),
                                                                            {"output": got}).passed
    finally:
        server.stop()


def test_sigterm_finishes_the_request_in_flight_then_exits_0(torch_cnn_package: Path) -> None:
    server = start_server(torch_cnn_package, "--max-batch", "64", "--max-delay-ms", "3000")
    client = th.InferenceServerClient(server.address, network_timeout=120)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(out=_infer(client, _images(5, 2))))
    worker.start()
    # The request is in flight (waiting for others to join its batch) when the gauge shows it.
    for _ in range(600):
        if _metric(server.url, "packager_requests_in_flight") == 1:
            break
        threading.Event().wait(0.01)
    server.process.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    rc, stderr = server.stop()
    assert rc == 0 and "stopped: in-flight requests were answered" in stderr
    assert result["out"].shape == (2, 10)


def test_bad_options_are_usage_errors(torch_cnn_package: Path, tmp_path: Path) -> None:
    done = run_cli("serve", str(torch_cnn_package), "--max-batch", "0")
    assert done.returncode == 2 and "--max-batch 0: must be at least 1" in done.stderr
    done = run_cli("serve", str(tmp_path / "missing"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_listener_sends_small_writes_at_once() -> None:
    """TCP_NODELAY on the listening socket (accepted ones inherit it on Linux), and proto
    IPPROTO_TCP so asyncio sets it too: without it every keep-alive response waited for the
    client's delayed ACK (40 ms a request, measured with benchmarks/serve_load.py)."""
    import socket

    from packager.serving.server import listen_socket

    sock = listen_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client = socket.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        accepted.close()
        client.close()
    finally:
        sock.close()


def test_serving_an_onnx_package_imports_no_framework(mlp_onnx_package: Path) -> None:
    """Loading, the batching evidence and the application import neither torch, TensorFlow nor Paddle."""
    import subprocess
    import sys

    script = ("import sys\nfrom packager.serving.server import open_service, create_app\n"
              f"service = open_service({str(mlp_onnx_package)!r})\ncreate_app(service)\nservice.close()\n"
              "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'paddle') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
