"""The checksum on several threads (issue 22): same values on any number of threads, and a cap that is honoured."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trainer_guard.checksum import cpu
from trainer_guard.checksum.disk import file_checksums
from trainer_guard.checksum.tensors import checksums
from trainer_guard.errors import ChecksumError


def _bufs():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 7, 8, 4099, 3 * 64 + 5, 1 << 12)]


def test_word_sums_are_the_same_on_any_number_of_threads(monkeypatch):
    monkeypatch.setattr(cpu, "PIECE_WORDS", 16)  # many pieces per buffer
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WORDS", 0)  # threads even for small buffers
    bufs = _bufs()
    one = cpu.word_sums(bufs, threads=1)
    assert one == [cpu.numpy_word_sum(b[: b.size // 8 * 8].view(np.uint64), 0) + (
        cpu.word_sum(b[b.size // 8 * 8:], threads=1, first_word=b.size // 8) if b.size % 8 else 0) & cpu.MASK64
        for b in bufs]
    for n in (2, 3, 8):
        assert cpu.word_sums(bufs, threads=n) == one


def test_threads_are_used_and_progress_counts_every_byte(monkeypatch):
    monkeypatch.setattr(cpu, "PIECE_WORDS", 16)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WORDS", 0)
    seen_threads = set()
    real = cpu.loop_word_sum

    def spy(words, pos0):
        import threading

        seen_threads.add(threading.current_thread().name)
        return real(words, pos0)

    monkeypatch.setattr(cpu, "loop_word_sum", spy)
    done = []
    bufs = _bufs()
    cpu.word_sums(bufs, progress=done.append, threads=3)
    assert sum(done) == sum(b.size for b in bufs)
    assert seen_threads and all(n.startswith("trainer_guard-checksum") for n in seen_threads)  # the pool did the work


def test_thread_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRAINER_GUARD_THREADS", "1")
    assert cpu.max_threads() == 1
    monkeypatch.setenv("TRAINER_GUARD_THREADS", "100000")
    assert cpu.max_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("TRAINER_GUARD_THREADS", "zero")
    with pytest.raises(ChecksumError, match=r"TRAINER_GUARD_THREADS='zero': expected a positive integer"):
        cpu.max_threads()


def test_file_and_tensor_checksums_agree_on_any_number_of_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "PIECE_WORDS", 64)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WORDS", 0)
    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(5000, generator=g), "b": torch.randn(33, 7, generator=g).to(torch.bfloat16),
         "c": torch.zeros(3, dtype=torch.int8)}
    save_file(t, tmp_path / "model.safetensors")
    want = checksums(t, backend="cpu", threads=1)
    assert checksums(t, backend="cpu", threads=4) == want
    assert file_checksums(tmp_path, threads=1) == want == file_checksums(tmp_path, threads=4)


def test_the_first_checksum_in_a_process_finds_the_loop_loaded():
    """Importing the CPU path loads numba's compiled loop on a thread (every array type a buffer can have), so the
    first save or resume checksum of a training process does not pay for it."""
    import subprocess
    import sys

    code = ("from trainer_guard.checksum import cpu\n"
            "cpu._WARM_UP.join(60)\n"
            "print(sorted({sig[0].mutable for sig in cpu._numba_word_sum.signatures}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == "[False, True]"  # read-only (a file's mmap) and writable, before any call
