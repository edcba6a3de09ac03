"""Exporter options (issue 13 A): declared with types per framework exporter, strings parse by type
("false" is False), an unknown option or a bad value is one usage error (exit 2) naming the options."""

from pathlib import Path

import numpy as np
import pytest

import packager
from packager.errors import UsageError
from packager.exporters import paddle as paddle_exporter
from packager.exporters import parse_exporter_options
from packager.exporters import pytorch as torch_exporter
from packager.exporters import tensorflow as tf_exporter
from tests.conftest import run_cli

MLP = "sample_models.torch_models:build_mlp"


def _frozen(model_pt: Path) -> bool:
    """Whether a saved TorchScript module was ``torch.jit.freeze``-d: freezing inlines the weights
    as constants, so the module keeps no parameters and its graph reads none (no prim::GetAttr)."""
    import torch

    module = torch.jit.load(str(model_pt))
    graph = str(module.graph)
    params = dict(module.named_parameters())
    if params:  # not frozen: the weights are attributes the graph reads
        assert "prim::GetAttr" in graph, graph
        return False
    assert "prim::GetAttr" not in graph, graph
    return True


# --- parsing by the declared types (no framework import) ------------------------------------
@pytest.mark.parametrize("framework, module, given, expected", [
    ("torch", torch_exporter, {"torchscript_freeze": "false"}, {"torchscript_freeze": False}),
    ("torch", torch_exporter, {"torchscript_freeze": "False"}, {"torchscript_freeze": False}),
    ("torch", torch_exporter, {"torchscript_freeze": "0"}, {"torchscript_freeze": False}),
    ("torch", torch_exporter, {"torchscript_freeze": "true"}, {"torchscript_freeze": True}),
    ("torch", torch_exporter, {"torchscript_freeze": True}, {"torchscript_freeze": True}),
    ("torch", torch_exporter, {}, {"torchscript_freeze": False, "torchscript_mode": "trace"}),
    ("torch", torch_exporter, {"torchscript_mode": "script"}, {"torchscript_mode": "script"}),
    ("paddle", paddle_exporter, {"paddle2onnx_timeout": "600"}, {"paddle2onnx_timeout": 600.0}),
    ("paddle", paddle_exporter, {"paddle2onnx_timeout": "0.3"}, {"paddle2onnx_timeout": 0.3}),
    ("paddle", paddle_exporter, {}, {"paddle2onnx_timeout": 600.0}),
    ("tensorflow", tf_exporter, {"monitor": "val_loss", "mode": "max"}, {"monitor": "val_loss", "mode": "max"}),
    ("tensorflow", tf_exporter, {}, {"monitor": None, "mode": None}),
])
def test_values_parse_by_declared_type(framework, module, given, expected):
    parsed = parse_exporter_options(framework, module.Options, given).model_dump()
    assert {k: parsed[k] for k in expected} == expected
    assert type(parsed.get("paddle2onnx_timeout", 0.0)) is float


@pytest.mark.parametrize("framework, module, given, fragments", [
    ("torch", torch_exporter, {"torchscript_freze": "true"},
     ["'torchscript_freze' is not an option of the torch exporter", "torchscript_freeze (bool",
      "torchscript_mode (trace|script", "spell it 'torchscript_freeze'"]),
    ("torch", torch_exporter, {"torchscript_freeze": "maybe"}, ["'torchscript_freeze'", "'maybe'", "(bool"]),
    ("torch", torch_exporter, {"torchscript_mode": "compile"}, ["'torchscript_mode'", "'compile'", "trace|script"]),
    ("paddle", paddle_exporter, {"paddle2onnx_timeout": "ten"}, ["'paddle2onnx_timeout'", "'ten'", "(float"]),
    ("paddle", paddle_exporter, {"paddle2onnx_timeout": "0"}, ["'paddle2onnx_timeout'", "greater than 0"]),
    ("tensorflow", tf_exporter, {"mode": "best"}, ["'mode'", "'best'", "min|max"]),
    # --torchscript-mode means nothing to a Keras model: said, not ignored.
    ("tensorflow", tf_exporter, {"torchscript_mode": "trace"},
     ["'torchscript_mode' is not an option of the tensorflow exporter", "monitor (str | None"]),
])
def test_unknown_option_or_bad_value_is_a_usage_error(framework, module, given, fragments):
    with pytest.raises(UsageError) as info:
        parse_exporter_options(framework, module.Options, given)
    assert info.value.exit_code == 2
    assert info.value.subject == f"{framework} exporter options"
    assert info.value.fix and "--option KEY=VALUE" in info.value.fix
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


