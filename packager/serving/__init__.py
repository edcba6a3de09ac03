"""Serving a package: a Triton model repository (:mod:`packager.serving.triton`) and an Open
Inference Protocol server (:mod:`packager.serving.server`).

Both gate dynamic batching on evidence (:mod:`packager.serving.evidence`): rows are merged into
one runtime call only for an artifact whose batched rows equal the same rows run alone, as the
one judge (packager/fidelity/judge.py) measures it on this host.
"""
