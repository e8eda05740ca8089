"""Checksums of the tensors stored in ``.safetensors`` files, read through ``mmap`` on every core (no torch).

The header is read by :mod:`trainer_guard.formats.safetensors` (the one reader); the bytes of every tensor go to
:func:`trainer_guard.checksum.cpu.word_sums`; dtype code, shape and size are folded in by
:func:`trainer_guard.checksum.spec.finalize`, so values equal ``checksums(tensors)`` of the same tensors on any
device. Importing this module imports neither torch nor transformers (``trainer-guard doctor`` and ``diff``).

Example:
    >>> import tempfile, os, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "optimizer.pt"); np.arange(10, dtype=np.uint8).tofile(p)
    >>> bytes_checksums([p])[p] == bytes_checksums([p])[p]  # a whole file's bytes (file_checksums: per tensor)
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ChecksumError, SafetensorsFormatError
from ..files import stored_twice
from ..formats import safetensors as st
from ..formats.dcp import DcpFormatError, DcpIndex, read_dcp_index, read_dcp_tensor
from .cpu import word_sums
from .spec import finalize

__all__ = ["file_checksums", "dcp_checksums", "safetensors_entries", "index_weight_map"]

def _header(path: str) -> st.Header:
    try:
        return st.read_header(path)
    except SafetensorsFormatError as e:
        raise ChecksumError(str(e)) from None


def safetensors_entries(path: str | os.PathLike) -> tuple[int, dict[str, dict[str, Any]], dict[str, str]]:
    """``(data_start, entries, metadata)`` of a validated header, ``entries[name] = {"dtype", "shape", "begin",
    "end"}`` (absolute byte offsets): :func:`trainer_guard.formats.safetensors.read_header` as plain dicts.

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
    h = _header(os.fspath(path))
    entries = {n: {"dtype": e.dtype, "shape": list(e.shape), "begin": e.begin, "end": e.end}
               for n, e in h.tensors.items()}
    return h.data_start, entries, dict(h.metadata)


def index_weight_map(idx: str | os.PathLike, error: type[Exception] = ChecksumError) -> dict[str, str]:
    """:func:`trainer_guard.formats.safetensors.read_weight_map` raising :class:`ChecksumError` (or ``error``)."""
    return st.read_weight_map(idx, error)


def _files_sums(paths: list[str], progress: Callable[[int], Any] | None,
                threads: int | None) -> list[dict[str, int]]:
    """Per file, tensor name -> checksum: every tensor of every file in ONE :func:`word_sums` call, so many small
    shards are shared out among the threads as well as a few big ones."""
    headers = [_header(p) for p in paths]  # every header first: a bad file is named before any data is read
    bufs: list[np.ndarray] = []
    owners: list[tuple[int, str]] = []
    maps = []
    try:
        for i, (path, h) in enumerate(zip(paths, headers)):
            if progress is not None:
                progress(h.data_start)  # the header: with the data (which tiles the rest) the bar ends at the size
            if not h.tensors:
                continue
            mm = np.memmap(path, dtype=np.uint8, mode="r")  # pages come from the page cache, nothing is copied
            maps.append(mm)
            for n in h.in_file_order():
                bufs.append(np.asarray(mm[h.tensors[n].begin : h.tensors[n].end]))
                owners.append((i, n))
        sums = word_sums(bufs, progress, threads)
    finally:
        del bufs, maps
    out: list[dict[str, int]] = [{} for _ in paths]
    for (i, n), s in zip(owners, sums):
        e = headers[i].tensors[n]
        out[i][n] = finalize(s, e.dtype, e.shape, e.nbytes)
    return out


def _index_problems(directory: str, files: dict[str, dict[str, int]]) -> list[str]:
    """What the ``*.safetensors.index.json`` files of ``directory`` list that ``files`` (name -> its tensors) lack.
    An index next to its single file (``model.safetensors.index.json`` beside ``model.safetensors``: left by an
    earlier sharded save) is not read: ``from_pretrained`` loads the single file."""
    problems = []
    for idx in (os.path.join(directory, f) for f in st.index_files(directory)):
        weight_map = index_weight_map(idx)
        if os.path.basename(idx).removesuffix(".index.json") in files:
            continue
        for name, fname in weight_map.items():
            if fname not in files:
                problems.append(f"{idx}: tensor {name!r} is in shard {fname!r}, which is missing")
            elif name not in files[fname]:
                problems.append(f"{idx}: tensor {name!r} should be in {fname!r} but is not there")
    return problems


