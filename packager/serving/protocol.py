"""The Open Inference Protocol (KServe V2) REST encoding: datatypes, requests and responses,
with the binary tensor data extension (a JSON header followed by raw tensor bytes).

Every malformed request raises :class:`ProtocolError` naming the tensor and what is wrong; the
server answers it with HTTP 400 and that message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from packager.errors import InputError
from packager.signature import Signature, TensorSpec
from runtimes.feeds import _np_dtype as np_dtype  # one owner of the name -> dtype rule (bfloat16)

#: Header that gives the length of the JSON part of a binary request or response.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: signature (numpy) dtype -> protocol datatype. BYTES (strings) has no signature dtype.
DATATYPES: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "bfloat16": "BF16",
}
NUMPY_DTYPES: dict[str, str] = {v: k for k, v in DATATYPES.items()}


class ProtocolError(InputError):
    """A request the protocol (or the model's signature) does not allow: HTTP 400."""


def protocol_shape(spec: TensorSpec) -> list[int]:
    """The spec's shape as the protocol writes it: -1 for a dynamic axis."""
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": DATATYPES[spec.dtype], "shape": protocol_shape(spec)}


@dataclass
class InferRequest:
    """One decoded ``/infer`` request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    #: Requested outputs, in the order asked, each with whether it goes back as binary data;
    #: None: every output, binary when ``binary_default``.
    outputs: list[tuple[str, bool]] | None
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def _subject(name: str) -> str:
    return f"request input {name!r}"


def _shape(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ProtocolError(_subject(name), "has an invalid 'shape'", expected="a list of non-negative integers",
                            got=json.dumps(value)[:80])
    return value


def _dtype(name: str, value: Any, binary: bool) -> np.dtype:
    if value == "BYTES":
        raise ProtocolError(_subject(name), "is BYTES (strings), which no packager signature takes",
                            expected=", ".join(NUMPY_DTYPES), got=value)
    if value not in NUMPY_DTYPES:
        raise ProtocolError(_subject(name), "has an unknown 'datatype'", expected=", ".join(NUMPY_DTYPES),
                            got=str(value)[:40])
    if value == "BF16" and not binary:
        raise ProtocolError(_subject(name), "is BF16 as JSON, which the protocol does not define",
                            fix="send BF16 tensors as binary data (binary tensor extension)")
    return np_dtype(NUMPY_DTYPES[value])


def decode_request(body: bytes, header_length: str | None, signature: Signature) -> InferRequest:
    """Decode an ``/infer`` body: JSON, or a JSON header of ``header_length`` bytes followed by
    the binary tensor data of the inputs that declare ``binary_data_size``.

    Raises:
        ProtocolError: Malformed JSON, an unknown or repeated input, a bad shape or datatype,
            data that does not fill the shape, an unknown requested output.
    """
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise ProtocolError(f"header {HEADER_LENGTH}", "is not a length within the body",
                                expected=f"0..{len(body)}", got=header_length[:40])
        head, binary = body[:length], memoryview(body)[length:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("request body", f"is not valid JSON ({exc})",
                            fix=f"send the JSON request (and the {HEADER_LENGTH} header with binary data)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ProtocolError("request body", "has no 'inputs' list", expected='{"inputs": [{"name", "shape", '
                            '"datatype", "data"}, ...]}', got=type(doc).__name__ if not isinstance(doc, dict)
                            else f"keys {sorted(doc)[:8]}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("request 'id'", "is not a string", got=json.dumps(request_id)[:40])
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("request 'parameters'", "is not an object", got=json.dumps(parameters)[:40])
    known = {s.name for s in signature.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("request input", "has no 'name'", got=json.dumps(item)[:80])
        name = item["name"]
        if name in inputs:
            raise ProtocolError(_subject(name), "is given twice", fix="send each input once")
        if name not in known:
            raise ProtocolError(_subject(name), "is not an input of the model", expected=sorted(known), got=name)
        shape = _shape(name, item.get("shape"))
        size = ((item.get("parameters") or {}).get("binary_data_size"))
        dtype = _dtype(name, item.get("datatype"), size is not None)
        count = math.prod(shape)
        if size is not None:
            want = count * dtype.itemsize
            if not isinstance(size, int) or size != want:
                raise ProtocolError(_subject(name), "has a binary_data_size that does not fit its shape and datatype",
                                    expected=f"{want} bytes ({shape} x {dtype.itemsize})", got=size)
            if offset + size > len(binary):
                raise ProtocolError(_subject(name), "has less binary data than its binary_data_size",
                                    expected=size, got=len(binary) - offset)
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise ProtocolError(_subject(name), "has neither 'data' nor a binary_data_size parameter")
            try:
                array = np.asarray(item["data"], dtype=dtype)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(_subject(name), f"has data that are not {item['datatype']} numbers ({exc})") from None
            if array.size != count:
                raise ProtocolError(_subject(name), "has data that do not fill its shape",
                                    expected=f"{count} elements ({shape})", got=f"{array.size} elements")
            array = array.reshape(shape)
        inputs[name] = array
    if offset != len(binary):
        raise ProtocolError("request body", "has binary data that no input claims",
                            expected=f"{offset} bytes", got=f"{len(binary)} bytes")
    binary_default = bool(parameters.get("binary_data_output", False))
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise ProtocolError("request 'outputs'", "is not a list", got=json.dumps(doc["outputs"])[:80])
        names = {s.name for s in signature.outputs}
        outputs = []
        for item in doc["outputs"]:
            name = item.get("name") if isinstance(item, dict) else None
            if name not in names:
                raise ProtocolError(f"requested output {name!r}", "is not an output of the model",
                                    expected=sorted(names), got=name)
            params = item.get("parameters") or {}
            outputs.append((name, bool(params.get("binary_data", binary_default))))
    return InferRequest(request_id, inputs, outputs, binary_default, parameters)


def encode_response(model: str, version: str, request: InferRequest, results: Mapping[str, np.ndarray],
                    signature: Signature) -> tuple[bytes, dict[str, str]]:
    """The ``/infer`` response body and its headers (binary when any output is binary)."""
    wanted = request.outputs if request.outputs is not None else [
        (s.name, request.binary_default) for s in signature.outputs]
    dtypes = {s.name: s.dtype for s in signature.outputs}
    outputs, chunks = [], []
    for name, binary in wanted:
        array = np.ascontiguousarray(results[name])
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPES.get(dtypes.get(name, ""), None)
                                 or DATATYPES[array.dtype.name], "shape": list(array.shape)}
        if binary:
            data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            if entry["datatype"] == "BF16":
                array = array.astype(np.float32)
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, allow_nan=True, separators=(",", ":")).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
