"""Benchmark the trainer_guard checksum against its peers (issue 3). A script, not a test.

GPU (``--gpu``): all 291 tensors of a Llama-3-8B-shaped bf16 model (16.06 GB) on one CUDA device, each tensor its
own allocation as after ``from_pretrained``. Timed with ``triton.testing.do_bench`` (median, p20, p80 of repeated
runs, L2 flushed between runs), every peer in the same run:

- ``trainer_guard.checksums(backend="triton")`` end to end (plan + one launch + host fold), and the kernel alone
  (prebuilt :class:`~trainer_guard.checksum.triton.ChecksumPlan`);
- plain reads: ``amax`` / int32 ``sum`` over one flat 16.06 GB copy of the model (the memory-speed roofline);
- ``torch.hash_tensor`` per tensor (order-blind XOR) and over the flat copy;
- ``torch._foreach_norm`` over the 291 tensors;
- the same position hash written with per-tensor torch ops (also checked equal to the kernel on every tensor);
- a small sweep of the kernel's tile shape (BLOCK, ITERS, num_warps), each checked to give the same sums.

Prints one markdown row per method with GPU name, versions, ms and TB/s.

CPU (default, or ``--cpu``): a safetensors file (``--cpu-mb``, default 512 MB of bf16) written to a temp dir and
read back warm from the page cache: ``file_checksums`` (numba loop over an mmap, one core), the numpy twin,
``hashlib.sha256`` / ``blake2b`` over the same mmap, and ``xxhash.xxh3_64`` when installed. Best of ``--repeat``.

Example:
    python benchmarks/bench_checksum.py            # CPU section
    python benchmarks/bench_checksum.py --gpu      # GPU section (needs CUDA; ~50 GB of GPU memory at peak)
    python benchmarks/bench_checksum.py --gpu --smoke   # the GPU section's code, dry-run on the CPU (no result)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

GB = 1e9

__all__ = ["llama3_8b_shapes", "main"]


def llama3_8b_shapes() -> dict[str, tuple[int, ...]]:
    """The 291 parameter shapes of Llama-3-8B (vocab 128256, hidden 4096, 32 layers, GQA 8 kv heads, MLP 14336)."""
    v, h, kv, f, n = 128256, 4096, 1024, 14336, 32
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(n):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _versions() -> str:
    import triton

    cuda = torch.version.cuda or "none"
    return f"torch {torch.__version__}, triton {triton.__version__}, CUDA {cuda}"


# ------------------------------------------------------------------------------------------------------ GPU
def _torch_ops_checksum_sums(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """The word sums S of the checksum, written with plain per-tensor torch int64 ops (wrapping = mod 2^64)."""

    def s64(x: int) -> int:
        return x - (1 << 64) if x >= 1 << 63 else x

    g, c1, c2 = s64(0x9E3779B97F4A7C15), s64(0xBF58476D1CE4E5B9), s64(0x94D049BB133111EB)

    def lsr(z: torch.Tensor, k: int) -> torch.Tensor:  # logical shift right on int64
        return (z >> k) & ((1 << (64 - k)) - 1)

    out = {}
    for name, t in tensors.items():
        w = t.reshape(-1).view(torch.int64)  # all shapes here are multiples of 8 bytes
        z = w ^ (torch.arange(w.numel(), device=t.device, dtype=torch.int64) * g)
        z = (z ^ lsr(z, 30)) * c1
        z = (z ^ lsr(z, 27)) * c2
        z = z ^ lsr(z, 31)
        out[name] = int(z.sum()) & ((1 << 64) - 1)
    return out


# -------------------------------------------------------------------------- candidate mixes (bench only)
# Same table and chunking as the product kernel (a ChecksumPlan's), other per-word mix, to learn in the same run
# whether the product kernel is memory- or instruction-bound: MIX=0 sums the raw words (no mix: the access
# pattern's own ceiling), MIX=1 is the product's splitmix64 (two 64-bit multiplies), MIX=2 a 3-round Feistel
# network on the 32-bit halves (one 32x32->64 multiply per round, still a bijection of each word).
_K1, _K2, _K3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


try:  # module level: triton resolves @triton.jit callees as globals
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = tl = None

if triton is not None:

    @triton.jit
    def _f32(a, b, K: tl.constexpr):
        return b ^ (a * K) ^ tl.umulhi(a, K)

    @triton.jit
    def _mix(z, MIX: tl.constexpr):
        if MIX == 0:
            return z
        elif MIX == 1:
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            return z ^ (z >> 31)
        else:
            a = (z & 0xFFFFFFFF).to(tl.uint32)
            b = (z >> 32).to(tl.uint32)
            b = _f32(a, b, 0x9E3779B1)
            a = _f32(b, a, 0x85EBCA77)
            b = _f32(a, b, 0xC2B2AE3D)
            return (b.to(tl.uint64) << 32) | a.to(tl.uint64)

    @triton.jit
    def _cand_kernel(base_ptr, table_ptr, out_ptr, n_rows, BLOCK: tl.constexpr, ITERS: tl.constexpr,
               ALIGNED: tl.constexpr, MIX: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        lo = 0
        hi = n_rows - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tl.load(table_ptr + mid) <= pid:
                lo = mid
            else:
                hi = mid - 1
        k = pid - tl.load(table_ptr + lo)
        chunk = BLOCK * ITERS
        off = tl.load(table_ptr + n_rows + lo) + k * chunk
        if ALIGNED:
            off = tl.multiple_of(off, 2)
        nwords = tl.minimum(tl.load(table_ptr + 2 * n_rows + lo) - k * chunk, chunk)
        pos0 = tl.load(table_ptr + 3 * n_rows + lo) + k * chunk
        slot = tl.load(table_ptr + 4 * n_rows + lo)
        idx = tl.arange(0, BLOCK)
        idx_key = idx.to(tl.uint64) * 0x9E3779B97F4A7C15
        acc = tl.zeros([BLOCK], dtype=tl.uint64)
        ptrs = base_ptr + off + idx
        if nwords == chunk:
            for s in range(ITERS):
                w = tl.load(ptrs + s * BLOCK).to(tl.uint64, bitcast=True)
                key = (pos0 + s * BLOCK).to(tl.uint64, bitcast=True) * 0x9E3779B97F4A7C15 + idx_key
                acc += _mix(w ^ key, MIX)
        else:
            for s in range(ITERS):
                m = idx + s * BLOCK < nwords
                w = tl.load(ptrs + s * BLOCK, mask=m, other=0).to(tl.uint64, bitcast=True)
                key = (pos0 + s * BLOCK).to(tl.uint64, bitcast=True) * 0x9E3779B97F4A7C15 + idx_key
                acc += tl.where(m, _mix(w ^ key, MIX), 0)
        total = tl.sum(acc, axis=0)
        tl.atomic_add(out_ptr + slot, total.to(tl.int64, bitcast=True))



def _candidate_kernel():
    return _cand_kernel


def _candidate_run(kernel, plan, mix: int) -> torch.Tensor:
    out = torch.zeros(len(plan.names), dtype=torch.int64, device=plan.device)
    kernel[(plan.n_chunks,)](plan.base, plan.table, out, plan.n_rows, BLOCK=plan.block, ITERS=plan.iters,
                             ALIGNED=plan.aligned, MIX=mix, num_warps=plan.num_warps)
    return out


def _torch_ops_feistel_sums(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """MIX=2's word sums in plain per-tensor torch int64 ops (reference for the candidate kernel)."""

    def s64(x: int) -> int:
        return x - (1 << 64) if x >= 1 << 63 else x

    g, m32 = s64(0x9E3779B97F4A7C15), 0xFFFFFFFF

    def f(a, b, k):
        t = a * k  # a, k < 2^32: the 64-bit product (wraps like uint64 in int64 bits)
        return b ^ ((t ^ (t >> 32)) & m32)

    out = {}
    for name, t in tensors.items():
        w = t.reshape(-1).view(torch.int64)
        z = w ^ (torch.arange(w.numel(), device=t.device, dtype=torch.int64) * g)
        a, b = z & m32, (z >> 32) & m32
        b = f(a, b, _K1)
        a = f(b, a, _K2)
        b = f(a, b, _K3)
        out[name] = int(((b << 32) | a).sum()) & ((1 << 64) - 1)
    return out