def file_checksums(path: str | os.PathLike, *, progress: bool = False, threads: int | None = None) -> dict[str, int]:
    """Checksum every tensor stored in a ``.safetensors`` file, or in all ``*.safetensors`` of a directory.

    The data is read through ``mmap`` (no copy) and summed on up to ``threads`` threads (default: every core,
    capped by ``TRAINER_GUARD_THREADS``); values equal ``checksums(tensors)`` of the same tensors on any device.
    In a directory, shards are merged (a name in two files is an error) and a ``*.safetensors.index.json`` is
    checked: a shard it lists must exist and hold the tensors it claims.

    Args:
        path: a ``.safetensors`` file or a directory (a checkpoint or model dir).
        progress: show a tqdm bar over the bytes (transformers' tqdm; off when its progress bars are disabled).
        threads: the most threads to use (``1``: the calling thread only).

    Raises:
        ChecksumError: naming the file/tensor: missing path, directory with no safetensors files, truncated,
            padded or foreign file, bad header, duplicate names, missing shard, unreadable or malformed index.

    Example:
        >>> import tempfile, os, torch
        >>> from safetensors.torch import save_file
        >>> from trainer_guard.checksum import checksums
        >>> d = tempfile.mkdtemp(); t = {"w": torch.arange(5.0)}
        >>> save_file(t, os.path.join(d, "model.safetensors"))
        >>> file_checksums(d) == checksums(t, backend="cpu")
        True
    """
    path = st.as_path(path, ChecksumError)
    files = st.safetensors_paths(path, ChecksumError)
    bar = None
    cb = None
    if progress:
        from transformers.utils.logging import tqdm  # lazy: transformers is heavy and only the bar needs it

        bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="checksum")
        cb = bar.update
    per_file: dict[str, dict[str, int]] = {}
    out: dict[str, int] = {}
    owner: dict[str, str] = {}
    try:
        for f, sums in zip(files, _files_sums(files, cb, threads)):
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


def bytes_checksums(paths: Sequence[str | os.PathLike], *, lengths: Mapping[str, int] | None = None,
                    threads: int | None = None) -> dict[str, int]:
    """The checksum of each file's bytes, as of a ``uint8`` tensor of the file's size (dtype ``U8``, shape
    ``(nbytes,)``): the one definition of "a whole file's checksum" (optimizer states, JSON records, configs ...).

    All files are summed in one :func:`~trainer_guard.checksum.cpu.word_sums` call, through ``mmap``, on up to
    ``threads`` threads (default: every core). ``lengths[path]`` checksums only the first that many bytes of that
    file (a safetensors header). Keys of the result are the paths as given.

    Raises:
        ChecksumError: a file is missing, unreadable, or shorter than its ``lengths`` entry (naming it).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.bin"); _ = open(p, "wb").write(b"hello")
        >>> s = bytes_checksums([p]); s[p] == bytes_checksums([p])[p] and s[p] != bytes_checksums([p], lengths={p: 4})[p]
        True
    """
    keys = [os.fspath(p) for p in paths]
    lengths = {os.fspath(k): int(v) for k, v in (lengths or {}).items()}
    maps: list[np.ndarray] = []
    sizes: list[int] = []
    try:
        for path in keys:
            try:
                size = os.path.getsize(path)
                n = lengths.get(path, size)
                if n > size:
                    raise ChecksumError(f"{path}: {size:,} bytes, shorter than the {n:,} to checksum (truncated)")
                maps.append(np.memmap(path, dtype=np.uint8, mode="r")[:n] if n else np.zeros(0, np.uint8))
            except (OSError, ValueError) as e:  # ValueError: mmap of a file emptied meanwhile
                raise ChecksumError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
            sizes.append(n)
        sums = word_sums([np.asarray(m) for m in maps], None, threads)
    finally:
        del maps
    return {k: finalize(s, "U8", (n,), n) for k, s, n in zip(keys, sums, sizes)}


def dcp_checksums(path: str | os.PathLike, index: DcpIndex | None = None, *,
                  threads: int | None = None) -> dict[str, int]:
    """Checksum every tensor of a torch.distributed.checkpoint directory (an FSDP ``pytorch_model_fsdp_0/``), keyed
    by :class:`~trainer_guard.formats.dcp.DcpIndex` names: each tensor assembled from its chunks on the CPU, one at a
    time, so the values equal :func:`trainer_guard.checksum.checksums` of the consolidated tensors (and the sums
    IntegrityGuard combines from the ranks' shards at save time).

    Raises:
        ChecksumError: the directory's metadata or a chunk is unreadable or damaged (names the file and tensor).

    Example:
        >>> import tempfile
        >>> dcp_checksums(tempfile.mkdtemp())  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        trainer_guard.errors.ChecksumError: ...: missing (DCP writes it last: the save did not finish)
    """
    from .tensors import checksums  # lazy: torch, only for DCP directories

    path = os.fspath(path)
    try:
        index = read_dcp_index(path) if index is None else index
        return {name: checksums({name: read_dcp_tensor(path, t)}, backend="cpu", threads=threads)[name]
                for name, t in index.tensors.items()}
    except DcpFormatError as e:
        raise ChecksumError(str(e)) from None
