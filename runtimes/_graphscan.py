"""Refuse artifacts whose graphs can run code or touch files, before a framework runs them.

A package may be written by an attacker with every checksum matching. Checksums prove the
bytes are the ones the manifest lists, not that they are harmless, so each runner scans its
artifact before the first run (``.pt2`` and TorchScript *before* the framework even loads
them, since loading alone runs code in both) and refuses, naming the entry, operator or
method, unless the caller trusts the package (``--trust``, ``trust=True``, or
``PACKAGER_TRUST=1`` for a whole process).

The rules are allowlists where the format allows one (operator namespaces, archive entries,
ONNX domains) with the known file- and process-touching operators of allowed namespaces
removed; see SECURITY.md for the lists. This module imports no framework: the callers pass
the framework objects in, and the archive scans read zip entries and JSON only.
"""

from __future__ import annotations

import ast
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from packager.errors import UnsafeArtifactError

#: ``PACKAGER_TRUST=1`` trusts every artifact this process loads (the CLI's ``--trust`` sets it,
#: so worker processes and Ray tasks it starts inherit the decision).
TRUST_ENV = "PACKAGER_TRUST"


def trusted(trust: bool | None = None) -> bool:
    """``trust`` when given, else the process-wide ``PACKAGER_TRUST`` decision."""
    if trust is not None:
        return bool(trust)
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes"}


def refuse(subject: str, findings: list[str], fix_extra: str = "") -> None:
    """Raise :class:`UnsafeArtifactError` listing ``findings`` (no-op when there are none)."""
    if not findings:
        return
    shown = findings[:8] + ([f"... and {len(findings) - 8} more"] if len(findings) > 8 else [])
    raise UnsafeArtifactError(subject, "holds what would run code or touch files when loaded or run: "
                              + "; ".join(shown),
                              fix="pass --trust (API: trust=True) only if you trust whoever wrote the package"
                                  + fix_extra)


# --- torch --------------------------------------------------------------------------------
#: Operator namespaces a TorchScript or torch.export graph may use. Custom namespaces load from
#: shared libraries or call Python, so they are refused.
TORCH_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized", "mkldnn", "mkldnn_prepacked",
                              "onednn", "quantization", "higher_order", "_operator", "math", "builtins"})
#: Operators of allowed namespaces that read or write files or call Python.
TORCH_FORBIDDEN = frozenset({"aten::from_file", "aten::save", "prim::PythonOp", "prim::IgnoredPythonOp",
                             "debugprims::load_tensor"})
#: A call of an operator in serialized TorchScript code: ``torch.from_file(``, ``ops.ns.op(``.
_TS_TORCH_CALL = re.compile(r"\btorch\.(from_file|save)\s*\(")
_TS_OPS_CALL = re.compile(r"\bops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")


def torchscript_source_findings(path: str | Path) -> list[str]:
    """What the serialized code of a TorchScript archive calls that is not allowed.

    Runs before ``torch.jit.load``: loading runs a module's ``__setstate__`` code.
    """
    findings: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if "/code/" not in f"/{name}" or not name.endswith(".py"):
                    continue
                text = zf.read(name).decode("utf-8", "replace")
                for match in _TS_TORCH_CALL.finditer(text):
                    findings.append(f"operator aten::{match.group(1)} in {name}")
                for match in _TS_OPS_CALL.finditer(text):
                    op = f"{match.group(1)}::{match.group(2)}"
                    if match.group(1) not in TORCH_NAMESPACES or op in TORCH_FORBIDDEN:
                        findings.append(f"operator {op} in {name}")
    except (zipfile.BadZipFile, OSError):
        return []  # not a zip: torch.jit.load reports it
    return sorted(set(findings))


def _op_allowed(kind: str) -> bool:
    namespace = kind.split("::", 1)[0]
    return namespace in TORCH_NAMESPACES and kind not in TORCH_FORBIDDEN


def _nodes(block: Any) -> Iterator[Any]:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)
        if node.hasAttribute("Subgraph"):
            yield from _nodes(node.g("Subgraph"))


def torchscript_module_findings(module: Any) -> list[str]:
    """Disallowed operators in every method of a loaded ScriptModule and its submodules (with
    the functions they call inlined), as ``operator X in method Y``."""
    findings: set[str] = set()
    for prefix, sub in module.named_modules():
        for method in sub._c._method_names():
            try:
                graph = getattr(sub, method).inlined_graph
            except Exception:  # noqa: BLE001 - a method without a graph (e.g. an interface stub)
                continue
            where = f"{prefix}.{method}" if prefix else method
            for node in _nodes(graph):
                if not _op_allowed(node.kind()):
                    findings.add(f"operator {node.kind()} in method {where}")
    return sorted(findings)


