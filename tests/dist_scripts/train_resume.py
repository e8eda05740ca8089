"""Train a tiny tied Llama on N processes with the guards of configs/default.yaml, checkpoint, resume.

Usage (from tests/test_distributed.py):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/train_resume.py OUT RESULTS CONFIG [KIND]

KIND is a :func:`trainer_guard.tiny.tiny_model` kind (default ``llama-tied``).

Run 1 (max_steps=4) is stopped after step 2, once checkpoint-2 is saved (a preempted job); run 2 builds a fresh
model and Trainer and resumes from checkpoint-2 to step 4. Run 3 trains 4 steps uninterrupted into OUT/straight,
the reference a resume must reproduce. The replica check runs every step and at train end. Each rank writes
RESULTS/rank<r>.json: final model fingerprints, global steps, guard reports and every file it wrote under OUT.
"""

from __future__ import annotations

import os
import sys
import traceback

from _common import dump, finish, record_writes, stop_at

from conftest import make_args  # noqa: E402
from transformers import Trainer  # noqa: E402

import trainer_guard  # noqa: E402
from trainer_guard.core.divergence import model_checksums, model_fingerprint  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402


def build(out: str, config: str, seed: int, extra: list | None = None, kind: str = "llama-tied") -> Trainer:
    callbacks = trainer_guard.callbacks_from_yaml(config, replica_divergence={"every": 1, "at_train_end": True})
    model = tiny_model(kind, seed=seed)
    trainer = Trainer(model=model, args=make_args(out, max_steps=4, save_steps=2),
                      train_dataset=tiny_dataset(32, 16, model.config.vocab_size),
                      callbacks=callbacks + list(extra or []))
    if hasattr(trainer_guard, "guard"):
        trainer_guard.guard(trainer)
    return trainer


def main(out: str, results: str, config: str, kind: str = "llama-tied") -> None:
    record_writes(out)
    result: dict = {"error": None}
    try:
        t1 = build(out, config, seed=0, extra=[stop_at(2)], kind=kind)
        result["world_size_seen"] = t1.args.world_size
        result["distributed_type"] = str(t1.accelerator.distributed_type)
        t1.train()
        result["step_run1"] = t1.state.global_step
        # A different init seed on purpose: the resume must load checkpoint-2, whatever the fresh weights.
        t2 = build(out, config, seed=1, kind=kind)
        t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
        result["step_run2"] = t2.state.global_step
        result["fingerprint"] = f"{model_fingerprint(model_checksums(t2.model)):016x}"
        t3 = build(os.path.join(out, "straight"), config, seed=0, kind=kind)
        t3.train()
        result["fingerprint_straight"] = f"{model_fingerprint(model_checksums(t3.model)):016x}"
        result["reports"] = {type(cb).__name__: cb.report() for cb in t2.callback_handler.callbacks
                             if hasattr(cb, "report")}
        div = [cb for cb in t2.callback_handler.callbacks if type(cb).__name__ == "ReplicaDivergenceGuard"]
        result["divergence_checks"] = div[0].checks if div else None
    except Exception as e:  # reported to the test, which shows it
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    dump(results, result)
    finish()  # no interpreter teardown: gloo threads left to it sometimes abort the process after the results


if __name__ == "__main__":
    main(*sys.argv[1:5])
