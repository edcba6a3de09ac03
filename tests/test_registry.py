"""The registry (packager/registry.py) against pyproject.toml, the runner classes and the code."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

from packager import registry
from runtimes.base import Runner, RunnerOptions

ROOT = Path(__file__).resolve().parents[1]


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def _extras() -> dict[str, set[str]]:
    """pip extra -> distributions it installs (extras that include others expanded)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = project["optional-dependencies"]
    out: dict[str, set[str]] = {"": _requirement_names(project["dependencies"])}

    def expand(name: str) -> set[str]:
        names: set[str] = set()
        for req in raw[name]:
            included = re.fullmatch(r"packager\[([\w,]+)\]", req)
            if included:
                for sub in included[1].split(","):
                    names |= expand(sub)
            else:
                names |= _requirement_names([req])
        return names

    for name in raw:
        out[name] = expand(name)
    return out


def _dist(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.mark.parametrize("record", list(registry.RUNTIMES.values()), ids=lambda r: r.name)
def test_each_runtime_is_installed_by_its_extra(record: registry.RuntimeRecord) -> None:
    extras = _extras()
    extra = record.extra or ""
    assert extra in extras, f"{record.name}: extra {record.extra!r} is not in pyproject.toml"
    assert _dist(record.distribution) in extras[extra], f"{record.name}: {record.distribution} not in [{extra}]"
    assert registry.extra_of(record.module) == record.extra


@pytest.mark.parametrize("record", list(registry.FRAMEWORKS.values()), ids=lambda r: r.name)
def test_each_framework_is_installed_by_its_extra(record: registry.FrameworkRecord) -> None:
    extras = _extras()
    assert _dist(record.distribution) in extras[record.extra]
    assert registry.extra_of(record.module) == record.extra
    assert importlib.util.find_spec(record.exporter) is not None


#: Modules an extra installs as a dependency of what it lists (keras 3 comes with tensorflow).
VIA = {"keras": "tensorflow"}


def test_every_module_extra_installs_that_module() -> None:
    extras = _extras()
    for module, extra in registry.MODULE_EXTRAS.items():
        dist = _dist(VIA.get(module) or registry.MODULE_DISTRIBUTIONS.get(module, module))
        assert dist in extras[extra or ""], f"{module}: {dist} is not installed by [{extra or 'core'}]"


def test_every_install_hint_in_the_code_names_an_extra_that_exists() -> None:
    """``pip install 'packager[X]'`` in code and docs: X must be an extra (issue 13: [onnx] was not)."""
    extras = _extras()
    files = [*ROOT.joinpath("packager").rglob("*.py"), *ROOT.joinpath("runtimes").rglob("*.py"),
             ROOT / "README.md", ROOT / "SECURITY.md", *ROOT.joinpath("docs").rglob("*.md")]
    bad = []
    for path in files:
        for match in re.finditer(r"packager\[([\w,]+)\]", path.read_text(encoding="utf-8")):
            bad += [f"{path.relative_to(ROOT)}: {name}" for name in match[1].split(",") if name not in extras]
    assert not bad


@pytest.mark.parametrize("name", list(registry.RUNTIMES))
def test_runner_classes_match_their_records(name: str) -> None:
    record = registry.RUNTIMES[name]
    module_name, cls_name = record.runner.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert issubclass(cls, Runner) and cls.runtime == name
    assert (cls.formats, cls.thread_safe, cls.devices) == (record.formats, record.thread_safe, record.devices)
    assert issubclass(cls.Options, RunnerOptions)
    assert set(record.formats) <= set(registry.FORMATS)


def test_every_format_has_a_runtime_and_derived_tables_agree() -> None:
    import runtimes
    from packager.fidelity import judge
    from packager import verifying

    for fmt in registry.FORMATS:
        assert registry.FORMAT_RUNTIMES[fmt], fmt
    assert runtimes.FORMAT_RUNTIMES is registry.FORMAT_RUNTIMES
    assert set(runtimes.RUNNERS) == set(registry.RUNTIMES)
    assert judge.NATIVE_FORMATS == {"torchscript", "torch_export", "saved_model"}
    # ONNX after the framework formats; the formats converted from an artifact after it.
    assert verifying.REFERENCE_PREFERENCE[0] == "torchscript"
    assert verifying.REFERENCE_PREFERENCE[-3:] == ("onnx", "tflite", "openvino")
    assert registry.DERIVED_FORMATS["onnx"] == ("openvino",) and registry.DERIVED_FORMATS["saved_model"] == ("tflite",)
    assert registry.DERIVED_FORMATS["paddle_legacy"] == ("openvino",)  # OpenVINO reads .pdmodel too
    assert registry.writable_formats(("saved_model", "onnx")) == ("saved_model", "onnx", "tflite", "openvino")
    assert registry.writable_formats(("paddle_legacy", "onnx")) == ("paddle_legacy", "onnx", "openvino")  # once
    assert registry.FORMAT_PREFERENCE[0] == "onnx"
    assert registry.FORMAT_RUNTIMES["paddle_inference"] == ("paddle_inference", "paddle_jit")


@pytest.mark.parametrize("suffix, fmt", [(".onnx", "onnx"), (".pt", "torchscript"), (".pt2", "torch_export"),
                                         (".pdmodel", "paddle_legacy"), (".json", "paddle_inference"),
                                         (".tflite", "tflite"), (".xml", "openvino")])
def test_bare_artifacts_are_detected_by_the_registry_suffixes(tmp_path: Path, suffix: str, fmt: str) -> None:
    import runtimes

    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"")
    assert runtimes.detect_format(path) == fmt


def test_no_module_restates_the_registry_tables() -> None:
    """The tables issue 13 found restated in ~10 places live once, in packager/registry.py."""
    pattern = re.compile(r"^(RUNTIME_EXTRAS|RUNTIME_DISTS|DISTRIBUTIONS|EXTRAS|FORMAT_RUNTIMES|FORMAT_PREFERENCE|"
                         r"REFERENCE_PREFERENCE|NATIVE_FORMATS)\b[^\n=]*= *[\[({\"]", re.M)
    hits = [f"{p.relative_to(ROOT)}: {m[1]}" for p in [*ROOT.joinpath("packager").rglob("*.py"),
                                                       *ROOT.joinpath("runtimes").rglob("*.py")]
            if p.name != "registry.py" for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not hits


def test_a_missing_core_dependency_says_reinstall_not_an_extra() -> None:
    assert registry.install_fix("onnxruntime").startswith("pip install --force-reinstall packager")
    assert registry.install_fix("torch") == "pip install 'packager[torch]'"
    assert registry.install_fix("pyarrow.parquet") == "pip install 'packager[data]'"
