"""The checksum (issue 3, field report R1's "verify the saved model's integrity"): three implementations agree
bit for bit with an independent pure-Python reference, and the corruptions it must catch are caught.

The Triton kernel runs under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before triton is
imported, and this process may already have imported it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import requires, triton_interpreter_result
from safetensors.torch import save_file

from trainer_guard import checksums, file_checksums
from trainer_guard.checksum import cpu as ck_cpu
from trainer_guard.checksum import disk as ck
from trainer_guard.checksum.spec import CHECKSUM_ALGO, fingerprint
from trainer_guard.checksum.tensors import DTYPE_NAMES, tensor_checksum
from trainer_guard.errors import ChecksumError

M64 = (1 << 64) - 1


# ------------------------------------------------------------------ independent reference (the documented spec)
def _ref_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_checksum(data: bytes, dtype: str, shape) -> int:
    """Straight from the module docstring, in plain Python ints."""
    padded = data + b"\0" * (-len(data) % 8)
    s = 0
    for i in range(len(padded) // 8):
        w = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        s += _ref_mix(w ^ ((i * 0x9E3779B97F4A7C15) & M64))
    text = f"{CHECKSUM_ALGO}|{dtype}|{','.join(map(str, shape))}|{len(data)}"
    m = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return _ref_mix((s & M64) ^ m)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
          torch.int64, torch.bool] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
SIZES = [1, 3, 1023, 4097]


def make(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + n)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)


def zoo() -> dict[str, torch.Tensor]:
    """Every dtype x odd size, plus awkward layouts: non-contiguous, misaligned view, empty, 0-dim, 2-D."""
    out = {f"{str(d).replace('torch.', '')}_{n}": make(d, n) for d in DTYPES for n in SIZES}
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    out["transposed"] = base.t()  # non-contiguous
    out["misaligned"] = torch.arange(30, dtype=torch.uint8)[1:20]  # data starts 1 byte into the storage
    out["bf16_offset"] = make(torch.bfloat16, 64)[3:40]  # starts 6 bytes in
    out["empty"] = torch.zeros(0, 4)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    out["matrix"] = make(torch.float32, 77).reshape(7, 11)
    return out


# ------------------------------------------------------------------------------------------- equality
def test_cpu_path_matches_reference_on_every_dtype_and_size():
    for name, t in zoo().items():
        want = ref_checksum(raw(t), DTYPE_NAMES[t.dtype], tuple(t.shape))
        assert tensor_checksum(t) == want, name


def test_file_path_matches_cpu_path(tmp_path):
    tensors = {k: v.contiguous() for k, v in zoo().items()}
    path = tmp_path / "zoo.safetensors"
    save_file(tensors, str(path))
    assert file_checksums(path) == checksums(tensors, backend="cpu")
    assert file_checksums(tmp_path) == checksums(tensors, backend="cpu")


def test_numpy_fallback_matches_numba_loop_aligned_and_not():
    buf = np.frombuffer(np.random.default_rng(0).bytes(8 * 5000 + 8), dtype=np.uint8)
    for start in (0, 3):
        words = buf[start : start + 8 * 5000].view(np.uint64)
        assert ck_cpu.numpy_word_sum(words, 17) == ck_cpu.loop_word_sum(words, 17)
    assert ck_cpu.HAVE_NUMBA, "numba is a dependency: the CPU loop should be compiled"


def test_word_sum_splits_anywhere(monkeypatch):
    # the sum is order-independent: feeding the loop in pieces (as big tensors are) gives the same value
    t = make(torch.float32, 4097)
    whole = tensor_checksum(t)
    monkeypatch.setattr(ck_cpu, "PIECE_WORDS", 7)
    assert tensor_checksum(t) == whole


_TRITON_CHILD = r"""
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
from test_checksum import zoo
from trainer_guard import checksums
from trainer_guard.checksum.triton import triton_checksums
z = zoo()
# chunks of 512 words: big tensors span full chunks (unmasked path) and a partial one (masked path)
out = {"chunked": triton_checksums(z, block=256, iters=2),
       "defaults": checksums({n: z[n] for n in ("float32_3", "bfloat16_1023", "misaligned")}, backend="triton")}
