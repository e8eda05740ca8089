"""A real Trainer under FSDP2 (``fsdp="full_shard"``, ``fsdp_config={"version": 2}``) on N CPU processes (gloo).

Usage (from tests/test_sharded.py):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/fsdp2.py OUT RESULTS MODE [CONFIG]

MODE:
- ``plain``: no guards; 2 steps, one SHARDED_STATE_DICT checkpoint. Records what wraps the model (the run is really
  sharded: DTensor parameters on each rank) and the checkpoint's files.
- ``guards``: every guard of CONFIG (configs/default.yaml), the replica check every step and at train end. Run 1
  (max_steps=4) stops after checkpoint-2 (a preempted job); rank 0 runs ``trainer-guard doctor``'s check on it
  and on a copy with one bit flipped in rank 1's model shard file, and every rank resumes from that copy (it must
  stop with a trainer_guard error before step 1); run 2 builds a fresh model and Trainer and resumes from
  checkpoint-2 to step 4; run 3 trains 4 steps uninterrupted into OUT/straight. Records each guard's report, the
  doctor verdicts, the manifest's tensor checksums next to the consolidated tensors' (gathered here, for the test
  only), the full-tensor checksums of the final models (combined from the shards) and any error.
- ``full``: the same train / stop / resume with ``state_dict_type="FULL_STATE_DICT"`` (the checkpoint holds a
  gathered ``model.safetensors``), IntegrityGuard and TiedWeightsGuard only.
- ``fallback``: the same arguments WITHOUT the harness patch: accelerate falls back to plain DDP on CPU. Every
  default guard plus EmbeddingLRGuard must treat the run as the DDP run it is (not skip it "because fsdp=").
- ``audit``: UpdateAuditGuard(every=1) alone on an untied Llama whose data uses ids below 64 only, so rank 1's shard
  of the input embedding (rows 64-127) gets no gradient and stays as it was while the tensor trains: no finding
  (``healthy``). Then the same with ``model.norm.weight`` left out of the optimizer: every rank stops with the same
  UpdateAuditError (``no_norm``).
- ``tokens``: UntrainedTokensGuard(mode="fix") on a tied Llama whose embedding rows 5 and 100 are zero (one on
  each rank's shard) and whose data uses id 100 only. Records the guard's report and, right after the guard ran at
  train begin, rows 5 and 100 of the full embedding next to the mean of the trained rows of the unsharded weight.

Each phase runs under a watchdog: a rank left waiting in a collective writes ``hung`` into its results and exits.
"""

from __future__ import annotations

import os
import sys
import traceback

from _common import dump, finish, record_writes, stop_at
from _fsdp import allow_fsdp_on_cpu, fsdp_args, sharding_facts, watchdog

from transformers import Trainer  # noqa: E402

import trainer_guard  # noqa: E402
from trainer_guard._dist import gather  # noqa: E402
from trainer_guard.core.divergence import model_fingerprint, sharded_checksums  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402



def build(out: str, seed: int, callbacks: list, max_steps: int = 4) -> Trainer:
    model = tiny_model("llama-tied", seed=seed)
    return Trainer(model=model, args=fsdp_args(out, max_steps=max_steps, save_steps=2),
                   train_dataset=tiny_dataset(32, 16, model.config.vocab_size), callbacks=callbacks)


def full_fingerprint(model) -> str:
    """The fingerprint of the full (unsharded) tensors, combined from each rank's shards."""
    return f"{model_fingerprint(sharded_checksums(dict(model.named_parameters()), gather)):016x}"


def plain(out: str, result: dict) -> None:
    t = build(out, seed=0, callbacks=[], max_steps=2)
    t.train()
    result.update(sharding_facts(t), step=t.state.global_step,
                  checkpoint=sorted(os.listdir(os.path.join(out, "checkpoint-2"))))


def flip_copy(src: str, dst: str, rel: str) -> None:
    """``dst``: a copy of checkpoint ``src`` with one bit flipped in the middle of file ``rel`` (rank 0 only)."""
    import shutil

    from _common import RANK

    if RANK == 0:
        shutil.copytree(src, dst)
        path = os.path.join(dst, rel)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
    gather(None)  # a barrier: every rank sees the copy


