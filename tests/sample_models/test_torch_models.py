import numpy as np
import pytest
import torch

from sample_models.torch_models import train_cnn, train_transformer

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("train", [train_cnn, train_transformer])
def test_training_is_deterministic(train):
    (a, ex_a), (b, ex_b) = train(seed=1, steps=3), train(seed=1, steps=3)
    for key in ex_a:
        np.testing.assert_array_equal(ex_a[key], ex_b[key])
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_cnn_train_and_eval_mode_differ(torch_cnn):
    # Dropout and BatchNorm make training-mode outputs differ: exporting in the wrong mode shows.
    model, example = torch_cnn
    x = torch.from_numpy(example["x"])
    with torch.no_grad():
        model.train()
        train_out = model(x)
        model.eval()
        eval_out = model(x)
    assert not torch.allclose(train_out, eval_out, atol=1e-3)
