"""Property-based bad input (issue 7): fuzzed manifests and feeds never reach the user as a
traceback; every rejected case is a PackagerError with exit code 2 naming the problem, and
every accepted feed gives the same outputs as its plain contiguous native-endian copy."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from packager.errors import ExitCode, FeedError, PackagerError
from packager.manifest import MANIFEST_NAME, SCHEMA_VERSION, parse_manifest
from tests._integrity import copy_package, tiny_torch_package

# Each manifest example runs two CLI commands and a runtime load: 50 examples keep the default
# suite within its budget; PACKAGER_FUZZ_EXAMPLES=500 for a deeper run.
FUZZ = settings(max_examples=int(os.environ.get("PACKAGER_FUZZ_EXAMPLES", "50")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def onnx_pkg(session_dir: Path) -> Path:
    return tiny_torch_package(session_dir, ("onnx",))


@pytest.fixture(scope="module")
def scratch(onnx_pkg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One package copy whose manifest.json each example overwrites (files stay intact)."""
    return copy_package(onnx_pkg, tmp_path_factory.mktemp("fuzz") / "pkg")


@pytest.fixture(scope="module")
def base_manifest(onnx_pkg: Path) -> dict:
    return json.loads((onnx_pkg / MANIFEST_NAME).read_text())


def cli(*args: str) -> tuple[int, str]:
    """The real CLI entry point in-process (fast enough for hundreds of examples)."""
    from packager.cli import main

    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(list(args))
    return code, stderr.getvalue()


# --- manifests ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
    | st.sampled_from(["", "../../etc/passwd", "/abs/path", "a\x00b", "x" * 5000, "é∂ƒ", "0" * 64, "f" * 64]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


@st.composite
def mutated_manifests(draw: st.DrawFn, base: dict) -> Any:
    doc = copy.deepcopy(base)
    kind = draw(st.sampled_from(["delete", "replace", "replace", "schema", "oversize", "whole", "add"]))
    paths = _paths(doc)
    if kind == "whole":
        return draw(json_values)
    if kind == "schema":
        doc["schema_version"] = draw(st.integers(min_value=-(2**64), max_value=2**64) | st.none() | st.booleans()
                                     | st.text(max_size=5) | st.floats() | st.just(SCHEMA_VERSION + 1))
        return doc
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "replace":
        parent[path[-1]] = draw(json_values)
    elif kind == "oversize":
        parent[path[-1]] = draw(st.sampled_from(["x" * 200_000, list(range(50_000)), 10**400 // 10**380,
                                                  {f"k{i}": i for i in range(5000)}]))
    else:  # an unknown field where extra="forbid"
        if isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return doc


def _accepts(doc: Any) -> bool:
    try:
        parse_manifest(doc)
        return True
    except PackagerError:
        return False


def test_manifest_fuzz_never_crashes(base_manifest: dict, scratch: Path) -> None:
    seen: dict[str, int] = {"rejected": 0, "accepted": 0}

    @FUZZ
    @given(doc=mutated_manifests(base_manifest))
    def check(doc: Any) -> None:
        text = json.dumps(doc, allow_nan=True)
        (scratch / MANIFEST_NAME).write_text(text)
        for args in (["verify", "--integrity-only"], ["inspect"]):
            code, err = cli(*args, str(scratch))
            assert code != ExitCode.INTERNAL, err
            assert "Traceback" not in err
            if code != 0:
                assert code == ExitCode.USAGE, err
                assert "manifest.json" in err or "package file" in err, err
        if code == 0:
            seen["accepted"] += 1
        else:
            seen["rejected"] += 1
        # The API: a PackagerError (exit code 2) or a runner, never anything else.
        import runtimes

        try:
            runtimes.load(scratch).close()
        except PackagerError as exc:
            assert exc.exit_code in (ExitCode.USAGE, ExitCode.RUNTIME), exc.message

    check()
    assert seen["rejected"] > 10  # the fuzzer does reach the error paths


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe\x00garbage", b"[1, 2]", b'"text"', b"null", b"1e999",
                                 b'{"schema_version": 1' + b" " * 100, b'{"schema_version": 99, "name": "x"}'])
def test_unparseable_manifests(raw: bytes, scratch: Path, base_manifest: dict) -> None:
    (scratch / MANIFEST_NAME).write_bytes(raw)
    try:
        code, err = cli("verify", "--integrity-only", str(scratch))
        assert code == ExitCode.USAGE and "manifest.json" in err and "Traceback" not in err, err
        if raw.startswith(b'{"schema_version": 99'):
            assert "99" in err and f"<= {SCHEMA_VERSION}" in err
    finally:
        (scratch / MANIFEST_NAME).write_text(json.dumps(base_manifest))


def test_oversized_manifest_is_refused_before_parsing(scratch: Path, base_manifest: dict) -> None:
    from packager.manifest import MAX_MANIFEST_BYTES

    with open(scratch / MANIFEST_NAME, "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    try:
        code, err = cli("inspect", str(scratch))
        assert code == ExitCode.USAGE and "too large" in err
    finally:
        (scratch / MANIFEST_NAME).write_text(json.dumps(base_manifest))


# --- feeds --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(onnx_pkg: Path):
    import runtimes

    with runtimes.load(onnx_pkg) as r:
        yield r


dtypes = (hnp.floating_dtypes(endianness="?") | hnp.integer_dtypes(endianness="?") | hnp.boolean_dtypes()
          | hnp.complex_number_dtypes(endianness="?") | hnp.unicode_string_dtypes(max_len=3)
          | hnp.datetime64_dtypes() | st.just(np.dtype(object)))
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple) | st.tuples(st.integers(0, 6), st.just(16))


