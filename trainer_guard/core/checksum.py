"""A position-aware 64-bit checksum of a tensor's raw bytes, identical from a GPU tensor and from a file.

Pure functions, no Trainer. Three implementations agree bit for bit: the fused multi-tensor Triton kernel
(:mod:`trainer_guard.ops.checksum_triton`, for CUDA tensors), a CPU loop over a tensor's bytes, and a CPU loop
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

Example:
    >>> import torch
    >>> from trainer_guard.core.checksum import checksums, tensor_checksum, fingerprint
    >>> a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    >>> tensor_checksum(a) == tensor_checksum(a.clone())
    True
    >>> tensor_checksum(a) == tensor_checksum(a.t().contiguous().reshape(2, 3))
    False
    >>> sums = checksums({"a": a, "b": a.to(torch.bfloat16)}, backend="cpu")
    >>> sums["a"] == sums["b"]
    False
    >>> isinstance(fingerprint(sums), int)
    True
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import reprlib
import struct
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ChecksumError

logger = logging.getLogger("trainer_guard")

__all__ = [
    "CHECKSUM_ALGO",
    "DTYPE_NAMES",
    "DTYPE_SIZES",
    "checksums",
    "tensor_checksum",
    "file_checksums",
    "safetensors_entries",
    "index_weight_map",
    "duplicate_hint",
    "stored_twice",
    "fingerprint",
    "dtype_name",
    "finalize",
    "word_sum",
    "mix64",
]

CHECKSUM_ALGO = "tg-wsum64-splitmix-v1"

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
C1 = 0xBF58476D1CE4E5B9
C2 = 0x94D049BB133111EB

#: torch dtype -> safetensors dtype name, the name folded into the checksum.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _tname, _sname in [
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e8m0fnu", "F8_E8M0"),
]:
    if hasattr(torch, _tname):
        DTYPE_NAMES[getattr(torch, _tname)] = _sname

#: safetensors dtype name -> bytes per element (the dtypes a file may hold for :func:`file_checksums`).
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "C64": 8, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
}

# Big tensors are fed to the CPU loop in pieces this size (the sum splits anywhere; keeps progress live).
_PIECE_WORDS = 1 << 25  # 256 MiB


# --------------------------------------------------------------------------------------------- the algorithm
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


def dtype_name(dtype: torch.dtype, name: str = "tensor") -> str:
    """The safetensors name of a torch dtype; :class:`ChecksumError` naming ``name`` when it has none."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ChecksumError(
            f"cannot checksum {name!r}: dtype {dtype} has no safetensors name; supported dtypes are "
            f"{', '.join(str(d).replace('torch.', '') for d in DTYPE_NAMES)}; convert the tensor first"
        ) from None


def _meta_key(dtype: str, shape: tuple[int, ...] | list[int], nbytes: int) -> int:
    text = f"{CHECKSUM_ALGO}|{dtype}|{','.join(str(int(s)) for s in shape)}|{int(nbytes)}"
    return int.from_bytes(hashlib.blake2b(text.encode("ascii"), digest_size=8).digest(), "little")


def finalize(word_sum_: int, dtype: str, shape: tuple[int, ...] | list[int], nbytes: int) -> int:
    """Fold dtype name, shape and byte count into a word sum ``S``: ``mix(S ^ M)`` (see the module docstring).

    Example:
        >>> finalize(0, "F32", (2,), 8) != finalize(0, "I32", (2,), 8)
        True
    """
    return mix64((int(word_sum_) & MASK64) ^ _meta_key(dtype, shape, nbytes))


