"""GPU kernels (Triton). Each module: a private ``@triton.jit`` kernel, a launcher, one public function.

Example:
    >>> from trainer_guard.ops.checksum_triton import triton_available
    >>> isinstance(triton_available(), bool)
    True
"""

__all__: list[str] = []
