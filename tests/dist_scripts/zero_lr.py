"""EmbeddingLRGuard under DeepSpeed ZeRO through the Trainer on N CPU processes (gloo), one launch per stage.

Usage (from tests/test_sharded_lr.py, with DS_ACCELERATOR=cpu and TORCH_EXTENSIONS_DIR in the environment):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/zero_lr.py OUT RESULTS STAGE

Phases, each under a watchdog (the helpers of ``_deepspeed.py``):

- ``lr``: an untied Llama with ``EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5)``; the Trainer creates the
  optimizer (no "optimizer" section in the DeepSpeed config), the guard splits its groups at creation, DeepSpeed
  wraps it. Run 1 (max_steps=4) stops after checkpoint-2; run 2 (another init) resumes it to step 4; run 3 trains
  4 steps straight into OUT/straight. A probe records at each step's begin (the LRs that step uses: DeepSpeed steps
  the scheduler inside its own step) each of DeepSpeed's param groups, and the largest change of this rank's part
  (ZeRO-3: its partition) of the embedding, the head and a decoder weight over the step.
- ``dsopt``: the same guard with an "optimizer" section in the DeepSpeed config (DeepSpeed builds the optimizer):
  the error, on every rank.
- ``noguard``: 2 steps and checkpoint-2 without the guard, then a resume of it with the guard: the error.
- ``tied``: a tied Llama with ``EmbeddingLRGuard(ratio=0.1)``, 2 steps: one parameter, one ``tied`` group.
"""

from __future__ import annotations

import os
import sys
import traceback

from _common import dump, finish, record_writes, stop_at
from _deepspeed import ds_args, ds_config, gathered_fingerprint, watchdog, zero_facts

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from trainer_guard import EmbeddingLRGuard  # noqa: E402
from trainer_guard.core.lr_groups import ROLE_KEY, unwrap_optimizer  # noqa: E402
from trainer_guard.errors import EmbeddingLRError  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402

WATCH = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight",
         "layer": "model.layers.0.mlp.down_proj.weight"}


def _local(p) -> torch.Tensor:
    """This rank's values of ``p``: its ZeRO-3 partition, else the whole (replicated) tensor."""
    return (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach()


class Probe(TrainerCallback):
    def __init__(self, rec: dict):
        self.rec = rec
        rec.setdefault("steps", [])

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.opt = unwrap_optimizer(optimizer)
        named = dict(model.named_parameters())
        self.watch = {k: named[n] for k, n in WATCH.items() if n in named}
        self.rec["optimizer_class"] = type(optimizer.optimizer).__name__ if hasattr(optimizer, "optimizer") else None

    def on_step_begin(self, args, state, control, **kw):
        self.before = {k: _local(p).clone() for k, p in self.watch.items()}
        self.groups = [{"role": g.get(ROLE_KEY), "lr": float(g["lr"]), "initial_lr": float(g["initial_lr"]),
                        "n_params": len(g["params"])} for g in self.opt.param_groups]

    def on_step_end(self, args, state, control, **kw):
        delta = {k: float((_local(p) - self.before[k]).abs().max()) if _local(p).numel() else 0.0
                 for k, p in self.watch.items()}
        self.rec["steps"].append({"step": state.global_step, "groups": self.groups, "delta": delta})


def lr(out: str, stage: int, rec: dict) -> None:
    data = tiny_dataset(32, 16)
    for name, o, seed, resume in (("run1", out, 0, None), ("run2", out, 1, "checkpoint-2"),
                                  ("straight", os.path.join(out, "straight"), 0, None)):
        guard, r = EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5), {}
        cbs = [guard, Probe(r)] + ([stop_at(2)] if name == "run1" else [])
        t = Trainer(model=tiny_model("llama-untied", seed=seed), args=ds_args(o, stage, max_steps=4, save_steps=2),
                    train_dataset=data, callbacks=cbs)
        t.train(resume_from_checkpoint=os.path.join(out, resume) if resume else None)
        r.update(step=t.state.global_step, report=guard.report(), record=guard.record,
                 logged=[{k: v for k, v in e.items() if k.startswith("learning_rate")}
                         for e in t.state.log_history if "learning_rate" in e],
                 fingerprint=gathered_fingerprint(t.model))
        rec[name] = r
        if name == "run1":
            rec.update(zero_facts(t), checkpoint=sorted(os.listdir(os.path.join(out, "checkpoint-2"))))


def dsopt(out: str, stage: int, rec: dict) -> None:
    from conftest import make_args

    cfg = ds_config(stage)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}
    t = Trainer(model=tiny_model("llama-untied", seed=0), args=make_args(out, deepspeed=cfg, max_steps=2),
                train_dataset=tiny_dataset(32, 16), callbacks=[EmbeddingLRGuard(ratio=0.1)])
    try:
        t.train()
    except EmbeddingLRError as e:
        rec.update(error=type(e).__name__, message=str(e))
    rec["step"] = t.state.global_step


def noguard(out: str, stage: int, rec: dict) -> None:
    data = tiny_dataset(32, 16)

    def build(cbs):
        return Trainer(model=tiny_model("llama-untied", seed=0), args=ds_args(out, stage, max_steps=4, save_steps=2),
                       train_dataset=data, callbacks=cbs)

    build([stop_at(2)]).train()
    t = build([EmbeddingLRGuard(ratio=0.1)])
    try:
        t.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    except EmbeddingLRError as e:
        rec.update(error=type(e).__name__, message=str(e))
    rec["step"] = t.state.global_step


def tied(out: str, stage: int, rec: dict) -> None:
    guard, r = EmbeddingLRGuard(ratio=0.1), rec
    t = Trainer(model=tiny_model("llama-tied", seed=0), args=ds_args(out, stage, max_steps=2, save_steps=10),
                train_dataset=tiny_dataset(32, 16), callbacks=[guard, Probe(r)])
    t.train()
    r.update(report=guard.report(), n_params=len(list(t.model.parameters())),
             tied=t.model.get_input_embeddings().weight is t.model.get_output_embeddings().weight)


PHASES = {"lr": lr, "dsopt": dsopt, "noguard": noguard, "tied": tied}


def main(out: str, results: str, stage: str, *phases: str) -> None:
    record_writes(out)
    result: dict = {"stage": int(stage)}
    for name in phases or tuple(PHASES):
        rec = result[name] = {"error": None}
        with watchdog(results, result, name, seconds=float(os.environ.get("TG_WATCHDOG_S", "240"))):
            try:
                PHASES[name](os.path.join(out, name), int(stage), rec)
            except Exception as e:  # reported to the test, which shows it
                rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    dump(results, result)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
