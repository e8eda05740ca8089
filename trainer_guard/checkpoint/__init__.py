"""A checkpoint directory as trainer_guard writes and checks it, one module per concept.

- :mod:`~trainer_guard.checkpoint.manifest`: the manifest schema (build, write, read, compare); no ranks.
- :mod:`~trainer_guard.checkpoint.writer`: the threaded writer a save hands its manifests to.
- :mod:`~trainer_guard.checkpoint.stored`: what a weight directory stores, from its safetensors headers.
- :mod:`~trainer_guard.checkpoint.saved`: what a ``Trainer`` save of a model writes (names, ties, adapter layout).
- :mod:`~trainer_guard.checkpoint.reconcile`: a save's files against the model, a loaded model against a manifest.
- :mod:`~trainer_guard.checkpoint.verify`: a directory checked on disk without a model (``doctor`` and the resume
  check both call it).

File names and layout come from :mod:`trainer_guard.files`, the safetensors format from
:mod:`trainer_guard.formats.safetensors`.
"""
