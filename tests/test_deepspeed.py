"""DeepSpeed ZeRO-2 / ZeRO-3 through the Trainer on 2 CPU processes (issue 18), with every default guard.

No patch: ``DS_ACCELERATOR=cpu`` makes DeepSpeed's CPU accelerator talk gloo and ``TrainingArguments(deepspeed=...,
use_cpu=True)`` runs ``DistributedType.DEEPSPEED``. The first launch JIT-builds DeepSpeed's shared-memory comm op
(about 90 s on 2 cores); ``TORCH_EXTENSIONS_DIR`` (``.ci/run`` exports a git-ignored folder of the checkout; the
same folder is the default here) keeps it for later launches. One launch per ZeRO stage (module fixture: ZeRO-2,
ZeRO-3, and ZeRO-3 in bf16 mixed precision) runs every phase of ``tests/dist_scripts/zero.py``: train with the default guards and stop after checkpoint-2, resume from it in
a fresh Trainer (another seed), train straight; ZeRO-2 also plants a replica divergence; both resume from a copy of
checkpoint-2 with one bit flipped. A fourth launch runs ZeRO-3 as DeepSpeed saves by default (no gathered
``model.safetensors``): train/resume, the flipped bit and the tampered resume only. Each launch has a subprocess timeout and each phase a watchdog, so a rank left
waiting in a collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from test_distributed import ROOT, launch

# found, not imported: DeepSpeed is imported only by the launched processes (with DS_ACCELERATOR=cpu)
pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs DeepSpeed: pip install --no-build-isolation deepspeed")]

CONFIG = os.path.join(ROOT, "configs", "default.yaml")


def _optim(rank: int, ranks: list) -> str:
    """Rank ``rank``'s optimizer partition file name (``bf16_`` in front under bf16 mixed precision)."""
    return ("bf16_" if ranks[0]["bf16"] else "") + f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module", params=[2, 3, "3-bf16"], ids=["zero2", "zero3", "zero3-bf16"])
def zero(request, tmp_path_factory):
    """One launch of zero.py for ZeRO stage ``request.param`` ("3-bf16": ZeRO-3 in bf16 mixed precision, bf16 weights
    and fp32 master copies): ``(stage, out dir, [rank 0 result, rank 1 result])``; each result's "bf16" says which."""
    stage = int(str(request.param).split("-")[0])
    return stage, *_launch(tmp_path_factory.mktemp(f"zero{request.param}"), str(request.param))


def _launch(tmp, stage: str, phases: str = "") -> tuple[str, list]:
    """zero.py launched for ``stage`` (``phases``: a comma-separated subset, else all): ``(out dir, ranks)``."""
    out, res = tmp / "out", tmp / "results"
    out.mkdir()
    res.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # only the launched processes see these
        mp.setenv("DS_ACCELERATOR", "cpu")
        mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR")
                  or os.path.join(ROOT, ".torch_extensions"))
        mp.setenv("TG_PHASES", phases)
        ranks = launch("zero.py", str(out), str(res), stage, CONFIG, tmp_path=tmp)
    for r in ranks:
        assert r.get("hung") is None, f"rank {r['rank']} hung in {r['hung']}:\n{r.get('hung_stack')}"
    return str(out), ranks


def _ok(rec: dict) -> None:
    assert rec["error"] is None, rec.get("traceback", rec["error"])


