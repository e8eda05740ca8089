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

Pure functions: no Trainer, no ranks, no torch at import (``trainer-guard doctor`` and ``diff``). The manifests of
such checkpoints are built by :func:`trainer_guard.checkpoint.reconcile.dcp_manifest` and
:func:`~trainer_guard.checkpoint.reconcile.files_manifest`.

Example:
    >>> import tempfile
    >>> sharded_layout(tempfile.mkdtemp()) is None
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..checksum.disk import dcp_checksums
from ..errors import IntegrityError
from ..files import deepspeed_step_dirs, fsdp_model_dirs
from ..formats.dcp import DcpIndex, is_dcp_dir, read_dcp_index
from ..formats.safetensors import TensorInfo

__all__ = ["sharded_layout", "dcp_dirs", "sharded_index", "tensor_infos", "sharded_sums"]


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
    return tensor_infos({d: read_dcp_index(os.path.join(directory, d))  # DcpFormatError is an IntegrityError
                         for d in fsdp_model_dirs(directory)})


def tensor_infos(indexes: Mapping[str, DcpIndex]) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of the tensors of DCP directories already read (directory name -> its index).

    Raises:
        IntegrityError: two directories hold the same name.
    """
    out: dict[str, TensorInfo] = {}
    for d, index in indexes.items():
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
