"""A real Trainer under DeepSpeed ZeRO-2 / ZeRO-3 on N CPU processes (gloo), with trainer_guard's default guards.

Usage (from tests/test_deepspeed.py, with DS_ACCELERATOR=cpu and TORCH_EXTENSIONS_DIR in the environment):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/zero.py OUT RESULTS STAGE CONFIG

STAGE is 2 or 3, "3-bf16" (bf16 mixed precision) or "3-nogather" (no stage3_gather_16bit_weights_on_model_save:
the rank files only, as DeepSpeed saves by default); TG_PHASES (comma-separated) runs a subset of the phases.

One launch per ZeRO stage runs every phase, each under a watchdog (a rank left waiting in a collective writes
``hung`` into its results and exits) and each catching its own error, so one broken phase does not hide the others:

- ``guards``: every guard of CONFIG (configs/default.yaml), the replica check every step and at train end. Run 1
  (max_steps=4) stops after checkpoint-2 (a preempted job; rank 0 records its trainer_guard_trainable.json); run 2
  builds a fresh model (another seed) and Trainer and resumes from checkpoint-2 to step 4; run 3 trains 4 steps uninterrupted into OUT/straight. Records what wraps the
  model (DeepSpeedEngine, ZeRO stage, partitions), the checkpoint's files, each guard's report, the replica checks
  counted, how many parameters UpdateAuditGuard audits, and the fingerprints of the final full models (ZeRO-3
  partitions gathered; and, for the straight run, combined from the partitions' checksums without a gather). Then ReplicaDivergenceGuard.check on the DeepSpeedEngine itself (what the Trainer calls
  ``model_wrapped``): ZeRO-2's engine holds whole replicas, compared like the bare model.
- ``diverge`` (stage 2 only): ReplicaDivergenceGuard(every=1) and rank 1 nudging one element of one weight after
  step 2 (as tests/dist_scripts/diverge.py does under DDP): every rank must raise ReplicaDivergenceError at step 2.
- ``audit``: UpdateAuditGuard(every=1) with ``model.norm.weight`` left out of the optimizer the Trainer hands to
  DeepSpeed: every rank must stop with the same UpdateAuditError at the first step (ZeRO-3: the norm's partitions).
- ``silent``: UpdateAuditGuard(every=1) on a run whose loss is multiplied by 0 from the first step (an RL run whose
  rewards are all zero): AdamW leaves every weight as it was, DeepSpeed's global gradient norm is 0, and the guard
  must count the steps as without signal, not report 20 tensors "not in any optimizer group" (it did under ZeRO-2).
- ``drift``: ``o_proj`` of layer 0 frozen; on rank 1 only, a callback scales its local values (ZeRO-3: rank 1's
  partition) before the first step: every rank must stop with the same UpdateAuditError at step 1.
- ``detached``: layer 1's MLP output is detached in forward (its three weights get no gradient). ZeRO-3: every rank
  stops at step 2 with the same UpdateAuditError naming the MLP (its gradient partitions all zero). ZeRO-2 keeps no
  gradient after its step: the guard warns ("no_update") and training goes on.
- ``tokens``: UntrainedTokensGuard(mode="fix") on a tied Llama (vocab 127, hidden 36: under ZeRO-3 row 63 is split
  between the two ranks' flat partitions) whose embedding rows 5, 63 and 100 are zero and whose data uses 63 and
  100. Records the guard's report and, right after the guard ran at train begin, rows 5, 63, 100 of the full
  embedding (ZeRO-3: gathered) and of the optimizer's fp32 copy (``deepspeed.utils.safe_get_full_fp32_param``),
  next to the mean of the trained rows of the unwrapped weight; then one training step.
- ``flipped``: rank 0 copies checkpoint-2 to OUT/flipped/checkpoint-2 and flips one bit in the tensor data of
  ``global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt``; every rank then resumes from the copy with the default
  guards: records the error each rank raised and how many optimizer steps ran.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback

from _common import RANK, dump, finish, nudge, record_writes, stop_at
from _deepspeed import combined_fingerprint, ds_args, flip_bit, gathered_fingerprint, watchdog, zero_facts

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import trainer_guard  # noqa: E402
from trainer_guard.core.io import read_json  # noqa: E402
from trainer_guard.files import TRAINABLE_FILE  # noqa: E402
from trainer_guard._dist import barrier  # noqa: E402
from trainer_guard.core.sharding import is_sharded  # noqa: E402
from trainer_guard.errors import TrainerGuardError  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402

WATCHDOG_S = float(os.environ.get("TG_WATCHDOG_S", "240"))
BF16 = False  # set by main from the STAGE argument ("3-bf16": ZeRO-3 in bf16 mixed precision)
GATHER = True  # likewise ("3-nogather": ZeRO-3 saving its rank files only, no gathered model.safetensors)


def args(out: str, stage: int, **kw):
    """This launch's DeepSpeed ``TrainingArguments`` (its stage; bf16, or no gathered weights, when asked)."""
    return ds_args(out, stage, bf16=BF16, gather=GATHER, **kw)