def test_the_run_really_is_zero2_or_zero3(zero):
    stage, out, ranks = zero
    for r in ranks:
        g = r["guards"]
        _ok(g)
        assert g["distributed_type"] == "DistributedType.DEEPSPEED" and g["is_deepspeed_enabled"]
        assert g["engine_class"] == "DeepSpeedEngine" and g["engine_module_is_model"] and g["zero_stage"] == stage
        assert g["n_params"] == 20  # the tied head counted once
        if stage == 2:  # partitioned optimizer state, whole parameters on every rank
            assert g["optimizer_class"] == "DeepSpeedZeroOptimizer" and g["n_ds_params"] == 0
            assert g["local_numel"] == g["full_numel"]
            assert g["global_step2"] == ["mp_rank_00_model_states.pt", _optim(0, ranks), _optim(1, ranks)]
        else:  # every parameter a partition: nothing local outside forward/backward, half of each on each rank
            assert g["optimizer_class"] == "DeepSpeedZeroOptimizer_Stage3" and g["n_ds_params"] == 20
            assert set(g["local_numel"].values()) == {0}
            assert all(2 * g["partition_numel"][n] >= g["full_numel"][n] > 2 * (g["partition_numel"][n] - 1)
                       for n in g["partition_numel"])
            assert g["global_step2"] == sorted([_optim(r, ranks) for r in (0, 1)]
                                               + [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)])
        # ZeRO-3 too: stage3_gather_16bit_weights_on_model_save gathers the weights into model.safetensors
        assert {"global_step2", "latest", "trainer_state.json", "zero_to_fp32.py", "model.safetensors"} <= set(
            g["checkpoint"])
    for f in ranks[0]["guards"]["global_step2"]:
        assert os.path.isfile(os.path.join(out, "checkpoint-2", "global_step2", f))
    # each rank writes its own optimizer partition (and, under ZeRO-3, its model partition); rank 1 nothing else
    # but the Trainer's rng_state_1.pth
    assert sorted(w for w in ranks[1]["writes"] if w.startswith("checkpoint-2/")) == sorted(
        [f"checkpoint-2/global_step2/{_optim(1, ranks)}", "checkpoint-2/rng_state_1.pth"]
        + (["checkpoint-2/global_step2/zero_pp_rank_1_mp_rank_00_model_states.pt"] if stage == 3 else []))


def _shared(reports: dict) -> dict:
    """The reports every rank must agree on: IntegrityGuard's 'checkpoint-N: checked, manifest ...' lines come from
    the rank that writes the checkpoint only."""
    return {k: [x for x in v if not (k == "IntegrityGuard" and x.startswith("checkpoint-"))]
            for k, v in reports.items()}


def test_default_guards_train_stop_resume_bit_identically(zero):
    stage, out, (r0, r1) = zero
    for r in (r0, r1):
        g = r["guards"]
        _ok(g)
        assert (g["step_run1"], g["step_run2"], g["step_straight"]) == (2, 4, 4)
        assert "trainable set matches checkpoint-2" in g["reports"]["ResumeGuard"]
    g0, g1 = r0["guards"], r1["guards"]
    # the resumed run (another init, checkpoint-2 loaded) equals an uninterrupted one bit for bit, on both ranks
    assert g0["fingerprint"] == g1["fingerprint"] == g0["fingerprint_straight"] == g1["fingerprint_straight"]
    for key in ("reports", "reports_run1", "reports_straight"):
        assert _shared(g0[key]) == _shared(g1[key]), key  # one verdict per guard
    rep = g0["reports"]
    # the resumed model compared with checkpoint-2's manifest after DeepSpeed's load (ZeRO-3: with the tensors of
    # its gathered model.safetensors, each parameter's checksum combined from the ranks' partitions, none gathered)
    for g in (g0, g1):
        matched = [x for x in g["reports"]["IntegrityGuard"] if x.startswith("resumed model matches ")]
        assert len(matched) == 1, g["reports"]["IntegrityGuard"]
        assert matched[0].endswith("(ZeRO-3 checksums combined from the ranks' partitions)") is (stage == 3), matched
    assert rep["TiedWeightsGuard"] == ["tied groups: [['model.embed_tokens.weight', 'lm_head.weight']]"]
    assert rep["DtypeGuard"] == [] and rep["HeadGuard"] == [] and rep["UntrainedTokensGuard"] == []
    assert rep["UpdateAuditGuard"] == []  # audited, nothing found (ZeRO-3: was "20 sharded ... not audited")
    skipped = ["replica check skipped: sharded parameters (FSDP/ZeRO-3), no replicas to compare"]
    for g in (g0, g1):
        # ZeRO-2's engine is no shard: checked like the bare model (was: any DeepSpeedEngine counted as sharding)
        assert g["engine_is_sharded"] is (stage == 3)
        assert g["audited"] == 20  # every parameter audited (ZeRO-3: its partitions, combined across ranks)
        # the full model's checksums combined from the partitions equal those of the gathered parameters
        assert g["combined_fingerprint"] == g["fingerprint_straight"]
    if stage == 2:  # whole replicas: compared at every step (train end: the last step was just checked)
        assert rep["ReplicaDivergenceGuard"] == []
        assert (g0["checks_run1"], g0["checks_run2"], g0["checks_straight"]) == (2, 2, 4)
        assert g0["engine_check"] == g1["engine_check"] is not None and g0["engine_report"] == []
    else:
        assert rep["ReplicaDivergenceGuard"] == skipped
        assert g0["checks_run2"] == g0["checks_straight"] == 0
        assert g0["engine_check"] is None and g0["engine_report"] == skipped


