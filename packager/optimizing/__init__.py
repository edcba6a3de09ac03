"""Optimised artifacts (fp16, int8) under an accuracy budget: ``packager optimize``.

:func:`optimize` (in :mod:`packager.optimizing.core`) orchestrates; one module per optimised
format converts (``onnx_fp16``, ``onnx_int8``, ``openvino_int8``, named by the registry);
:mod:`packager.optimizing.localize` finds where two ONNX graphs of a model part.
"""

from packager.optimizing.core import Attempt, OptimizeResult, optimize, target_format

__all__ = ["Attempt", "OptimizeResult", "optimize", "target_format"]
