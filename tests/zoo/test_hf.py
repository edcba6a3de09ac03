"""BERT with tokenizer-order inputs: package outputs must equal model(**feeds)."""
import numpy as np
import pytest

from tests.zoo.models import bert_feeds, tiny_bert

ATOL = 1e-4  # float32, hidden states of scale ~1


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_bert_tokenizer_order(tmp_path, fmt):
    import torch
    import packager
    import runtimes

    model = tiny_bert()
    feeds = bert_feeds(2, 8)
    packager.export(model, feeds, out=tmp_path / "pkg", formats=[fmt],
                    input_spec=["input_ids:int64[batch,seq=1..32]@0:100",
                                "token_type_ids:int64[batch,seq=1..32]@0:2",
                                "attention_mask:int64[batch,seq=1..32]@0:2"])
    assert packager.verify(str(tmp_path / "pkg"))
    fresh = bert_feeds(3, 12, seed=1)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in fresh.items()}).last_hidden_state.numpy()
    with runtimes.load(str(tmp_path / "pkg"), format=fmt) as runner:
        got = runner.run(fresh)
    out = got["last_hidden_state"]  # the output name the model gives it, not a guess
    assert np.max(np.abs(out - ref)) <= ATOL