def test_what_trains_is_recorded_as_without_deepspeed(zero, tmp_path):
    """ResumeGuard's record (trainer_guard_trainable.json) and its train-begin table count whole parameters and name
    the optimizer's members: was 0 of 0 under ZeRO-3 (a partitioned parameter's numel() is 0) and, under both
    stages, each group "<unnamed (N,)>" of this rank's flat fp32 partition (sizes that differ per rank)."""
    from conftest import make_args
    from transformers import Trainer

    from trainer_guard.core.trainable import count_table, trainable_record
    from trainer_guard.tiny import tiny_model

    stage, out, (r0, r1) = zero
    plain = Trainer(model=tiny_model("llama-tied", seed=0), args=make_args(tmp_path))  # one process, no DeepSpeed
    plain.create_optimizer_and_scheduler(num_training_steps=4)  # the scheduler records each group's initial_lr
    want = trainable_record(plain.model, plain.optimizer, global_step=2)
    got = r0["guards"]["trainable"]
    assert want["trainable_params"] == want["total_params"] > 0
    assert got == want
    for r in (r0, r1):  # the same table on every rank, from the whole parameters
        assert r["guards"]["reports"]["ResumeGuard"][0] == "trainable parameters at train begin:\n" + count_table(want)


def test_update_audit_stops_every_rank_for_a_norm_left_out_of_the_optimizer(zero):
    """The optimizer the Trainer hands DeepSpeed lacks model.norm.weight: found from DeepSpeed's own parameter lists
    (its param_groups hold flat fp32 partitions), at the first step, on every rank alike."""
    stage, out, (r0, r1) = zero
    a0, a1 = r0["audit"], r1["audit"]
    assert a0 == a1  # same error, same step, same message on both ranks
    assert a0["error"] == "UpdateAuditError" and a0["step"] == 0
    assert a0["findings"] == ["model.norm.weight: not_in_optimizer"]
    assert "trainable but unchanged: 1 tensor (32 values) in model.norm - not in any optimizer group" in a0["message"]


def test_update_audit_counts_steps_without_gradient_signal_and_reports_nothing(zero):
    """Loss times 0 from the first step (an RL run whose rewards are all zero): AdamW leaves every weight as it was.
    DeepSpeed keeps no .grad after its step; its global gradient norm (0) says the steps had no signal, so nothing is
    reported (was, under ZeRO-2: all 20 tensors "not in any optimizer group", a stop at step 1)."""
    stage, out, (r0, r1) = zero
    for r in (r0, r1):
        s = r["silent"]
        assert s["error"] is None and s["step"] == 4 and s["findings"] == [] and s["silent_steps"] == 4, s
        assert len(s["report"]) == 1 and "every gradient was exactly zero" in s["report"][0]


def test_update_audit_stops_every_rank_for_a_frozen_weight_changed_on_one_rank(zero):
    """Rank 1 alone scales its copy (ZeRO-2) or its partition (ZeRO-3) of a frozen weight: every rank stops at step 1
    with one error naming it."""
    stage, out, (r0, r1) = zero
    d0, d1 = r0["drift"], r1["drift"]
    assert d0["error"] == d1["error"] == "UpdateAuditError" and d0["step"] == d1["step"] == 0
    assert d0["message"] == d1["message"]
    assert ("frozen but changed: 1 tensor (1,024 values) in model.layers.0.self_attn.o_proj - frozen and in no "
            "optimizer group: modified outside the optimizer") in d0["message"]
    # ZeRO-3: the partitions' checksums are combined, so both ranks see the change; ZeRO-2: rank 1's own replica
    assert d0["message"].endswith("(all ranks)" if stage == 3 else "(rank 1)"), d0["message"]


