"""Small file helpers: atomic writes (temp file + fsync + rename), JSON sidecars.

Example:
    >>> import tempfile, os
    >>> from trainer_guard.core.io import atomic_write_json, read_json
    >>> d = tempfile.mkdtemp()
    >>> atomic_write_json(os.path.join(d, "x.json"), {"a": 1})
    >>> read_json(os.path.join(d, "x.json"))
    {'a': 1}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from ..errors import DamagedFileError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "replace_json", "read_json", "TOO_DEEP"]

TOO_DEEP = "JSON nested too deeply"
""":class:`~trainer_guard.errors.DamagedFileError`'s ``reason`` for JSON nested past Python's recursion limit."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a torn one; on error the temp file is removed. The
    file gets the permissions ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s private 0600.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread, for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def replace_json(path: str | os.PathLike, obj: Any) -> bool:
    """Make ``path`` hold ``obj`` (atomically, as :func:`atomic_write_json`), or, with ``obj=None``, nothing: a file
    left there (an earlier run's record in a checkpoint directory saved into again) is removed.

    Returns:
        Whether an earlier file was removed.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "record.json")
        >>> replace_json(p, {"a": 1}), replace_json(p, None), os.path.exists(p)
        (False, True, False)
    """
    if obj is not None:
        atomic_write_json(path, obj)
        return False
    if not os.path.isfile(path):
        return False
    os.remove(path)
    return True


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``.

    Raises:
        DamagedFileError: (an :class:`~trainer_guard.errors.IntegrityError` and a ``ValueError``) the file is not
            valid UTF-8 JSON or nests too deeply: truncated, emptied or garbled; the message names the file.
        OSError: it cannot be opened.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "r.json"); _ = open(p, "w").write('{"a": ')
        >>> try:
        ...     read_json(p)
        ... except ValueError as e:
        ...     str(e).startswith(p + ": damaged, not valid JSON")
        True
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
        raise DamagedFileError(path, str(e)) from None
    except RecursionError:
        raise DamagedFileError(path, TOO_DEEP) from None