def _wall_bench(fn, warmup=0, rep=0, quantiles=(0.5, 0.2, 0.8)) -> list[float]:
    """Stand-in for do_bench in ``--smoke`` runs (no CUDA events on the CPU): 2 runs, wall clock, ms."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return [float(np.quantile(times, q)) for q in quantiles]


def gpu_bench(args: argparse.Namespace) -> None:
    import triton
    from triton.testing import do_bench

    from trainer_guard import checksums
    from trainer_guard.checksum.spec import finalize
    from trainer_guard.checksum.triton import ChecksumPlan

    shapes = llama3_8b_shapes()
    if args.smoke:  # dry run of this section on the CPU: triton interpreter, shapes / 256, wall-clock timer
        dev, name = torch.device("cpu"), "CPU smoke run (TRITON_INTERPRET=1, 2 layers, rows / 256), NOT a result"
        shapes = {n: tuple(max(1, d // 256) if i == 0 else d for i, d in enumerate(sh)) for n, sh in shapes.items()
                  if not n.startswith("model.layers.") or n.split(".")[2] in ("0", "1")}
        do_bench = _wall_bench
    elif not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    else:
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
    torch.manual_seed(0)
    tensors = {n: torch.empty(s, dtype=torch.bfloat16, device=dev).normal_() for n, s in shapes.items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    print(f"## GPU: {name}; {_versions()}; {len(tensors)} tensors, {nbytes / GB:.2f} GB bf16\n")

    # correctness at full size before timing: kernel == per-tensor torch ops == (on a few tensors) CPU path
    plan = ChecksumPlan(tensors)
    got = checksums(tensors, backend="triton")
    sums = _torch_ops_checksum_sums(tensors)
    ref = {n: finalize(sums[n], "BF16", tuple(t.shape), t.numel() * 2) for n, t in tensors.items()}
    bad = [n for n in tensors if got[n] != ref[n]]
    few = {n: tensors[n] for n in ("model.norm.weight", "model.layers.0.self_attn.k_proj.weight")}
    bad += [n for n, v in checksums(few, backend="cpu").items() if v != got[n]]
    print(f"correctness: triton == torch-ops on {len(tensors) - len(bad)}/{len(tensors)} tensors"
          f"{'' if not bad else '; MISMATCH: ' + ', '.join(bad[:5])}\n")

    tl = list(tensors.values())
    cache: dict = {}
    assert checksums(tensors, backend="triton", cache=cache) == got and cache
    runs = [
        ("trainer_guard checksums(backend='triton'), end to end", lambda: checksums(tensors, backend="triton")),
        ("trainer_guard checksums(backend='triton', cache=...), end to end, launch table reused (the audit's path)",
         lambda: checksums(tensors, backend="triton", cache=cache)),
        ("trainer_guard kernel only (prebuilt plan)", lambda: plan.run()),
        ("plain read: flat.amax() (one flat copy of the model)", lambda: flat.amax()),
        ("plain read: flat.view(int32).sum()", lambda: flat.view(torch.int32).sum()),
    ]
    if hasattr(torch, "hash_tensor"):
        runs += [
            ("torch.hash_tensor per tensor (order-blind XOR)", lambda: [torch.hash_tensor(t) for t in tl]),
            ("torch.hash_tensor(flat) (order-blind XOR)", lambda: torch.hash_tensor(flat)),
        ]
    runs += [
        ("torch._foreach_norm", lambda: torch._foreach_norm(tl)),
        ("position hash in per-tensor torch ops", lambda: _torch_ops_checksum_sums(tensors)),
    ]
    # candidate mixes on the same plan: raw-word sum (access pattern ceiling), splitmix (== product), Feistel32
    kern = _candidate_kernel()
    raw = plan.run()
    same1 = plan.finish(_candidate_run(kern, plan, 1)) == plan.finish(raw)
    few = {n: tensors[n] for n in list(tensors)[:3] + ["model.norm.weight"]}
    fplan = ChecksumPlan(few)
    fref = _torch_ops_feistel_sums(few)
    fgot = [v & ((1 << 64) - 1) for v in _candidate_run(kern, fplan, 2).tolist()]
    same2 = fgot == [fref[n] for n in fplan.names]
    print(f"candidate kernel MIX=1 == product kernel: {same1}; MIX=2 == torch-ops Feistel reference: {same2}\n")
    runs += [
        ("candidate MIX=0: same kernel, raw word sum, no mix (access-pattern ceiling)",
         lambda: _candidate_run(kern, plan, 0)),
        ("candidate MIX=1: same kernel, splitmix64 (the product's mix)", lambda: _candidate_run(kern, plan, 1)),
        (f"candidate MIX=2: 3-round Feistel on 32-bit halves{'' if same2 else ' (WRONG RESULT)'}",
         lambda: _candidate_run(kern, plan, 2)),
    ]
    # tuning sweep (same 512 KiB chunk, other tile shapes): results must be identical, times may not be
    for block, iters, warps in [(2048, 32, 8), (512, 128, 4), (4096, 16, 16), (1024, 32, 4)]:
        p = ChecksumPlan(tensors, block=block, iters=iters, num_warps=warps)
        same = p.finish(p.run()) == got
        runs.append((f"kernel only, BLOCK={block} ITERS={iters} num_warps={warps}"
                     f"{'' if same else ' (WRONG RESULT)'}", p.run))
    print("| GPU | method | median ms | p20 ms | p80 ms | TB/s (median) |")
    print("|---|---|---:|---:|---:|---:|")
    results = {}
    for label, fn in runs:
        med, p20, p80 = do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
        results[label] = med
        print(f"| {name} | {label} | {med:.3f} | {p20:.3f} | {p80:.3f} | {nbytes / (med * 1e-3) / 1e12:.2f} |",
              flush=True)
    ours = results["trainer_guard kernel only (prebuilt plan)"]
    e2e = results["trainer_guard checksums(backend='triton'), end to end"]
    print(f"\ngoal >= 3.0 TB/s: kernel {nbytes / (ours * 1e-3) / 1e12:.2f} TB/s, end to end "
          f"{nbytes / (e2e * 1e-3) / 1e12:.2f} TB/s")
    ht = [v for k, v in results.items() if k.startswith("torch.hash_tensor")]
    if ht:
        print(f"goal within 3% of torch.hash_tensor (best {min(ht):.3f} ms): kernel {100 * (ours / min(ht) - 1):+.1f}%, "
              f"end to end {100 * (e2e / min(ht) - 1):+.1f}%")


# ------------------------------------------------------------------------------------------------------ CPU
def _best(fn, repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time (this process) over ``repeat`` runs.

    On a shared machine the wall time includes waiting for a core; the CPU time is what one core needed.
    """
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def cpu_bench(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from trainer_guard import checksums, file_checksums
    from trainer_guard.checksum import cpu as ck
    from trainer_guard.checksum.cpu import max_threads
    from trainer_guard.checksum.disk import safetensors_entries

    torch.set_num_threads(1)
    n = int(args.cpu_mb * 1e6) // 2
    # a few tensors of a realistic mix: one big matrix, a few mid ones, some norms (odd sizes included)
    sizes = {"embed": n // 2, "mlp": n // 4, "attn": n // 4 - 4096 - 3, "norm": 4096, "odd": 3}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v, generator=g).to(torch.bfloat16) for k, v in sizes.items()}
    nbytes = sum(t.numel() * 2 for t in tensors.values())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"## CPU: {cpu}, 1 thread; numpy {np.__version__}; {'numba ' + __import__('numba').__version__ if ck.HAVE_NUMBA else 'no numba'}; "
          f"{nbytes / GB:.3f} GB bf16 safetensors file, warm page cache, best of {args.repeat}\n")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_file(tensors, path)
        file_checksums(path)  # compile + warm the page cache
        assert file_checksums(path) == checksums(tensors, backend="cpu")
        mm = np.memmap(path, dtype=np.uint8, mode="r")

        def numpy_twin():
            _, entries, _ = safetensors_entries(path)
            for e in entries.values():
                b = mm[e["begin"] : e["end"]]
                ck.numpy_word_sum(b[: b.size // 8 * 8].view(np.uint64), 0)

        ncores = max_threads()
        runs = [
            ("trainer_guard file_checksums (numba, mmap), 1 thread", lambda: file_checksums(path, threads=1)),
            (f"trainer_guard file_checksums (numba, mmap), {ncores} threads", lambda: file_checksums(path)),
            ("trainer_guard checksums(backend='cpu') on in-memory tensors, 1 thread",
             lambda: checksums(tensors, backend="cpu", threads=1)),
            (f"trainer_guard checksums(backend='cpu') on in-memory tensors, {ncores} threads",
             lambda: checksums(tensors, backend="cpu")),
            ("same checksum, chunked numpy (fallback without numba)", numpy_twin),
            ("hashlib.sha256 over the mmap", lambda: hashlib.sha256(mm).digest()),
            ("hashlib.blake2b over the mmap", lambda: hashlib.blake2b(mm).digest()),
        ]
        try:
            import xxhash

            runs.append(("xxhash.xxh3_64 over the mmap (order-aware, not splittable)", lambda: xxhash.xxh3_64(mm).digest()))
            runs.append(("xxhash.xxh3_64 over a fresh mmap each run (page faults counted, as file_checksums pays)",
                         lambda: xxhash.xxh3_64(np.memmap(path, dtype=np.uint8, mode="r")).digest()))
        except ImportError:
            print("(xxhash not installed: skipped)")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"({os.cpu_count()} cores, load average {load:.1f} when started)\n")
        print("| CPU | method | best wall s | GB/s wall | best CPU s | GB/s per core (CPU time) |")
        print("|---|---|---:|---:|---:|---:|")
        for label, fn in runs:
            wall, cpu_s = _best(fn, args.repeat)
            print(f"| {cpu} | {label} | {wall:.4f} | {nbytes / wall / GB:.2f} | {cpu_s:.4f} | "
                  f"{nbytes / cpu_s / GB:.2f} |", flush=True)
        del mm


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="run the GPU section (Llama-3-8B-shaped, 16.06 GB bf16)")
    ap.add_argument("--cpu", action="store_true", help="run the CPU section (default when --gpu is not given)")
    ap.add_argument("--cpu-mb", type=float, default=512, help="size of the CPU benchmark file in MB")
    ap.add_argument("--repeat", type=int, default=5, help="CPU: best of this many runs")
    ap.add_argument("--warmup", type=int, default=100, help="GPU: do_bench warmup in ms")
    ap.add_argument("--rep", type=int, default=1000, help="GPU: do_bench measuring time in ms")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: dry-run the GPU section on the CPU (tiny)")
    args = ap.parse_args(argv)
    if args.smoke:
        if not args.gpu:
            sys.exit("--smoke goes with --gpu")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if args.gpu:
        gpu_bench(args)
    if args.cpu or not args.gpu:
        cpu_bench(args)


if __name__ == "__main__":
    main()
