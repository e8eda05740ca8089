"""The safetensors format: its one header reader, its one dtype table, and the shard index.

Every module that reads a ``.safetensors`` header or names a safetensors dtype code goes through here, so they all
apply the same rules (one size limit, one set of checks, one table of codes). Importable without torch: the code
table and the header reader are plain Python; :func:`torch_dtype` and :func:`code_of` import torch when called.

File layout: 8 bytes (little-endian unsigned length ``n``), ``n`` bytes of JSON (an object: tensor name ->
``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative to the data area, plus an optional
``"__metadata__"`` of strings), then the data area, which the tensors tile exactly.

Example:
    >>> import tempfile, os, torch
    >>> from safetensors.torch import save_file
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_file({"w": torch.zeros(2, 3)}, p)
    >>> h = read_header(p)
    >>> h.tensors["w"].dtype, h.tensors["w"].shape, h.tensors["w"].nbytes, torch_name("BF16"), dtype_size("BF16")
    ('F32', (2, 3), 24, 'bfloat16', 2)
"""

from __future__ import annotations

import functools
import json
import math
import os
import reprlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SafetensorsFormatError

if TYPE_CHECKING:
    import torch

__all__ = [
    "weight_files",
    "HEADER_LIMIT",
    "INDEX_SUFFIX",
    "DTYPES",
    "DTYPE_SIZES",
    "FLOAT_NAMES",
    "TensorEntry",
    "TensorInfo",
    "Header",
    "dtype_size",
    "torch_name",
    "code_of",
    "torch_dtype",
    "torch_dtypes",
    "nbytes",
    "read_header",
    "file_problem",
    "tensor_infos",
    "safetensors_files",
    "safetensors_paths",
    "as_path",
    "index_files",
    "read_weight_map",
    "is_uint",
]

HEADER_LIMIT = 100_000_000
"""The largest header safetensors itself accepts (bytes); a longer one is no safetensors file."""

INDEX_SUFFIX = ".safetensors.index.json"
"""Shard indexes are named ``<prefix>.safetensors.index.json`` (``model.safetensors.index.json``)."""

#: safetensors dtype code -> (torch dtype name, bytes per element): every code trainer_guard reads or writes.
#: A code whose torch dtype this torch lacks (older versions: unsigned ints, float8) is still read and sized.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "C64": ("complex64", 8),
    "C128": ("complex128", 16),
}

#: safetensors dtype code -> bytes per element.
DTYPE_SIZES: dict[str, int] = {code: size for code, (_, size) in DTYPES.items()}

#: torch names of the floating-point dtypes (real, not complex), widest first.
FLOAT_NAMES: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                                "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz")

_NAMES = {code: name for code, (name, _) in DTYPES.items()}
_CODES = {name: code for code, name in _NAMES.items()}


def dtype_size(code: str) -> int:
    """Bytes per element of safetensors dtype ``code`` (``"BF16"`` -> 2); a torch name (``"bfloat16"``) works too.

    Raises:
        KeyError: neither a code nor a torch name of :data:`DTYPES`.
    """
    return DTYPE_SIZES[_CODES.get(code, code)]


def torch_name(dtype: Any) -> str:
    """The torch name of a dtype: ``"BF16"`` / ``torch.bfloat16`` / ``"bfloat16"`` -> ``"bfloat16"`` (the name
    manifests store). A string that is no known code is returned as it is."""
    if not isinstance(dtype, str):
        return str(dtype).removeprefix("torch.")
    return _NAMES.get(dtype, dtype)


def code_of(dtype: Any) -> str | None:
    """The safetensors code of a dtype: ``torch.bfloat16`` / ``"bfloat16"`` / ``"BF16"`` -> ``"BF16"``; ``None``
    when safetensors has no code for it."""
    name = torch_name(dtype)
    return _CODES.get(name)


@functools.lru_cache(maxsize=1)
def torch_dtypes() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors code, for every code of :data:`DTYPES` this torch has a dtype for."""
    import torch  # lazy import of a heavy library: this module must load without torch (doctor, diff)

    return {getattr(torch, name): code for code, (name, _) in DTYPES.items() if hasattr(torch, name)}


def torch_dtype(code: str) -> torch.dtype | None:
    """The torch dtype of safetensors ``code`` (``"BF16"`` -> ``torch.bfloat16``); ``None`` when this torch has none."""
    import torch  # lazy import of a heavy library: this module must load without torch (doctor, diff)

    name = _NAMES.get(code)
    dtype = getattr(torch, name, None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor of ``dtype`` (code or torch name) and ``shape``; an unknown dtype counts 1 byte an element."""
    try:
        size = dtype_size(dtype)
    except KeyError:
        size = 1
    return math.prod(shape) * size


