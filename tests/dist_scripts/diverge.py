"""Perturb one rank's weights during a 2-process run and see what happens, with and without the guard.

Usage (from tests/test_distributed.py):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/diverge.py OUT RESULTS

Scenarios, one launch, each rank writing RESULTS/rank<r>.json:

- ``silent``: no guard; rank 1 nudges one weight after step 2. Training finishes without a word and the
  replicas end with different weights (the pitfall).
- ``guarded``: the same with ``ReplicaDivergenceGuard(every=1)``: every rank raises the same
  ReplicaDivergenceError at step 2, before checkpoint-2 is written.
- ``rank_fails``: rank 1 alone cannot compute its checksums: every rank raises the same ChecksumError (no rank is
  left waiting in the all-gather).
- ``fsdp2``: torch's ``fully_shard`` (FSDP2) on CPU/gloo, outside the Trainer (accelerate 1.15 ignores FSDP on
  CPU): ``sharded_checksums`` of the sharded model equal the checksums of the unsharded one, computed from local
  shards; only tensors whose shard offsets are not 8-byte aligned are gathered (counted here). The guard skips.
"""

from __future__ import annotations

import os
import sys

from _common import RANK, dump, finish, nudge

import torch  # noqa: E402
from conftest import make_args  # noqa: E402
from transformers import Trainer  # noqa: E402

import trainer_guard.callbacks.divergence as div_mod  # noqa: E402
from trainer_guard import ChecksumError, ReplicaDivergenceGuard  # noqa: E402
from trainer_guard._dist import barrier, gather  # noqa: E402
from trainer_guard.checksum import checksums  # noqa: E402
from trainer_guard.core.divergence import model_checksums, model_fingerprint, sharded_checksums  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402



def run(out: str, callbacks: list) -> tuple[Trainer, str | None, str | None]:
    model = tiny_model("llama-tied")
    trainer = Trainer(model=model, args=make_args(out, max_steps=4, save_steps=2),
                      train_dataset=tiny_dataset(32, 16, model.config.vocab_size), callbacks=callbacks)
    try:
        trainer.train()
    except Exception as e:
        return trainer, type(e).__name__, str(e)
    return trainer, None, None


def main(out: str, results: str) -> None:
    result: dict = {}

    trainer, err, _ = run(os.path.join(out, "silent"), [nudge()])
    fps = gather(f"{model_fingerprint(model_checksums(trainer.model)):016x}")
    result["silent"] = {"error": err, "step": trainer.state.global_step, "fingerprints": fps}
    barrier()

    guard = ReplicaDivergenceGuard(every=1)
    trainer, err, msg = run(os.path.join(out, "guarded"), [nudge(), guard])
    result["guarded"] = {"error": err, "message": msg, "step": trainer.state.global_step, "checks": guard.checks,
                         "saved": sorted(os.listdir(os.path.join(out, "guarded")))
                         if os.path.isdir(os.path.join(out, "guarded")) else []}
    barrier()

    if RANK == 1:
        def broken(*a, **k):
            raise ChecksumError("simulated: tensor 'model.norm.weight' is on an unsupported device")

        div_mod.model_checksums = broken
    guard = ReplicaDivergenceGuard(every=2)
    trainer, err, msg = run(os.path.join(out, "rank_fails"), [guard])
    result["rank_fails"] = {"error": err, "message": msg, "step": trainer.state.global_step}
    barrier()
    result["fsdp2"] = fsdp2()
    dump(results, result)
    finish()  # two of the runs were stopped inside a DDP step on purpose


def fsdp2() -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    # bf16, hidden 36: 1-D norm weights split 18/18 values = a 36-byte offset (not 8-aligned: gathered); 2-D
    # weights and the 127-row embedding (64/63 rows, uneven) are combined from their shards exactly.
    model = tiny_model("llama-untied", vocab_size=127, hidden=36).to(torch.bfloat16)
    before = model_checksums(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    calls = {"n": 0}
    real_full = DTensor.full_tensor

    def counted(self, *a, **k):
        calls["n"] += 1
        return real_full(self, *a, **k)

    DTensor.full_tensor = counted
    try:
        tensors = dict(model.named_parameters())
        sharded = sharded_checksums(tensors, gather)
        gathered_while_summing = calls["n"]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 127, (2, 8), generator=torch.Generator().manual_seed(RANK))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        after = sharded_checksums(dict(model.named_parameters()), gather)
        full_after = checksums({n: p.full_tensor() for n, p in model.named_parameters()}, backend="cpu")
    finally:
        DTensor.full_tensor = real_full
    guard = ReplicaDivergenceGuard(every=1)
    return {
        "n_tensors": len(tensors),
        "n_dtensors": sum(isinstance(p, DTensor) for p in tensors.values()),
        "equal_unsharded": sharded == before,
        "changed_by_step": sum(after[n] != sharded[n] for n in after),
        "equal_full_after_step": after == full_after,
        "gathered": gathered_while_summing,
        "guard": [guard.check(model, 1), guard.report()],
    }


if __name__ == "__main__":
    main(*sys.argv[1:3])
