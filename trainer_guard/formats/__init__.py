"""File formats trainer_guard reads, each owned by one module: :mod:`trainer_guard.formats.safetensors`.

A leaf: these modules import nothing else of the package but :mod:`trainer_guard.errors`, and never torch at import
time (the CLI's ``doctor`` and ``diff`` read checkpoints without it).
"""
