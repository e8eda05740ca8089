"""Checkpoints of sharded training, as manifests see them: FSDP ``SHARDED_STATE_DICT`` (torch.distributed.checkpoint
directories ``pytorch_model_fsdp_<i>/`` + ``optimizer_<i>/``) and DeepSpeed ZeRO (``global_step<N>/`` rank files).

The manifest is the same whole-checkpoint format (:mod:`trainer_guard.checkpoint.contents`): every file with its
size and the checksum of all its bytes (``.distcp`` shards, ``.metadata``, ZeRO rank files), plus per-tensor
checksums where the tensors can be read safely. A DCP tensor's entry names its directory as its ``file``
(``pytorch_model_fsdp_0``); its checksum is the checksum of the consolidated (full) tensor, which IntegrityGuard
combines from the ranks' shards at save time (:func:`trainer_guard.core.divergence.sharded_checksums`, no tensor
gathered) and :func:`trainer_guard.checksum.disk.dcp_checksums` recomputes from the files, so a sharded checkpoint
and its consolidated export (``model.safetensors``) carry the same values. ZeRO rank files are pickles: they are
covered by their file checksums only (reading their tensors would need unsafe unpickling).

Pure functions: no Trainer, no ranks.

Example:
    >>> import tempfile
    >>> sharded_layout(tempfile.mkdtemp()) is None
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..checksum.disk import dcp_checksums, file_checksums
from ..errors import ChecksumError, IntegrityError
from ..files import deepspeed_step_dirs, fsdp_model_dirs
from ..formats.dcp import DcpFormatError, is_dcp_dir, read_dcp_index
from ..formats.safetensors import TensorInfo, safetensors_files
from .manifest import build_manifest, compare, dtype_name, index_entries
from .reconcile import Checked
from .stored import read_index

__all__ = ["sharded_layout", "dcp_dirs", "sharded_index", "sharded_sums", "dcp_manifest", "files_manifest"]


def dcp_dirs(directory: str | os.PathLike) -> list[str]:
    """The FSDP model directories (``pytorch_model_fsdp_<i>``) of ``directory`` that are DCP directories."""
    directory = os.fspath(directory)
    return [d for d in fsdp_model_dirs(directory) if is_dcp_dir(os.path.join(directory, d))]


def sharded_layout(directory: str | os.PathLike) -> str | None:
    """``"fsdp"`` (DCP model directories), ``"deepspeed"`` (ZeRO ``global_step<N>/`` rank files) or ``None``."""
    if fsdp_model_dirs(directory):
        return "fsdp"
    if deepspeed_step_dirs(directory):
        return "deepspeed"
    return None


def sharded_index(directory: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor of the DCP model directories of ``directory`` (their ``file`` is
    the DCP directory's name); read from ``.metadata`` only.

    Raises:
        IntegrityError: a ``.metadata`` is missing, damaged or foreign, or two directories hold the same name.
    """
    directory = os.fspath(directory)
    out: dict[str, TensorInfo] = {}
    for d in fsdp_model_dirs(directory):
        index = read_dcp_index(os.path.join(directory, d))  # DcpFormatError is an IntegrityError
        for name, t in index.tensors.items():
            if name in out:
                raise IntegrityError(f"{name} is stored in both {out[name].file}/ and {d}/")
            out[name] = TensorInfo(d, t.dtype, t.shape)
    return out


def sharded_sums(directory: str | os.PathLike, *, threads: int | None = None) -> dict[str, int]:
    """Checksums of every tensor of the DCP model directories of ``directory`` (consolidated tensors).

    Raises:
        ChecksumError: a directory's metadata or a chunk is unreadable or damaged (named).
    """
    directory = os.fspath(directory)
    out: dict[str, int] = {}
    for d in fsdp_model_dirs(directory):
        out.update(dcp_checksums(os.path.join(directory, d), threads=threads))
    return out


def dcp_manifest(directory: str | os.PathLike, live: Mapping[str, Any], sums: Mapping[str, int], *,
                 global_step: int | None, tie_groups: list[list[str]], verify: str = "manifest") -> Checked:
    """Check the DCP model directories of ``directory`` against the ``live`` tensors (state-dict name -> tensor or
    anything with ``dtype`` and ``shape``: DTensors give their global ones) and build the manifest, taking the
    checksums from ``sums`` (the full tensors', combined from the shards).

    ``verify``: ``"manifest"`` compares names, dtypes and shapes with ``.metadata``; ``"readback"`` also reads every
    tensor back from the ``.distcp`` files and compares checksums; ``"off"`` turns problems into warnings.
    """
    directory = os.fspath(directory)
    try:
        index = sharded_index(directory)
    except IntegrityError as e:
        return Checked(None, [str(e)], [])
    problems: list[str] = []
    stored: dict[str, TensorInfo] = {}
    for name, info in index.items():
        t = live.get(name)
        if t is None or name not in sums:
            problems.append(f"{info.file}/: holds {name}, which the model does not have")
            continue
        now = (dtype_name(t.dtype), tuple(int(s) for s in t.shape))
        if now != (info.dtype, info.shape):
            problems.append(f"{info.file}/: {name} is stored as {info.dtype} {list(info.shape)}, the model holds "
                            f"{now[0]} {list(now[1])}")
        stored[name] = info
    aliases = {n for g in tie_groups for n in g[1:]}
    for name in sorted(set(live) - set(index) - aliases):
        problems.append(f"{name}: not saved (no DCP model directory holds it)")
    if verify == "readback":
        try:
            back = sharded_sums(directory)
        except ChecksumError as e:
            return Checked(None, problems + [str(e)], [])
        problems += [m.message for m in compare(
            index_entries(stored, {k: sums[k] for k in stored}), index_entries(stored, back),
            expected_label="model", actual_label="files", check_extra=False)]
    if problems and verify != "off":
        return Checked(None, problems, [])
    manifest = build_manifest(stored, global_step=global_step, tie_groups=tie_groups,
                              files={k: i.file for k, i in stored.items()}, sums={k: sums[k] for k in stored})
    return Checked(manifest, [], problems)


def files_manifest(directory: str | os.PathLike, *, global_step: int | None,
                   tie_groups: list[list[str]]) -> Checked:
    """The manifest of a checkpoint whose tensors the ranks hold as partitions no rank can checksum alone (DeepSpeed
    ZeRO-3): every file by its bytes (added at commit), and the tensors of its ``.safetensors`` files, if any (a ZeRO-3
    save with ``stage3_gather_16bit_weights_on_model_save``), read back from the files (``source: file``)."""
    directory = os.fspath(directory)
    if not safetensors_files(directory):
        return Checked(build_manifest({}, global_step=global_step, tie_groups=[]), [], [])
    try:
        index = read_index(directory)
        sums = file_checksums(directory)
    except (IntegrityError, ChecksumError, DcpFormatError) as e:
        return Checked(None, [str(e)], [])
    manifest = build_manifest(index, global_step=global_step, tie_groups=tie_groups,
                              files={k: i.file for k, i in index.items()}, sums=sums,
                              sources={k: "file" for k in index}, directory=directory)
    return Checked(manifest, [], [])
