"""Checksums of live tensors: which tensors can be checksummed, and the dispatch between the CPU loop and the
fused Triton kernel (:func:`checksums`).

Example:
    >>> import torch
    >>> a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    >>> tensor_checksum(a) == tensor_checksum(a.clone())
    True
    >>> tensor_checksum(a) == tensor_checksum(a.t().contiguous().reshape(2, 3))
    False
    >>> sums = checksums({"a": a, "b": a.to(torch.bfloat16)}, backend="cpu")
    >>> sums["a"] == sums["b"]
    False
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ChecksumError
from .cpu import word_sums
from .spec import finalize
from .validate import DTYPE_NAMES, check_tensor, dtype_name, flat_bytes  # noqa: F401  (public here too)

logger = logging.getLogger("trainer_guard")

__all__ = ["DTYPE_NAMES", "dtype_name", "check_tensor", "tensor_bytes", "tensor_checksum", "checksums", "partial_sums"]

def tensor_bytes(name: str, t: torch.Tensor) -> np.ndarray:
    """``t``'s row-major bytes as a flat ``uint8`` numpy array on the host (checked with :func:`check_tensor`)."""
    check_tensor(name, t)
    b = flat_bytes(t)
    if b.device.type != "cpu":
        b = b.cpu()
    return b.numpy()


def tensor_checksum(t: torch.Tensor) -> int:
    """The checksum of one tensor on the CPU path (a CUDA tensor is copied to the host first).

    Example:
        >>> tensor_checksum(torch.zeros(3)) != tensor_checksum(torch.zeros(4))
        True
    """
    return _cpu_checksums({"tensor": t})["tensor"]


def _cpu_checksums(tensors: Mapping[str, torch.Tensor], threads: int | None = None) -> dict[str, int]:
    """Host tensors are summed together on every core; a device tensor is copied to the host and summed one at a
    time (never the whole model on the host at once)."""
    out: dict[str, int] = {}
    host = [n for n, t in tensors.items() if t.device.type == "cpu"]
    groups = [host] + [[n] for n, t in tensors.items() if t.device.type != "cpu"]
    for names in groups:
        bufs = [tensor_bytes(str(n), tensors[n]) for n in names]
        for n, s, b in zip(names, word_sums(bufs, threads=threads), bufs):
            out[n] = finalize(s, DTYPE_NAMES[tensors[n].dtype], tuple(tensors[n].shape), b.size)
    return {n: out[n] for n in tensors}


def checksums(
    tensors: Mapping[str, torch.Tensor], backend: Literal["auto", "triton", "cpu"] = "auto", *,
    threads: int | None = None, cache: dict | None = None,
) -> dict[str, int]:
    """Checksum every tensor of a mapping (e.g. a ``state_dict``); values are unsigned 64-bit ints.

    Args:
        tensors: name -> tensor. Tied entries (two names, one storage) are each checksummed under their name.
        backend: ``"triton"`` runs the fused kernel (all tensors on CUDA, or CPU tensors under
            ``TRITON_INTERPRET=1``); ``"cpu"`` the CPU loop (copies CUDA tensors to the host); ``"auto"`` picks
            triton when every tensor is on CUDA and triton imports, else cpu (and falls back to cpu, with a
            warning, if the kernel fails to compile or launch).
        threads: CPU path: the most threads to use (default every core, capped by ``TRAINER_GUARD_THREADS``).
        cache: triton path: a dict kept by the caller between calls on the same tensors (an audit every step):
            the kernel's launch table is built once (:func:`trainer_guard.checksum.triton.triton_checksums`).

    Raises:
        ChecksumError: an unknown backend, a non-tensor value, a meta/sparse/nested tensor, a dtype with no
            safetensors name, or triton asked for but unusable.

    Example:
        >>> s = checksums({"w": torch.ones(2, 2), "b": torch.zeros(2)}, backend="cpu")
        >>> sorted(s), all(0 <= v < 2**64 for v in s.values())
        (['b', 'w'], True)
    """
    if backend not in ("auto", "triton", "cpu"):
        raise ChecksumError(f"`backend` can be 'auto', 'triton', 'cpu', got {backend!r}")
    if not isinstance(tensors, Mapping):
        raise ChecksumError(f"checksums() needs a mapping of name -> tensor, got {type(tensors).__name__}")
    if cache and backend != "cpu":  # the same tensors as the cached launch table: checked when it was built
        from . import triton as kernel  # lazy: imports triton; a cache only ever holds a plan when it imported

        hit = kernel.cached_plan(tensors, cache)
        if hit is not None:
            return hit.finish(hit.run())
    for name, t in tensors.items():
        check_tensor(str(name), t)
    if not tensors:
        return {}
    out = _by_kernel(tensors, backend, lambda kernel: kernel.triton_checksums(tensors, checked=True, cache=cache))
    return out if out is not None else _cpu_checksums(tensors, threads)


