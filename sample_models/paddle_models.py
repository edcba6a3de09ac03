"""Paddle samples: LeNet (``x: float32[batch,1,28,28]``) and a small CNN with BatchNorm and
Dropout (``x: float32[batch,3,32,32]``), trained a few steps on synthetic data, plus helpers
that save a model in every way Paddle users do (see :func:`save_everything`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "No ccache found" at import: noise for users of the samples
    import paddle
    from paddle import nn

NUM_CLASSES = 10
LENET_SPEC = "x:float32[batch,1,28,28]"
CNN_SPEC = "x:float32[batch,3,32,32]"


class LeNet(nn.Layer):
    """LeNet-5 for 28x28 grey images."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(1, 6, 3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2D(2, 2),
            nn.Conv2D(6, 16, 5, stride=1, padding=0), nn.ReLU(), nn.MaxPool2D(2, 2))
        self.fc = nn.Sequential(nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, num_classes))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.flatten(self.features(x), 1))


class SmallCNN(nn.Layer):
    """Conv-BN-ReLU x2, Dropout, linear head, for 32x32 RGB images."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(), nn.MaxPool2D(2),
            nn.Conv2D(8, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU(), nn.AdaptiveAvgPool2D(4))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(16 * 16, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.dropout(paddle.flatten(self.features(x), 1)))


class ExpandHead(nn.Layer):
    """A head whose legacy (.pdmodel) program paddle2onnx 2.1 cannot convert (it crashes on the
    ``expand_v2`` of a shape slice); the PIR program of the same Layer converts fine."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(x.flatten(1)) + paddle.ones([1]).expand([paddle.shape(x)[0], 3])


class CumprodHead(nn.Layer):
    """Uses ``cumprod``, an op paddle2onnx 2.1 has no converter for (it aborts the process)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.cumprod(self.fc(x), dim=1)


class UpsampleHead(nn.Layer):
    """Bilinear upsampling by a scale factor: Paddle Inference's oneDNN path (3.3) rejects its
    PIR attribute at the first run ("ConvertPirAttribute2RuntimeAttribute not support"); the
    runner must retry without oneDNN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 4, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="bilinear"))


def build_lenet() -> LeNet:
    """Builder for ``--builder sample_models.paddle_models:build_lenet``."""
    return LeNet()


def build_cnn() -> SmallCNN:
    """Builder for ``--builder sample_models.paddle_models:build_cnn``."""
    return SmallCNN()


def build_cnn_model() -> paddle.Model:
    """A builder that returns a ``paddle.Model`` (the exporter takes its network)."""
    return paddle.Model(SmallCNN(), inputs=[paddle.static.InputSpec([None, 3, 32, 32], "float32", "x")])


def synthetic(shape: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose label is the quadrant with the brightest mean (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype("float32")
    h, w = shape[-2] // 2, shape[-1] // 2
    quads = np.stack([x[..., :h, :w].mean((1, 2, 3)), x[..., :h, w:].mean((1, 2, 3)),
                      x[..., h:, :w].mean((1, 2, 3)), x[..., h:, w:].mean((1, 2, 3))], 1)
    return x, quads.argmax(1).astype("int64")


def train(model: nn.Layer, shape: tuple[int, ...], *, steps: int = 5, batch: int = 16, seed: int = 0,
          optimizer: Any = None) -> Any:
    """A few Adam steps on synthetic data; returns the optimizer (its state is saved too)."""
    paddle.seed(seed)
    x, y = synthetic(shape, steps * batch, seed)
    opt = optimizer or paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters())
    model.train()
    for step in range(steps):
        xb = paddle.to_tensor(x[step * batch:(step + 1) * batch])
        yb = paddle.to_tensor(y[step * batch:(step + 1) * batch])
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.clear_grad()
    model.eval()
    return opt


def train_lenet(seed: int = 0, steps: int = 5) -> tuple[LeNet, np.ndarray, Any]:
    """(trained LeNet in eval mode, example inputs [4,1,28,28], its optimizer)."""
    paddle.seed(seed)
    model = LeNet()
    opt = train(model, (1, 28, 28), steps=steps, seed=seed)
    return model, synthetic((1, 28, 28), 4, seed + 1)[0], opt


def train_cnn(seed: int = 0, steps: int = 5) -> tuple[SmallCNN, np.ndarray, Any]:
    """(trained SmallCNN in eval mode, example inputs [4,3,32,32], its optimizer)."""
    paddle.seed(seed)
    model = SmallCNN()
    opt = train(model, (3, 32, 32), steps=steps, seed=seed)
    return model, synthetic((3, 32, 32), 4, seed + 1)[0], opt


def fit_hapi(seed: int = 0, epochs: int = 1, n: int = 64, callbacks: list | None = None,
             eval_data: bool = False) -> paddle.Model:
    """Train SmallCNN with the high-level API (``paddle.Model.fit``) on synthetic data."""
    from paddle.io import TensorDataset

    paddle.seed(seed)
    x, y = synthetic((3, 32, 32), n, seed)
    data = TensorDataset([paddle.to_tensor(x), paddle.to_tensor(y[:, None])])
    model = build_cnn_model()
    model.prepare(paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters()),
                  nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    model.fit(data, eval_data=data if eval_data else None, epochs=epochs, batch_size=16, verbose=0,
              callbacks=callbacks)
    model.network.eval()
    return model


def input_spec(shape: tuple[int | None, ...], name: str = "x") -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec(list(shape), "float32", name)]