def test_update_audit_on_a_detached_module(zero):
    """Layer 1's MLP output is detached: its three weights and the norm before it get no gradient. ZeRO-3: each
    rank's gradient partitions are read from DeepSpeed's optimizer (all zero) and every rank stops at step 2 (after
    min_grad_steps) with the same error. ZeRO-2 frees the gradients in its step: a warning that names both possible
    causes, and training goes on."""
    stage, out, (r0, r1) = zero
    names = [f"model.layers.1.{m}.weight" for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "post_attention_layernorm")]
    d0, d1 = r0["detached"], r1["detached"]
    cause = "grad_empty" if stage == 3 else "no_update"
    for d in (d0, d1):
        assert d["findings"] == [f"{n}: {cause}" for n in names], d
    if stage == 3:
        assert d0["error"] == d1["error"] == "UpdateAuditError" and d0["step"] == d1["step"] == 1
        assert d0["message"] == d1["message"]
        assert "trainable but unchanged: 4 tensors (6,176 values) in model.layers.1.mlp.down_proj" in d0["message"]
        assert "no gradient reached it (its gradient partition in DeepSpeed ZeRO-3's optimizer is all zero)" in d0[
            "message"]
    else:
        assert d0["error"] is d1["error"] is None and d0["step"] == d1["step"] == 3
        assert len(d0["report"]) == 1 and "(warning only)" in d0["report"][0]
        assert "the optimizer keeps no per-tensor gradient after its step (DeepSpeed ZeRO-1/2)" in d0["report"][0]
        assert d1["report"] == []  # the warning is the main process's


def test_zero2_replica_check_catches_a_nudged_rank(zero):
    stage, out, (r0, r1) = zero
    if stage != 2:
        pytest.skip("ZeRO-3 holds no replicated parameters to compare")
    d0, d1 = r0["diverge"], r1["diverge"]
    assert d0["error"] == d1["error"] == "ReplicaDivergenceError"
    assert d0["message"] == d1["message"] and d0["step"] == d1["step"] == 2 and d0["checks"] == 2
    assert "rank 1 differs from rank 0" in d0["message"]
    assert "first differing tensors: model.layers.1.mlp.down_proj.weight" in d0["message"]
    assert d0["saved"] == []  # checkpoint-2 was not written


