"""IntegrityGuard's cost as a fraction of the Trainer's own checkpoint save, per verify mode; and the resume check.

A script, not a test. For each model size it trains a few steps with ``save_steps=1`` and times, in the same run,
``Trainer._save_checkpoint`` (model file, optimizer, scheduler, RNG, trainer state: the plain save) and the guard's
``on_save`` work (headers, checksums, manifest write with fsync). The median over the saves is reported, one
markdown row per (model, mode), plus the resume check (checksum the live model, compare with the manifest) against
the Trainer's own weight load. The goal from issue 3: ``manifest`` mode <= 10% of the plain save.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_integrity.py [--sizes tiny,small,medium] [--saves 3]

Measured (CPU, 2 shared cores, torch 2.13, transformers 5.23, numba checksum loop) -- see the final report of
issue 3 for the numbers of the latest run; this machine's disk and neighbours make absolute times noisy, the
ratio is what matters.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

SIZES = {
    # name: (vocab, hidden, layers, intermediate)
    "tiny": (128, 32, 2, 64),
    "small": (8192, 256, 4, 688),
    "medium": (32000, 512, 8, 1408),
}


def build(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, layers, inter = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(2, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def bench_save(size: str, verify: str, saves: int) -> dict:
    from transformers import Trainer, TrainingArguments

    from trainer_guard import IntegrityGuard
    from trainer_guard.tiny import tiny_dataset

    model = build(size)
    out = tempfile.mkdtemp(prefix=f"bench-integrity-{size}-")
    guard = IntegrityGuard(verify=verify, backend="cpu")
    args = TrainingArguments(output_dir=out, max_steps=saves, save_steps=1, per_device_train_batch_size=2,
                             use_cpu=True, report_to=[], logging_steps=10_000, disable_tqdm=True, save_strategy="steps")
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(2 * saves, 16, model.config.vocab_size),
                      callbacks=[guard])
    plain = []
    original = trainer._save_checkpoint

    def timed(*a, **kw):
        t0 = time.perf_counter()
        original(*a, **kw)
        plain.append(time.perf_counter() - t0)

    trainer._save_checkpoint = timed
    trainer.train()
    ckpt = os.path.join(out, f"checkpoint-{saves}")
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) if size else 0
    g = [t["seconds"] for t in guard.timings]
    row = {"size": size, "params_MB": nbytes / 1e6, "verify": verify, "saves": len(plain),
           "plain_save_s": statistics.median(plain), "guard_s": statistics.median(g) if g else float("nan")}
    row["ratio"] = row["guard_s"] / row["plain_save_s"]
    row["ckpt"] = ckpt
    return row


def bench_resume(size: str, ckpt: str, repeats: int = 3) -> dict:
    from transformers import Trainer, TrainingArguments

    from trainer_guard import IntegrityGuard

    model = build(size)
    args = TrainingArguments(output_dir=os.path.dirname(ckpt), use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args)
    guard = IntegrityGuard(backend="cpu")
    load, check = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer._load_from_checkpoint(ckpt)
        load.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        problems = guard.check_model(model, ckpt)
        check.append(time.perf_counter() - t0)
        assert not problems, problems
    return {"size": size, "load_s": statistics.median(load), "check_s": statistics.median(check)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,small,medium")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--modes", default="off,manifest,readback")
    a = p.parse_args()
    import numba
    import transformers

    from trainer_guard.core.checksum import checksums

    checksums({"warm": torch.ones(16)}, backend="cpu")  # compile the numba loop before timing
    print(f"# IntegrityGuard cost, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, numba {numba.__version__}, "
          f"threads {torch.get_num_threads()}\n")
    print("| model | state dict MB | verify | saves | plain save (median s) | guard (median s) | guard / save |")
    print("|---|---:|---|---:|---:|---:|---:|")
    last = {}
    for size in a.sizes.split(","):
        for mode in a.modes.split(","):
            r = bench_save(size, mode, a.saves)
            last[size] = r["ckpt"]
            print(f"| {size} | {r['params_MB']:.1f} | {mode} | {r['saves']} | {r['plain_save_s']:.3f} | "
                  f"{r['guard_s']:.4f} | {100 * r['ratio']:.1f}% |", flush=True)
    print("\n| model | Trainer weight load (median s) | resume check (median s) | check / load |")
    print("|---|---:|---:|---:|")
    for size, ckpt in last.items():
        r = bench_resume(size, ckpt)
        print(f"| {size} | {r['load_s']:.3f} | {r['check_s']:.4f} | {100 * r['check_s'] / r['load_s']:.0f}% |",
              flush=True)


if __name__ == "__main__":
    main()
