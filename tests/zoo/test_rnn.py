"""Recurrent models per framework over a dynamic sequence axis: a Keras LSTM+GRU stack
(``keras.Input(shape=(None, F))``), a Paddle ``nn.LSTM`` (one and two directions) and a torch
``nn.LSTM``/``nn.GRU`` tagger, each emitting one output per step. Every format the framework
offers is exported, verified (its sweep covers the ``seq`` range) and run at two sequence
lengths other than the example's, judged against the model called the way its users call it
(``model(x, training=False)``, ``model.eval()(x)``)."""
from __future__ import annotations

import numpy as np
import pytest

ATOL = 1e-5  # per-step float32 outputs of scale ~0.1 through two recurrent layers
F = 6  # features per step
SEQS = (5, 17)  # fresh sequence lengths, both unlike the example's 10
SPEC = [f"x:float32[batch,seq=1..64,{F}]"]


def _steps(batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, F)).astype(np.float32)


def _check(pkg, name: str, call) -> None:
    import packager
    import runtimes

    report = packager.verify(str(pkg))
    assert report.exit_code == 0, [(r.format, r.verdict, r.worst, r.contract) for r in report.rows]
    formats = packager.Package(pkg).manifest.formats
    for seq in SEQS:
        fresh = _steps(3, seq, 1)
        ref = call(fresh)
        assert ref.shape == (3, seq, 4) and np.std(ref) > 1e-3
        for fmt in formats:
            with runtimes.load(str(pkg), format=fmt) as runner:
                out = runner.run({name: fresh})["output"]
            assert out.shape == ref.shape and np.max(np.abs(out - ref)) <= ATOL, (fmt, seq)


def test_keras_lstm_gru(tmp_path):
    import packager
    from runtimes._tf import import_tf

    tf = import_tf()
    keras = tf.keras
    keras.utils.set_random_seed(0)  # Keras 3 initialisers use Keras' seed, not TensorFlow's
    # Named: Keras numbers default names per process (input_layer, input_layer_1, ...), so the
    # name would depend on which tests ran before.
    model = keras.Sequential([keras.Input(shape=(None, F), name="steps"), keras.layers.LSTM(16, return_sequences=True),
                              keras.layers.GRU(8, return_sequences=True), keras.layers.Dense(4)])
    # The spec names the sequence axis: from example data alone the exporter fixes every
    # non-batch axis to the example's size (see test_keras_declared_dynamic_axis_from_example).
    packager.export(model, _steps(4, 10, 0), out=tmp_path / "pkg", formats=["saved_model", "onnx"],
                    input_spec=[f"steps:float32[batch,seq=1..64,{F}]"])
    assert packager.Package(tmp_path / "pkg").manifest.formats == ["saved_model", "onnx"]
    _check(tmp_path / "pkg", "steps", lambda x: model(x, training=False).numpy())


# Regression: with example data and no --input-spec the signature used to come from the arrays
# alone, so an axis the Keras model declares dynamic (Input(shape=(None, F))) was frozen at the
# example's length and the package refused any other one.
def test_keras_declared_dynamic_axis_from_example(tmp_path):
    import packager
    from runtimes._tf import import_tf

    keras = import_tf().keras
    model = keras.Sequential([keras.Input(shape=(None, F), name="steps"), keras.layers.GRU(4, return_sequences=True)])
    packager.export(model, {"steps": _steps(2, 10, 0)}, out=tmp_path / "pkg", formats=["saved_model", "onnx"])
    spec = packager.Package(tmp_path / "pkg").manifest.signature.inputs[0]
    assert spec.shape[0] == "batch" and isinstance(spec.shape[1], str) and spec.shape[2] == F, spec.shape
    # Other lengths than the example's load, verify and match the model.
    _check(tmp_path / "pkg", "steps", lambda x: model(x, training=False).numpy())


@pytest.mark.parametrize("direction", ["forward", "bidirect"])
def test_paddle_lstm(tmp_path, direction):
    import packager
    from runtimes._paddle import paddle_module

    paddle = paddle_module()

    class Tagger(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.rnn = paddle.nn.LSTM(F, 16, num_layers=2, direction=direction)
            self.head = paddle.nn.Linear(32 if direction == "bidirect" else 16, 4)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out)

    paddle.seed(0)
    model = Tagger()
    model.eval()
    packager.export(model, {"x": _steps(4, 10, 0)}, out=tmp_path / "pkg", input_spec=SPEC)
    assert packager.Package(tmp_path / "pkg").manifest.formats == ["paddle_inference", "onnx"]
    _check(tmp_path / "pkg", "x", lambda x: model(paddle.to_tensor(x)).numpy())


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_torch_rnn(tmp_path, cell):
    import torch

    import packager

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(F, 16, num_layers=2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out)

    torch.manual_seed(0)
    model = Tagger().eval()
    # torch.export refuses a dynamic seq through nn.LSTM/nn.GRU (a converter limitation, torch
    # 2.13: the RNN kernel specialises the sequence length); the refusal is an honest ExportError.
    from packager.errors import ExportError

    with pytest.raises(ExportError, match=r"fixes axes declared dynamic: input 'x' axis 1 \(seq\) at 10"):
        packager.export(model, {"x": _steps(4, 10, 0)}, out=tmp_path / "te", formats=["torch_export"],
                        input_spec=SPEC)
    packager.export(model, {"x": _steps(4, 10, 0)}, out=tmp_path / "pkg", formats=["onnx", "torchscript"],
                    input_spec=SPEC)
    assert packager.Package(tmp_path / "pkg").manifest.formats == ["onnx", "torchscript"]

    def eager(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    _check(tmp_path / "pkg", "x", eager)