def _doctor(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer_guard", "doctor", path], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_integrity_doctor_and_resume_see_a_flipped_bit_in_a_rank_file(zero):
    stage, out, (r0, r1) = zero
    healthy = _doctor(os.path.join(out, "checkpoint-2"))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert r0["flipped"]["flipped_file"] == os.path.join("global_step2", _optim(1, (r0, r1)))
    flipped = _doctor(os.path.join(out, "flipped", "checkpoint-2"))
    assert flipped.returncode == 1, flipped.stdout + flipped.stderr
    assert r0["flipped"]["flipped_file"] in flipped.stdout
    for r in (r0, r1):  # every rank stops before step 1 with trainer_guard's error
        f = r["flipped"]
        assert f["guard_error"] and f["steps_run"] == 0, f
        assert _optim(1, (r0, r1)) in f["message"]
    assert r0["flipped"]["error"] == r1["flipped"]["error"]


def test_untrained_tokens_found_and_fixed_under_zero(zero):
    """Rows 5, 63 and 100 are zero (under ZeRO-3 row 63 is split between the ranks' flat partitions), the data uses
    63 and 100: every rank finds all three from its partition's row peaks (ZeRO-3: was nothing found, the local data
    being empty), fixes 63 and 100 to the mean of the 124 trained rows and leaves 5, in the weight AND in the
    optimizer's fp32 copy (else the first step writes the zero rows back: ZeRO-1/2's fp32 master is a copy too)."""
    stage, out, (r0, r1) = zero
    for r in (r0, r1):
        k = r["tokens"]
        _ok(k)
        assert k["step"] == 1 and k["found"] == {"input embedding": [5, 63, 100]}
        assert k["weight_fixed_are_mean"] == k["fp32_fixed_are_mean"] == [True, True]
        assert k["weight_row5_zero"] and k["fp32_row5_zero"]
    assert r0["tokens"]["report"] == r1["tokens"]["report"] == [
        "input embedding: 3 row(s) look never trained (~0): ids [5, 63, 100]",
        "training data (all 16 examples, 256 tokens) uses: id 63 x3, id 100 x16",
        "fixed: input embedding rows [63, 100] set to the mean of 124 trained rows",
    ]


def _tampered_stops_every_rank(r0: dict, r1: dict) -> None:
    """The ``tampered`` phase: both ranks stopped at train begin with the same IntegrityError naming the weight."""
    for r in (r0, r1):
        t = r["tampered"]
        assert t["guard_error"] and t["error"] == "IntegrityError" and t["step"] == 2, t
        assert "model.layers.0.mlp.up_proj.weight" in t["message"] and "not restored from the checkpoint" in t[
            "message"], t["message"]
    assert r0["tampered"]["message"] == r1["tampered"]["message"]


def test_a_zero3_model_that_differs_from_its_checkpoint_after_the_load_stops_every_rank(zero):
    """ZeRO-3: after DeepSpeed's load, one element of a partitioned weight differs from checkpoint-2 (changed by a
    callback before IntegrityGuard's train-begin check): each parameter's combined checksum is compared with the
    tensors the manifest recorded from the gathered model.safetensors, and every rank stops alike."""
    stage, out, (r0, r1) = zero
    if stage != 3:
        pytest.skip("ZeRO-2 holds whole parameters: compared as in DDP (tests/test_integrity.py)")
    _tampered_stops_every_rank(r0, r1)


def test_zero3_without_gathered_weights_is_checked_by_its_files_and_partitions(tmp_path):
    """DeepSpeed's default ZeRO-3 save (``stage3_gather_16bit_weights_on_model_save`` off): no model.safetensors,
    the rank files only. The manifest records every parameter's checksum combined from the ranks' partitions at the
    save (no gather), equal to the gathered parameters'. The default guards train, save, resume bit-identically and
    the resumed model is compared with those checksums; one element changed after DeepSpeed's load stops every rank;
    doctor passes the checkpoint by its files and fails it after one flipped bit in a rank file; a resume from that
    copy stops every rank before step 1."""
    from trainer_guard.checkpoint.manifest import read_manifest
    from trainer_guard.core.divergence import model_fingerprint

    out, (r0, r1) = _launch(tmp_path, "3-nogather", "guards,flipped,tampered")
    g0, g1 = r0["guards"], r1["guards"]
    for g in (g0, g1):
        _ok(g)
        assert g["zero_stage"] == 3 and "model.safetensors" not in g["checkpoint"]
        assert (g["step_run1"], g["step_run2"], g["step_straight"]) == (2, 4, 4)
    assert g0["fingerprint"] == g1["fingerprint"] == g0["fingerprint_straight"]
    assert _shared(g0["reports"]) == _shared(g1["reports"])
    manifest = read_manifest(os.path.join(out, "straight", "checkpoint-4"))
    parts = manifest["partitions"]
    assert manifest["tensors"] == {} and len(parts) == 21  # the tied head under both names
    assert parts["lm_head.weight"] == parts["model.embed_tokens.weight"]
    assert parts["model.layers.0.mlp.up_proj.weight"]["shape"] == [64, 32]
    # the straight run's last save: the same values as its final model, gathered (each tied storage once)
    once = {n: int(e["checksum"], 16) for n, e in parts.items() if n != "lm_head.weight"}
    assert f"{model_fingerprint(once):016x}" == g0["fingerprint_straight"]
    for g in (g0, g1):
        said = [x for x in g["reports"]["IntegrityGuard"] if x.startswith("resumed model")]
        assert said == [f"resumed model matches {os.path.join(out, 'checkpoint-2', 'trainer_guard_manifest.json')} "
                        f"(ZeRO-3 checksums combined from the ranks' partitions)"], said
    _tampered_stops_every_rank(r0, r1)
    healthy = _doctor(os.path.join(out, "checkpoint-2"))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "  partitions: 21 parameter checksums combined from DeepSpeed ZeRO-3 partitions at the save" in healthy.stdout
    flipped = _doctor(os.path.join(out, "flipped", "checkpoint-2"))
    assert flipped.returncode == 1 and r0["flipped"]["flipped_file"] in flipped.stdout, flipped.stdout
    for r in (r0, r1):
        assert r["flipped"]["guard_error"] and r["flipped"]["error"] == "IntegrityError", r["flipped"]
        assert r["flipped"]["steps_run"] == 0
