"""How trainer_guard writes numbers in its messages (one owner for byte sizes).

Example:
    >>> human_bytes(1_234_567), human_bytes(1_234_567, digits=2), human_bytes(1536, binary=True), human_bytes(12)
    ('1.2 MB', '1.23 MB', '1.5 KiB', '12 B')
"""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: float, *, digits: int = 1, binary: bool = False) -> str:
    """A byte count with its unit: decimal (``kB``, ``MB``: as ``ls -h --si`` and file listings) by default,
    binary (``KiB``, ``MiB``: memory) with ``binary=True``; whole bytes below one unit."""
    base = 1024 if binary else 1000
    units = ("B", "KiB", "MiB", "GiB", "TiB") if binary else ("B", "kB", "MB", "GB", "TB")
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= base
    return f"{n:.{digits}f} {units[-1]}"  # pragma: no cover
