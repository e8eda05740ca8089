"""Sharded training (issue 18): a real Trainer under FSDP2 on 2 CPU processes (gloo), and the guards on its shards.

accelerate leaves FSDP off on CPU (``MULTI_CPU`` is not among the distributed types that take an FSDP plugin), so the
scripts patch that one decision in the test process only (``tests/dist_scripts/_fsdp.py``): the Trainer then wraps
the model with torch's ``fully_shard`` (DTensor parameters, ``Shard(0)``) and saves ``pytorch_model_fsdp_0/``
checkpoints through torch.distributed.checkpoint, as it does on GPUs. Every launch has a subprocess timeout and each
phase a watchdog inside the script, so a rank left waiting in a collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import os

import pytest
from test_distributed import ROOT, dirs, launch

pytestmark = pytest.mark.distributed


@pytest.mark.slow
def test_fsdp2_through_the_trainer_really_shards_on_cpu(tmp_path):
    out, res = dirs(tmp_path)
    ranks = launch("fsdp2.py", out, res, "plain", tmp_path=tmp_path)
    for r in ranks:
        assert r["error"] is None, r.get("traceback", r["error"])
        assert r["distributed_type"] == "DistributedType.FSDP" and r["is_fsdp_enabled"]
        # fully_shard on the model and each decoder layer (accelerate also wraps the embedding and head): not DDP
        assert {"<model>", "model.layers.0", "model.layers.1"} <= set(r["fsdp_modules"])
        assert r["n_params"] == r["n_dtensors"] == 20  # every parameter a DTensor (the tied head counted once)
        assert r["placements"] == ["(Shard(dim=0),)"]
        assert all(2 * r["local_rows"][n] == r["full_rows"][n] for n in r["full_rows"])  # each rank holds half
        assert r["step"] == 2
    assert {"pytorch_model_fsdp_0", "optimizer_0", "trainer_state.json"} <= set(ranks[0]["checkpoint"])
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "pytorch_model_fsdp_0", ".metadata"))


def _ok(ranks: list[dict]) -> None:
    for r in ranks:
        assert r.get("hung") is None, f"rank {r['rank']} hung in {r['hung']}:\n{r.get('hung_stack')}"
        assert r["error"] is None, r.get("traceback", r["error"])
        assert r["distributed_type"] == "DistributedType.FSDP" and r["n_dtensors"] == r["n_params"]


@pytest.mark.slow
def test_default_guards_train_save_resume_a_tied_llama_under_fsdp2(tmp_path):
    """Issue 18: UntrainedTokensGuard stopped every FSDP2 run at train begin (``aten.nonzero`` on a DTensor)."""
    out, res = dirs(tmp_path)
    r0, r1 = launch("fsdp2.py", out, res, "guards", os.path.join(ROOT, "configs", "default.yaml"), tmp_path=tmp_path)
    _ok([r0, r1])
    for r in (r0, r1):
        assert (r["step_run1"], r["step_run2"]) == (2, 4)
        assert "UntrainedTokensGuard" in r["reports"] and "UpdateAuditGuard" in r["reports"]
    # the resumed run equals an uninterrupted one bit for bit (full tensors, combined from the shards)
    assert r0["fingerprint"] == r1["fingerprint"] == r0["fingerprint_straight"] == r1["fingerprint_straight"]
    for g in r0["reports"]:  # one verdict per guard (only the writing rank 0 notes the manifests it wrote)
        assert [x for x in r0["reports"][g] if ": checked, manifest of" not in x] == r1["reports"][g], g
        assert [x for x in r0["reports_run1"][g] if ": checked, manifest of" not in x] == r1["reports_run1"][g], g
    assert r0["reports"]["TiedWeightsGuard"] == ["tied groups: [['model.embed_tokens.weight', 'lm_head.weight']]"]
    # skipped with one note each, decided from the DTensor parameters / the engine accelerate runs
    assert r0["reports"]["ReplicaDivergenceGuard"] == [
        "replica check skipped: sharded parameters (FSDP/ZeRO-3), no replicas to compare"]
    # IntegrityGuard: every checkpoint committed with a whole manifest whose tensor checksums, combined from the
    # shards at save time, equal those of the consolidated tensors; the resume compared the loaded shards with it
    assert any(x.startswith("checkpoint-4: checked, manifest of 21 tensors") for x in r0["reports"]["IntegrityGuard"])
    for r in (r0, r1):
        assert any(x.startswith("resumed model matches ") and x.endswith("(full tensors combined from the shards)")
                   for x in r["reports"]["IntegrityGuard"]), r["reports"]["IntegrityGuard"]
    assert r0["manifest_sums"] == r0["consolidated_sums"] and len(r0["manifest_sums"]) == 21
    assert {"pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp",
            "optimizer_0/.metadata", "optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp", "rng_state_0.pth",
            "rng_state_1.pth", "trainer_state.json"} <= set(r0["manifest_files"])
    # doctor: the healthy sharded checkpoint passes; one flipped bit in rank 1's model shard fails it, naming the
    # file and the tensor (recomputed from the .distcp chunks)
    assert r0["doctor_healthy"] == [0, []]
    code, found = r0["doctor_flipped"]
    assert code == 1 and any(f.startswith("pytorch_model_fsdp_0/__1_0.distcp changed since") for f in found), found
    assert any("in the files differs from" in f for f in found), found
    # a resume from the flipped copy stops on every rank, before anything loads, with the same trainer_guard error
    for r in (r0, r1):
        name, msg, step = r["flipped_resume"]
        assert (name, step) == ("IntegrityError", 0) and "pytorch_model_fsdp_0/__1_0.distcp changed since" in msg
    assert r0["flipped_resume"] == r1["flipped_resume"]
    assert r0["reports"]["UpdateAuditGuard"] == []  # audited on the shards (was: "20 sharded ... not audited")
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= set(os.listdir(os.path.join(out, "checkpoint-2")))


@pytest.mark.slow
def test_untrained_tokens_found_and_fixed_on_fsdp2_shards(tmp_path):
    """Rows 5 (rank 0's shard) and 100 (rank 1's) are zero, the data uses 100: every rank reports both, fixes 100
    to the mean of the 126 trained rows (summed per shard, combined) and leaves 5."""
    out, res = dirs(tmp_path)
    r0, r1 = launch("fsdp2.py", out, res, "tokens", tmp_path=tmp_path)
    _ok([r0, r1])
    assert r0["report"] == r1["report"] == [
        "input embedding: 2 row(s) look never trained (~0): ids [5, 100]",
        "training data (all 16 examples, 256 tokens) uses: id 100 x16",
        "fixed: input embedding rows [100] set to the mean of 126 trained rows",
    ]
    assert r0["found"] == r1["found"] == {"input embedding": [5, 100]}  # the tied head is the same table
    assert r0["row100_is_mean"] and r0["row5_zero"] and r1["row100_is_mean"] and r1["row5_zero"]


@pytest.mark.slow
def test_fsdp_arguments_on_a_ddp_fallback_are_guarded_as_ddp(tmp_path):
    """``fsdp=...`` without the harness patch: accelerate trains plain DDP on CPU. The guards read what wraps the
    model, so they check this run as the DDP run it is (they used to skip it, or refuse it, "because fsdp=")."""
    out, res = dirs(tmp_path)
    r0, r1 = launch("fsdp2.py", out, res, "fallback", os.path.join(ROOT, "configs", "default.yaml"),
                    tmp_path=tmp_path)
    for r in (r0, r1):
        assert r.get("hung") is None and r["error"] is None, r.get("traceback", r["error"])
        assert r["args_fsdp"] and r["distributed_type"] == "DistributedType.MULTI_CPU" and r["n_dtensors"] == 0
        assert r["divergence_checks"] == 2 and r["reports"]["ReplicaDivergenceGuard"] == []  # compared, not skipped
        assert r["audit_steps"] == 2 and r["reports"]["UpdateAuditGuard"] == []  # every parameter audited
        assert r["reports"]["EmbeddingLRGuard"] == [
            "tied: model.embed_tokens.weight = lm_head.weight at 0.1 x the LR of param group 0 (peak lr 0.001)"]
    assert r0["reports"]["IntegrityGuard"][0].startswith("checkpoint-2: checked, manifest of 20 tensors")
    assert "trainer_guard_manifest.json" in r0["checkpoint"]


@pytest.mark.slow
def test_update_audit_on_fsdp2_shards_combines_the_ranks(tmp_path):
    """Each rank checksums its shards; the full tensors' checksums and gradient states are combined across ranks,
    so every rank reaches the same verdict: rank 1's embedding rows get no gradient and stay as they were while
    the tensor trains (no finding: a per-shard verdict would stop this healthy run), and a norm weight left out of
    the optimizer stops every rank with the same message."""
    out, res = dirs(tmp_path)
    r0, r1 = launch("fsdp2.py", out, res, "audit", tmp_path=tmp_path)
    _ok([r0, r1])
    h0, h1 = r0["healthy"], r1["healthy"]
    assert (h0["embed_shard_changed"], h1["embed_shard_changed"]) == (True, False)  # the planted situation
    for h in (h0, h1):
        assert h["error"] is None and h["report"] == [] and h["step"] == h["steps"] == 3
        assert h["audited"] == h["n_dtensors"] == 21  # every parameter audited, all of them DTensor shards
    n0, n1 = r0["no_norm"], r1["no_norm"]
    assert n0 == n1  # same error, same step, same message on both ranks
    assert n0["error"] == "UpdateAuditError" and n0["step"] == 0 and n0["message"] == (
        "UpdateAuditGuard at optimizer step 1: parameters that should train did not, or frozen ones changed\n"
        "  - trainable but unchanged: 1 tensor (32 values) in model.norm - not in any optimizer group; build the "
        "optimizer after setting requires_grad, add the tensors to a param group, or freeze them "
        "(requires_grad=False) (all ranks)")


@pytest.mark.slow
def test_integrity_on_a_full_state_dict_fsdp2_checkpoint(tmp_path):
    """FULL_STATE_DICT: the checkpoint holds a gathered model.safetensors (and accelerate's pytorch_model_fsdp.bin);
    the manifest takes the full tensors' checksums combined from the shards, the resume compares the loaded shards
    with it, and doctor passes the checkpoint."""
    out, res = dirs(tmp_path)
    r0, r1 = launch("fsdp2.py", out, res, "full", tmp_path=tmp_path)
    _ok([r0, r1])
    assert {"model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin", "trainer_guard_manifest.json"} <= set(
        r0["checkpoint"])
    for r in (r0, r1):
        assert (r["step_run1"], r["step_run2"]) == (2, 4)
        assert any(x.startswith("resumed model matches ") for x in r["reports"]["IntegrityGuard"])
        assert r["reports"]["TiedWeightsGuard"] == ["tied groups: [['model.embed_tokens.weight', 'lm_head.weight']]"]
    assert any(x.startswith("checkpoint-4: checked, manifest of") for x in r0["reports"]["IntegrityGuard"])
    assert r0["doctor"] == [0, []]


@pytest.mark.slow
def test_default_guards_on_a_lora_adapter_under_fsdp2(tmp_path):
    """PEFT under FSDP2: accelerate saves the adapter only (DCP, ``adapter_only``), under get_peft_model_state_dict's
    names. Every default guard trains, saves and resumes it; IntegrityGuard's manifest records the adapter's tensors
    (checksummed from the files) and every file; doctor passes the checkpoint."""
    out, res = dirs(tmp_path)
    r0, r1 = launch("fsdp2.py", out, res, "peft", os.path.join(ROOT, "configs", "default.yaml"), tmp_path=tmp_path)
    _ok([r0, r1])
    assert {"pytorch_model_fsdp_0", "optimizer_0", "trainer_guard_manifest.json"} <= set(r0["checkpoint"])
    for r in (r0, r1):
        assert (r["step_run1"], r["step_run2"]) == (2, 4)
        assert r["reports"]["ResumeGuard"][-1] == "trainable set matches checkpoint-2"
    assert r0["reports"]["IntegrityGuard"][0].startswith("checkpoint-4: checked, manifest of 8 tensors")
    assert r0["doctor"] == [0, []]