# ------------------------------------------------------------------------------------------------ CPU loop
def _numpy_word_sum(words: np.ndarray, pos0: int) -> int:
    """Chunked numpy twin of the numba loop (used when numba is missing; same values)."""
    total = np.uint64(0)
    step = 1 << 20
    with np.errstate(over="ignore"):
        for a in range(0, words.size, step):
            w = words[a : a + step].astype(np.uint64, copy=True)
            z = w ^ ((np.arange(a, a + w.size, dtype=np.uint64) + np.uint64(pos0)) * np.uint64(GAMMA))
            z = (z ^ (z >> np.uint64(30))) * np.uint64(C1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(C2)
            z ^= z >> np.uint64(31)
            total = total + np.add.reduce(z, dtype=np.uint64)
    return int(total)


try:  # numba: the loop compiles to ~10 GB/s per core (see benchmarks/README.md); numpy is ~10x slower.
    from numba import njit

    _G, _C1, _C2 = np.uint64(GAMMA), np.uint64(C1), np.uint64(C2)
    _S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

    def _word_sum_loop(words, pos0):  # pragma: no cover - compiled
        s = np.uint64(0)
        p = np.uint64(pos0)
        for i in range(words.size):
            z = words[i] ^ ((p + np.uint64(i)) * _G)
            z = (z ^ (z >> _S30)) * _C1
            z = (z ^ (z >> _S27)) * _C2
            s += z ^ (z >> _S31)
        return s

    try:  # compiled once, then loaded from numba's on-disk cache
        _numba_word_sum = njit(nogil=True, cache=True, fastmath=False)(_word_sum_loop)
    except RuntimeError:  # no writable cache dir (read-only install, unwritable HOME): compile in each process
        _numba_word_sum = njit(nogil=True, cache=False, fastmath=False)(_word_sum_loop)

    def _loop_word_sum(words: np.ndarray, pos0: int) -> int:
        return int(_numba_word_sum(words, np.int64(pos0)))

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; keep working without it
    _loop_word_sum = _numpy_word_sum
    HAVE_NUMBA = False


def word_sum(buf: np.ndarray, progress: Callable[[int], Any] | None = None) -> int:
    """``S`` of a flat ``uint8`` array (the bytes of one tensor), without copying it.

    Full words are summed by the CPU loop over a ``uint64`` view (aligned or not); the last partial word is
    zero-padded in Python. ``progress(nbytes_done)`` is called after each piece when given.

    Example:
        >>> import numpy as np
        >>> word_sum(np.zeros(0, np.uint8))
        0
    """
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ChecksumError(f"word_sum needs a flat uint8 array, got dtype {buf.dtype} with {buf.ndim} dims")
    nfull = buf.size // 8
    s = 0
    for a in range(0, nfull, _PIECE_WORDS):
        b = min(nfull, a + _PIECE_WORDS)
        s += _loop_word_sum(buf[8 * a : 8 * b].view(np.uint64), a)
        if progress is not None:
            progress(8 * (b - a))
    tail = buf[8 * nfull :]
    if tail.size:
        w = int.from_bytes(tail.tobytes() + b"\0" * (8 - tail.size), "little")
        s += mix64(w ^ ((nfull * GAMMA) & MASK64))
        if progress is not None:
            progress(int(tail.size))
    return s & MASK64


def _cpu_bytes(name: str, t: torch.Tensor) -> np.ndarray:
    _check_tensor(name, t)
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise ChecksumError(f"cannot checksum {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise ChecksumError(f"cannot checksum {name!r}: it is a nested tensor, which has no single row-major layout; "
                            f"checksum its components instead (dict(enumerate(t.unbind())))")
    if t.layout != torch.strided:
        raise ChecksumError(f"cannot checksum {name!r}: layout {t.layout} is not supported; pass a dense tensor "
                            f"(e.g. .to_dense())")
    if t.is_quantized:
        raise ChecksumError(f"cannot checksum {name!r}: it is a quantized tensor ({t.dtype}, {t.qscheme()}), whose "
                            f"bytes do not include its scales; checksum t.int_repr() and its scales (or "
                            f"t.dequantize()) instead")
    if t.device.type == "meta":
        raise ChecksumError(f"cannot checksum {name!r}: it is on the meta device and holds no data; materialise "
                            f"the weights first")
    dtype_name(t.dtype, name)


def tensor_checksum(t: torch.Tensor) -> int:
    """The checksum of one tensor on the CPU path (a CUDA tensor is copied to the host first).

    Example:
        >>> import torch
        >>> tensor_checksum(torch.zeros(3)) != tensor_checksum(torch.zeros(4))
        True
    """
    return _tensor_checksum("tensor", t)


def _tensor_checksum(name: str, t: torch.Tensor) -> int:
    buf = _cpu_bytes(name, t)
    return finalize(word_sum(buf), DTYPE_NAMES[t.dtype], tuple(t.shape), buf.size)


def checksums(
    tensors: Mapping[str, torch.Tensor], backend: Literal["auto", "triton", "cpu"] = "auto"
) -> dict[str, int]:
    """Checksum every tensor of a mapping (e.g. a ``state_dict``); values are unsigned 64-bit ints.

    Args:
        tensors: name -> tensor. Tied entries (two names, one storage) are each checksummed under their name.
        backend: ``"triton"`` runs the fused kernel (all tensors on CUDA, or CPU tensors under
            ``TRITON_INTERPRET=1``); ``"cpu"`` the CPU loop (copies CUDA tensors to the host one at a time);
            ``"auto"`` picks triton when every tensor is on CUDA and triton imports, else cpu (and falls back to
            cpu, with a warning, if the kernel fails to compile or launch).

    Raises:
        ChecksumError: an unknown backend, a non-tensor value, a meta/sparse/nested tensor, a dtype with no
            safetensors name, or triton asked for but unusable.

    Example:
        >>> import torch
        >>> s = checksums({"w": torch.ones(2, 2), "b": torch.zeros(2)}, backend="cpu")
        >>> sorted(s), all(0 <= v < 2**64 for v in s.values())
        (['b', 'w'], True)
    """
    if backend not in ("auto", "triton", "cpu"):
        raise ChecksumError(f"`backend` can be 'auto', 'triton', 'cpu', got {backend!r}")
    if not isinstance(tensors, Mapping):
        raise ChecksumError(f"checksums() needs a mapping of name -> tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        _check_tensor(str(name), t)
    if not tensors:
        return {}
    if backend == "auto":
        on_cuda = all(t.device.type == "cuda" for t in tensors.values())
        if on_cuda and _triton_importable():
            from ..ops import checksum_triton

            try:
                return checksum_triton.triton_checksums(tensors)
            except ChecksumError:
                raise
            except Exception as e:  # e.g. a GPU triton cannot compile for: same values from the CPU path
                logger.warning(f"trainer_guard: the triton checksum kernel failed ({type(e).__name__}: {e}); "
                               f"using the CPU path (same values, slower). Pass backend='cpu' to skip the kernel.")
        backend = "cpu"
    if backend == "triton":
        from ..ops.checksum_triton import triton_checksums

        return triton_checksums(tensors)
    return {name: _tensor_checksum(name, t) for name, t in tensors.items()}


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------------- file path
def safetensors_entries(path: str | os.PathLike) -> tuple[int, dict[str, dict[str, Any]], dict[str, str]]:
    """Parse and validate a ``.safetensors`` header without reading the data.

    Returns ``(data_start, entries, metadata)`` where ``entries[name] = {"dtype", "shape", "begin", "end"}``
    (absolute byte offsets in the file). Every offset is checked against the dtype, shape and file size, and
    the tensors must tile the data area exactly, as safetensors itself requires.

    Raises:
        ChecksumError: naming the file (and tensor) for a missing, truncated, padded or foreign file.

    Example:
        >>> import tempfile, os, torch
        >>> from safetensors.torch import save_file
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save_file({"w": torch.zeros(2, 3)}, p)
        >>> start, entries, meta = safetensors_entries(p)
        >>> entries["w"]["dtype"], entries["w"]["shape"], entries["w"]["end"] - entries["w"]["begin"]
        ('F32', [2, 3], 24)
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ChecksumError(f"{path}: {size} bytes is too short for a safetensors file (truncated?); "
                                    f"re-save or re-download it")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(size - 8, 100_000_000):
                raise ChecksumError(
                    f"{path}: header length {hlen} exceeds the file ({size} bytes): not a safetensors file, "
                    f"or truncated; re-save or re-download it"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise ChecksumError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an int of > 4300 digits, nested too deep
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ChecksumError(f"{path}: header is not valid JSON ({why}); not a safetensors file, or corrupted; "
                            f"re-save or re-download it") from None
    if not isinstance(header, dict):
        raise ChecksumError(f"{path}: header is not a JSON object; not a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + hlen
    data_size = size - start
    entries: dict[str, dict[str, Any]] = {}
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise ChecksumError(f"{path}: tensor {name!r}: header entry lacks dtype/shape/data_offsets")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPE_SIZES:
            raise ChecksumError(f"{path}: tensor {name!r}: dtype {reprlib.repr(dt)} is not supported; supported are "
                                f"{', '.join(DTYPE_SIZES)}")
        if (not isinstance(shape, list) or not all(map(_uint, shape)) or not isinstance(offs, list)
                or len(offs) != 2 or not all(map(_uint, offs)) or offs[0] > offs[1]):
            raise ChecksumError(f"{path}: tensor {name!r}: malformed shape {reprlib.repr(shape)} or data_offsets "
                                f"{reprlib.repr(offs)} (non-negative integers, begin <= end expected): corrupted "
                                f"header; re-save or re-download it")
        b, end = offs
        want = math.prod(shape) * DTYPE_SIZES[dt]
        if end - b != want:
            raise ChecksumError(f"{path}: tensor {name!r}: data_offsets {offs} hold {end - b} bytes but {dt} "
                                f"{shape} needs {want}: corrupted header")
        if end > data_size:
            raise ChecksumError(f"{path}: tensor {name!r}: ends at byte {start + end} but the file has {size} "
                                f"bytes (truncated); re-save or re-download it")
        entries[name] = {"dtype": dt, "shape": list(shape), "begin": start + b, "end": start + end}
        spans.append((b, end, name))
    spans.sort()
    pos = 0
    for b, end, name in spans:
        if b != pos:
            raise ChecksumError(f"{path}: tensor {name!r}: starts at data offset {b}, expected {pos} (overlap or "
                                f"hole in the data area: corrupted header)")
        pos = end
    if pos != data_size:
        raise ChecksumError(f"{path}: {data_size - pos} bytes after the last tensor (the data area should end at "
                            f"{pos}): padded or foreign file")
    return start, entries, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _uint(v: Any) -> bool:
    """``v`` is a non-negative ``int`` and not a ``bool`` (JSON ``true`` parses as one)."""
    return type(v) is int and v >= 0  # noqa: E721


def _file_sums(path: str, progress: Callable[[int], Any] | None) -> dict[str, int]:
    start, entries, _ = safetensors_entries(path)
    if progress is not None:
        progress(start)  # the header: with the data (which tiles the rest) the bar ends at the file size
    out: dict[str, int] = {}
    if not entries:
        return out
    mm = np.memmap(path, dtype=np.uint8, mode="r")  # mmap: pages come from the page cache, nothing is copied
    try:
        for name, e in sorted(entries.items(), key=lambda kv: kv[1]["begin"]):
            buf = mm[e["begin"] : e["end"]]
            s = word_sum(np.asarray(buf), progress)
            out[name] = finalize(s, e["dtype"], e["shape"], e["end"] - e["begin"])
    finally:
        del mm
    return out


def index_weight_map(idx: str, error: type[Exception] = ChecksumError) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a shard index file, ``{}`` when it has none; ``error``
    naming the file when it is unreadable, not JSON (nested too deeply, ...) or its ``weight_map`` is malformed."""
    try:
        with open(idx, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
        why = "JSON nested too deeply" if isinstance(e, RecursionError) else getattr(e, "strerror", None) or e
        raise error(f"{idx}: unreadable index ({why}); fix or delete it") from None
    weight_map = data.get("weight_map", {}) if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise error(f"{idx}: malformed index ('weight_map' must map tensor names to shard file names); fix or "
                    f"delete it")
    return weight_map


#: The single weight files ``from_pretrained`` reads in preference to any shard index (transformers, PEFT).
SINGLE_FILES = ("model.safetensors", "adapter_model.safetensors")


def duplicate_hint(directory: str | os.PathLike, a: str, b: str) -> tuple[str, str | None, str] | None:
    """For tensors stored in both files ``a`` and ``b`` (names in ``directory``): ``(kept, index, why)`` when
    ``from_pretrained`` reads only one of them (``kept``, e.g. ``model.safetensors``; ``index`` the shard index that
    lists the other, or ``None``), else ``None``.

    ``save_pretrained`` removes an earlier save's shards but not an earlier ``model.safetensors``, which
    ``from_pretrained`` then loads instead of the new shards.
    """
    directory = os.fspath(directory)
    for kept, other in ((a, b), (b, a)):
        if kept not in SINGLE_FILES:
            continue
        idx = kept + ".index.json"
        try:
            listed = os.path.isfile(os.path.join(directory, idx)) and other in index_weight_map(
                os.path.join(directory, idx)).values()
        except ChecksumError:
            listed = False
        if listed:
            return kept, idx, f"from_pretrained loads {kept} and ignores {idx} and its shards"
        return kept, None, f"from_pretrained loads {kept} only and ignores {other}, which no shard index lists"
    return None


def stored_twice(name: str, first: str, second: str) -> str:
    """The message for tensor ``name`` found in both files ``first`` and ``second`` (paths in one directory), naming
    the file ``from_pretrained`` loads when it reads only one of them (:func:`duplicate_hint`)."""
    hint = duplicate_hint(os.path.dirname(first) or ".", os.path.basename(first), os.path.basename(second))
    return (f"tensor {name!r} is stored twice: in {first} and in {second}; "
            + (f"{hint[2]}: remove the stale one" if hint else "remove the stale file"))


def _index_problems(directory: str, files: dict[str, dict[str, int]]) -> list[str]:
    """What the ``*.safetensors.index.json`` files of ``directory`` list that ``files`` (name -> its tensors) lack.
    An index next to its single file (``model.safetensors.index.json`` beside ``model.safetensors``: left by an
    earlier sharded save) is not read: ``from_pretrained`` loads the single file.

    Raises:
        ChecksumError: an index is unreadable or malformed (names it).
    """
    problems = []
    for idx in sorted(glob.glob(os.path.join(directory, "*.safetensors.index.json"))):
        weight_map = index_weight_map(idx)
        if os.path.basename(idx).removesuffix(".index.json") in files:
            continue
        for name, fname in weight_map.items():
            if fname not in files:
                problems.append(f"{idx}: tensor {name!r} is in shard {fname!r}, which is missing")
            elif name not in files[fname]:
                problems.append(f"{idx}: tensor {name!r} should be in {fname!r} but is not there")
    return problems


def safetensors_files(directory: str | os.PathLike) -> list[str]:
    """Sorted names of the ``*.safetensors`` files directly in ``directory``."""
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")
                  and os.path.isfile(os.path.join(directory, f)))


def as_path(path: Any, error: type[Exception] = ChecksumError) -> str:
    """``path`` (``str``, ``bytes`` or ``os.PathLike``) as a ``str``; ``error`` naming the type for anything else."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise error(f"expected a file or directory path (str or os.PathLike), got {type(path).__name__}") from None


def safetensors_paths(path: str | os.PathLike, error: type[Exception] = ChecksumError) -> list[str]:
    """``[path]`` for a file, the paths of the ``*.safetensors`` files directly in a directory; ``error`` (with the
    path in the message) when the path does not exist or the directory holds none."""
    path = as_path(path, error)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise error(f"{path}: no such file or directory")
    files = [os.path.join(path, f) for f in safetensors_files(path)]
    if not files:
        raise error(f"{path}: no *.safetensors file in this directory")
    return files


def file_checksums(path: str | os.PathLike, *, progress: bool = False) -> dict[str, int]:
    """Checksum every tensor stored in a ``.safetensors`` file, or in all ``*.safetensors`` of a directory.

    The data is read through ``mmap`` (no copy) and checksummed by the CPU loop; values equal
    ``checksums(tensors)`` of the same tensors on any device. In a directory, shards are merged (a name in two
    files is an error) and a ``*.safetensors.index.json`` is checked: a shard it lists must exist and hold the
    tensors it claims.

    Args:
        path: a ``.safetensors`` file or a directory (a checkpoint or model dir).
        progress: show a tqdm bar over the bytes (transformers' tqdm; off when its progress bars are disabled).

    Raises:
        ChecksumError: naming the file/tensor: missing path, directory with no safetensors files, truncated,
            padded or foreign file, bad header, duplicate names, missing shard, unreadable or malformed index.

    Example:
        >>> import tempfile, os, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp(); t = {"w": torch.arange(5.0)}
        >>> save_file(t, os.path.join(d, "model.safetensors"))
        >>> file_checksums(d) == checksums(t, backend="cpu")
        True
    """
    path = as_path(path)
    files = safetensors_paths(path)
    bar = None
    cb = None
    if progress:
        from transformers.utils.logging import tqdm

        total = sum(os.path.getsize(f) for f in files)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="checksum")
        cb = bar.update
    per_file: dict[str, dict[str, int]] = {}
    out: dict[str, int] = {}
    owner: dict[str, str] = {}
    try:
        for f in files:
            sums = _file_sums(f, cb)
            per_file[os.path.basename(f)] = sums
            for name, v in sums.items():
                if name in owner:
                    raise ChecksumError(stored_twice(name, owner[name], f))
                owner[name] = f
                out[name] = v
    finally:
        if bar is not None:
            bar.close()
    if os.path.isdir(path):
        problems = _index_problems(path, per_file)
        if problems:
            raise ChecksumError("sharded checkpoint is incomplete:\n  - " + "\n  - ".join(problems))
    return out


# ------------------------------------------------------------------------------------------- fingerprint
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
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= MASK64:
            raise ChecksumError(f"fingerprint(): checksum of {name!r} must be an unsigned 64-bit int, got {v!r}")
        h = int.from_bytes(hashlib.blake2b(str(name).encode("utf-8"), digest_size=8).digest(), "little")
        acc += mix64(h ^ int(v))
    return mix64((acc & MASK64) ^ ((len(sums) * GAMMA) & MASK64))