def is_uint(v: Any) -> bool:
    """``v`` is an ``int`` (not a ``bool``: JSON ``true`` parses as one) in ``[0, 2**63)``: a size or an offset."""
    return type(v) is int and 0 <= v < 1 << 63  # noqa: E721


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header: ``dtype`` code, ``shape``, and its bytes ``[begin, end)`` as absolute file offsets."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it, as manifests name it: ``file`` (name), ``dtype`` (torch
    name, ``"float32"``), ``shape``."""

    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """A validated header: the file's ``path`` and ``size``, where its data starts, its tensors and metadata."""

    path: str
    size: int
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    def in_file_order(self) -> list[str]:
        """Tensor names in the order their bytes lie in the file (sequential reads)."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].begin)


def _fail(path: str, kind: str, message: str, brief: str) -> SafetensorsFormatError:
    name = os.path.basename(path)
    return SafetensorsFormatError(path, kind, f"{path}: {message}", f"{name}: {brief}")


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of the ``.safetensors`` file ``path``, without reading its data.

    Checks: an 8-byte length within the file and :data:`HEADER_LIMIT`; a JSON object; each tensor with a known
    dtype code, a shape and ``data_offsets`` of non-negative integers whose span is the bytes its dtype and shape
    need; offsets within the file; tensors tiling the data area exactly, as safetensors itself requires.

    Raises:
        SafetensorsFormatError: naming the file (and the tensor): unreadable, truncated, padded or foreign.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, "short", f"{size} bytes is too short for a safetensors file (truncated?); re-save "
                                           f"or re-download it",
                            f"{size} bytes, too short to be a safetensors file (truncated?)")
            (hlen,) = struct.unpack("<Q", head)
            if 8 + hlen > size or hlen > HEADER_LIMIT:
                limit = (f"exceeds the file ({size} bytes)" if 8 + hlen > size
                         else f"exceeds safetensors' limit of {HEADER_LIMIT:,} bytes")
                raise _fail(path, "length", f"header length {hlen} {limit}: not a safetensors file, or truncated; "
                                            f"re-save or re-download it",
                            f"not a safetensors file or truncated (header length {hlen} bytes, file {size} bytes)")
            raw = f.read(hlen)
    except OSError as e:
        raise _fail(path, "unreadable", f"cannot read: {e.strerror or e}", f"unreadable ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an int of > 4300 digits, nested too deep
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        deep = " (nested too deeply)" if isinstance(e, RecursionError) else ""
        raise _fail(path, "json", f"header is not valid JSON ({why}); not a safetensors file, or corrupted; "
                                  f"re-save or re-download it",
                    f"header is not valid JSON{deep}; not a safetensors file, or corrupted") from None
    if not isinstance(header, dict):
        raise _fail(path, "object", "header is not a JSON object; not a safetensors file",
                    "header is not a JSON object; not a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + hlen
    data_size = size - start
    tensors: dict[str, TensorEntry] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise _fail(path, "entry", f"tensor {name!r}: header entry lacks dtype/shape/data_offsets",
                        f"tensor {name!r} has no valid data_offsets; corrupted header")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPE_SIZES:
            raise _fail(path, "dtype", f"tensor {name!r}: dtype {reprlib.repr(dt)} is not supported; supported are "
                                       f"{', '.join(DTYPE_SIZES)}",
                        f"tensor {name!r}: dtype {reprlib.repr(dt)} is not a safetensors dtype this version reads")
        good_shape = isinstance(shape, list) and all(map(is_uint, shape))
        good_offs = (isinstance(offs, list) and len(offs) == 2 and all(map(is_uint, offs)) and offs[0] <= offs[1])
        if not (good_shape and good_offs):
            what = "data_offsets" if good_shape else "shape"
            raise _fail(path, "offsets" if good_shape else "shape",
                        f"tensor {name!r}: malformed shape {reprlib.repr(shape)} or data_offsets "
                        f"{reprlib.repr(offs)} (non-negative integers, begin <= end expected): corrupted header; "
                        f"re-save or re-download it",
                        f"tensor {name!r} has no valid {what}; corrupted header")
        b, end = offs
        want = math.prod(shape) * DTYPE_SIZES[dt]
        if end - b != want:
            raise _fail(path, "size", f"tensor {name!r}: data_offsets {offs} hold {end - b} bytes but {dt} {shape} "
                                      f"needs {want}: corrupted header",
                        f"tensor {name!r}: data_offsets hold {end - b} bytes but {dt} {shape} needs {want}; "
                        f"corrupted header")
        tensors[name] = TensorEntry(dt, tuple(shape), start + b, start + end)
    last = max((t.end for t in tensors.values()), default=start)
    if last > size:
        first = next(n for n, t in tensors.items() if t.end > size)
        raise _fail(path, "truncated", f"tensor {first!r}: ends at byte {tensors[first].end} but the file has {size} "
                                       f"bytes (truncated); re-save or re-download it",
                    f"truncated: {size} bytes on disk, the header needs {last} (last {last - size} missing)")
    pos = start
    for name in sorted(tensors, key=lambda k: (tensors[k].begin, tensors[k].end)):
        t = tensors[name]
        if t.begin != pos:
            msg = (f"tensor {name!r}: starts at data offset {t.begin - start}, expected {pos - start} (overlap or "
                   f"hole in the data area: corrupted header)")
            raise _fail(path, "tiling", msg, msg)
        pos = t.end
    if pos != size:
        raise _fail(path, "padded", f"{size - pos} bytes after the last tensor (the data area should end at "
                                    f"{pos - start}): padded or foreign file",
                    f"{size - pos} unexpected bytes after the last tensor (padded or overwritten)")
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return Header(path, size, start, tensors, metadata)


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable safetensors file (truncated, padded, foreign), said with the file's name only,
    or ``None`` when it is (:func:`read_header`)."""
    try:
        read_header(path)
    except SafetensorsFormatError as e:
        return e.brief
    return None


def tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor in the file ``path`` (header only), in header order.

    Raises:
        SafetensorsFormatError: see :func:`read_header`.
    """
    header = read_header(path)
    fname = os.path.basename(header.path)
    return {k: TensorInfo(fname, torch_name(t.dtype), t.shape) for k, t in header.tensors.items()}


def safetensors_files(directory: str | os.PathLike) -> list[str]:
    """Sorted names of the ``*.safetensors`` files directly in ``directory``."""
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")
                  and os.path.isfile(os.path.join(directory, f)))


def as_path(path: Any, error: type[Exception] = SafetensorsFormatError) -> str:
    """``path`` (``str``, ``bytes`` or ``os.PathLike``) as a ``str``; ``error`` naming the type for anything else."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        message = f"expected a file or directory path (str or os.PathLike), got {type(path).__name__}"
        raise (SafetensorsFormatError(repr(path), "path", message) if error is SafetensorsFormatError
               else error(message)) from None


def safetensors_paths(path: str | os.PathLike, error: type[Exception] = SafetensorsFormatError) -> list[str]:
    """``[path]`` for a file, the paths of the ``*.safetensors`` files directly in a directory; ``error`` (with the
    path in the message) when the path does not exist or the directory holds none."""
    path = as_path(path, error)

    def fail(message: str) -> Exception:
        return SafetensorsFormatError(path, "path", message) if error is SafetensorsFormatError else error(message)

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise fail(f"{path}: no such file or directory")
    files = [os.path.join(path, f) for f in safetensors_files(path)]
    if not files:
        raise fail(f"{path}: no *.safetensors file in this directory")
    return files


def weight_files(path: str | os.PathLike, error: type[Exception] = SafetensorsFormatError) -> list[str]:
    """The ``.safetensors`` files a load of ``path`` reads: the file itself, the shards of a directory's
    ``*.safetensors.index.json``, or every ``*.safetensors`` directly in the directory; ``error`` (with the path in
    the message) when the path does not exist, holds no safetensors file, or its index names a missing shard."""
    path = as_path(path, error)

    def fail(message: str) -> Exception:
        return SafetensorsFormatError(path, "path", message) if error is SafetensorsFormatError else error(message)

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise fail(f"{path}: no such file or directory; pass a .safetensors file or a directory of them")
    indexes = index_files(path)
    if indexes:
        shards = sorted(set(read_weight_map(os.path.join(path, indexes[0]), error).values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise fail(f"{path}: {indexes[0]} lists shard(s) that are missing: {', '.join(missing)}; copy the "
                       f"complete checkpoint")
        if shards:
            return [os.path.join(path, s) for s in shards]
    files = [os.path.join(path, f) for f in safetensors_files(path)]
    if not files:
        raise fail(f"{path}: no *.safetensors file in this directory; save with safe_serialization=True")
    return files


def index_files(directory: str | os.PathLike) -> list[str]:
    """Sorted names of the shard indexes (``*.safetensors.index.json``) directly in ``directory``."""
    return sorted(f for f in os.listdir(directory) if f.endswith(INDEX_SUFFIX))


def read_weight_map(idx: str | os.PathLike, error: type[Exception] = SafetensorsFormatError) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of the shard index ``idx``, ``{}`` when it has none.

    Raises:
        error: naming the file when it is unreadable, not JSON (nested too deeply, ...), or its ``weight_map`` is
            malformed (:class:`SafetensorsFormatError` of kind ``"index"`` unless another class is given).
    """
    idx = os.fspath(idx)

    def fail(message: str) -> Exception:
        if error is SafetensorsFormatError:
            return SafetensorsFormatError(idx, "index", message)
        return error(message)

    try:
        with open(idx, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
        why = "JSON nested too deeply" if isinstance(e, RecursionError) else getattr(e, "strerror", None) or e
        raise fail(f"{idx}: unreadable index ({why}); fix or delete it") from None
    weight_map = data.get("weight_map", {}) if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise fail(f"{idx}: malformed index ('weight_map' must map tensor names to shard file names); fix or "
                   f"delete it")
    return weight_map
