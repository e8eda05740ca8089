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

from ..lazy import lazy_exports

_LAZY: dict[str, str] = {
    "CHECKSUM_ALGO": ".spec", "mix64": ".spec", "finalize": ".spec", "fingerprint": ".spec",
    "HAVE_NUMBA": ".cpu", "max_threads": ".cpu", "word_sum": ".cpu", "word_sums": ".cpu",
    "file_checksums": ".disk", "safetensors_entries": ".disk", "index_weight_map": ".disk",
    "DTYPE_NAMES": ".tensors", "dtype_name": ".tensors", "check_tensor": ".tensors", "tensor_checksum": ".tensors",
    "checksums": ".tensors",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
