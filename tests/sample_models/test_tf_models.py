"""Keras samples: deterministic training, and inference mode that really differs from training mode."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from sample_models.tf_models import train_cnn, train_two_tower  # noqa: E402

pytestmark = pytest.mark.tensorflow


@pytest.mark.parametrize("train", [train_cnn, train_two_tower])
def test_training_is_deterministic(train):
    (a, ex_a), (b, ex_b) = train(seed=1, epochs=1, n=64), train(seed=1, epochs=1, n=64)
    for key in ex_a:
        np.testing.assert_array_equal(ex_a[key], ex_b[key])
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_two_tower_train_and_eval_mode_differ(keras_two_tower):
    # BatchNorm (batch statistics) and Dropout make training-mode outputs differ, so an export
    # traced in the wrong mode fails parity. Run on a copy: training=True updates BatchNorm.
    import keras

    model, example = keras_two_tower
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    inputs = [example["image"], example["tabular"]]
    eval_out = copy(inputs, training=False)
    np.testing.assert_array_equal(np.asarray(model(inputs, training=False)[0]), np.asarray(eval_out[0]))
    train_out = copy(inputs, training=True)
    assert np.abs(np.asarray(train_out[0]) - np.asarray(eval_out[0])).max() > 1e-3
