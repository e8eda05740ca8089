"""Fused multi-tensor Triton kernel for the checksum of :mod:`trainer_guard.checksum.spec` (one launch for a model).

Like apex's ``multi_tensor_apply``, the launcher describes every tensor in a small table and a single kernel walks
them all: each tensor's bytes are cut into chunks of ``BLOCK * ITERS`` 64-bit words, one program per chunk; a
program finds its tensor by a binary search over the table's chunk prefix sums, sums
``mix(w_i ^ i * GAMMA)`` over its words and adds the partial sum to the tensor's slot with an integer atomic
(exact and order-free, so the result is deterministic). Bytes that do not fill a last word are copied, zero-padded,
into one small side buffer that the same launch reads. The host then folds dtype, shape and size in
(:func:`trainer_guard.checksum.spec.finalize`), so values equal the CPU and file paths bit for bit.

Runs on CUDA tensors; under ``TRITON_INTERPRET=1`` (set before triton is imported) it runs on CPU tensors too,
which is how the tests check it without a GPU.

Example:
    >>> import torch
    >>> from trainer_guard.checksum.triton import triton_checksums, triton_available
    >>> if torch.cuda.is_available() and triton_available():
    ...     sums = triton_checksums({"w": torch.ones(4, 4, device="cuda")})
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..errors import ChecksumError
from .spec import C1, C2, GAMMA, MASK64, meta_key, mix64
from .validate import DTYPE_NAMES, check_tensor, flat_bytes

__all__ = ["ChecksumPlan", "cached_plan", "triton_available", "triton_checksums", "interpreting", "BLOCK", "ITERS", "NUM_WARPS"]

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
    _GAMMA = tl.constexpr(GAMMA)  # the definition's constants (spec.py), as compile-time values of the kernel
    _C1 = tl.constexpr(C1)
    _C2 = tl.constexpr(C2)

    @triton.jit
    def _mix(z):
        z = (z ^ (z >> 30)) * _C1
        z = (z ^ (z >> 27)) * _C2
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
        idx_key = idx.to(tl.uint64) * _GAMMA
        acc = tl.zeros([BLOCK], dtype=tl.uint64)
        ptrs = base_ptr + off + idx
        if nwords == chunk:  # full chunk: no masks, so the loads vectorise
            for s in range(ITERS):
                w = tl.load(ptrs + s * BLOCK).to(tl.uint64, bitcast=True)
                key = (pos0 + s * BLOCK).to(tl.uint64, bitcast=True) * _GAMMA + idx_key
                acc += _mix(w ^ key)
        else:
            for s in range(ITERS):
                m = idx + s * BLOCK < nwords
                w = tl.load(ptrs + s * BLOCK, mask=m, other=0).to(tl.uint64, bitcast=True)
                key = (pos0 + s * BLOCK).to(tl.uint64, bitcast=True) * _GAMMA + idx_key
                acc += tl.where(m, _mix(w ^ key), 0)
        total = tl.sum(acc, axis=0)
        tl.atomic_add(out_ptr + slot, total.to(tl.int64, bitcast=True))


class ChecksumPlan:
    """The launch table for one set of tensors; :meth:`run` can be called again while their storage is unchanged.

    :func:`triton_checksums` builds one per call; the benchmark keeps one to time the kernel alone.

    Example:
        >>> import torch
        >>> if torch.cuda.is_available():
        ...     plan = ChecksumPlan({"w": torch.ones(3, device="cuda")})  # doctest: +SKIP
        ...     sums = plan.finish(plan.run())  # doctest: +SKIP
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, block: int = BLOCK, iters: int = ITERS,
                 num_warps: int = NUM_WARPS, checked: bool = False, first_words: Mapping[str, int] | None = None):
        if triton is None:
            raise ChecksumError(f"backend 'triton' needs triton, which failed to import ({_IMPORT_ERROR}); use "
                                f"backend='cpu'")
        if block < 2 or block & (block - 1) or iters < 1:
            raise ChecksumError(f"block must be a power of two >= 2 and iters >= 1, got block={block}, "
                                f"iters={iters}")
        devices = set()
        for name, t in tensors.items():
            if not checked:
                check_tensor(str(name), t)
            devices.add(t.device)
        if len(devices) > 1:
            raise ChecksumError(f"backend 'triton' needs all tensors on one device, got "
                                f"{sorted(map(str, devices))}; move them or use backend='cpu'")
        device = next(iter(devices)) if devices else torch.device("cpu")
        if devices and device.type != "cuda" and not (interpreting() and device.type == "cpu"):
            raise ChecksumError(f"backend 'triton' needs CUDA tensors, got {device} tensors; use backend='cpu' (or "
                                f"TRITON_INTERPRET=1 for CPU tensors, for testing)")
        self.device, self.block, self.iters, self.num_warps = device, block, iters, num_warps
        self.names = list(tensors)
        self.metas: list[tuple[str, tuple[int, ...], int]] = []
        self._keys: list[int] | None = None
        rows: list[tuple[int, int, int, int]] = []  # (address, nwords, first position, slot)
        self._keep: list[torch.Tensor] = []  # copies (non-contiguous / misaligned) that must outlive the launch
        base: tuple[int, torch.Tensor, int] | None = None  # lowest address: (address, tensor, nwords)
        self._tail_src: list[torch.Tensor] = []
        tails: list[tuple[int, int]] = []  # (slot, position of the partial last word)
        for slot, name in enumerate(self.names):
            t = tensors[name].detach()
            nbytes = t.numel() * t.element_size()
            self.metas.append((DTYPE_NAMES[t.dtype], tuple(int(s) for s in t.shape), nbytes))
            if not t.is_contiguous() or t.is_conj() or t.is_neg() or t.data_ptr() % 8:
                t = flat_bytes(t)
                if t.data_ptr() % 8:
                    t = t.clone()  # realign: the kernel reads 8-byte words
                self._keep.append(t)
            nfull = nbytes // 8
            first = int((first_words or {}).get(name, 0))  # a shard's word position in its whole tensor
            if nfull:
                rows.append((t.data_ptr(), nfull, first, slot))
                if base is None or t.data_ptr() < base[0]:
                    base = (t.data_ptr(), t, nfull)
            if nbytes % 8:
                self._tail_src.append(t.reshape(-1).view(torch.uint8)[8 * nfull :])
                tails.append((slot, first + nfull))
        self._tail_pieces: list[torch.Tensor] = []
        self._tail_buf = None
        if tails:  # every partial last word, zero-padded, in one small buffer that the same launch reads
            self._tail_buf = torch.zeros(8 * len(tails), dtype=torch.uint8, device=device)
            pad = torch.zeros(8, dtype=torch.uint8, device=device)
            for tb in self._tail_src:
                self._tail_pieces += [tb, pad[: 8 - tb.numel()]]
            for k, (slot, pos0) in enumerate(tails):
                rows.append((self._tail_buf.data_ptr() + 8 * k, 1, pos0, slot))
            if base is None or self._tail_buf.data_ptr() < base[0]:
                base = (self._tail_buf.data_ptr(), self._tail_buf, len(tails))
        self.key = _plan_key(tensors) if not self._keep and not first_words else None  # copies would go stale
        self.n_rows = len(rows)
        self.n_chunks = 0
        self.table = None
        self.base = None
        if rows:
            base_ptr, base_t, base_words = base
            self.base = base_t.reshape(-1).view(torch.uint8)[: 8 * base_words].view(torch.int64)
            chunk = block * iters
            cols: list[list[int]] = [[], [], [], [], []]
            for ptr, nw, p0, slot in rows:
                for c, v in zip(cols, (self.n_chunks, (ptr - base_ptr) // 8, nw, p0, slot)):
                    c.append(v)
                self.n_chunks += -(-nw // chunk)
            # every start on 16 bytes and an even chunk: the kernel may use 16-byte vector loads
            self.aligned = base_ptr % 16 == 0 and all(o % 2 == 0 for o in cols[1]) and chunk % 2 == 0
            self.table = torch.tensor(cols, dtype=torch.int64).to(device)

    def run(self) -> torch.Tensor:
        """Launch: returns the per-tensor word sums ``S`` as an int64 device tensor (two's complement of u64)."""
        out = torch.zeros(len(self.names), dtype=torch.int64, device=self.device)
        if self._tail_buf is not None:
            torch.cat(self._tail_pieces, out=self._tail_buf)
        if self.n_chunks:
            _checksum_kernel[(self.n_chunks,)](self.base, self.table, out, self.n_rows, BLOCK=self.block,
                                               ITERS=self.iters, ALIGNED=self.aligned, num_warps=self.num_warps)
        return out

    def word_sums(self, out: torch.Tensor) -> dict[str, int]:
        """The per-tensor word sums ``S`` of :meth:`run` as unsigned ints, not finalised: a shard's part of its whole
        tensor's sum (plans built with ``first_words``), to be added up across ranks."""
        return {name: s & MASK64 for name, s in zip(self.names, out.tolist())}

    def finish(self, out: torch.Tensor) -> dict[str, int]:
        """Fold dtype/shape/size into the word sums on the host (one device-to-host copy)."""
        sums = out.tolist()
        if self._keys is None:  # M of every tensor (dtype, shape, size), once per plan: finalize = mix(S ^ M)
            self._keys = [meta_key(*meta) for meta in self.metas]
        return {name: mix64((s & MASK64) ^ key) for name, s, key in zip(self.names, sums, self._keys)}

    def fits(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """True when :meth:`run` would checksum exactly ``tensors`` (same names, storage, dtypes and shapes, and
        no copies were needed), so the plan can be reused for them."""
        return self.key is not None and self.key == _plan_key(tensors)


def _plan_key(tensors: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((n, t.data_ptr(), t.dtype, t.shape, t.stride()) for n, t in tensors.items())


def cached_plan(tensors: Mapping[str, torch.Tensor], cache: dict | None, *, block: int = BLOCK, iters: int = ITERS,
                num_warps: int = NUM_WARPS) -> ChecksumPlan | None:
    """The plan ``cache`` holds for exactly these ``tensors`` (names, storage, dtypes, shapes), else ``None``."""
    plan = cache.get((tuple(tensors), block, iters, num_warps)) if cache else None
    return plan if plan is not None and plan.fits(tensors) else None


def triton_checksums(
    tensors: Mapping[str, torch.Tensor], *, block: int = BLOCK, iters: int = ITERS, num_warps: int = NUM_WARPS,
    checked: bool = False, cache: dict | None = None,
) -> dict[str, int]:
    """Checksums of all ``tensors`` in one kernel launch (plus one tiny copy when some sizes are not multiples of 8).

    All tensors must be on one CUDA device (or on the CPU under ``TRITON_INTERPRET=1``). Non-contiguous tensors
    are made contiguous (a copy), and so is a tensor whose data does not start on 8 bytes.

    ``cache``: a dict the caller keeps between calls (e.g. an audit checking the same parameters every step); the
    launch table is then built once and reused while the tensors' storage, dtypes and shapes stay the same.

    Raises:
        ChecksumError: triton missing, tensors on the CPU without the interpreter, tensors on several devices,
            or a tensor :func:`~trainer_guard.checksum.checksums` would refuse.

    Example:
        >>> import torch
        >>> if torch.cuda.is_available():
        ...     triton_checksums({"w": torch.ones(3, device="cuda")})  # doctest: +SKIP
    """
    key = (tuple(tensors), block, iters, num_warps)
    plan = cached_plan(tensors, cache, block=block, iters=iters, num_warps=num_warps)
    if plan is None:
        plan = ChecksumPlan(tensors, block=block, iters=iters, num_warps=num_warps, checked=checked)
        if cache is not None and plan.key is not None:
            cache.clear()  # one plan kept: the caller's latest set of tensors
            cache[key] = plan
    return plan.finish(plan.run())
