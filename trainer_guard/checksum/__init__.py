"""The position-aware 64-bit checksum of a tensor's bytes, identical from a GPU tensor, a CPU tensor and a file.

Layout (one owner each): :mod:`.spec` the definition and its guarantees (a leaf: constants, mix, fold,
fingerprint); :mod:`.cpu` the CPU loop on every core; :mod:`.disk` safetensors files through ``mmap`` (no torch);
:mod:`.tensors` live tensors and the dispatch between the CPU loop and :mod:`.triton`, the fused GPU kernel.

Names load on first use (PEP 562): ``from trainer_guard.checksum import file_checksums`` imports no torch.

Example:
    >>> import torch
    >>> from trainer_guard.checksum import checksums, fingerprint
    >>> sums = checksums({"w": torch.ones(3)}, backend="cpu")
    >>> isinstance(fingerprint(sums), int)
    True
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "CHECKSUM_ALGO": ".spec", "mix64": ".spec", "finalize": ".spec", "fingerprint": ".spec",
    "HAVE_NUMBA": ".cpu", "max_threads": ".cpu", "word_sum": ".cpu", "word_sums": ".cpu",
    "file_checksums": ".disk", "safetensors_entries": ".disk", "index_weight_map": ".disk",
    "DTYPE_NAMES": ".tensors", "dtype_name": ".tensors", "check_tensor": ".tensors", "tensor_checksum": ".tensors",
    "checksums": ".tensors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines public ``name`` on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's attributes plus the public names not loaded yet."""
    return sorted({*globals(), *__all__})