@st.composite
def feed_cases(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    dtype = draw(st.sampled_from([np.dtype("float32"), np.dtype(">f4")]) | dtypes)
    shape = draw(shapes)
    if dtype.kind == "O":
        array = np.empty(shape, dtype=object)
    else:
        array = draw(hnp.arrays(dtype, shape))
    special = draw(st.sampled_from(["none", "nan", "inf", "-inf"]))
    if special != "none" and dtype.kind == "f" and array.size:
        array.flat[draw(st.integers(0, array.size - 1))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[special]
    layout = draw(st.sampled_from(["c", "fortran", "strided", "transposed"]))
    if layout == "fortran":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        wide = np.repeat(array, 2, axis=-1)
        array = wide[..., ::2]
    elif layout == "transposed" and array.ndim >= 2:
        array = np.ascontiguousarray(np.swapaxes(array, -1, -2)).swapaxes(-1, -2)
    names = draw(st.sampled_from([["x"], ["x"], ["X"], ["x", "y"], [], ["input"]]) | st.lists(st.text(max_size=4),
                                                                                         max_size=2))
    feeds: Any = {name: array for name in names}
    container = draw(st.sampled_from(["dict", "dict", "list", "array", "none"]))
    if container == "list":
        feeds = list(feeds.values())
    elif container == "array":
        feeds = array
    elif container == "none":
        feeds = None
    return feeds, special


@FUZZ
@given(case=feed_cases())
def test_feed_fuzz(runner: Any, case: tuple[Any, str]) -> None:
    feeds, special = case
    try:
        outputs = runner.run(feeds)
    except FeedError as exc:
        assert exc.exit_code == ExitCode.USAGE
        assert exc.subject.startswith(("input 'x'", "feeds")), exc.message
        assert exc.expected is not None or exc.fix, exc.message
        return
    # Accepted: it must really have been a valid feed, and the layout/byte order must not matter.
    (array,) = feeds.values()
    assert set(feeds) == {"x"} and array.dtype.kind == "f" and array.dtype.itemsize == 4
    assert array.ndim == 2 and array.shape[1] == 16
    plain = np.ascontiguousarray(array, dtype=np.float32)
    expected = runner.run({"x": plain})["output"]
    assert outputs["output"].shape == (array.shape[0], 4)
    np.testing.assert_array_equal(outputs["output"], expected)
    if special == "none" and array.size and np.isfinite(plain).all():
        assert np.isfinite(outputs["output"]).all()


def test_feed_fuzz_specific_cases(runner: Any) -> None:
    """The cases the issue names, pinned (the fuzzer finds them too, but not on every run)."""
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    expected = runner.run({"x": x})["output"]
    np.testing.assert_array_equal(runner.run({"x": x.astype(">f4")})["output"], expected)  # big-endian
    np.testing.assert_array_equal(runner.run({"x": np.asfortranarray(x)})["output"], expected)
    np.testing.assert_array_equal(runner.run({"x": np.repeat(x, 2, axis=1)[:, ::2]})["output"], expected)
    assert runner.run({"x": np.zeros((0, 16), np.float32)})["output"].shape == (0, 4)  # empty batch
    for bad, words in [({"x": x.astype(np.float64)}, "wrong dtype"), ({"x": x[:, :8]}, "dimension 1"),
                       ({"x": x[0]}, "wrong rank"), ({"y": x}, "names"), ({"x": [[1.0], [1.0, 2.0]]}, "array"),
                       ({"x": x.astype(">f8")}, "wrong dtype")]:
        with pytest.raises(FeedError, match=words):
            runner.run(bad)


@pytest.mark.parametrize("case", ["dtype", "shape", "names", "nan", "inf", "empty", "bigendian", "fortran", "pickle"])
def test_cli_run_bad_feeds(case: str, onnx_pkg: Path, tmp_path: Path) -> None:
    """The same feeds through ``packager run``: exit 2 naming the problem, or a correct result."""
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    path = tmp_path / "in.npz"
    if case == "pickle":
        np.save(tmp_path / "in.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
        path = tmp_path / "in.npy"
    else:
        arrays = {"dtype": {"x": x.astype(np.int64)}, "shape": {"x": x[:, :7]}, "names": {"image": x},
                  "nan": {"x": np.where(x > 1, np.nan, x)}, "inf": {"x": np.where(x > 1, np.inf, x)},
                  "empty": {"x": x[:0]}, "bigendian": {"x": x.astype(">f4")},
                  "fortran": {"x": np.asfortranarray(x)}}[case]
        np.savez(path, **arrays)
    code, err = cli("run", str(onnx_pkg), "-i", str(path), "-o", str(tmp_path / "out.npz"), "-q")
    assert code != ExitCode.INTERNAL and "Traceback" not in err, err
    if case == "bigendian" or (case == "fortran" and code == 0):
        assert code == 0, err
        assert np.load(tmp_path / "out.npz")["output"].shape == (5, 4)
    elif case == "fortran":  # the streaming reader may refuse it, but must say why
        assert code == ExitCode.USAGE and "fortran" in err.lower(), err
    elif case == "empty":
        assert code in (0, ExitCode.USAGE), err
    else:
        assert code == ExitCode.USAGE, err
        assert {"dtype": "dtype", "shape": "dimension", "names": "image", "nan": "NaN", "inf": "inf",
                "pickle": "pickle"}[case].lower() in err.lower(), err

