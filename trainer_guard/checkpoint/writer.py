"""The threaded manifest writer: a save's manifests are written (atomic, fsynced) off the training thread, each one
made a manifest of its whole directory first (every file's size and checksum, on every core:
:func:`~trainer_guard.checkpoint.contents.commit`), deepest directory first, so the checkpoint's own manifest (which
lists its adapter sub-directories' manifests too) is written last: the commit mark.

Example:
    >>> import tempfile, torch
    >>> from trainer_guard.checkpoint.manifest import build_manifest
    >>> w = ManifestWriter()
    >>> w.submit(tempfile.mkdtemp(), build_manifest({"w": torch.ones(2)}, global_step=1, tie_groups=[]))
    >>> w.join()
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import IntegrityError
from ..files import MANIFEST_FILE
from .contents import commit
from .manifest import write_manifest

__all__ = ["ManifestWriter"]


class ManifestWriter:
    """Writes manifests (atomic, fsynced: :func:`write_manifest`) on one background thread, one at a time.

    What a manifest says of the tensors is computed before :meth:`submit`; the thread lists and checksums the
    directory's files (:func:`~trainer_guard.checkpoint.contents.commit`), then writes and fsyncs (started once,
    reused). :meth:`join` waits for the pending write and raises its failure, so a manifest that
    could not be written is never silent.

    Example:
        >>> import tempfile, torch
        >>> from trainer_guard.checkpoint.manifest import build_manifest
        >>> w = ManifestWriter()
        >>> w.submit(tempfile.mkdtemp(), build_manifest({"w": torch.ones(2)}, global_step=1, tie_groups=[]))
        >>> w.join()
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._pending: Any = None
        self._error: tuple[str, Exception] | None = None
        self.last_seconds: float | None = None

    def _run(self, items: Sequence[tuple[str, Mapping[str, Any]]],
             known: Mapping[str, tuple[int, int]] | None = None) -> None:
        from .._dist import is_main_process  # lazy: imports accelerate and torch

        if not is_main_process():  # write_manifest writes on the main process only: list nothing elsewhere
            return
        t0 = time.perf_counter()
        top = os.path.normpath(items[0][0]) if items else None  # the checkpoint itself: what ``known`` is relative to
        for directory, manifest in sorted(items, key=lambda item: -os.path.normpath(item[0]).count(os.sep)):
            try:
                mine = known if os.path.normpath(directory) == top else None
                write_manifest(directory, commit(directory, manifest, known=mine))
            except Exception as e:  # re-raised by join() in the caller's thread
                self._error = (directory, e)
                break
        self.last_seconds = time.perf_counter() - t0

    def submit(self, directory: str | os.PathLike, manifest: Mapping[str, Any], background: bool = True) -> None:
        """Write ``manifest`` into ``directory`` (after the previous write finished); inline when not ``background``."""
        self.submit_many([(directory, manifest)], background=background)

    def submit_many(self, items: Sequence[tuple[str | os.PathLike, Mapping[str, Any]]],
                    background: bool = True, known: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Write several ``(directory, manifest)`` pairs in order (one save of several PEFT adapters). ``known``:
        files of the first directory already checksummed (relative path -> ``(size, checksum)``)."""
        self.join()
        items = [(os.fspath(d), m) for d, m in items]
        if background:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer_guard-manifest")
            self._pending = self._pool.submit(self._run, items, known)
        else:
            self._run(items, known)
            self.join()

    def join(self) -> None:
        """Wait for the pending write; raise :class:`IntegrityError` (naming the file) if it failed."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._error is not None:
            (directory, e), self._error = self._error, None
            if not os.path.isdir(directory):  # the checkpoint itself was deleted meanwhile (rotation, best-model
                return                        # cleanup at train end): nothing is left that a manifest could lie about
            raise IntegrityError(f"{os.path.join(directory, MANIFEST_FILE)} could not be written ({e}); that "
                                 f"checkpoint has no manifest. Check free disk space and permissions.") from e
