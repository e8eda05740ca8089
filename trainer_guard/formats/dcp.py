"""torch.distributed.checkpoint (DCP) directories, read on CPU without unsafe unpickling: what an FSDP
``SHARDED_STATE_DICT`` checkpoint's ``pytorch_model_fsdp_0/`` and ``optimizer_0/`` hold.

A DCP directory holds ``.metadata`` (a pickle of :class:`torch.distributed.checkpoint.metadata.Metadata`: every
tensor's dtype, size and chunks, and where each chunk's bytes are) and one ``__<rank>_<n>.distcp`` file per writing
rank (each chunk a ``torch.save`` archive at an offset). DCP itself reads ``.metadata`` with ``pickle.load``; here
it is read with an unpickler that builds only the metadata classes, torch sizes and dtypes (anything else is refused
as a damaged or foreign file), and each chunk with ``torch.load(..., weights_only=True)``.

Names: accelerate saves ``{"model": state_dict}``, so DCP stores ``model.model.embed_tokens.weight``; the
``planner_data`` path (``("model", "model.embed_tokens.weight")``) gives the state dict's own name, which is what
:attr:`DcpIndex.tensors` is keyed by (the common first element dropped). A tensor stored once for several names (a
tie) is listed under the name it was stored as; the others are in :attr:`DcpIndex.deduplicated` (DCP keeps no link
to the stored name: the manifest's ``aliases`` record it).

Example:
    >>> import tempfile
    >>> is_dcp_dir(tempfile.mkdtemp())
    False
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError

__all__ = ["DCP_METADATA", "Chunk", "DcpTensor", "DcpIndex", "is_dcp_dir", "read_dcp_index", "dcp_problems",
           "read_dcp_tensor", "DcpFormatError"]

DCP_METADATA = ".metadata"
"""The metadata file of a DCP directory (written last by DCP's coordinator rank)."""

_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    (f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                       "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                       "_MEM_FORMAT_ENCODING")
} | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib._local", "PosixPath"),
     ("pathlib._local", "WindowsPath"), ("collections", "OrderedDict")}


class DcpFormatError(IntegrityError):
    """A DCP directory that cannot be read: its ``.metadata`` damaged or foreign, a chunk outside its file, a chunk
    that does not load. ``str(error)`` names the file (and tensor) and what to do."""


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the tensor (``offsets``, ``sizes``) and in the files
    (``file`` relative to the DCP directory, byte ``offset`` and ``length``)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    """One tensor of a DCP directory: ``key`` (DCP's name), ``dtype`` (torch name), full ``shape``, its chunks."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass
class DcpIndex:
    """What a DCP directory's ``.metadata`` says: ``tensors`` (state-dict name -> :class:`DcpTensor`), ``objects``
    (non-tensor entries, e.g. an optimizer's ``param_groups``: name -> their chunk), ``deduplicated`` (names of the
    state dict not stored because their tensor is stored under another name: a tie), ``files`` (every data file it
    refers to)."""

    tensors: dict[str, DcpTensor] = field(default_factory=dict)
    objects: dict[str, Chunk] = field(default_factory=dict)
    deduplicated: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)


def is_dcp_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DCP directory (holds ``.metadata`` and ``.distcp`` files)."""
    path = os.fspath(path)
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return DCP_METADATA in names and any(n.endswith(".distcp") for n in names)


class _Unpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes, ``torch.Size`` and torch dtypes: nothing a checkpoint names can run."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a DCP metadata file never holds")


