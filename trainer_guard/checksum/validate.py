"""Which tensors the checksum accepts, and how their bytes are read: shared by the CPU dispatch
(:mod:`trainer_guard.checksum.tensors`) and the Triton kernel (:mod:`trainer_guard.checksum.triton`).

Example:
    >>> import torch
    >>> check_tensor("w", torch.zeros(2)); flat_bytes(torch.zeros(2)).numel()
    8
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ChecksumError
from ..formats.safetensors import torch_dtypes

__all__ = ["DTYPE_NAMES", "dtype_name", "check_tensor", "flat_bytes"]

#: torch dtype -> safetensors dtype code, the name folded into the checksum (the formats module's one table),
#: for the dtypes the safetensors library can save (not complex128, whose C128 code it reads but cannot write).
DTYPE_NAMES: dict[torch.dtype, str] = {d: code for d, code in torch_dtypes().items() if code != "C128"}


def dtype_name(dtype: torch.dtype, name: str = "tensor") -> str:
    """The safetensors code of a torch dtype; :class:`ChecksumError` naming ``name`` when it has none.

    Example:
        >>> dtype_name(torch.bfloat16)
        'BF16'
    """
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ChecksumError(
            f"cannot checksum {name!r}: dtype {dtype} has no safetensors name; supported dtypes are "
            f"{', '.join(str(d).replace('torch.', '') for d in DTYPE_NAMES)}; convert the tensor first"
        ) from None


def check_tensor(name: str, t: Any) -> None:
    """Raise :class:`ChecksumError` naming ``name`` unless ``t`` is a dense tensor with data and a safetensors dtype.

    Example:
        >>> check_tensor("w", torch.zeros(2))
    """
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


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s row-major bytes as a flat ``uint8`` tensor on its device (a copy only when it is not contiguous)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