#: Archive entries (below the root folder) a ``.pt2`` written by ``torch.export.save`` holds.
_PT2_ENTRIES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                          r"|models/[^/]+\.json|data/weights/weight_\d+|data/weights/[^/]*weights_config\.json"
                          r"|data/constants/tensor_\d+|data/constants/[^/]*constants_config\.json"
                          r"|data/sample_inputs/[^/]+\.pt|extra/[^/]+)")
#: Names a guard expression may use (torch turns guards into Python source and ``exec``s it when
#: the program's module is built): the placeholders and torch's sympy helpers, no builtins.
_GUARD_NAME = re.compile(r"[A-Z][A-Za-z]*|L|math|inf|floor|ceiling|sqrt|cast_symbool_to_symint_guardless")
_GUARD_NODES = (ast.Expression, ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name,
                ast.Load, ast.Attribute, ast.Subscript, ast.Call, ast.Tuple, ast.List, ast.Slice, ast.keyword,
                ast.operator, ast.cmpop, ast.boolop, ast.unaryop)


def guard_is_safe(code: str) -> bool:
    """Whether a guard of a ``.pt2`` is a plain shape comparison (names, no dunder access)."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            return False
        if isinstance(node, ast.Name) and not _GUARD_NAME.fullmatch(node.id):
            return False
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "_" in node.value[:2]:
            return False
    return True


def _fx_targets(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if "target" in value and "inputs" in value and isinstance(value["target"], str):
            yield value["target"]
        for item in value.values():
            yield from _fx_targets(item)
    elif isinstance(value, list):
        for item in value:
            yield from _fx_targets(item)


def _fx_target_allowed(target: str) -> bool:
    if target.startswith("torch.ops."):
        parts = target.split(".")
        return len(parts) >= 4 and _op_allowed(f"{parts[2]}::{parts[3]}")
    return target.split(".", 1)[0] in {"_operator", "math", "builtins"} and "__" not in target


def _pt2_config_findings(name: str, data: bytes) -> list[str]:
    try:
        config = json.loads(data).get("config", {})
    except (ValueError, AttributeError):
        return [f"entry {name} is not a JSON payload config"]
    findings = []
    for fqn, meta in (config.items() if isinstance(config, dict) else []):
        path = str((meta or {}).get("path_name", ""))
        if (meta or {}).get("use_pickle"):
            findings.append(f"entry {name}: {fqn!r} is stored as a pickle (use_pickle)")
        elif not re.fullmatch(r"(weight|tensor)_\d+", path):
            findings.append(f"entry {name}: {fqn!r} is stored as {path!r} (a pickled object)")
    return findings


def _pt2_program_findings(name: str, data: bytes) -> list[str]:
    try:
        program = json.loads(data)
    except ValueError:
        return [f"entry {name} is not JSON"]
    findings = [f"guard {code!r} in {name} is not a plain shape comparison (torch runs guards as Python code)"
                for code in program.get("guards_code") or [] if not (isinstance(code, str) and guard_is_safe(code))]
    graph = (program.get("graph_module") or {}).get("graph") or {}
    if graph.get("custom_obj_values"):
        findings.append(f"custom (pickled) objects in {name}")
    findings += [f"operator {t} in {name}" for t in sorted(set(_fx_targets(program.get("graph_module"))))
                 if not _fx_target_allowed(t)]
    return findings


def pt2_findings(path: str | Path) -> list[str]:
    """What in a ``.pt2`` archive ``torch.export.load`` would unpickle, ``exec`` or call outside
    the allowed operators: checked on the archive's own entries and configs, before torch opens it."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return []  # not a zip: torch.export.load reports it
    findings: list[str] = []
    with zf:
        for info in zf.infolist():
            name = info.filename
            inner = name.split("/", 1)[1] if "/" in name else name
            if info.is_dir():
                continue
            if not _PT2_ENTRIES.fullmatch(inner):
                findings.append(f"entry {name} (not part of a plain torch.export program: pickled objects, "
                                "compiled code or legacy pickles)")
            elif inner.endswith("config.json"):
                findings += _pt2_config_findings(name, zf.read(name))
            elif inner.startswith("models/"):
                findings += _pt2_program_findings(name, zf.read(name))
    return findings


def exported_program_findings(program: Any) -> list[str]:
    """Disallowed operators in a loaded ExportedProgram's graphs (nested graphs included)."""
    findings: set[str] = set()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in getattr(graph, "nodes", ()):
            if node.op != "call_function":
                continue
            target = node.target
            name = getattr(target, "name", None)
            kind = name() if callable(name) else None  # OpOverload: "aten::add.Tensor"
            if kind is not None:
                if not _op_allowed(kind.split(".", 1)[0]):
                    findings.add(f"operator {kind}")
            elif getattr(target, "__module__", "") not in {"_operator", "math", "builtins"}:
                findings.add(f"call {getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}")
    return sorted(findings)



