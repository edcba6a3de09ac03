"""The fidelity engine behind ``packager verify``.

- :mod:`packager.fidelity.metrics`: per-output figures and tolerances (numpy only).
- :mod:`packager.fidelity.contract`: output/input contract checks against the signature.
- :mod:`packager.fidelity.onnx_checks`: ``onnx.checker``, shape inference, IR/opset support.
- :mod:`packager.fidelity.sweep`: the shape sweep plan and sweep inputs.
- :mod:`packager.fidelity.report`: the report models (what the writers read).
- :mod:`packager.fidelity.report_text` / :mod:`packager.fidelity.report_html` /
  :mod:`packager.fidelity.report_junit`: report writers.

The orchestration lives in :mod:`packager.verifying`. Nothing here imports a framework at
module import time.
"""
