"""The CPU loop of the checksum: the word sum ``S`` of a byte buffer, on every core.

A ``numba`` ``@njit(nogil=True)`` loop over a ``uint64`` view (no copy, aligned or not); without numba a chunked
numpy twin gives the same values, only slower. Because ``S`` is a plain sum mod 2^64 (see
:mod:`trainer_guard.checksum.spec`), a buffer is cut into pieces that threads sum at the same time (the loop
releases the GIL) and the partial sums add up to the same value on any number of threads.

Threads: :func:`max_threads` is the number of cores this process may use, capped by the environment variable
``TRAINER_GUARD_THREADS`` (``1`` turns threading off); every function takes a ``threads=`` argument too.

Example:
    >>> import numpy as np
    >>> buf = np.arange(4096, dtype=np.uint8)
    >>> word_sum(buf, threads=1) == word_sum(buf, threads=4)
    True
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import ChecksumError
from .spec import C1, C2, GAMMA, MASK64, mix64

__all__ = ["HAVE_NUMBA", "PIECE_WORDS", "max_threads", "word_sum", "word_sums", "numpy_word_sum", "loop_word_sum"]

#: Buffers are summed in pieces of this many 64-bit words (16 MiB): the unit of work of one thread, and of the
#: progress bar.
PIECE_WORDS = 1 << 21

#: Below this many words (32 MiB) in all, one thread sums everything (a pool costs more than it saves).
PARALLEL_MIN_WORDS = 1 << 22

THREADS_ENV = "TRAINER_GUARD_THREADS"


def max_threads() -> int:
    """Threads the checksum may use: the cores this process may run on, capped by ``TRAINER_GUARD_THREADS``.

    Raises:
        ChecksumError: ``TRAINER_GUARD_THREADS`` is set to something other than a positive integer.

    Example:
        >>> max_threads() >= 1
        True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return max(1, cores)
    try:
        cap = int(raw)
    except ValueError:
        cap = 0
    if cap < 1:
        raise ChecksumError(f"{THREADS_ENV}={raw!r}: expected a positive integer (1 = one thread); unset it to use "
                            f"every core")
    return max(1, min(cap, cores))