def build(out: str, stage: int, seed: int, callbacks: list, max_steps: int = 4) -> Trainer:
    model = tiny_model("llama-tied", seed=seed)
    return Trainer(model=model, args=args(out, stage, max_steps=max_steps, save_steps=2),
                   train_dataset=tiny_dataset(32, 16, model.config.vocab_size), callbacks=callbacks)


def reports(trainer: Trainer) -> dict:
    return {type(cb).__name__: cb.report() for cb in trainer.callback_handler.callbacks if hasattr(cb, "report")}


def replica_checks(trainer: Trainer) -> int:
    return sum(cb.checks for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "ReplicaDivergenceGuard")


class Steps(TrainerCallback):
    """Counts the optimizer steps this Trainer ran."""

    def __init__(self):
        self.n = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.n += 1


class Audited(TrainerCallback):
    """Records how many parameters the Trainer's UpdateAuditGuard audits (after its first step)."""

    def __init__(self, rec: dict, guards: list):
        self.rec = rec
        self.guard = next(cb for cb in guards if type(cb).__name__ == "UpdateAuditGuard")

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard.audit is not None:
            self.rec["audited"] = len(self.guard.audit.params)


def guards(out: str, stage: int, config: str, rec: dict) -> None:
    def cbs():
        return trainer_guard.callbacks_from_yaml(config, replica_divergence={"every": 1, "at_train_end": True})

    t1 = build(out, stage, seed=0, callbacks=cbs() + [stop_at(2)])
    t1.train()
    rec.update(zero_facts(t1), step_run1=t1.state.global_step, reports_run1=reports(t1),
               checks_run1=replica_checks(t1),
               checkpoint=sorted(os.listdir(os.path.join(out, "checkpoint-2"))),
               global_step2=sorted(os.listdir(os.path.join(out, "checkpoint-2", "global_step2"))))
    if RANK == 0:  # the writer's record of what trains (ResumeGuard's trainer_guard_trainable.json)
        rec["trainable"] = read_json(os.path.join(out, "checkpoint-2", TRAINABLE_FILE))
    t2 = build(out, stage, seed=1, callbacks=cbs())  # another init on purpose: the resume must load checkpoint-2
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    rec.update(step_run2=t2.state.global_step, reports=reports(t2), checks_run2=replica_checks(t2),
               fingerprint=gathered_fingerprint(t2.model))
    cb3 = cbs()
    t3 = build(os.path.join(out, "straight"), stage, seed=0, callbacks=cb3 + [Audited(rec, cb3)])
    t3.train()
    rec.update(step_straight=t3.state.global_step, reports_straight=reports(t3), checks_straight=replica_checks(t3),
               fingerprint_straight=gathered_fingerprint(t3.model),
               combined_fingerprint=combined_fingerprint(t3.model))
    engine_guard = trainer_guard.ReplicaDivergenceGuard()
    rec.update(engine_is_sharded=is_sharded(t3.model_wrapped),
               engine_check=engine_guard.check(t3.model_wrapped, t3.state.global_step), engine_report=engine_guard.report())


