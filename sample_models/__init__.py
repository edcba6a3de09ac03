"""Small real models per framework, trained in seconds on synthetic data, deterministically.

Each framework module exposes builders (``build_*``, usable as ``--builder``) and
``train_*`` functions returning a trained model plus example inputs.
"""
