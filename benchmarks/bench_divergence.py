"""Cost of one ReplicaDivergenceGuard check as a fraction of one training step (issue 7). A script, not a test.

Runs a real data-parallel ``Trainer`` on ``--nproc`` processes (it re-launches itself under
``accelerate launch --multi_gpu``; on a machine without GPUs ``use_cpu=True`` makes that gloo on CPU) with
``ReplicaDivergenceGuard(every=1)``, and times on rank 0, per step after ``--warmup`` steps (numba JIT excluded):

- *step*: ``on_step_begin`` -> ``on_step_end`` of a callback placed before the guard (forward, backward, DDP
  all-reduce, optimizer step), so the check is not part of it;
- *check*: the guard's whole ``check()`` (checksum every parameter, all-gather one fingerprint per rank), timed
  after a barrier so that ranks reaching the step at different times (which they would wait for at the next
  all-reduce anyway) do not count;
- *local*: the checksum part alone; *gather* = check - local.

Medians over ``--steps`` steps. The guard checks every ``every`` steps, so the amortised cost is
``check / (every * step)``. Prints one markdown row (device, versions, ranks, params, MB, times, fractions) and
appends it to ``--csv`` when given.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_divergence.py                          # tiny-ish Llama, 2 CPU ranks
    OMP_NUM_THREADS=1 python benchmarks/bench_divergence.py --hidden 512 --layers 8  # ~40M params
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multiproc import relaunch  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="per-device batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=100, help="interval used for the amortised column")
    p.add_argument("--csv", default=None)
    return p.parse_args(argv)


def _launch(argv) -> int:
    return relaunch(__file__, _parse(argv).nproc, argv)


def _worker(args) -> None:
    import tempfile

    import torch
    import transformers as tf
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import trainer_guard.callbacks.divergence as div_mod
    from trainer_guard import ReplicaDivergenceGuard
    from trainer_guard._dist import barrier
    from trainer_guard.core.divergence import checksum_algo
    from trainer_guard.tiny import tiny_dataset

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    step_t, check_t, local_t = [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            step_t.append(time.perf_counter() - self.t0)

    real_sums = div_mod.model_checksums

    def timed_sums(*a, **k):
        t0 = time.perf_counter()
        out = real_sums(*a, **k)
        local_t.append(time.perf_counter() - t0)
        return out

    div_mod.model_checksums = timed_sums

    class TimedGuard(ReplicaDivergenceGuard):
        def check(self, model, step=None):
            barrier()  # not timed: ranks arriving at different times would wait at the next all-reduce anyway
            t0 = time.perf_counter()
            out = super().check(model, step)
            check_t.append(time.perf_counter() - t0)
            return out

    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    n = args.nproc * args.batch * (args.warmup + args.steps)
    ds = tiny_dataset(n, args.seq, args.vocab)
    out = tempfile.mkdtemp(prefix="bench_div_")
    targs = TrainingArguments(output_dir=out, max_steps=args.warmup + args.steps,
                              per_device_train_batch_size=args.batch, use_cpu=not torch.cuda.is_available(),
                              report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                              learning_rate=1e-4)
    guard = TimedGuard(every=1)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=[StepTimer(), guard])
    trainer.train()
    if trainer.args.process_index != 0:
        return
    w = args.warmup
    step, check, local = (statistics.median(x[w:]) for x in (step_t, check_t, local_t))
    params = sum(p.numel() for p in model.parameters())
    mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"
    kind = trainer.accelerator.distributed_type.value
    row = (f"| {dev} | torch {torch.__version__} | {trainer.args.world_size} ranks ({kind}) "
           f"| {checksum_algo()} | {params / 1e6:.1f}M params, {mb:.0f} MB | step {step * 1e3:.1f} ms "
           f"| check {check * 1e3:.2f} ms (checksum {local * 1e3:.2f}, gather {(check - local) * 1e3:.2f}) "
           f"| {100 * check / step:.2f}% of a step | every={args.every}: {100 * check / (args.every * step):.4f}% |")
    print("| device | torch | ranks | algo | model | step (median) | check (median) | per check | amortised |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(row, flush=True)
    if args.csv:
        with open(args.csv, "a", encoding="utf-8") as f:
            f.write(",".join(str(v) for v in (dev, torch.__version__, trainer.args.world_size, params, round(mb, 1),
                                               round(step * 1e3, 3), round(check * 1e3, 3), round(local * 1e3, 3),
                                               round(check / step, 6))) + "\n")


if __name__ == "__main__":
    if "WORLD_SIZE" not in os.environ:
        sys.exit(_launch(sys.argv[1:]))
    _worker(_parse())
