"""EmbeddingLRGuard (and the tie guards) under FSDP2 through the Trainer on N CPU processes (gloo), one launch.

Usage (from tests/test_sharded_lr.py):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/fsdp2_lr.py OUT RESULTS

Phases, each under a watchdog (a rank left waiting in a collective writes ``hung`` and exits):

- ``untied``: an untied Llama with ``EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5)``, SHARDED_STATE_DICT.
  Run 1 (max_steps=4) stops after checkpoint-2; run 2 (another init) resumes from checkpoint-2 to step 4; run 3
  trains 4 steps uninterrupted into OUT/straight. A probe after the guard records, at every optimizer step
  (between ``optimizer.step()`` and the scheduler step, where the groups are split), each param group's role, LR,
  parameter names and whether they are DTensors, the largest change of this rank's shard of the embedding, the
  head and one decoder weight, and the optimizer's step count of the embedding; at each step end the local sum of
  the embedding's ``exp_avg``; at train begin (after the resume loaded ``optimizer_0``) the same, as loaded.
- ``tied``: a tied Llama with ``EmbeddingLRGuard(ratio=0.1)``, 2 steps: one DTensor, one ``tied`` group. Then the
  same model asked for two rates (``embed_ratio=0.1, head_ratio=0.5``): the error, on every rank.
- ``full``: a tied Llama with TiedWeightsGuard, HeadGuard and IntegrityGuard (and EmbeddingLRGuard), with
  ``state_dict_type="FULL_STATE_DICT"``: train to checkpoint-2 (stop), resume in a fresh Trainer to step 4; records
  the checkpoint's files and safetensors keys, each guard's report, any error. Then the same checkpoint without
  TiedWeightsGuard's tie record (``norecord``: as saved without the guard), resumed with it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from _common import dump, finish, record_writes, stop_at
from _fsdp import allow_fsdp_on_cpu, fsdp_args, sharding_facts, watchdog

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import trainer_guard  # noqa: E402
from trainer_guard import EmbeddingLRGuard  # noqa: E402
from trainer_guard._dist import gather  # noqa: E402
from trainer_guard.core.divergence import model_fingerprint, sharded_checksums  # noqa: E402
from trainer_guard.core.lr_groups import ROLE_KEY, unwrap_optimizer  # noqa: E402
from trainer_guard.core.sharding import is_dtensor, local_part  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402

WATCH = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight",
         "layer": "model.layers.0.mlp.down_proj.weight"}


class Probe(TrainerCallback):
    """Listed after the guard: sees the groups split at ``on_optimizer_step``, merged at ``on_step_end``."""

    def __init__(self, rec: dict):
        self.rec = rec
        rec.setdefault("steps", [])

    def _state_of(self, p) -> dict:
        st = self.opt.state.get(p, {})
        return {"step": float(st["step"]) if "step" in st else None,
                "exp_avg_sum": float(local_part(st["exp_avg"]).double().sum()) if "exp_avg" in st else None}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.opt = unwrap_optimizer(optimizer)
        named = dict(model.named_parameters())
        self.names = {id(p): n for n, p in named.items()}
        self.watch = {k: named[n] for k, n in WATCH.items() if n in named}
        self.rec["begin"] = {"state": self._state_of(self.watch["embed"]), "n_groups": len(self.opt.param_groups)}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.before = {k: local_part(p).clone() for k, p in self.watch.items()}

    def on_optimizer_step(self, args, state, control, **kw):
        groups = [{"role": g.get(ROLE_KEY), "lr": float(g["lr"]), "initial_lr": float(g["initial_lr"]),
                   "names": [self.names.get(id(p), "?") for p in g["params"]],
                   "dtensor": all(is_dtensor(p) for p in g["params"])} for g in self.opt.param_groups]
        delta = {k: float((local_part(p) - self.before[k]).abs().max()) if local_part(p).numel() else 0.0
                 for k, p in self.watch.items()}
        self.rec["steps"].append({"step": state.global_step + 1, "groups": groups, "delta": delta,
                                  "embed_state": self._state_of(self.watch["embed"])})

    def on_step_end(self, args, state, control, **kw):
        self.rec.setdefault("end_state", {})[state.global_step] = self._state_of(self.watch["embed"])
        self.rec.setdefault("n_groups_at_step_end", []).append(len(self.opt.param_groups))


def full_fingerprint(model) -> str:
    return f"{model_fingerprint(sharded_checksums(dict(model.named_parameters()), gather)):016x}"


def untied(out: str, result: dict) -> None:
    data = tiny_dataset(32, 16)

    def build(o, seed, callbacks):
        model = tiny_model("llama-untied", seed=seed)
        return Trainer(model=model, args=fsdp_args(o, max_steps=4, save_steps=2), train_dataset=data,
                       callbacks=callbacks)

    runs = {}
    for name, o, seed, resume in (("run1", out, 0, None), ("run2", out, 1, "checkpoint-2"),
                                  ("straight", os.path.join(out, "straight"), 0, None)):
        guard, rec = EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5), {}
        cbs = [guard, Probe(rec)] + ([stop_at(2)] if name == "run1" else [])
        t = build(o, seed, cbs)
        t.train(resume_from_checkpoint=os.path.join(out, resume) if resume else None)
        rec.update(step=t.state.global_step, report=guard.report(), record=guard.record,
                   logged=[{k: v for k, v in e.items() if k.startswith("learning_rate")}
                           for e in t.state.log_history if "learning_rate" in e],
                   fingerprint=full_fingerprint(t.model))
        runs[name] = rec
        if name == "run1":
            result.update(sharding_facts(t))
            ck = os.path.join(out, "checkpoint-2")
            result["checkpoint"] = sorted(os.listdir(ck))
            sidecar = os.path.join(ck, "trainer_guard_embedding_lr.json")
            result["sidecar"] = json.load(open(sidecar)) if os.path.isfile(sidecar) else None
    result["untied"] = runs


def tied(out: str, result: dict) -> None:
    from trainer_guard.errors import EmbeddingLRError

    data = tiny_dataset(32, 16)
    guard, rec = EmbeddingLRGuard(ratio=0.1), {}
    t = Trainer(model=tiny_model("llama-tied", seed=0), args=fsdp_args(out, max_steps=2, save_steps=10),
                train_dataset=data, callbacks=[guard, Probe(rec)])
    t.train()
    rec.update(report=guard.report(), facts=sharding_facts(t))
    result["tied"] = rec
    conflict = {"error": None}
    try:
        Trainer(model=tiny_model("llama-tied", seed=0), args=fsdp_args(out + "_conflict", max_steps=2),
                train_dataset=data, callbacks=[EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5)]).train()
    except EmbeddingLRError as e:
        conflict = {"error": type(e).__name__, "message": str(e)}
    result["tied_conflict"] = conflict


def full(out: str, result: dict) -> None:
    from safetensors import safe_open

    data = tiny_dataset(32, 16)

    def cbs():
        return [trainer_guard.TiedWeightsGuard(), trainer_guard.HeadGuard(), trainer_guard.IntegrityGuard(),
                EmbeddingLRGuard(ratio=0.1)]

    def build(seed, callbacks):
        return Trainer(model=tiny_model("llama-tied", seed=seed),
                       args=fsdp_args(out, max_steps=4, save_steps=2, state_dict_type="FULL_STATE_DICT"),
                       train_dataset=data, callbacks=callbacks)

    rec: dict = {"error": None}
    result["full"] = rec
    c1 = cbs()
    t1 = build(0, c1 + [stop_at(2)])
    t1.train()
    rec["facts"] = sharding_facts(t1)
    ck = os.path.join(out, "checkpoint-2")
    rec["checkpoint"] = sorted(os.listdir(ck))
    st = os.path.join(ck, "model.safetensors")
    if os.path.isfile(st):
        with safe_open(st, "pt") as f:
            rec["safetensors_keys"] = sorted(f.keys())
    rec["reports_run1"] = {type(cb).__name__: cb.report() for cb in c1}
    c2 = cbs()
    t2 = build(1, c2)
    t2.train(resume_from_checkpoint=ck)
    rec["step_run2"] = t2.state.global_step
    rec["reports"] = {type(cb).__name__: cb.report() for cb in c2}
    rec["fingerprint"] = full_fingerprint(t2.model)
    rec["tied_after_resume"] = t2.model.get_input_embeddings().weight is t2.model.get_output_embeddings().weight
    # the same checkpoint saved without TiedWeightsGuard (no tie record): the values under both names decide
    import shutil

    from _common import RANK
    from trainer_guard._dist import barrier

    copy = os.path.join(out, "norecord", "checkpoint-2")
    if RANK == 0:
        shutil.copytree(ck, copy)
        os.remove(os.path.join(copy, "trainer_guard_ties.json"))
    barrier()
    c3 = [trainer_guard.TiedWeightsGuard(), trainer_guard.HeadGuard(), EmbeddingLRGuard(ratio=0.1)]
    t3 = build(1, c3)
    t3.train(resume_from_checkpoint=copy)
    rec["norecord"] = {"step": t3.state.global_step, "reports": {type(cb).__name__: cb.report() for cb in c3},
                       "fingerprint": full_fingerprint(t3.model),
                       "tied": t3.model.get_input_embeddings().weight is t3.model.get_output_embeddings().weight}


PHASES = {"untied": untied, "tied": tied, "full": full}


def main(out: str, results: str, *phases: str) -> None:
    record_writes(out)
    allow_fsdp_on_cpu()
    result: dict = {"error": None, "errors": {}}
    for phase in phases or tuple(PHASES):
        try:
            with watchdog(results, result, phase, seconds=float(os.environ.get("TG_WATCHDOG_S", "240"))):
                PHASES[phase](os.path.join(out, phase), result)
        except Exception as e:  # reported to the test, which shows it
            result["errors"][phase] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
    dump(results, result)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