def _load_metadata(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
        for _ in pickletools.genops(data):  # every length within the file before anything is built: a damaged length
            pass  # would have the unpickler allocate it (gigabytes, or a MemoryError with noise on stderr)
        return _Unpickler(io.BytesIO(data)).load()
    except OSError as e:
        raise DcpFormatError(f"{path}: unreadable ({e.strerror or e})") from None
    except Exception as e:  # truncated, garbled or foreign: no traceback from a checkpoint's bytes
        raise DcpFormatError(f"{path}: not a readable torch.distributed.checkpoint metadata file "
                             f"({type(e).__name__}: {e}); the checkpoint is damaged: restore it from a copy, or "
                             f"resume from an earlier checkpoint") from None


def _ints(x: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in x)


def _plain_names(paths: Any, keys: list[str]) -> dict[str, str]:
    """DCP key -> the state dict's own name: the ``planner_data`` path without its common first element (accelerate's
    ``"model"``). Decided per key, so a key whose path is missing or damaged (one flipped bit in ``.metadata``) loses
    the common prefix from its key instead of every name keeping it, which made every tensor look foreign.

    Example:
        >>> _plain_names({"model.w": ("model", "w")}, ["model.w", "model.b"])
        {'model.b': 'b', 'model.w': 'w'}
        >>> _plain_names({}, ["w"])
        {'w': 'w'}
    """
    names = {k: tuple(paths.get(k) or (k,)) for k in sorted(paths.keys() | set(keys))}
    firsts = {str(p[0]) for p in names.values() if len(p) > 1}
    if len(firsts) != 1:
        return {k: ".".join(str(x) for x in p) for k, p in names.items()}
    first = firsts.pop()
    return {k: ".".join(str(x) for x in p[1:]) if len(p) > 1 and str(p[0]) == first
            else ".".join(str(x) for x in p).removeprefix(first + ".") for k, p in names.items()}


def read_dcp_index(path: str | os.PathLike) -> DcpIndex:
    """The :class:`DcpIndex` of DCP directory ``path`` (its ``.metadata`` only; no tensor data is read).

    Raises:
        DcpFormatError: ``.metadata`` is missing, damaged or foreign (named), or describes something else than
            tensors stored in files of this directory.
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, DCP_METADATA)
    if not os.path.isfile(meta_path):
        raise DcpFormatError(f"{meta_path}: missing (DCP writes it last: the save did not finish)")
    md = _load_metadata(meta_path)
    try:
        import torch

        sd_meta = md.state_dict_metadata
        storage = md.storage_data
        paths = getattr(md, "planner_data", None) or {}
        keys = list(sd_meta)
        plain = _plain_names(paths, keys)
        by_key: dict[str, list[Chunk]] = {}
        for idx, info in storage.items():
            if getattr(info, "transform_descriptors", None):
                raise DcpFormatError(f"{meta_path}: {idx.fqn} is stored with transforms "
                                     f"{list(info.transform_descriptors)} (compressed?), which this version does not "
                                     f"read; check it with torch.distributed.checkpoint itself")
            by_key.setdefault(idx.fqn, []).append(
                (_ints(idx.offset) if idx.offset is not None else (), str(info.relative_path), int(info.offset),
                 int(info.length)))
        out = DcpIndex()
        for key in keys:
            m = sd_meta[key]
            stored = by_key.get(key, [])
            out.files.update(s[1] for s in stored)
            if hasattr(m, "chunks"):  # TensorStorageMetadata
                where = {s[0]: s[1:] for s in stored}
                chunks = []
                for c in m.chunks:
                    off = _ints(c.offsets)
                    if off not in where:
                        raise DcpFormatError(f"{meta_path}: {key}: chunk at {list(off)} has no stored bytes")
                    chunks.append(Chunk(off, _ints(c.sizes), *where[off]))
                shape = _ints(m.size)
                for c in chunks:
                    if len(c.offsets) != len(shape) or len(c.sizes) != len(shape) or any(
                            o < 0 or n < 0 or o + n > d for o, n, d in zip(c.offsets, c.sizes, shape)):
                        raise DcpFormatError(f"{meta_path}: {key}: chunk at {list(c.offsets)} of size "
                                             f"{list(c.sizes)} lies outside the tensor's shape {list(shape)}: the "
                                             f"file is damaged; restore it from a copy")
                dtype = m.properties.dtype
                if not isinstance(dtype, torch.dtype):
                    raise DcpFormatError(f"{meta_path}: {key}: dtype {dtype!r} is not a torch dtype")
                out.tensors[plain[key]] = DcpTensor(key, str(dtype).removeprefix("torch."), shape,
                                                    tuple(chunks))
            elif stored:  # BytesStorageMetadata: a pickled object (torch.save'd by DCP)
                out.objects[plain[key]] = Chunk((), (), *stored[0][1:])
        stored_names = {plain[k] for k in keys}
        out.deduplicated = {n for n in plain.values() if n not in stored_names}  # in planner_data, not stored
        return out
    except DcpFormatError:
        raise
    except Exception as e:  # a metadata object of unexpected shape: foreign or another torch's format
        raise DcpFormatError(f"{meta_path}: unexpected DCP metadata ({type(e).__name__}: {e}); check the checkpoint "
                             f"with the torch version that wrote it") from None


def dcp_problems(path: str | os.PathLike, index: DcpIndex) -> list[str]:
    """What is wrong with the files of DCP directory ``path`` as ``index`` describes them, without reading tensor
    data: a data file missing, a file shorter than its chunks need (truncated), chunks that do not cover their
    tensor. Each problem starts with the file it names (relative to ``path``)."""
    path = os.fspath(path)
    out = []
    sizes: dict[str, int | None] = {}
    for f in sorted(index.files):
        try:
            sizes[f] = os.path.getsize(os.path.join(path, f))
        except OSError:
            sizes[f] = None
            out.append(f"{f} is missing (its {DCP_METADATA} places chunks in it)")
    cut: dict[str, tuple[int, list[str]]] = {}  # file -> (the furthest chunk end, tensors cut)
    for name, t in sorted(index.tensors.items()):
        covered = 0
        for c in t.chunks:
            covered += math.prod(c.sizes)
            size = sizes.get(c.file)
            if size is not None and c.offset + c.length > size:
                end, names = cut.get(c.file, (0, []))
                cut[c.file] = (max(end, c.offset + c.length), names + [name])
        total = math.prod(t.shape)
        if covered != total:
            out.append(f"{DCP_METADATA}: {name}'s chunks hold {covered} of its {total} values")
    for f, (end, names) in sorted(cut.items()):
        out.append(f"{f} is truncated: {sizes[f]:,} bytes, its {DCP_METADATA} places chunks up to byte {end:,} "
                   f"({len(names)} tensor(s) cut, e.g. {names[0]})")
    return out


def read_dcp_tensor(path: str | os.PathLike, t: DcpTensor) -> Any:
    """The full tensor ``t`` of DCP directory ``path``, assembled from its chunks on the CPU (each chunk read with
    ``torch.load(..., weights_only=True)``).

    Raises:
        DcpFormatError: a chunk is unreadable or not the tensor its metadata describes (names the file and tensor).
    """
    import torch

    path = os.fspath(path)
    full = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
    for c in t.chunks:
        fp = os.path.join(path, c.file)
        try:
            with open(fp, "rb") as f:
                f.seek(c.offset)
                data = f.read(c.length)
            if len(data) != c.length:
                raise ValueError(f"{len(data)} of {c.length} bytes")
            part = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except OSError as e:
            raise DcpFormatError(f"{fp}: unreadable ({e.strerror or e})") from None
        except Exception as e:  # a damaged archive: no traceback from a checkpoint's bytes
            raise DcpFormatError(f"{fp}: {t.key}'s chunk at {list(c.offsets)} does not load ({type(e).__name__}: "
                                 f"{e}): the file is damaged; restore it from a copy") from None
        if not isinstance(part, torch.Tensor) or tuple(part.shape) != c.sizes or part.dtype != full.dtype:
            raise DcpFormatError(f"{fp}: {t.key}'s chunk at {list(c.offsets)} is not the {t.dtype} {list(c.sizes)} "
                                 f"tensor its {DCP_METADATA} describes")
        full[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] = part
    return full

