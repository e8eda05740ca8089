"""The checksum's definition: constants, the mix, the host-side fold and the model fingerprint (a leaf module).

Both implementations import this and nothing else of the package's checksum code: the CPU loop
(:mod:`trainer_guard.checksum.cpu`, files through :mod:`trainer_guard.checksum.disk`) and the fused Triton kernel
(:mod:`trainer_guard.checksum.triton`). No torch, no numpy: pure Python integers.


Pure functions, no Trainer. Three implementations agree bit for bit: the fused multi-tensor Triton kernel
(:mod:`trainer_guard.checksum.triton`, for CUDA tensors), a CPU loop over a tensor's bytes, and a CPU loop
over a ``.safetensors`` file through ``mmap`` (no copy of the data). The CPU loop is a ``numba`` ``@njit``
function (``nogil``, no fastmath) over a ``uint64`` view; without numba a chunked numpy loop gives the same
values, only slower.

Definition (``CHECKSUM_ALGO = "tg-wsum64-splitmix-v1"``)
--------------------------------------------------------
Take the tensor's row-major bytes (a non-contiguous tensor is read as ``.contiguous()``), ``nbytes`` of them,
zero-padded to a multiple of 8, as little-endian unsigned 64-bit words ``w_0 .. w_{W-1}``
(``W = ceil(nbytes / 8)``). With all arithmetic mod 2^64::

    key(i)  = i * GAMMA                                  (GAMMA = 0x9E3779B97F4A7C15, odd)
    mix(z)  = splitmix64 finaliser:  z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                                     z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
    S       = sum over i of mix(w_i XOR key(i))
    M       = first 8 bytes (little-endian) of BLAKE2b of "tg-wsum64-splitmix-v1|<dtype>|<shape>|<nbytes>"
    checksum(t) = mix(S XOR M)

``<dtype>`` is the safetensors dtype name (``BF16``, ``F32``, ``F8_E4M3``, ... see :data:`DTYPE_NAMES`) and
``<shape>`` is the comma-joined sizes, so a file and a live tensor name a dtype the same way. The word sum does not
depend on the dtype (bytes are bytes), so the GPU kernel and the file loop share it; dtype, shape and byte count
are folded in afterwards, on the host, by ``M``.

Because ``S`` is a plain sum, any split of the words into chunks, in any order, on any number of GPU programs or
CPU threads, gives the same value: chunk ``[a, b)`` contributes ``sum_{a<=i<b} mix(w_i ^ key(i))`` and the
partial sums add. That is what makes a fused, atomics-based GPU kernel deterministic.

Guarantees
----------
*Every change confined to one 64-bit word is detected, with certainty* -- in particular every single-bit flip,
and every swap or change of elements that share a word (4 bf16, 8 int8 values). Proof: ``mix`` is a bijection of
the 64-bit integers (``z -> z ^ (z >> s)`` with ``s > 0`` is inverted by repeated xor-shifts, and multiplication
by an odd constant is invertible mod 2^64), and so is ``z -> z ^ key(i)`` for fixed ``i``. If word ``i`` changes
from ``w`` to ``w' != w`` and nothing else changes, then ``mix(w ^ key(i)) != mix(w' ^ key(i))``, so ``S`` changes
by a non-zero amount mod 2^64, so ``S ^ M`` changes (same ``M``: same dtype, shape, size), so
``checksum = mix(S ^ M)`` changes. The same argument shows that :func:`fingerprint` changes whenever exactly one
tensor's checksum changes. (A flip in the zero padding of the last word is not a change of the tensor: the
padding is not data.)

*Other corruptions are detected with probability about 1 - 2^-64* (treating ``mix`` as a random function): a
swap of two elements in different words (the keys make the contribution depend on the position), a transpose (the
words move; a non-square one also changes ``<shape>``), truncation or padding (``nbytes`` changes ``M`` and words
disappear), a dtype reinterpretation of the same bytes (``<dtype>`` changes ``M``; ``bf16`` vs ``fp16`` of the
same bits differ), a permutation of whole tensors between names (:func:`fingerprint` hashes name and checksum
together). Dtype, shape and size are also kept in plain text in manifests, so those changes are caught exactly.
It is an integrity check against accidents (bit rot, torn writes, wrong loads), not a cryptographic hash: someone
who wants a collision can build one.

Example (the host-side fold, on plain integers; tensors and files: :mod:`trainer_guard.checksum.tensors`,
:mod:`trainer_guard.checksum.disk`):
    >>> s = mix64(0x1234 ^ GAMMA)  # the word sum S of one 8-byte word 0x1234 at position 1 (key(1) = GAMMA)
    >>> finalize(s, "uint8", (8,), 8) != finalize(s, "int8", (8,), 8)  # the same bytes, another dtype name
    True
    >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    True
"""