def numpy_word_sum(words: np.ndarray, pos0: int) -> int:
    """``sum mix(w_i ^ (pos0 + i) * GAMMA)`` over a ``uint64`` array, in chunked numpy (the twin of the loop)."""
    total = np.uint64(0)
    step = 1 << 20
    with np.errstate(over="ignore"):
        for a in range(0, words.size, step):
            w = words[a : a + step].astype(np.uint64, copy=True)
            z = w ^ ((np.arange(a, a + w.size, dtype=np.uint64) + np.uint64(pos0)) * np.uint64(GAMMA))
            z = (z ^ (z >> np.uint64(30))) * np.uint64(C1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(C2)
            z ^= z >> np.uint64(31)
            total = total + np.add.reduce(z, dtype=np.uint64)
    return int(total)


try:  # numba: the loop compiles to memory speed per core (see benchmarks/README.md); numpy is ~10x slower.
    from numba import njit

    _G, _C1, _C2 = np.uint64(GAMMA), np.uint64(C1), np.uint64(C2)
    _S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

    def _word_sum_loop(words, pos0):  # pragma: no cover - compiled
        s = np.uint64(0)
        p = np.uint64(pos0)
        for i in range(words.size):
            z = words[i] ^ ((p + np.uint64(i)) * _G)
            z = (z ^ (z >> _S30)) * _C1
            z = (z ^ (z >> _S27)) * _C2
            s += z ^ (z >> _S31)
        return s

    try:  # compiled once, then loaded from numba's on-disk cache
        _numba_word_sum = njit(nogil=True, cache=True, fastmath=False)(_word_sum_loop)
    except RuntimeError:  # no writable cache dir (read-only install, unwritable HOME): compile in each process
        _numba_word_sum = njit(nogil=True, cache=False, fastmath=False)(_word_sum_loop)

    def loop_word_sum(words: np.ndarray, pos0: int) -> int:
        """The numba loop: ``sum mix(w_i ^ (pos0 + i) * GAMMA)`` over a ``uint64`` array (releases the GIL)."""
        return int(_numba_word_sum(words, np.int64(pos0)))

    HAVE_NUMBA = True

    def _warm_up() -> None:
        """Load the compiled loop from numba's cache for both array types a buffer can have: read-only (a file's
        mmap) and writable (a tensor's bytes); numba types a misaligned view like an aligned one."""
        raw = np.zeros(16, np.uint8)
        frozen = raw.copy()
        frozen.setflags(write=False)
        for buf in (frozen, raw):  # the file path first: doctor calls it right after import
            _numba_word_sum(buf.view(np.uint64), np.int64(0))

    # The first call in a process pays for numba to load the loop (~0.1-0.3 s): do it now, on a thread, so that a
    # training process (which imports this when its guards are built) finds it ready at its first save or resume.
    _WARM_UP = threading.Thread(target=_warm_up, name="trainer_guard-numba-warmup", daemon=True)
    _WARM_UP.start()
    atexit.register(_WARM_UP.join, 10)  # never let the interpreter exit in the middle of numba's loading
except ImportError:  # pragma: no cover - numba is a dependency; keep working without it
    loop_word_sum = numpy_word_sum
    HAVE_NUMBA = False


def _tail_sum(tail: np.ndarray, pos: int) -> int:
    """The last, partial word (``1..7`` bytes), zero-padded, at word position ``pos``."""
    w = int.from_bytes(tail.tobytes() + b"\0" * (8 - tail.size), "little")
    return mix64(w ^ ((pos * GAMMA) & MASK64))


def word_sums(buffers: Sequence[np.ndarray], progress: Callable[[int], Any] | None = None,
              threads: int | None = None, first_words: Sequence[int] | None = None) -> list[int]:
    """``S`` of each flat ``uint8`` array of ``buffers`` (the bytes of one tensor each), on up to ``threads`` threads.

    ``first_words[k]`` (default 0) is the word position of buffer ``k``'s first byte in its whole tensor: a shard
    of a tensor split by rows gives its part of the whole tensor's sum, and the parts add up (FSDP2 shards).

    Every buffer is cut into pieces of :data:`PIECE_WORDS` words; the pieces of all buffers are shared out among
    the threads (balanced by size) and added back per buffer. ``progress(nbytes_done)`` is called from the calling
    thread as pieces finish (with threads, a thread's pieces are reported when it is done).

    Raises:
        ChecksumError: a buffer is not a flat ``uint8`` array.

    Example:
        >>> import numpy as np
        >>> word_sums([np.zeros(0, np.uint8), np.ones(9, np.uint8)])[0]
        0
    """
    tasks: list[tuple[int, np.ndarray, int]] = []  # (buffer index, uint64 view, first word position)
    sums = [0] * len(buffers)
    for k, buf in enumerate(buffers):
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
            got = f"dtype {buf.dtype} with {buf.ndim} dims" if isinstance(buf, np.ndarray) else type(buf).__name__
            raise ChecksumError(f"word_sum needs a flat uint8 array, got {got}")
        nfull = buf.size // 8
        first = int(first_words[k]) if first_words is not None else 0
        for a in range(0, nfull, PIECE_WORDS):
            b = min(nfull, a + PIECE_WORDS)
            tasks.append((k, buf[8 * a : 8 * b].view(np.uint64), first + a))
        if buf.size % 8:
            sums[k] += _tail_sum(buf[8 * nfull :], first + nfull)
    total = sum(words.size for _, words, _ in tasks)
    # threads pay off only on enough bytes: below PARALLEL_MIN_WORDS the pool's start costs more than it saves
    n = min(threads or max_threads(), len(tasks)) if total >= PARALLEL_MIN_WORDS else 1
    if n <= 1:
        for k, words, pos0 in tasks:
            sums[k] += loop_word_sum(words, pos0)
            if progress is not None:
                progress(8 * words.size)
    else:
        buckets: list[list[tuple[int, np.ndarray, int]]] = [[] for _ in range(n)]  # one job per thread, balanced
        load = [0] * n
        for task in sorted(tasks, key=lambda t: -t[1].size):
            i = load.index(min(load))
            buckets[i].append(task)
            load[i] += task[1].size

        def run(bucket: list[tuple[int, np.ndarray, int]]) -> list[tuple[int, int, int]]:
            return [(k, loop_word_sum(words, pos0), words.size) for k, words, pos0 in bucket]

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="trainer_guard-checksum") as pool:
            for fut in [pool.submit(run, b) for b in buckets]:
                for k, s, size in fut.result():
                    sums[k] += s
                    if progress is not None:
                        progress(8 * size)
    if progress is not None:
        tails = sum(buf.size % 8 for buf in buffers)
        if tails:
            progress(tails)
    return [s & MASK64 for s in sums]


def word_sum(buf: np.ndarray, progress: Callable[[int], Any] | None = None, threads: int | None = None,
             first_word: int = 0) -> int:
    """``S`` of one flat ``uint8`` array (the bytes of one tensor, or of a row shard starting at word
    ``first_word`` of it), without copying it (:func:`word_sums`).

    Example:
        >>> import numpy as np
        >>> word_sum(np.zeros(0, np.uint8))
        0
    """
    return word_sums([buf], progress, threads, [first_word])[0]
