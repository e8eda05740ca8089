"""What a weight directory stores, read from its ``.safetensors`` headers only (no tensor data, no torch).

Example:
    >>> import tempfile, os, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp(); save_file({"w": torch.zeros(2, 3)}, os.path.join(d, "model.safetensors"))
    >>> read_index(d)["w"]
    TensorInfo(file='model.safetensors', dtype='float32', shape=(2, 3))
"""

from __future__ import annotations

import os

from ..errors import IntegrityError, SafetensorsFormatError, UsageError
from ..files import stored_twice
from ..formats.safetensors import TensorInfo, file_problem, safetensors_files, safetensors_paths, tensor_infos

__all__ = ["read_index", "file_problem", "safetensors_files", "TensorInfo"]


def read_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor in a ``.safetensors`` file or a directory of them (headers only).

    Raises:
        UsageError: the path does not exist or holds no safetensors file.
        IntegrityError: a file is truncated or not safetensors (names the file), or two files hold the same name.
    """
    out: dict[str, TensorInfo] = {}
    for fp in safetensors_paths(os.fspath(path), UsageError):
        try:
            infos = tensor_infos(fp)
        except SafetensorsFormatError as e:
            raise IntegrityError(e.brief) from None
        for key, info in infos.items():
            if key in out:
                raise IntegrityError(stored_twice(key, os.path.join(os.path.dirname(fp), out[key].file), fp))
            out[key] = info
    return out