def save_everything(model: nn.Layer, opt: Any, shape: tuple[int, ...], work: Path) -> dict[str, Path]:
    """Save ``model`` in every way a Paddle user does; returns a name -> path map.

    Names: ``state_dict`` (.pdparams), ``checkpoint`` (dict with model/optimizer state and epoch,
    plus a .pdopt beside it), ``hapi`` (``paddle.Model.save`` training prefix), ``hapi_infer``
    (``save(training=False)``), ``jit_pir`` (.json), ``jit_legacy`` (.pdmodel), ``static``
    (``paddle.static.save_inference_model``), ``v1_dir`` (Paddle 1.x ``__model__`` folder).
    """
    from runtimes._paddle import ModelFiles, load_program, quiet, static_mode

    work.mkdir(parents=True, exist_ok=True)
    spec = input_spec((None, *shape))
    paths: dict[str, Path] = {}
    model.eval()
    with quiet():
        paddle.save(model.state_dict(), str(work / "weights.pdparams"))
        paths["state_dict"] = work / "weights.pdparams"
        paddle.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 3,
                     "best_acc": 0.5}, str(work / "ckpt.pdparams"))
        paddle.save(opt.state_dict(), str(work / "ckpt.pdopt"))
        paths["checkpoint"] = work / "ckpt.pdparams"
        hapi = paddle.Model(model, inputs=spec)
        hapi.prepare(optimizer=opt)
        hapi.save(str(work / "hapi" / "model"))
        paths["hapi"] = work / "hapi" / "model"
        hapi.save(str(work / "hapi_infer" / "model"), training=False)
        paths["hapi_infer"] = work / "hapi_infer" / "model"
        paddle.jit.save(model, str(work / "jit" / "model"), input_spec=spec)
        paths["jit_pir"] = work / "jit" / "model.json"
        with paddle.pir_utils.OldIrGuard():
            paddle.jit.save(model, str(work / "jit_legacy" / "model"), input_spec=spec)
        paths["jit_legacy"] = work / "jit_legacy" / "model.pdmodel"
        model.eval()
        # paddle.static.save_inference_model on the static program of the jit save.
        files = ModelFiles(paths["jit_pir"], work / "jit" / "model.pdiparams", "pir")
        with static_mode() as exe:
            program, feeds, fetches = load_program(files, exe)
            data = {op.attrs().get("name"): op.result(0) for op in program.global_block().ops
                    if op.name() == "pd_op.data"}
            paddle.static.save_inference_model(str(work / "static" / "model"), [data[n] for n in feeds], fetches,
                                               exe, program=program)
        paths["static"] = work / "static"
        paths["v1_dir"] = _write_v1_dir(paths["jit_legacy"], work / "v1")
    return paths


def _write_v1_dir(legacy_model: Path, folder: Path) -> Path:
    """A Paddle 1.x style folder: ``__model__`` plus one file per parameter (``save_vars``)."""
    import shutil

    from runtimes._paddle import ModelFiles, load_program, static_mode

    folder.mkdir(parents=True, exist_ok=True)
    files = ModelFiles(legacy_model, legacy_model.with_suffix(".pdiparams"), "legacy")
    with static_mode() as exe:
        program, _, _ = load_program(files, exe)
        with paddle.pir_utils.OldIrGuard():
            params = [v for v in program.list_vars() if v.persistable and v.name not in ("feed", "fetch")]
            paddle.static.io.save_vars(exe, str(folder), program, vars=params, filename=None)
    shutil.copy2(legacy_model, folder / "__model__")
    return folder


def save_layer(layer: nn.Layer, shape: tuple[int | None, ...], prefix: Path, legacy: bool = False) -> Path:
    """``paddle.jit.save`` a Layer (legacy .pdmodel under OldIrGuard); returns the program file."""
    from runtimes._paddle import quiet

    layer.eval()
    with quiet():
        if legacy:
            with paddle.pir_utils.OldIrGuard():
                paddle.jit.save(layer, str(prefix), input_spec=input_spec(shape))
        else:
            paddle.jit.save(layer, str(prefix), input_spec=input_spec(shape))
    return Path(str(prefix) + (".pdmodel" if legacy else ".json"))


def demo_lenet(work: Path) -> dict[str, Any]:
    """Demo: LeNet trained a few steps, saved as a .pdparams state_dict, exported with a builder."""
    from runtimes._paddle import quiet

    model, _, _ = train_lenet(steps=5)
    path = work / "lenet.pdparams"
    with quiet():
        paddle.save(model.state_dict(), str(path))
    return {"source": str(path), "builder": "sample_models.paddle_models:build_lenet", "input_spec": [LENET_SPEC],
            "framework": "paddle"}


def demo_cnn(work: Path) -> dict[str, Any]:
    """Demo: SmallCNN trained with paddle.Model.fit, saved with paddle.Model.save (training checkpoint)."""
    model = fit_hapi(epochs=1, n=32)
    from runtimes._paddle import quiet

    with quiet():
        model.save(str(work / "cnn"))
    return {"source": str(work / "cnn.pdparams"), "builder": "sample_models.paddle_models:build_cnn",
            "input_spec": [CNN_SPEC], "framework": "paddle"}
