"""Keras samples: a CNN with BatchNorm and Dropout, and a two-input/two-output functional model.

Both train for a few seconds on synthetic data. The builders are importable so weights-only
saves can be exported with ``--builder sample_models.tf_models:build_cnn``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtimes._tf import import_keras

keras = import_keras()

NUM_CLASSES = 10
IMAGE = (16, 16, 3)
TABULAR = 8


@keras.saving.register_keras_serializable(package="packager_samples")
class Scale(keras.layers.Layer):
    """A custom layer (multiplies by a constant): its class must be imported to load a save."""

    def __init__(self, factor: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs: Any) -> Any:
        return inputs * self.factor

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}


def build_cnn() -> Any:
    """Conv-BN-ReLU x2, Dropout, dense head; input ``image: float32[batch,16,16,3]`` (NHWC)."""
    layers = keras.layers
    image = keras.Input(IMAGE, name="image")
    x = layers.Conv2D(8, 3, padding="same")(image)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(16, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(image, logits, name="keras_cnn")


def build_two_tower(custom: bool = False) -> Any:
    """Inputs ``image`` [batch,16,16,3] and ``tabular`` [batch,8]; outputs ``class_logits``, ``score``.

    Args:
        custom: Add the custom :class:`Scale` layer (a save then needs ``--trust`` to load).
    """
    layers = keras.layers
    image = keras.Input(IMAGE, name="image")
    tabular = keras.Input((TABULAR,), name="tabular")
    x = layers.Conv2D(8, 3, strides=2, padding="same")(image)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    t = layers.Dense(16, activation="relu")(tabular)
    t = layers.Dropout(0.2)(t)
    if custom:
        t = Scale(0.5)(t)
    h = layers.Concatenate()([x, t])
    class_logits = layers.Dense(3, name="class_logits")(h)
    score = layers.Dense(1, activation="sigmoid", name="score")(h)
    return keras.Model([image, tabular], [class_logits, score], name="keras_two_tower")


def build_two_tower_custom() -> Any:
    return build_two_tower(custom=True)


def cnn_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic images; the label is the brightest channel (x3, to use several classes)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *IMAGE)).astype("float32")
    return x, (x.mean(axis=(1, 2)).argmax(axis=1) * 3).astype("int64")


def two_tower_data(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, *IMAGE)).astype("float32")
    tabular = rng.standard_normal((n, TABULAR)).astype("float32")
    label = image.mean(axis=(1, 2)).argmax(axis=1).astype("int64")
    score = (tabular[:, 0] > 0).astype("float32")[:, None]
    return {"image": image, "tabular": tabular}, {"class_logits": label, "score": score}


def compile_cnn(model: Any) -> Any:
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def compile_two_tower(model: Any) -> Any:
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss={"class_logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        "score": keras.losses.BinaryCrossentropy()})
    return model


def train_cnn(seed: int = 0, epochs: int = 2, n: int = 256, callbacks: list | None = None,
              validation: bool = False) -> tuple[Any, dict[str, np.ndarray]]:
    """Train the CNN briefly; return it with example inputs ``{"image": [4,16,16,3]}``."""
    keras.utils.set_random_seed(seed)
    model = compile_cnn(build_cnn())
    x, y = cnn_data(n, seed)
    val = cnn_data(64, seed + 1) if validation else None
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks or [], validation_data=val)
    return model, {"image": cnn_data(4, seed + 2)[0]}


def train_two_tower(seed: int = 0, epochs: int = 2, n: int = 256, custom: bool = False,
                    callbacks: list | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """Train the two-tower model briefly; return it with example inputs for both inputs."""
    keras.utils.set_random_seed(seed)
    model = compile_two_tower(build_two_tower(custom=custom))
    x, y = two_tower_data(n, seed)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks or [])
    return model, two_tower_data(4, seed + 2)[0]


def demo_cnn(work: Path) -> dict:
    """Train the CNN, save it as a native ``.keras`` file, export from that file."""
    model, example = train_cnn()
    path = work / "keras_cnn.keras"
    model.save(path)
    np.savez(work / "example.npz", **example)
    return {"source": path, "example_inputs": work / "example.npz"}


def demo_two_tower(work: Path) -> dict:
    """Train the two-tower model, save weights only, export with the builder."""
    model, example = train_two_tower()
    path = work / "two_tower.weights.h5"
    model.save_weights(path)
    np.savez(work / "example.npz", **example)
    return {"source": path, "builder": "sample_models.tf_models:build_two_tower",
            "example_inputs": work / "example.npz"}