# a sharded tensor's parts at their word offsets (FSDP2 shards; the second bf16 part ends in a partial word)
from trainer_guard.checksum.tensors import partial_sums
g = torch.Generator().manual_seed(0)
parts = {"f32_a": (torch.randn(37, 5, generator=g)[:10], 0), "f32_b": (torch.randn(37, 5, generator=g)[10:], 25),
         "bf16_b": (torch.randn(9, 3, generator=g).to(torch.bfloat16)[4:], 3)}
out["partial"] = partial_sums({n: t for n, (t, _) in parts.items()}, {n: w for n, (_, w) in parts.items()},
                              backend="triton")
print("RESULT" + json.dumps({k: {n: str(v) for n, v in d.items()} for k, d in out.items()}))
"""


def _partial_cpu() -> dict[str, str]:
    from trainer_guard.checksum.tensors import partial_sums

    g = torch.Generator().manual_seed(0)
    parts = {"f32_a": (torch.randn(37, 5, generator=g)[:10], 0), "f32_b": (torch.randn(37, 5, generator=g)[10:], 25),
             "bf16_b": (torch.randn(9, 3, generator=g).to(torch.bfloat16)[4:], 3)}
    got = partial_sums({n: t for n, (t, _) in parts.items()}, {n: w for n, (_, w) in parts.items()}, backend="cpu")
    return {n: str(v) for n, v in got.items()}


def test_partial_sums_of_row_shards_add_up_to_the_whole_tensor():
    from trainer_guard.checksum.spec import MASK64, finalize
    from trainer_guard.checksum.tensors import dtype_name, partial_sums

    for dtype, rows, cols, cut in ((torch.float32, 37, 5, 10), (torch.bfloat16, 9, 3, 4), (torch.float64, 6, 1, 5)):
        w = torch.randn(rows, cols).to(dtype)
        row_words = w.element_size() * cols / 8
        a = partial_sums({"w": w[:cut]}, {"w": 0}, backend="cpu")["w"]
        b = partial_sums({"w": w[cut:]}, {"w": int(cut * row_words)}, backend="cpu")["w"]
        whole = finalize((a + b) & MASK64, dtype_name(dtype), (rows, cols), w.numel() * w.element_size())
        assert whole == checksums({"w": w}, backend="cpu")["w"], dtype
        wrong = partial_sums({"w": w[cut:]}, {"w": int(cut * row_words) + 1}, backend="cpu")["w"]  # misplaced
        assert finalize((a + wrong) & MASK64, dtype_name(dtype), (rows, cols), w.numel() * w.element_size()) != whole


@pytest.mark.slow
def test_triton_kernel_matches_cpu_path_under_interpreter():
    got = triton_interpreter_result(_TRITON_CHILD)
    want = {n: str(v) for n, v in checksums(zoo(), backend="cpu").items()}
    assert len(got["chunked"]) == len(want) and len(got["defaults"]) == 3
    assert got.pop("partial") == _partial_cpu()  # shards at word offsets: the kernel's parts equal the CPU's
    for run, sums in got.items():
        bad = [n for n in sums if sums[n] != want[n]]
        assert not bad, f"{run}: triton differs from cpu on {bad}"


@pytest.mark.gpu
def test_triton_kernel_matches_cpu_path_on_gpu():
    from trainer_guard.checksum.triton import triton_checksums

    z = {k: v.cuda() for k, v in zoo().items()}
    z["big"] = torch.randn(3 * 1024 * 64 + 5, device="cuda", dtype=torch.bfloat16)  # several full + 1 partial chunk
    got = checksums(z)  # auto -> triton
    assert got == triton_checksums(z)
    assert got == checksums(z, backend="cpu")


@pytest.mark.gpu
def test_auto_backend_falls_back_to_cpu_when_the_kernel_fails(monkeypatch, caplog):
    from trainer_guard.checksum import triton as checksum_triton

    def broken(tensors, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(checksum_triton, "triton_checksums", broken)
    z = {"w": torch.randn(1000, device="cuda")}
    with caplog.at_level("WARNING", logger="trainer_guard"):
        assert checksums(z) == checksums(z, backend="cpu")
    assert "the triton checksum kernel failed (RuntimeError: no kernel image for this GPU)" in caplog.text


# ------------------------------------------------------------------------------------------- detection
def _flip(t: torch.Tensor, bit: int) -> torch.Tensor:
    b = bytearray(raw(t))
    b[bit // 8] ^= 1 << (bit % 8)
    return torch.frombuffer(b, dtype=t.dtype).reshape(t.shape).clone()


@pytest.mark.parametrize("dtype,n", [(torch.float32, 5), (torch.bfloat16, 7), (torch.uint8, 11)])
def test_every_single_bit_flip_is_detected(dtype, n):
    t = make(dtype, n)
    base = tensor_checksum(t)
    nbits = 8 * t.numel() * t.element_size()
    sums = {tensor_checksum(_flip(t, bit)) for bit in range(nbits)}
    assert base not in sums
    assert len(sums) == nbits  # and no two flips collide


def test_swaps_transposes_truncation_padding_dtype_and_shape_are_detected():
    t = make(torch.bfloat16, 64).reshape(8, 8)
    base = tensor_checksum(t)
    flat = t.reshape(-1)
    variants = {
        "swap in one word": flat[[1, 0, *range(2, 64)]].reshape(8, 8),
        "swap across words": flat[[0, 1, 2, 9, 4, 5, 6, 7, 8, 3, *range(10, 64)]].reshape(8, 8),
        "square transpose": t.t().contiguous(),
        "truncation": t.reshape(-1)[:-1],
        "zero padding": torch.cat([flat, torch.zeros(1, dtype=t.dtype)]),
        "dtype reinterpretation": t.view(torch.float16),
        "reshape": t.reshape(4, 16),
    }
    for what, v in variants.items():
        assert tensor_checksum(v) != base, what
    r = make(torch.float32, 6).reshape(2, 3)
    assert tensor_checksum(r.t().contiguous()) != tensor_checksum(r)  # non-square transpose (shape differs too)
    # the same bytes with a trailing zero byte: identical words, told apart by the byte count
    u = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert tensor_checksum(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)) != tensor_checksum(u)


def test_torch_hash_tensor_misses_a_swap_that_the_checksum_catches():
    t = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    s = torch.tensor([2, 1, 3, 4], dtype=torch.int64)
    if hasattr(torch, "hash_tensor"):  # the order-blind peer named in issue 3
        assert torch.hash_tensor(t) == torch.hash_tensor(s)
    assert tensor_checksum(t) != tensor_checksum(s)


def test_fingerprint_is_order_independent_and_sensitive():
    a = {"x": 1, "y": 2, "z": 3}
    assert fingerprint(a) == fingerprint(dict(reversed(list(a.items()))))
    assert fingerprint(a) != fingerprint({"x": 2, "y": 1, "z": 3})  # checksums permuted between names
    assert fingerprint(a) != fingerprint({"x": 1, "y": 2})
    assert fingerprint(a) != fingerprint({"x": 1, "y": 2, "w": 3})
    assert fingerprint({}) == fingerprint({})
    with pytest.raises(ChecksumError, match=r"checksum of 'x' must be an unsigned 64-bit int, got -1"):
        fingerprint({"x": -1})


# --------------------------------------------------------------------------------------- files on disk
@pytest.fixture
def saved(tmp_path):
    tensors = {"a.weight": make(torch.float32, 64).reshape(8, 8), "b.weight": make(torch.float32, 64, 1).reshape(8, 8),
               "c.bias": make(torch.bfloat16, 5)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_file_bit_flip_changes_exactly_that_tensor(saved):
    path, tensors = saved
    start, entries, _ = ck.safetensors_entries(path)
    before = file_checksums(path)
    data = bytearray(path.read_bytes())
    data[entries["b.weight"]["begin"] + 13] ^= 0x10
    path.write_bytes(bytes(data))
    after = file_checksums(path)
    assert [n for n in before if before[n] != after[n]] == ["b.weight"]


def test_file_truncation_padding_and_foreign_files_raise_naming_the_file(saved, tmp_path):
    path, _ = saved
    good = path.read_bytes()
    size = len(good)
    path.write_bytes(good[:-3])
    with pytest.raises(ChecksumError, match=rf"tensor '\w\.\w+': ends at byte {size} but the file has {size - 3} "
                                            rf"bytes \(truncated\)"):
        file_checksums(path)
    path.write_bytes(good + b"\0" * 8)
    with pytest.raises(ChecksumError, match=r"8 bytes after the last tensor .*padded or foreign file"):
        file_checksums(path)
    path.write_bytes(good[:5])
    with pytest.raises(ChecksumError, match=r"5 bytes is too short for a safetensors file \(truncated\?\)"):
        file_checksums(path)
    foreign = tmp_path / "pytorch_model.safetensors"
    torch.save({"w": torch.zeros(3)}, foreign)  # a zip pickle with the wrong extension
    with pytest.raises(ChecksumError, match=r"pytorch_model.safetensors: header length \d+ exceeds the file"):
        file_checksums(foreign)
    with pytest.raises(ChecksumError, match=r"nowhere: no such file or directory"):
        file_checksums(tmp_path / "nowhere")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ChecksumError, match=r"emptydir: no \*.safetensors file in this directory"):
        file_checksums(empty)


def test_swapped_tensors_in_a_file_are_caught(saved):
    path, tensors = saved
    before = file_checksums(path)
    # swap the two same-shaped tensors' data by swapping their names in the header
    start = _data_start(path)
    blob = path.read_bytes()
    header = json.loads(blob[8:start])
    header["a.weight"], header["b.weight"] = header["b.weight"], header["a.weight"]
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (start - 8 - len(hb))
    path.write_bytes(blob[:8] + hb + blob[start:])
    after = file_checksums(path)
    assert after["a.weight"] == before["b.weight"] and after["b.weight"] == before["a.weight"]
    assert fingerprint(after) != fingerprint(before)


def test_sharded_dir_missing_shard_and_duplicate_names(tmp_path):
    from trainer_guard.tiny import tiny_model

    model = tiny_model("llama-untied")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    live = checksums(dict(model.state_dict()), backend="cpu")
    assert file_checksums(tmp_path) == live  # sharded dir merges to the live model's checksums
    dup = tmp_path / "zz-extra.safetensors"
    save_file({"lm_head.weight": torch.zeros(2)}, str(dup))
    with pytest.raises(ChecksumError, match=r"tensor 'lm_head.weight' is stored twice: in .* and in .*zz-extra"):
        file_checksums(tmp_path)
    dup.unlink()
    shards[0].unlink()
    with pytest.raises(ChecksumError, match=rf"sharded checkpoint is incomplete:\n  - .*index.json: tensor '.+' is "
                                            rf"in shard '{shards[0].name}', which is missing"):
        file_checksums(tmp_path)


def test_file_progress_bar_counts_every_byte(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    seen = []

    class Bar:
        def __init__(self, total, **kw):
            seen.append(("total", total))

        def update(self, n):
            seen.append(("update", n))

        def close(self):
            seen.append(("close", None))

    monkeypatch.setattr(hf_logging, "tqdm", Bar)
    tensors = {"w": make(torch.float32, 4097), "b": make(torch.uint8, 3)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    assert file_checksums(tmp_path, progress=True) == checksums(tensors, backend="cpu")
    size = (tmp_path / "m.safetensors").stat().st_size
    assert seen[0] == ("total", size) and seen[-1] == ("close", None)
    assert sum(n for k, n in seen if k == "update") == size


def test_file_path_maps_the_file_instead_of_reading_it(tmp_path):
    t = {"w": torch.zeros(4 * 1024 * 1024, dtype=torch.uint8)}  # 4 MiB of data
    path = tmp_path / "m.safetensors"
    save_file(t, str(path))
    file_checksums(path)  # compile/warm
    tracemalloc.start()
    file_checksums(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 512 * 1024, f"file_checksums allocated {peak} bytes for a 4 MiB tensor: it copied the data"


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors_say_what_and_what_to_do():
    with pytest.raises(ChecksumError, match=r"^`backend` can be 'auto', 'triton', 'cpu', got 'gpu'$"):
        checksums({"w": torch.ones(1)}, backend="gpu")
    with pytest.raises(ChecksumError, match=r"cannot checksum 'm': it is on the meta device and holds no data"):
        checksums({"m": torch.empty(3, device="meta")})
    with pytest.raises(ChecksumError, match=r"cannot checksum 'c': dtype torch.complex128 has no safetensors name"):
        checksums({"c": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(ChecksumError, match=r"cannot checksum 'x': expected a torch.Tensor, got list"):
        checksums({"x": [1, 2]})
    with pytest.raises(ChecksumError, match=r"cannot checksum 's': layout torch.sparse_coo is not supported"):
        checksums({"s": torch.eye(2).to_sparse()})
    assert checksums({}) == {}
    assert checksums({"w": torch.ones(2)}) == checksums({"w": torch.ones(2)}, backend="cpu")  # auto on CPU


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="interpreter accepts CPU")
def test_triton_backend_refuses_cpu_tensors_without_interpreter():
    with pytest.raises(ChecksumError, match=r"backend 'triton' needs CUDA tensors, got cpu tensors; use "
                                            r"backend='cpu'"):
        checksums({"w": torch.ones(2)}, backend="triton")


@requires("triton", "3.3", "triton.compiler.ASTSource(constexprs=...), the ahead-of-time compile call this "
          "test makes")
@pytest.mark.slow
def test_kernel_compiles_for_h100_with_vector_loads():
    """No GPU here: compile the kernel ahead of time for sm_90 so a GPU-only type error cannot hide."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from trainer_guard.checksum.triton import BLOCK, ITERS, NUM_WARPS, _checksum_kernel

    sig = {"base_ptr": "*i64", "table_ptr": "*i64", "out_ptr": "*i64", "n_rows": "i32", "BLOCK": "constexpr",
           "ITERS": "constexpr", "ALIGNED": "constexpr"}
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    src = ASTSource(_checksum_kernel, sig, constexprs={"BLOCK": BLOCK, "ITERS": ITERS, "ALIGNED": True}, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})
    except Exception as e:  # pragma: no cover - toolchain (ptxas) missing is not a kernel bug
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no CUDA toolchain: {e}")
        raise
    ptx = k.asm["ptx"]
    assert "ld.global.v2.b64" in ptx  # full chunks: 16-byte loads
    assert "atom.global.gpu.acq_rel.add.u64" in ptx  # one exact 64-bit integer atomic per chunk