from __future__ import annotations

import functools
import hashlib
import numbers
from collections.abc import Mapping

from ..errors import ChecksumError

__all__ = ["CHECKSUM_ALGO", "MASK64", "GAMMA", "C1", "C2", "mix64", "meta_key", "finalize", "fingerprint"]

CHECKSUM_ALGO = "tg-wsum64-splitmix-v1"

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
C1 = 0xBF58476D1CE4E5B9
C2 = 0x94D049BB133111EB


def mix64(z: int) -> int:
    """The splitmix64 finaliser on a Python int (a bijection of [0, 2^64)).

    Example:
        >>> mix64(0), mix64(1) != mix64(2)
        (0, True)
    """
    z &= MASK64
    z = ((z ^ (z >> 30)) * C1) & MASK64
    z = ((z ^ (z >> 27)) * C2) & MASK64
    return z ^ (z >> 31)


def meta_key(dtype: str, shape: tuple[int, ...] | list[int], nbytes: int) -> int:
    """``M``: the first 8 bytes (little-endian) of BLAKE2b of ``"<algo>|<dtype>|<shape>|<nbytes>"``.

    Example:
        >>> meta_key("float32", (2,), 8) != meta_key("float32", (1, 2), 8)
        True
    """
    return _meta_key(str(dtype), tuple(int(s) for s in shape), int(nbytes))


@functools.lru_cache(maxsize=65536)
def _meta_key(dtype: str, shape: tuple[int, ...], nbytes: int) -> int:
    """Cached: a model's tensors keep their dtype and shape, so checking them every step hashes each once."""
    text = f"{CHECKSUM_ALGO}|{dtype}|{','.join(map(str, shape))}|{nbytes}"
    return int.from_bytes(hashlib.blake2b(text.encode("ascii"), digest_size=8).digest(), "little")


def finalize(word_sum_: int, dtype: str, shape: tuple[int, ...] | list[int], nbytes: int) -> int:
    """Fold dtype name, shape and byte count into a word sum ``S``: ``mix(S ^ M)`` (see the module docstring).

    Example:
        >>> finalize(0, "float32", (2,), 8) != finalize(0, "int32", (2,), 8)
        True
    """
    return mix64((int(word_sum_) & MASK64) ^ meta_key(dtype, shape, nbytes))


def fingerprint(sums: Mapping[str, int]) -> int:
    """One order-independent 64-bit value for a whole model from its ``name -> checksum`` pairs.

    ``mix(n * GAMMA ^ sum_k mix(H(name_k) ^ checksum_k))`` with ``H`` = 64-bit BLAKE2b of the UTF-8 name. Changing
    exactly one checksum always changes it; renaming, adding, dropping or permuting tensors between names changes
    it with probability ~1 - 2^-64.

    Example:
        >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
        True
        >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"a": 2, "b": 1})
        False
    """
    if not isinstance(sums, Mapping):
        raise ChecksumError(f"fingerprint() needs a mapping of name -> checksum, got {type(sums).__name__}")
    acc = 0
    for name, v in sums.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= int(v) <= MASK64:
            raise ChecksumError(f"fingerprint(): checksum of {name!r} must be an unsigned 64-bit int, got {v!r}")
        h = int.from_bytes(hashlib.blake2b(str(name).encode("utf-8"), digest_size=8).digest(), "little")
        acc += mix64(h ^ int(v))
    return mix64((acc & MASK64) ^ ((len(sums) * GAMMA) & MASK64))
