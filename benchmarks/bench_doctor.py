"""`trainer-guard doctor` on a multi-GB sharded checkpoint against its peers (issue 22). A script, not a test.

Builds a Llama-shaped model of about ``--gb`` GB (fp32, random weights, built from a config: nothing downloaded),
saves it with ``save_pretrained`` in 4 shards plus a trainer_guard manifest (the format IntegrityGuard writes), then
times, each as a fresh process so that imports count as a user waits for them, with the files in the page cache:

- ``trainer-guard doctor DIR`` with every core (the default) and with ``TRAINER_GUARD_THREADS=1``;
- ``sha256sum`` over the same files (one process, one core: what Megatron-LM's verify_integrity computes);
- ``b3sum`` when installed (BLAKE3, all cores);
- ``AutoModelForCausalLM.from_pretrained(DIR)`` (what a user runs to find out whether the checkpoint loads);
- the in-process ``file_checksums(DIR)`` call alone, one thread and all (no imports counted).

Prints markdown rows with the machine, versions and sizes.

Example:
    python benchmarks/bench_doctor.py --gb 2 --dir /tmp/bench_doctor
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

__all__ = ["main"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(directory: str, gb: float) -> int:
    """Save a Llama of ~``gb`` GB in 4 shards with a trainer_guard manifest; return the bytes on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer_guard.checkpoint.manifest import build_manifest, write_manifest
    from trainer_guard.checksum.disk import file_checksums

    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, int((gb * 1e9 / 4 - 2 * vocab * hidden) / per_layer))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=f"{int(total / 4 / 1e6) + 1}MB")
    from trainer_guard.formats.safetensors import read_weight_map

    sums = file_checksums(directory)
    tensors = {n: t for n, t in model.state_dict().items() if n in sums}
    files = read_weight_map(os.path.join(directory, "model.safetensors.index.json"))
    write_manifest(directory, build_manifest(tensors, global_step=None, tie_groups=[], files=files, sums=sums,
                                             directory=directory))
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def _run(label: str, cmd: list[str], env: dict | None = None, repeat: int = 3) -> tuple[str, float]:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        if r.returncode not in (0, 1):
            raise SystemExit(f"{label} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return label, best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/bench_doctor")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if os.path.isdir(args.dir):
        shutil.rmtree(args.dir)
    size = _build(args.dir, args.gb)
    files = sorted(os.path.join(args.dir, f) for f in os.listdir(args.dir) if f.endswith(".safetensors"))
    for f in files:  # into the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    from trainer_guard.checksum.cpu import max_threads

    py = sys.executable
    runs = [
        _run(f"trainer-guard doctor (all {max_threads()} cores)", [py, "-m", "trainer_guard", "doctor", args.dir],
             repeat=args.repeat),
        _run("trainer-guard doctor (TRAINER_GUARD_THREADS=1)", [py, "-m", "trainer_guard", "doctor", args.dir],
             {"TRAINER_GUARD_THREADS": "1"}, repeat=args.repeat),
        _run("sha256sum (one core)", ["sha256sum", *files], repeat=args.repeat),
    ]
    if shutil.which("b3sum"):
        runs.append(_run("b3sum (all cores)", ["b3sum", *files], repeat=args.repeat))
    load = ("import time, torch; from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({args.dir!r}, dtype=torch.float32)")
    runs.append(_run("AutoModelForCausalLM.from_pretrained (fresh process)", [py, "-c", load], repeat=args.repeat))
    from trainer_guard.checksum.disk import file_checksums

    for threads in (1, None):
        file_checksums(args.dir, threads=threads)
        t0 = time.perf_counter()
        file_checksums(args.dir, threads=threads)
        runs.append((f"file_checksums in process, {threads or max_threads()} thread(s), no imports",
                     time.perf_counter() - t0))
    import torch
    import transformers

    print(f"## {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; checkpoint {size / 1e9:.2f} GB in {len(files)} shards, page cache warm, "
          f"best of {args.repeat}\n")
    print("| method | best s | GB/s |")
    print("|---|---:|---:|")
    for label, s in runs:
        print(f"| {label} | {s:.3f} | {size / s / 1e9:.2f} |")


if __name__ == "__main__":
    main()
