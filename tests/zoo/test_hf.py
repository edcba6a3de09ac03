"""Hugging Face transformers, random-init from configs: every package must compute what
``model(**feeds)`` computes, on a fresh batch with another batch and sequence size.

BERT gets tokenizer-order inputs (``input_ids, token_type_ids, attention_mask``, not
``forward``'s order) and a padded row: a positional binding would feed the mask to the token
types. GPT-2 runs without a cache, its mask all ones: with a random 0/1 mask a causal row can
have every key masked, where eager attention and ONNX Runtime legitimately differ (a softmax
over nothing). The T5 encoder gets BERT's padded row (its relative-position bias added under
the mask); the Whisper encoder takes ``input_features[batch, mel, 2*max_source_positions]``, the
frame count fixed by its position table, so only the batch varies.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from tests.zoo import models as Z

ATOL = 1e-4  # float32 hidden states of scale ~1


def _ids(batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(1, 100, (batch, seq), dtype=np.int64)


def _text(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": _ids(batch, seq, rng), "attention_mask": np.ones((batch, seq), np.int64)}


def _t5(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    feeds = Z.bert_feeds(batch, seq, seed)  # a padded row: T5's relative-position bias under a mask
    return {"input_ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"]}


def _audio(batch: int, _seq: int, seed: int) -> dict[str, np.ndarray]:
    shape = (batch, Z.WHISPER_MEL_BINS, Z.WHISPER_FRAMES)  # Whisper's frame count is fixed by its positions
    return {"input_features": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _image(batch: int, _seq: int, seed: int) -> dict[str, np.ndarray]:
    return {"pixel_values": np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)}


TEXT_SPEC = ["input_ids:int64[batch,seq=1..32]@0:100", "attention_mask:int64[batch,seq=1..32]@1:2"]
MODELS: dict[str, tuple[Callable, Callable, list[str]]] = {
    "bert": (Z.tiny_bert, Z.bert_feeds, ["input_ids:int64[batch,seq=1..32]@0:100",
                                         "token_type_ids:int64[batch,seq=1..32]@0:2",
                                         "attention_mask:int64[batch,seq=1..32]@0:2"]),
    "distilbert": (Z.tiny_distilbert, _text, TEXT_SPEC),
    "gpt2": (Z.tiny_gpt2, _text, TEXT_SPEC),
    "vit": (Z.tiny_vit, _image, ["pixel_values:float32[batch,3,32,32]"]),
    "t5_encoder": (Z.tiny_t5_encoder, _t5, ["input_ids:int64[batch,seq=1..32]@0:100",
                                            "attention_mask:int64[batch,seq=1..32]@0:2"]),
    "whisper_encoder": (Z.tiny_whisper_encoder, _audio,
                        [f"input_features:float32[batch,{Z.WHISPER_MEL_BINS},{Z.WHISPER_FRAMES}]"]),
}
CASES = [("bert", "onnx"), ("bert", "torchscript"), ("bert", "torch_export"), ("distilbert", "onnx"),
         ("distilbert", "torch_export"), ("gpt2", "onnx"), ("gpt2", "torch_export"), ("vit", "onnx"),
         ("vit", "torch_export"), ("t5_encoder", "onnx"), ("t5_encoder", "torchscript"),
         ("t5_encoder", "torch_export"), ("whisper_encoder", "onnx"), ("whisper_encoder", "torchscript"),
         ("whisper_encoder", "torch_export"),
         # OpenVINO IR, converted from each model's ONNX artifact (added to the package).
         ("bert", "openvino"), ("distilbert", "openvino"), ("gpt2", "openvino"), ("vit", "openvino"),
         ("t5_encoder", "openvino"), ("whisper_encoder", "openvino")]


@pytest.mark.parametrize("name, fmt", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_package_computes_what_the_model_computes(tmp_path, name, fmt):
    import torch

    import packager
    import runtimes

    build, feeds, spec = MODELS[name]
    model = build()
    result = packager.export(model, feeds(2, 8, 0), out=tmp_path / "pkg", formats=[fmt], input_spec=spec)
    assert result.passed
    report = packager.verify(str(tmp_path / "pkg"))  # the golden case, the shape sweep, batch consistency
    assert report.exit_code == 0, [(r.format, r.verdict, r.worst, r.contract) for r in report.rows]
    fresh = feeds(3, 12, 1)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in fresh.items()}).last_hidden_state.numpy()
    with runtimes.load(str(tmp_path / "pkg"), format=fmt) as runner:
        got = runner.run(fresh)
    out = got["last_hidden_state"]  # the output name the model gives it, not a guess
    assert out.shape == ref.shape and np.max(np.abs(out - ref)) <= ATOL
