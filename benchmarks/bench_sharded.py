"""Cost of IntegrityGuard on FSDP2 (SHARDED_STATE_DICT) checkpoints: per save and per resume, next to what the
Trainer itself spends (issue 18). A script, not a test.

Re-launches itself on ``--nproc`` CPU processes (``accelerate launch --multi_gpu``, gloo) with the test harness's
patch that lets accelerate run FSDP2 on CPU (``tests/dist_scripts/_fsdp.py``), trains a Llama of ``--hidden`` x
``--layers`` with ``IntegrityGuard`` and saves every ``--save-steps``, then resumes from the last checkpoint in a
fresh Trainer. Times, on each rank (medians over the saves):

- *save*: the Trainer's checkpoint write (``on_step_end`` of the last callback -> ``on_save`` of the first);
- *guard on_save*: IntegrityGuard's ``on_save`` on this rank (the collective full-tensor checksums of its shards, its
  own shard files' checksums, one all-gather each; on the writing rank also the DCP metadata check);
- *manifest write*: the writing rank's background commit (the remaining files hashed, manifest written, fsynced);
- *resume: files*: ``resolve_resume`` (each rank hashes the files it wrote, the writing rank the rest, before
  anything loads); *resume: tensors*: the loaded shards' combined checksums against the manifest; next to the
  Trainer's own load (model + optimizer, DCP).

Prints one markdown row per rank and appends it to ``--csv`` when given.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_sharded.py                           # ~40M params, 2 CPU ranks
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multiproc import relaunch  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--csv", default=None)
    return p.parse_args(argv)


def _launch(argv) -> int:
    return relaunch(__file__, _parse(argv).nproc, argv)


def _worker(args) -> None:
    sys.path[:0] = [os.path.join(ROOT, "tests", "dist_scripts"), os.path.join(ROOT, "tests")]
    from _fsdp import allow_fsdp_on_cpu, fsdp_args

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

    import trainer_guard
    from trainer_guard._dist import gather
    from trainer_guard.tiny import tiny_dataset

    allow_fsdp_on_cpu()
    rank = int(os.environ.get("RANK", "0"))
    out = os.environ.get("TG_BENCH_OUT") or tempfile.mkdtemp(prefix="bench_sharded_")
    out = gather(out)[0]  # one directory for all ranks (rank 0's)
    times: dict[str, list[float]] = {"save": [], "guard_on_save": [], "files_check": [], "tensor_check": [],
                                     "load": []}

    class Clock(TrainerCallback):  # first and last callback: brackets the Trainer's save
        def on_step_end(self, a, s, c, **kw):
            self.t = time.perf_counter()

        def on_save(self, a, s, c, **kw):
            times["save"].append(time.perf_counter() - self.t)

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                          num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab,
                          max_position_embeddings=256, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg)

    def timed(guard, name, key):
        real = getattr(guard, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                times[key].append(time.perf_counter() - t)

        setattr(guard, name, wrapper)

    guard = trainer_guard.IntegrityGuard()
    timed(guard, "on_save", "guard_on_save")
    m = model()
    data = tiny_dataset(64, 64, args.vocab)
    t = Trainer(model=m, args=fsdp_args(out, max_steps=args.steps, save_steps=args.save_steps),
                train_dataset=data, callbacks=[Clock(), guard])
    t.train()
    nparams = sum(p.numel() for p in m.parameters())
    writes = guard.writer.last_seconds
    guard2 = trainer_guard.IntegrityGuard()
    timed(guard2, "resolve_resume", "files_check")
    timed(guard2, "verify_resume", "tensor_check")
    t2 = Trainer(model=model(), args=fsdp_args(out, max_steps=args.steps + 1, save_steps=100), train_dataset=data,
                 callbacks=[guard2])
    real_load = t2._load_from_checkpoint

    def load(*a, **kw):
        s = time.perf_counter()
        try:
            return real_load(*a, **kw)
        finally:
            times["load"].append(time.perf_counter() - s)

    t2._load_from_checkpoint = load
    t2.train(resume_from_checkpoint=True)
    ckpt = os.path.join(out, f"checkpoint-{args.steps}")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ckpt) for f in fs)
    med = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in times.items()}
    # the post-load comparison runs inside the load (the after_weights_load hook): subtracted from the load
    row = (f"| {platform.processor() or platform.machine()} | torch {torch.__version__} | rank {rank}/{args.nproc} | "
           f"{nparams / 1e6:.1f}M | {size / 1e6:.0f} MB | {med['save']:.0f} ms | {med['guard_on_save']:.0f} ms | "
           f"{(writes or 0) * 1e3:.0f} ms | {med['files_check']:.0f} ms | {med['tensor_check']:.0f} ms | "
           f"{(sum(times['load']) - sum(times['tensor_check'])) * 1e3:.0f} ms |")
    for r, line in enumerate(gather(row)):
        if rank == 0:
            print(line)
            if args.csv:
                with open(args.csv, "a", encoding="utf-8") as f:
                    f.write(line + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "WORLD_SIZE" not in os.environ:
        print("| cpu | versions | rank | params | checkpoint | save | guard on_save | manifest write (rank 0) | "
              "resume: files (before load) | resume: tensors (after load) | load |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        return _launch(argv)
    _worker(_parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