def _by_kernel(tensors: Mapping[str, torch.Tensor], backend: str, run: Any) -> dict[str, int] | None:
    """``run(trainer_guard.checksum.triton)`` where the kernel is to run: ``backend="triton"``, or ``"auto"`` with
    every tensor on CUDA and triton importable; ``None`` where the CPU path is to run instead. Under ``"auto"`` a
    kernel that fails (a GPU triton cannot compile for) falls back to the CPU path (same values) with a warning."""
    if backend == "cpu" or (backend == "auto" and not (
            all(t.device.type == "cuda" for t in tensors.values()) and _triton_importable())):
        return None
    from . import triton as kernel  # lazy: imports triton, which only CUDA tensors need

    if backend == "triton":
        return run(kernel)
    try:
        return run(kernel)
    except ChecksumError:
        raise
    except Exception as e:  # e.g. a GPU triton cannot compile for: same values from the CPU path
        logger.warning(f"trainer_guard: the triton checksum kernel failed ({type(e).__name__}: {e}); "
                       f"using the CPU path (same values, slower). Pass backend='cpu' to skip the kernel.")
        return None


def partial_sums(tensors: Mapping[str, torch.Tensor], first_words: Mapping[str, int], *,
                 backend: Literal["auto", "triton", "cpu"] = "auto", threads: int | None = None) -> dict[str, int]:
    """The word sums ``S`` (not finalised) of each tensor's bytes, placed at word ``first_words[name]`` of its whole
    tensor: one rank's part of a sharded tensor's checksum (the parts of all ranks add up, mod 2**64, to the whole
    tensor's ``S``; :func:`trainer_guard.core.divergence.sharded_checksums` finalises it with the full dtype and
    shape). CUDA shards are summed by the Triton kernel in one launch (no copy to the host), host shards on every
    core; ``backend`` as for :func:`checksums`.

    Example:
        >>> from trainer_guard.checksum.spec import MASK64, finalize
        >>> w = torch.arange(8.0).reshape(4, 2)  # two shards of 2 rows: 2 words each
        >>> a, b = partial_sums({"w": w[:2]}, {"w": 0})["w"], partial_sums({"w": w[2:]}, {"w": 2})["w"]
        >>> finalize((a + b) & MASK64, dtype_name(w.dtype), (4, 2), 32) == checksums({"w": w}, backend="cpu")["w"]
        True
    """
    for name, t in tensors.items():
        check_tensor(str(name), t)
    if not tensors:
        return {}

    def launch(kernel: Any) -> dict[str, int]:
        plan = kernel.ChecksumPlan(tensors, checked=True, first_words=first_words)
        return plan.word_sums(plan.run())

    out = _by_kernel(tensors, backend, launch)
    if out is not None:
        return out
    names = list(tensors)
    bufs = [tensor_bytes(str(n), tensors[n]) for n in names]
    sums = word_sums(bufs, threads=threads, first_words=[int(first_words.get(n, 0)) for n in names])
    return dict(zip(names, sums))


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (lazy probe of an optional heavy library)
    except Exception:
        return False
    return True