def integrity(out: str, result: dict, t1, cbs) -> None:
    """After run 1: the manifest against the consolidated tensors, doctor on the healthy and the flipped copy, and a
    resume from the flipped copy on every rank."""
    import json

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from trainer_guard.checksum import checksums
    from trainer_guard.doctor import diagnose
    from trainer_guard.errors import TrainerGuardError

    from _common import RANK

    ckpt = os.path.join(out, "checkpoint-2")
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p) for n, p in t1.model.state_dict().items()}
    consolidated = {n: f"{v:016x}" for n, v in checksums(full, backend="cpu").items()}
    if RANK == 0:
        with open(os.path.join(ckpt, "trainer_guard_manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
        result["manifest_sums"] = {n: e["checksum"] for n, e in m["tensors"].items()}
        result["manifest_files"] = sorted(m["files"])
        result["consolidated_sums"] = consolidated
        healthy = diagnose(ckpt)
        result["doctor_healthy"] = [healthy.exit_code, [f.message for f in healthy.problems + healthy.unusable]]
    bad = os.path.join(out, "flipped", "checkpoint-2")
    flip_copy(ckpt, bad, "pytorch_model_fsdp_0/__1_0.distcp")
    if RANK == 0:
        d = diagnose(bad)
        result["doctor_flipped"] = [d.exit_code, [f.message for f in d.problems + d.unusable]]
    t = build(os.path.join(out, "flipped"), seed=1, callbacks=cbs())
    try:
        t.train(resume_from_checkpoint=bad)
        result["flipped_resume"] = None
    except TrainerGuardError as e:
        result["flipped_resume"] = [type(e).__name__, str(e), t.state.global_step]
    dist.barrier()


def guards(out: str, result: dict, config: str) -> None:
    def cbs():
        return trainer_guard.callbacks_from_yaml(config, replica_divergence={"every": 1, "at_train_end": True})

    t1 = build(out, seed=0, callbacks=cbs() + [stop_at(2)])
    t1.train()
    result.update(sharding_facts(t1), step_run1=t1.state.global_step)
    integrity(out, result, t1, cbs)
    t2 = build(out, seed=1, callbacks=cbs())  # another init on purpose: the resume must load checkpoint-2
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    result["step_run2"] = t2.state.global_step
    result["fingerprint"] = full_fingerprint(t2.model)
    result["reports"] = {type(cb).__name__: cb.report() for cb in t2.callback_handler.callbacks
                         if hasattr(cb, "report")}
    result["reports_run1"] = {type(cb).__name__: cb.report() for cb in t1.callback_handler.callbacks
                              if hasattr(cb, "report")}
    t3 = build(os.path.join(out, "straight"), seed=0, callbacks=cbs())
    t3.train()
    result["fingerprint_straight"] = full_fingerprint(t3.model)


def stop_resume_doctor(out: str, result: dict, build_one) -> None:
    """``build_one(seed, extra_callbacks)`` trains 4 steps into ``out`` saving every 2: stop after checkpoint-2,
    resume from it in a fresh Trainer (another seed), record both runs' steps, the resumed run's reports and, on
    rank 0, the doctor's verdict on checkpoint-2."""
    from _common import RANK
    from trainer_guard.doctor import diagnose

    t1 = build_one(0, [stop_at(2)])
    t1.train()
    result.update(sharding_facts(t1), step_run1=t1.state.global_step,
                  checkpoint=sorted(os.listdir(os.path.join(out, "checkpoint-2"))))
    t2 = build_one(1, [])
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    result["step_run2"] = t2.state.global_step
    result["reports"] = {type(cb).__name__: cb.report() for cb in t2.callback_handler.callbacks
                         if hasattr(cb, "report")}
    if RANK == 0:
        d = diagnose(os.path.join(out, "checkpoint-2"))
        result["doctor"] = [d.exit_code, [f.message for f in d.problems + d.unusable]]


def full(out: str, result: dict) -> None:
    def build_full(seed: int, extra: list) -> Trainer:
        model = tiny_model("llama-tied", seed=seed)
        return Trainer(model=model, args=fsdp_args(out, max_steps=4, save_steps=2, state_dict_type="FULL_STATE_DICT"),
                       train_dataset=tiny_dataset(32, 16, model.config.vocab_size),
                       callbacks=[trainer_guard.IntegrityGuard(), trainer_guard.TiedWeightsGuard()] + extra)

    stop_resume_doctor(out, result, build_full)


def peft(out: str, result: dict, config: str) -> None:
    """A LoRA adapter under FSDP2 with every default guard: accelerate saves the adapter only (DCP, adapter_only)."""
    from peft import LoraConfig, get_peft_model

    def build_peft(seed: int, extra: list) -> Trainer:
        model = get_peft_model(tiny_model("llama-untied", seed=seed),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        return Trainer(model=model, args=fsdp_args(out, max_steps=4, save_steps=2),
                       train_dataset=tiny_dataset(32, 16, 128),
                       callbacks=trainer_guard.callbacks_from_yaml(config) + extra)

    stop_resume_doctor(out, result, build_peft)


def fallback(out: str, result: dict, config: str) -> None:
    callbacks = trainer_guard.callbacks_from_yaml(config, replica_divergence={"every": 1},
                                                  embedding_lr={"enabled": True})
    t = build(out, seed=0, callbacks=callbacks, max_steps=2)
    t.train()
    div = next(cb for cb in callbacks if type(cb).__name__ == "ReplicaDivergenceGuard")
    audit = next(cb for cb in callbacks if type(cb).__name__ == "UpdateAuditGuard")
    result.update(sharding_facts(t), args_fsdp=bool(t.args.fsdp), divergence_checks=div.checks,
                  audit_steps=audit.audit.steps if audit.audit else 0,
                  checkpoint=sorted(os.listdir(os.path.join(out, "checkpoint-2"))),
                  reports={type(cb).__name__: cb.report() for cb in callbacks})


def audit(out: str, result: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from trainer_guard import UpdateAuditError, UpdateAuditGuard

    ids = [[(5 * i + j) % 64 for j in range(16)] for i in range(16)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 16] * 16})

    class Shard(TrainerCallback):  # this rank's rows of the input embedding: did they change? what was audited?
        def __init__(self, rec, guard):
            self.rec, self.guard = rec, guard

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.w = model.get_input_embeddings().weight
            self.before = self.w.to_local().detach().clone()

        def on_step_end(self, args, state, control, **kwargs):
            self.rec["audited"] = len(self.guard.audit.params)
            self.rec["embed_shard_changed"] = not torch.equal(self.before, self.w.to_local())

    class NoNorm(Trainer):
        def create_optimizer(self, model=None):
            params = [p for n, p in self.model.named_parameters() if n != "model.norm.weight"]
            self.optimizer = torch.optim.AdamW(params, lr=self.args.learning_rate, weight_decay=0.0)
            return self.optimizer

    for name, cls in (("healthy", Trainer), ("no_norm", NoNorm)):
        guard = UpdateAuditGuard(every=1)
        rec = {"error": None, "message": None}
        t = cls(model=tiny_model("llama-untied", seed=0), args=fsdp_args(os.path.join(out, name), max_steps=3,
                save_steps=10), train_dataset=data, callbacks=[guard, Shard(rec, guard)])
        try:
            t.train()
        except UpdateAuditError as e:
            rec.update(error=type(e).__name__, message=str(e))
        rec.update(step=t.state.global_step, report=guard.report(), steps=guard.audit.steps,
                   n_dtensors=sharding_facts(t)["n_dtensors"])
        result[name] = rec
    result.update(sharding_facts(t))


def tokens(out: str, result: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    model = tiny_model("llama-tied", seed=0)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[[5, 100]] = 0
    keep = [i for i in range(emb.shape[0]) if i not in (5, 100)]
    expected = emb[keep].float().mean(dim=0)
    ids = [[100 if j == 3 else 6 + (7 * i + j) % 90 for j in range(16)] for i in range(16)]  # 100 used, 5 not
    data = Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 16] * 16})

    class Rows(TrainerCallback):  # after the guard: every rank takes part in full_tensor() at the same point
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            full = model.get_input_embeddings().weight.full_tensor()
            result["row100_is_mean"] = bool(torch.allclose(full[100].float(), expected, rtol=1e-5, atol=1e-7))
            result["row5_zero"] = bool(full[5].abs().max() == 0)

    guard = trainer_guard.UntrainedTokensGuard(mode="fix")
    t = Trainer(model=model, args=fsdp_args(out, max_steps=1, save_steps=10), train_dataset=data,
                callbacks=[guard, Rows()])
    t.train()
    result.update(sharding_facts(t), report=guard.report(), found=guard.found["untrained"])


def main(out: str, results: str, mode: str, config: str | None = None) -> None:
    record_writes(out)
    if mode != "fallback":
        allow_fsdp_on_cpu()
    result: dict = {"error": None, "mode": mode}
    try:
        with watchdog(results, result, mode, seconds=float(os.environ.get("TG_WATCHDOG_S", "240"))):
            if mode in ("plain", "tokens", "audit", "full"):
                {"plain": plain, "tokens": tokens, "audit": audit, "full": full}[mode](out, result)
            else:
                {"guards": guards, "fallback": fallback, "peft": peft}[mode](out, result, config)
    except Exception as e:  # reported to the test, which shows it
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-3000:]
    dump(results, result)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:5])