# --- torchscript_freeze through the real export ------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    from sample_models.torch_models import train_mlp

    return train_mlp(steps=2)


@pytest.mark.parametrize("value, frozen", [("false", False), ("true", True), (None, False), (False, False),
                                           (True, True)])
def test_api_torchscript_freeze(mlp, tmp_path, value, frozen):
    model, example = mlp
    options = {} if value is None else {"torchscript_freeze": value}
    result = packager.export(model, example, out=tmp_path / "p", formats=["torchscript"], options=options)
    assert result.passed
    assert _frozen(result.path / "torchscript" / "model.pt") is frozen


def test_api_typo_fails_before_anything_is_written(mlp, tmp_path):
    model, example = mlp
    with pytest.raises(UsageError, match="'torchscript_freez' is not an option of the torch exporter"):
        packager.export(model, example, out=tmp_path / "p", options={"torchscript_freez": "true"})
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def weights(mlp, tmp_path_factory):
    import torch

    model, example = mlp
    folder = tmp_path_factory.mktemp("options")
    torch.save(model.state_dict(), folder / "w.pth")
    np.savez(folder / "ex.npz", **example)
    return folder


def _export_args(weights: Path, out: Path, *extra: str) -> list[str]:
    return ["export", str(weights / "w.pth"), "--builder", MLP, "--example-inputs", str(weights / "ex.npz"),
            "--formats", "torchscript", "--out", str(out), *extra]


@pytest.mark.parametrize("value, frozen", [("false", False), ("true", True)])
def test_cli_torchscript_freeze(weights, tmp_path, value, frozen):
    """``--option torchscript_freeze=false`` froze before the fix (the string 'false' is truthy)."""
    proc = run_cli(*_export_args(weights, tmp_path / "p", "--option", f"torchscript_freeze={value}"))
    assert proc.returncode == 0, proc.stderr
    assert _frozen(tmp_path / "p" / "torchscript" / "model.pt") is frozen


@pytest.mark.parametrize("option, fragments", [
    ("torchscript_freez=true", ["'torchscript_freez' is not an option of the torch exporter",
                                "torchscript_freeze (bool", "torchscript_mode (trace|script", "Fix:"]),
    ("torchscript_freeze=maybe", ["'torchscript_freeze'", "'maybe'", "torchscript_freeze (bool", "Fix:"]),
    ("=true", ["is not KEY=VALUE"]),
    ("torchscript_freeze", ["is not KEY=VALUE"]),
])
def test_cli_bad_option_is_exit_2(weights, tmp_path, option, fragments):
    proc = run_cli(*_export_args(weights, tmp_path / "p", "--option", option))
    assert proc.returncode == 2, proc.stderr
    text = " ".join(proc.stderr.split())
    for fragment in fragments:
        assert fragment in text, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists()


def test_cli_bad_torchscript_mode_is_exit_2(weights, tmp_path):
    proc = run_cli(*_export_args(weights, tmp_path / "p", "--torchscript-mode", "compile"))
    assert proc.returncode == 2, proc.stderr
    assert "'torchscript_mode'" in proc.stderr and "trace|script" in " ".join(proc.stderr.split())
