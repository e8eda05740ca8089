"""Deprecated location of the checksum: it lives in :mod:`trainer_guard.checksum` now (kept while modules move).

Example:
    >>> from trainer_guard.core.checksum import checksums  # same object as trainer_guard.checksum.checksums
"""

from __future__ import annotations

from ..checksum.cpu import HAVE_NUMBA, word_sum
from ..checksum.disk import (
    SINGLE_FILES,
    as_path,
    duplicate_hint,
    file_checksums,
    index_weight_map,
    safetensors_entries,
    safetensors_paths,
    stored_twice,
)
from ..checksum.spec import CHECKSUM_ALGO, finalize, fingerprint, mix64
from ..checksum.tensors import DTYPE_NAMES, checksums, dtype_name, tensor_checksum
from ..errors import ChecksumError
from ..formats.safetensors import DTYPE_SIZES, safetensors_files

__all__ = [
    "HAVE_NUMBA", "word_sum", "SINGLE_FILES", "as_path", "duplicate_hint", "file_checksums", "index_weight_map",
    "safetensors_entries", "safetensors_paths", "stored_twice", "CHECKSUM_ALGO", "finalize", "fingerprint", "mix64",
    "DTYPE_NAMES", "checksums", "dtype_name", "tensor_checksum", "ChecksumError", "DTYPE_SIZES", "safetensors_files",
]
