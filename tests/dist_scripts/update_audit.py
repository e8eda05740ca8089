"""UpdateAuditGuard in a 2-process DDP run (gloo, CPU). Used by tests/test_update_audit.py.

Usage:
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/update_audit.py OUT RESULTS

Scenarios, one launch, each rank writing RESULTS/rank<r>.json:

- ``healthy``: ``UpdateAuditGuard(every=1)`` on a plain DDP run: no finding on any rank.
- ``rank1_drift``: on rank 1 only, a buggy forward pre-hook scales a frozen weight in place (DDP does not sync
  frozen parameters). Only rank 1 sees it, yet every rank raises the same UpdateAuditError at step 1 and no
  rank is left waiting in the next all-reduce.
"""

from __future__ import annotations

import os
import sys

from _common import RANK, dump, finish

import torch  # noqa: E402
from conftest import make_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from trainer_guard import UpdateAuditError, UpdateAuditGuard  # noqa: E402
from trainer_guard._dist import barrier  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402


def run(out: str, drift: bool) -> dict:
    model = tiny_model("llama-untied")
    if drift:
        o_proj = model.model.layers[0].self_attn.o_proj
        o_proj.weight.requires_grad_(False)
        if RANK == 1:
            def hook(m, args):
                with torch.no_grad():
                    m.weight.mul_(0.99)

            o_proj.register_forward_pre_hook(hook)
    guard = UpdateAuditGuard(every=1)
    trainer = Trainer(model=model, args=make_args(out, max_steps=3, save_strategy="no"),
                      train_dataset=tiny_dataset(32, 16, model.config.vocab_size), callbacks=[guard])
    err = msg = None
    try:
        trainer.train()
    except UpdateAuditError as e:
        err, msg = type(e).__name__, str(e)
    return {"error": err, "message": msg, "step": trainer.state.global_step,
            "findings": [(f.name, f.cause) for f in guard.findings]}


def main(out: str, results: str) -> None:
    result = {"healthy": run(os.path.join(out, "healthy"), drift=False)}
    barrier()
    result["rank1_drift"] = run(os.path.join(out, "drift"), drift=True)
    dump(results, result)
    finish()  # the drift run was stopped inside a DDP step on purpose

if __name__ == "__main__":
    main(*sys.argv[1:3])