# --- TensorFlow ----------------------------------------------------------------------------
#: Ops that read or write files, map memory from files or call Python: refused anywhere in a
#: SavedModel (TensorFlow has thousands of ops, so this one list is a denylist; the checkpoint
#: ops below are allowed only where the loader's own saver runs them).
TF_FILE_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2", "FixedLengthRecordReader",
    "FixedLengthRecordReaderV2", "TFRecordReader", "TFRecordReaderV2", "LMDBReader", "TFRecordDataset",
    "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2",
    "SaveDataset", "SaveDatasetV2", "LoadDataset", "SnapshotDataset", "SnapshotDatasetV2", "CacheDataset",
    "CacheDatasetV2", "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "CreateSummaryFileWriter",
    "CreateSummaryDbWriter", "DebugIdentityV2", "DebugIdentityV3", "LoadAndRemapMatrix",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "DecodeProtoV2", "PrintV2",
})
#: Checkpoint ops: the SavedModel's own save/restore functions use them (the loader passes the
#: variables path); anywhere else they read or write arbitrary checkpoint files.
TF_CHECKPOINT_OPS = frozenset({"Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
                               "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec"})


def _called_functions(node: Any) -> Iterator[str]:
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func.name
        if value.HasField("list"):
            yield from (f.name for f in value.list.func)


def _closure(roots: Iterable[str], edges: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def saved_model_findings(saved_model: Any) -> list[str]:
    """File-touching or Python-calling ops in a parsed ``saved_model_pb2.SavedModel`` (every
    meta graph, the main graph and every library function), as ``op X in function Y``."""
    findings: set[str] = set()
    for meta in saved_model.meta_graphs:
        graph = meta.graph_def
        library = {f.signature.name: f for f in graph.library.function}
        calls = {name: {c for n in f.node_def for c in [*_called_functions(n), n.op] if c in library}
                 for name, f in library.items()}
        # The saver: main-graph nodes the saver_def names, their inputs, and what they call.
        inputs = {n.name: {i.lstrip("^").split(":")[0] for i in n.input} for n in graph.node}
        roots = {meta.saver_def.save_tensor_name.split(":")[0], meta.saver_def.restore_op_name.split(":")[0]} - {""}
        saver_nodes = _closure(roots, inputs)
        saver_functions = _closure({c for n in graph.node if n.name in saver_nodes
                                    for c in [*_called_functions(n), n.op] if c in library}, calls)
        for node in graph.node:
            _tf_check(node.op, node.name in saver_nodes, f"node {node.name!r}", findings)
        for name, function in library.items():
            for node in function.node_def:
                _tf_check(node.op, name in saver_functions, f"function {name!r}", findings)
    return sorted(findings)


def _tf_check(op: str, in_saver: bool, where: str, findings: set[str]) -> None:
    if op in TF_FILE_OPS or (op in TF_CHECKPOINT_OPS and not in_saver):
        findings.add(f"op {op} in {where}")


# --- Paddle --------------------------------------------------------------------------------
#: Paddle operators that read or write files or call Python (legacy ProgramDesc op types and
#: PIR op names without their dialect prefix).
PADDLE_FILE_OPS = frozenset({"save", "save_combine", "load", "load_combine", "py_func", "read_file",
                             "checkpoint_notify", "recv_save", "save_combine_tensor", "load_combine_tensor"})


def _pir_ops(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("#"), str) and ("I" in value or "O" in value or "A" in value):
            yield value["#"].split(".", 1)[-1]
        for item in value.values():
            yield from _pir_ops(item)
    elif isinstance(value, list):
        for item in value:
            yield from _pir_ops(item)


def paddle_program_findings(model_file: str | Path, program_desc: Any = None) -> list[str]:
    """File-touching ops of a Paddle inference program: a PIR ``.json`` (read here), or a legacy
    ``.pdmodel`` given as an empty ``framework_pb2.ProgramDesc`` to parse into."""
    path = Path(model_file)
    if path.suffix == ".json":
        try:
            program = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return []  # the loader reports what it cannot read
        return sorted({f"op {op} in {path.name}" for op in _pir_ops(program) if op in PADDLE_FILE_OPS})
    if program_desc is None:
        return []
    try:
        program_desc.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError: the loader reports it
        return []
    return sorted({f"op {op.type} in block {block.idx} of {path.name}" for block in program_desc.blocks
                   for op in block.ops if op.type in PADDLE_FILE_OPS})