# ------------------------------------------------------------------------------ malformed JSON on disk
_DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON nested deeper than Python's parser goes


def _raw_safetensors(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_header_nested_too_deeply_or_with_a_huge_int_is_a_checksum_error(tmp_path):
    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, _DEEP.encode())
    with pytest.raises(ChecksumError, match=r"m.safetensors: header is not valid JSON \(nested too deeply\); not a "
                                            r"safetensors file, or corrupted; re-save or re-download it$"):
        ck.safetensors_entries(path)
    _raw_safetensors(path, b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}')
    with pytest.raises(ChecksumError, match=r"m.safetensors: header is not valid JSON \(Exceeds the limit"):
        ck.safetensors_entries(path)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]},  # bool is an int in Python
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]},
    {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
])
def test_header_offsets_and_shapes_must_be_non_negative_ints(tmp_path, entry):
    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, json.dumps({"w": entry}).encode(), b"\0" * 4)
    with pytest.raises(ChecksumError, match=r"m.safetensors: tensor 'w': malformed shape .* or data_offsets .* "
                                            r"\(non-negative integers, begin <= end expected\): corrupted header"):
        ck.safetensors_entries(path)


def test_header_dtype_that_is_not_a_string_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)
    with pytest.raises(ChecksumError, match=r"tensor 'w': dtype \['F32'\] is not supported"):
        ck.safetensors_entries(path)


@pytest.mark.parametrize("text, says", [
    (_DEEP, r"unreadable index \(JSON nested too deeply\); fix or delete it$"),
    ('{"weight_map": null}', r"malformed index \('weight_map' must map tensor names to shard file names\); fix or "
                             r"delete it$"),
    ("[1]", r"malformed index \('weight_map' must map"),
    ("not json", r"unreadable index \(Expecting value"),
])
def test_unreadable_or_malformed_shard_index_is_named(tmp_path, text, says):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ChecksumError, match=rf"^{re.escape(str(tmp_path / 'model.safetensors.index.json'))}: {says}"):
        file_checksums(tmp_path)
