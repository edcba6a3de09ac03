"""Tiny Keras models for the mutation suite (TensorFlow part): a correct one and broken variants.

Keras is channels-last: the correct signature is ``image: float32[batch,8,8,3]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtimes._tf import import_tf

tf = import_tf()
keras = tf.keras
layers = keras.layers
IMAGE = (8, 8, 3)
CLASSES = 5


def build(kind: str = "good", seed: int = 0, stats: Any = None) -> Any:
    """The correct CNN (``kind="good"``) or a broken variant of it, with seeded weights.

    Kinds: ``dropout`` (a random mask, what survives of a Dropout left training: Keras' own
    Dropout follows the serving call's training=False), ``batchnorm`` (normalises with the
    batch's statistics, for the same reason written out), ``fixed_batch`` (Input with
    batch_size=4), ``channels_first`` (expects NCHW), ``float16`` (computes in float16, float32
    at the boundary), ``two_outputs`` and ``one_output``.

    Args:
        stats: The correct model's BatchNorm (gamma, beta) for ``batchnorm``.
    """
    keras.utils.set_random_seed(seed)
    if kind in ("two_outputs", "one_output"):
        x = keras.Input((12,), name="x")
        h = layers.Dense(8, activation="tanh", name="embedding")(x)
        scores = layers.Dense(3, name="scores")(h)
        return keras.Model(x, scores if kind == "one_output" else [scores, h], name=f"tf_{kind}")
    shape = (3, 8, 8) if kind == "channels_first" else IMAGE
    image = keras.Input(shape, name="image", batch_size=4 if kind == "fixed_batch" else None)
    x = layers.Permute((2, 3, 1))(image) if kind == "channels_first" else image
    dtype = "float16" if kind == "float16" else None
    x = layers.Conv2D(6, 3, padding="same", dtype=dtype)(x)
    if kind == "batchnorm":
        gamma, beta = stats
        x = layers.Lambda(lambda t: tf.nn.batch_normalization(t, *tf.nn.moments(t, axes=[0, 1, 2]), beta, gamma,
                                                               1e-3))(x)
    else:
        x = layers.BatchNormalization(dtype=dtype)(x)
    x = layers.ReLU(dtype=dtype)(x)
    x = layers.MaxPooling2D(dtype=dtype)(x)
    x = layers.Flatten(dtype=dtype)(x)
    if kind == "dropout":
        x = layers.Lambda(lambda t: t * tf.cast(tf.random.uniform(tf.shape(t)) > 0.5, t.dtype) * 2.0)(x)
    else:
        x = layers.Dropout(0.5)(x)
    logits = layers.Dense(CLASSES, name="logits16" if dtype else "logits", dtype=dtype)(x)
    if dtype:
        logits = layers.Activation("linear", dtype="float32", name="logits")(logits)
    model = keras.Model(image, logits, name=f"tf_{kind}")
    if kind == "good":
        bn = next(layer for layer in model.layers if isinstance(layer, layers.BatchNormalization))
        rng = np.random.default_rng(seed)
        gamma, beta, mean, var = bn.get_weights()
        bn.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.uniform(-0.2, 0.2, beta.shape),
                        rng.uniform(-0.5, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
        head = model.get_layer("logits")
        kernel, bias = head.get_weights()
        head.set_weights([kernel * 4.0, bias])  # scores of order 1
    return model


def bn_affine(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """(gamma, beta) of the model's BatchNorm."""
    gamma, beta, _mean, _var = next(l for l in model.layers if isinstance(l, layers.BatchNormalization)).get_weights()
    return gamma, beta


def broken(kind: str, good: Any) -> Any:
    """A broken variant carrying the correct model's weights."""
    if kind == "weight":
        return perturbed(good)
    model = build(kind, stats=bn_affine(good) if kind == "batchnorm" else None)
    return copy_weights(good, model, skip_bn_stats=kind == "batchnorm")


def copy_weights(source: Any, target: Any, skip_bn_stats: bool = False) -> Any:
    """Give a broken variant the correct model's weights (layers with weights, in order)."""
    src = [layer for layer in source.layers if layer.get_weights()]
    if skip_bn_stats:
        src = [layer for layer in src if not isinstance(layer, layers.BatchNormalization)]
    dst = [layer for layer in target.layers if layer.get_weights()]
    for a, b in zip(src, dst):
        b.set_weights([np.asarray(w, dtype=v.dtype) for w, v in zip(a.get_weights(), b.get_weights())])
    return target


def perturbed(model: Any, rel: float = 1e-3) -> Any:
    """A clone whose first conv kernel is scaled by ``1 + rel``."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    conv = next(layer for layer in clone.layers if isinstance(layer, layers.Conv2D))
    kernel, bias = conv.get_weights()
    conv.set_weights([kernel * (1.0 + rel), bias])
    return clone


def image_inputs(seed: int = 0, batch: int = 4, channels_first: bool = False) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((batch, *IMAGE)).astype(np.float32)
    return {"image": np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if channels_first else x}