def _audit_run(out: str, stage: int, rec: dict, *, max_steps: int, trainer_cls=Trainer, callbacks=(),
               model=None) -> trainer_guard.UpdateAuditGuard:
    guard = trainer_guard.UpdateAuditGuard(every=1)
    model = model if model is not None else tiny_model("llama-tied", seed=0)
    t = trainer_cls(model=model, args=args(out, stage, max_steps=max_steps, save_steps=10),
                    train_dataset=tiny_dataset(32, 16, model.config.vocab_size), callbacks=[guard, *callbacks])
    try:
        t.train()
    except trainer_guard.UpdateAuditError as e:
        rec.update(error=type(e).__name__, message=str(e))
    rec.update(step=t.state.global_step, report=guard.report(),
               findings=sorted(f"{f.name}: {f.cause}" for f in guard.findings),
               silent_steps=guard.audit.silent_steps if guard.audit is not None else None)
    return guard


def audit(out: str, stage: int, rec: dict) -> None:
    class NoNorm(Trainer):
        def create_optimizer(self, model=None):
            params = [p for n, p in self.model.named_parameters() if n != "model.norm.weight"]
            self.optimizer = torch.optim.AdamW(params, lr=self.args.learning_rate, weight_decay=0.0)
            return self.optimizer

    _audit_run(os.path.join(out, "audit"), stage, rec, max_steps=3, trainer_cls=NoNorm)


def silent(out: str, stage: int, rec: dict) -> None:
    class NoSignal(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return super().compute_loss(model, inputs, return_outputs, **kwargs) * 0.0

    _audit_run(os.path.join(out, "silent"), stage, rec, max_steps=4, trainer_cls=NoSignal)


def drift(out: str, stage: int, rec: dict) -> None:
    model = tiny_model("llama-tied", seed=0)
    model.model.layers[0].self_attn.o_proj.weight.requires_grad_(False)

    class Drift(TrainerCallback):  # rank 1 only: a buggy in-place edit of a frozen weight (its own copy/partition)
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if RANK == 1 and state.global_step == 0:
                w = model.model.layers[0].self_attn.o_proj.weight
                with torch.no_grad():
                    (w.ds_tensor if hasattr(w, "ds_id") else w).mul_(0.99)

    _audit_run(os.path.join(out, "drift"), stage, rec, max_steps=2, callbacks=[Drift()], model=model)


def detached(out: str, stage: int, rec: dict) -> None:
    model = tiny_model("llama-tied", seed=0)
    model.model.layers[1].mlp.register_forward_hook(lambda m, args, output: output.detach())
    _audit_run(os.path.join(out, "detached"), stage, rec, max_steps=3, model=model)


def diverge(out: str, stage: int, rec: dict) -> None:
    guard = trainer_guard.ReplicaDivergenceGuard(every=1)
    t = build(os.path.join(out, "diverge"), stage, seed=0, callbacks=[nudge(), guard])
    try:
        t.train()
    except trainer_guard.ReplicaDivergenceError as e:
        rec.update(error=type(e).__name__, message=str(e))
    rec.update(step=t.state.global_step, checks=guard.checks,
               saved=sorted(os.listdir(os.path.join(out, "diverge"))))


def tokens(out: str, stage: int, rec: dict) -> None:
    import contextlib

    import deepspeed
    from datasets import Dataset
    from deepspeed.utils import safe_get_full_fp32_param

    model = tiny_model("llama-tied", seed=0, vocab_size=127, hidden=36)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[[5, 63, 100]] = 0
    keep = [i for i in range(emb.shape[0]) if i not in (5, 63, 100)]
    # bf16: DeepSpeed casts the weight (and its fp32 master is made from that): the mean of the rounded rows
    expected = emb[keep].to(torch.bfloat16 if BF16 else torch.float32).float().mean(dim=0)
    ids = [[100 if j == 3 else 6 + (7 * i + j) % 90 for j in range(16)] for i in range(16)]  # 63, 100 used; 5 not
    data = Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 16] * 16})

    class Rows(TrainerCallback):  # after the guard, on every rank at the same point (the gathers are collectives)
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            w = model.get_input_embeddings().weight
            hp = safe_get_full_fp32_param(w).detach().cpu().float()
            ctx = deepspeed.zero.GatheredParameters([w]) if hasattr(w, "ds_id") else contextlib.nullcontext()
            with ctx:
                lp = w.data.detach().cpu().float().clone()
            for name, full in (("weight", lp), ("fp32", hp)):
                rec[f"{name}_shape"] = list(full.shape)
                want = expected.to(torch.bfloat16).float() if BF16 and name == "weight" else expected  # bf16 weight
                rec[f"{name}_fixed_are_mean"] = [bool(torch.allclose(full[i], want, rtol=1e-5, atol=1e-7))
                                                 for i in (63, 100)]
                rec[f"{name}_row5_zero"] = bool(full[5].abs().max() == 0)

    guard = trainer_guard.UntrainedTokensGuard(mode="fix")
    t = Trainer(model=model, args=args(os.path.join(out, "tokens"), stage, max_steps=1, save_steps=10),
                train_dataset=data, callbacks=[guard, Rows()])
    t.train()
    rec.update(report=guard.report(), found=guard.found["untrained"], step=t.state.global_step)


