"""Fused multi-tensor Triton kernel for :mod:`trainer_guard.core.checksum` (one launch for a whole model).

Like apex's ``multi_tensor_apply``, the launcher describes every tensor in a small table and a single kernel walks
them all: each tensor's bytes are cut into chunks of ``BLOCK * ITERS`` 64-bit words, one program per chunk; a
program finds its tensor by a binary search over the table's chunk prefix sums, sums
``mix(w_i ^ i * GAMMA)`` over its words and adds the partial sum to the tensor's slot with an integer atomic
(exact and order-free, so the result is deterministic). Bytes that do not fill a last word are copied, zero-padded,
into one small side buffer that the same launch reads. The host then folds dtype, shape and size in
(:func:`trainer_guard.core.checksum.finalize`), so values equal the CPU and file paths bit for bit.

Runs on CUDA tensors; under ``TRITON_INTERPRET=1`` (set before triton is imported) it runs on CPU tensors too,
which is how the tests check it without a GPU.

Example:
    >>> import torch
    >>> from trainer_guard.ops.checksum_triton import triton_checksums, triton_available
    >>> if torch.cuda.is_available() and triton_available():
    ...     sums = triton_checksums({"w": torch.ones(4, 4, device="cuda")})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache

import torch

from ..core.checksum import DTYPE_NAMES, _check_tensor, finalize
from ..errors import ChecksumError

__all__ = ["triton_available", "triton_checksums", "interpreting"]

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # pragma: no cover - triton ships with torch on Linux
    triton = None
    tl = None
    _IMPORT_ERROR = e

#: 64-bit words per loop step of one program (num_warps=8: 4 words = two 16-byte loads per thread).
BLOCK = 1024
#: loop steps per program: a chunk is BLOCK * ITERS words = 512 KiB.
ITERS = 64
NUM_WARPS = 8


def interpreting() -> bool:
    """True when triton runs in interpreter mode (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when triton imported (a GPU is still needed unless :func:`interpreting`)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _mix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit
    def _checksum_kernel(base_ptr, table_ptr, out_ptr, n_rows, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                         ALIGNED: tl.constexpr):
        # table: int64 [5, n_rows] = chunk_start (prefix sum), word offset from base_ptr, nwords, first pos, slot
        pid = tl.program_id(0).to(tl.int64)
        lo = 0
        hi = n_rows - 1
        while lo < hi:  # the last row whose chunk_start <= pid (while, not range: the interpreter needs it)
            mid = (lo + hi + 1) // 2
            if tl.load(table_ptr + mid) <= pid:
                lo = mid
            else:
                hi = mid - 1
        k = pid - tl.load(table_ptr + lo)
        chunk = BLOCK * ITERS
        off = tl.load(table_ptr + n_rows + lo) + k * chunk
        if ALIGNED:  # every tensor starts on 16 bytes and chunk is even: allow 16-byte vector loads
            off = tl.multiple_of(off, 2)
        nwords = tl.minimum(tl.load(table_ptr + 2 * n_rows + lo) - k * chunk, chunk)
        pos0 = tl.load(table_ptr + 3 * n_rows + lo) + k * chunk
        slot = tl.load(table_ptr + 4 * n_rows + lo)

        idx = tl.arange(0, BLOCK)
        # key(pos0 + s*BLOCK + idx) = (pos0 + s*BLOCK) * GAMMA + idx * GAMMA  (mod 2^64)
        idx_key = idx.to(tl.uint64) * 0x9E3779B97F4A7C15
        acc = tl.zeros([BLOCK], dtype=tl.uint64)
        ptrs = base_ptr + off + idx
        if nwords == chunk:  # full chunk: no masks, so the loads vectorise
            for s in range(ITERS):
                w = tl.load(ptrs + s * BLOCK).to(tl.uint64, bitcast=True)
                key = (pos0 + s * BLOCK).to(tl.uint64, bitcast=True) * 0x9E3779B97F4A7C15 + idx_key
                acc += _mix(w ^ key)
        else:
            for s in range(ITERS):
                m = idx + s * BLOCK < nwords
                w = tl.load(ptrs + s * BLOCK, mask=m, other=0).to(tl.uint64, bitcast=True)
                key = (pos0 + s * BLOCK).to(tl.uint64, bitcast=True) * 0x9E3779B97F4A7C15 + idx_key
                acc += tl.where(m, _mix(w ^ key), 0)
        total = tl.sum(acc, axis=0)
        tl.atomic_add(out_ptr + slot, total.to(tl.int64, bitcast=True))


@lru_cache(maxsize=4096)
def _finalize_cached(s: int, dtype: str, shape: tuple[int, ...], nbytes: int) -> int:
    return finalize(s, dtype, shape, nbytes)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


def triton_checksums(
    tensors: Mapping[str, torch.Tensor], *, block: int = BLOCK, iters: int = ITERS, num_warps: int = NUM_WARPS
) -> dict[str, int]:
    """Checksums of all ``tensors`` in one kernel launch (plus one tiny copy when some sizes are not multiples of 8).

    All tensors must be on one CUDA device (or on the CPU under ``TRITON_INTERPRET=1``). Non-contiguous tensors
    are made contiguous (a copy), and so is a tensor whose data does not start on 8 bytes.

    Raises:
        ChecksumError: triton missing, tensors on the CPU without the interpreter, tensors on several devices,
            or a tensor :func:`~trainer_guard.core.checksum.checksums` would refuse.

    Example:
        >>> import torch
        >>> if torch.cuda.is_available():
        ...     triton_checksums({"w": torch.ones(3, device="cuda")})  # doctest: +SKIP
    """
    if triton is None:
        raise ChecksumError(f"backend 'triton' needs triton, which failed to import ({_IMPORT_ERROR}); use "
                            f"backend='cpu'")
    if block < 2 or block & (block - 1) or iters < 1:
        raise ChecksumError(f"block must be a power of two >= 2 and iters >= 1, got block={block}, iters={iters}")
    devices = set()
    for name, t in tensors.items():
        _check_tensor(str(name), t)
        devices.add(t.device)
    if not tensors:
        return {}
    if len(devices) > 1:
        raise ChecksumError(f"backend 'triton' needs all tensors on one device, got {sorted(map(str, devices))}; "
                            f"move them or use backend='cpu'")
    (device,) = devices
    if device.type != "cuda" and not (interpreting() and device.type == "cpu"):
        raise ChecksumError(f"backend 'triton' needs CUDA tensors, got {device} tensors; use backend='cpu' (or "
                            f"TRITON_INTERPRET=1 for CPU tensors, for testing)")

    names = list(tensors)
    metas = []
    rows = []  # (int64 word view, nwords, pos0, slot): one per tensor with >= 8 bytes, one per partial last word
    tails = []  # (slot, pos0, bytes of the partial last word)
    for slot, name in enumerate(names):
        t = tensors[name]
        u8 = _flat_bytes(t)
        nbytes = u8.numel()
        metas.append((DTYPE_NAMES[t.dtype], tuple(int(s) for s in t.shape), nbytes))
        nfull = nbytes // 8
        if nfull:
            if u8.data_ptr() % 8:
                u8 = u8.clone()  # realign: the kernel reads 8-byte words
            rows.append((u8[: 8 * nfull].view(torch.int64), nfull, 0, slot))
        if nbytes % 8:
            tails.append((slot, nfull, u8[8 * nfull :]))
    if tails:  # all partial last words, zero-padded, in one small buffer read by the same launch
        pad = torch.zeros(8, dtype=torch.uint8, device=device)
        pieces = []
        for _, _, tb in tails:
            pieces += [tb, pad[: 8 - tb.numel()]]
        tail_buf = torch.cat(pieces).view(torch.int64)
        for k, (slot, pos0, _) in enumerate(tails):
            rows.append((tail_buf[k : k + 1], 1, pos0, slot))

    out = torch.zeros(len(names), dtype=torch.int64, device=device)
    if rows:
        base = min((r[0] for r in rows), key=lambda v: v.data_ptr())  # offsets from the lowest address are >= 0
        base_ptr = base.data_ptr()
        chunk = block * iters
        starts, offs, nws, pos0s, slots = [], [], [], [], []
        n_chunks = 0
        for view, nw, p0, slot in rows:
            starts.append(n_chunks)
            offs.append((view.data_ptr() - base_ptr) // 8)
            nws.append(nw)
            pos0s.append(p0)
            slots.append(slot)
            n_chunks += -(-nw // chunk)
        aligned = base_ptr % 16 == 0 and all(o % 2 == 0 for o in offs) and chunk % 2 == 0
        table = torch.tensor([starts, offs, nws, pos0s, slots], dtype=torch.int64).to(device, non_blocking=True)
        _checksum_kernel[(n_chunks,)](base, table, out, len(rows), BLOCK=block, ITERS=iters, ALIGNED=aligned,
                                      num_warps=num_warps)
    sums = out.tolist()
    return {name: _finalize_cached(s & 0xFFFFFFFFFFFFFFFF, *metas[i]) for i, (name, s) in enumerate(zip(names, sums))}