def flipped(out: str, stage: int, config: str, rec: dict) -> None:
    copy = os.path.join(out, "flipped", "checkpoint-2")
    if RANK == 0:
        shutil.copytree(os.path.join(out, "checkpoint-2"), copy)
        name = next(f for f in sorted(os.listdir(os.path.join(copy, "global_step2")))  # bf16: "bf16_zero_pp_..."
                    if f.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        rec["flipped_file"] = os.path.join("global_step2", name)
        rec["offset"] = flip_bit(os.path.join(copy, rec["flipped_file"]))
    barrier()
    steps = Steps()
    t = build(os.path.join(out, "flipped_run"), stage, seed=1,
              callbacks=trainer_guard.callbacks_from_yaml(config) + [steps])
    try:
        t.train(resume_from_checkpoint=copy)
    except Exception as e:  # which error, raised where: the test asserts it is trainer_guard's, on every rank
        rec.update(error=type(e).__name__, guard_error=isinstance(e, TrainerGuardError), message=str(e)[:2000])
    rec["steps_run"] = steps.n


def tampered(out: str, stage: int, rec: dict) -> None:
    """ZeRO-3: resume from checkpoint-2, then (a callback placed before IntegrityGuard, at train begin, after
    DeepSpeed's load) change one element of one partitioned weight, as a load that restored something else would:
    IntegrityGuard compares each gathered parameter with the manifest and every rank stops with the same error."""
    import deepspeed
    from transformers import TrainerCallback

    class Tamper(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            w = model.get_parameter("model.layers.0.mlp.up_proj.weight")
            with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
                if RANK == 0:
                    with torch.no_grad():
                        w[0, 0] += 1.0

    t = build(os.path.join(out, "tampered_run"), stage, seed=1, callbacks=[Tamper(), trainer_guard.IntegrityGuard()])
    try:
        t.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    except Exception as e:  # the test asserts it is trainer_guard's, on every rank
        rec.update(error=type(e).__name__, guard_error=isinstance(e, TrainerGuardError), message=str(e)[:2000])
    rec["step"] = t.state.global_step


def main(out: str, results: str, stage: str, config: str) -> None:
    global BF16, GATHER
    record_writes(out)
    stage_n, BF16, GATHER = int(stage.split("-")[0]), stage.endswith("-bf16"), not stage.endswith("-nogather")
    result: dict = {"stage": stage_n, "bf16": BF16, "gather": GATHER}
    phases = [("guards", lambda rec: guards(out, stage_n, config, rec))]
    if stage_n == 2:
        phases.append(("diverge", lambda rec: diverge(out, stage_n, rec)))
    phases.append(("audit", lambda rec: audit(out, stage_n, rec)))
    phases.append(("silent", lambda rec: silent(out, stage_n, rec)))
    phases.append(("drift", lambda rec: drift(out, stage_n, rec)))
    phases.append(("detached", lambda rec: detached(out, stage_n, rec)))
    phases.append(("tokens", lambda rec: tokens(out, stage_n, rec)))
    phases.append(("flipped", lambda rec: flipped(out, stage_n, config, rec)))
    if stage_n == 3:
        phases.append(("tampered", lambda rec: tampered(out, stage_n, rec)))
    only = os.environ.get("TG_PHASES")  # a comma-separated subset, when working on one phase by hand
    for name, phase in phases:
        if only and name not in only.split(","):
            continue
        rec = result[name] = {"error": None}
        with watchdog(results, result, name, seconds=WATCHDOG_S):
            try:
                phase(rec)
            except Exception as e:  # reported to the test, which shows it
                rec["error"] = rec.get("error") or f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc()[-3000:]
            barrier()
    dump(results, result)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:5])
