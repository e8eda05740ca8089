"""EmbeddingLRGuard and the tie guards under FSDP2 through the Trainer (issue 18), 2 CPU processes (gloo).

One launch of ``tests/dist_scripts/fsdp2_lr.py`` runs every phase (see its docstring); the test reads each rank's
results. The harness patch (``tests/dist_scripts/_fsdp.py``) makes accelerate run real FSDP2 on CPU: every parameter
a ``Shard(0)`` DTensor, SHARDED_STATE_DICT checkpoints through torch.distributed.checkpoint.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_distributed import dirs, launch

from trainer_guard.core import lr_groups, sharding
from trainer_guard.errors import EmbeddingLRError

pytestmark = pytest.mark.distributed

LR = 1e-2  # conftest.make_args; linear schedule over 4 steps, no warmup
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _lr_at(step: int, max_steps: int) -> float:
    return LR * (1 - (step - 1) / max_steps)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2_lr")
    out, res = dirs(tmp)
    r0, r1 = launch("fsdp2_lr.py", out, res, tmp_path=tmp)
    for r in (r0, r1):
        assert r.get("hung") is None, f"rank {r['rank']} hung in {r['hung']}:\n{r.get('hung_stack')}"
    return out, r0, r1


def _no_error(ranks, phase):
    for r in ranks[1:]:
        assert phase not in r["errors"], f"rank {r['rank']}, phase {phase}:\n{r['errors'][phase]}"


def _check_steps(steps, factors: dict[str, float], first_step: int, max_steps: int = 4):
    """Each recorded optimizer step: the Trainer's two groups plus one group per role holding exactly that role's
    DTensor parameter, at factor x the scheduled LR; the embedding's shard moved by its own LR."""
    assert [s["step"] for s in steps] == list(range(first_step, first_step + len(steps)))
    for s in steps:
        base = [g for g in s["groups"] if g["role"] is None]
        added = {g["role"]: g for g in s["groups"] if g["role"] is not None}
        assert len(base) == 2 and set(added) == set(factors), s
        assert all(g["dtensor"] for g in s["groups"])  # the groups hold the model's DTensor parameters
        assert all(EMB not in g["names"] and HEAD not in g["names"] for g in base)
        assert math.isclose(base[0]["lr"], _lr_at(s["step"], max_steps), rel_tol=1e-9)  # the scheduler steps every group
        for role, f in factors.items():
            assert math.isclose(added[role]["lr"], f * base[0]["lr"], rel_tol=1e-9), (s["step"], role)
            assert math.isclose(added[role]["initial_lr"], f * LR, rel_tol=1e-9)
        # update size: this rank's shard of the embedding moved by ~its own LR, a decoder weight by the base LR
        emb_factor = factors.get("embeddings", factors.get("tied"))
        ratio = s["delta"]["embed"] / s["delta"]["layer"]
        assert 0.7 * emb_factor < ratio < 1.3 * emb_factor, (s["step"], s["delta"])
        if s["step"] == 1:  # Adam's first step moves every element with a gradient by exactly lr (no weight decay)
            assert math.isclose(s["delta"]["embed"], emb_factor * LR, rel_tol=0.01), s["delta"]
            assert math.isclose(s["delta"]["layer"], LR, rel_tol=0.01), s["delta"]
            if "lm_head" in factors:
                assert math.isclose(s["delta"]["head"], factors["lm_head"] * LR, rel_tol=0.01), s["delta"]


@pytest.mark.slow
def test_embedding_lr_groups_hold_the_dtensors_and_resume_from_a_sharded_checkpoint(ranks):
    """Untied Llama, embed_ratio=0.1, head_ratio=0.5: run 1 stops after checkpoint-2 (SHARDED_STATE_DICT), run 2
    resumes it with another init, run 3 trains straight through."""
    out, r0, r1 = ranks
    _no_error(ranks, "untied")
    factors = {"embeddings": 0.1, "lm_head": 0.5}
    for r in (r0, r1):
        assert r["distributed_type"] == "DistributedType.FSDP" and r["n_dtensors"] == r["n_params"] == 21
        runs = r["untied"]
        assert (runs["run1"]["step"], runs["run2"]["step"], runs["straight"]["step"]) == (2, 4, 4)
        _check_steps(runs["run1"]["steps"], factors, 1)
        _check_steps(runs["run2"]["steps"], factors, 3)
        _check_steps(runs["straight"]["steps"], factors, 1)
        for run in runs.values():  # split only around the optimizer step: the Trainer's layout everywhere else
            assert run["begin"]["n_groups"] == 2 and set(run["n_groups_at_step_end"]) == {2}
            assert run["report"] == [
                f"embeddings: {EMB} at 0.1 x the LR of param group 0 (peak lr 0.001)",
                f"lm_head: {HEAD} at 0.5 x the LR of param group 0 (peak lr 0.005)"]
            for e in run["logged"]:  # learning_rate/<role> in the Trainer's logs
                assert math.isclose(e["learning_rate/embeddings"], 0.1 * e["learning_rate"], rel_tol=1e-9)
                assert math.isclose(e["learning_rate/lm_head"], 0.5 * e["learning_rate"], rel_tol=1e-9)
        # the resume loaded optimizer_0 into this rank's shard of the embedding (the Trainer's layout, merged),
        # and its first step ran with that state inside the embeddings group
        saved, loaded = runs["run1"]["end_state"]["2"], runs["run2"]["begin"]["state"]
        assert loaded["step"] == 2 and loaded["exp_avg_sum"] == saved["exp_avg_sum"] is not None
        assert runs["run2"]["steps"][0]["embed_state"]["step"] == 3
        # the resumed model equals the uninterrupted one bit for bit (full tensors combined from the shards)
        assert runs["run2"]["fingerprint"] == runs["straight"]["fingerprint"] != runs["run1"]["fingerprint"]
    assert r0["untied"]["run2"]["fingerprint"] == r1["untied"]["run2"]["fingerprint"]
    assert r0["untied"]["run1"]["steps"][0]["embed_state"] != r1["untied"]["run1"]["steps"][0]["embed_state"]  # shards
    # the checkpoint: DCP files, plus the split's sidecar written by rank 0 only
    ckpt = os.path.join(out, "untied", "checkpoint-2")
    assert {"pytorch_model_fsdp_0", "optimizer_0", "trainer_guard_embedding_lr.json"} <= set(r0["checkpoint"])
    side = json.load(open(os.path.join(ckpt, "trainer_guard_embedding_lr.json"), encoding="utf-8"))
    assert side == r0["sidecar"] == r1["sidecar"]
    assert side["base_groups"] == 2 and [(g["role"], g["factor"], g["names"]) for g in side["groups"]] == [
        ("embeddings", 0.1, [EMB]), ("lm_head", 0.5, [HEAD])]
    assert "untied/checkpoint-2/trainer_guard_embedding_lr.json" in r0["writes"]
    assert not any("trainer_guard" in w for w in r1["writes"])


@pytest.mark.slow
def test_tied_embedding_is_one_dtensor_in_one_group_under_fsdp2(ranks):
    _, r0, r1 = ranks
    _no_error(ranks, "tied")
    for r in (r0, r1):
        t = r["tied"]
        assert t["facts"]["n_params"] == t["facts"]["n_dtensors"] == 20  # embedding and head: one DTensor
        _check_steps(t["steps"], {"tied": 0.1}, 1, max_steps=2)
        for s in t["steps"]:
            assert [g["names"] for g in s["groups"] if g["role"] == "tied"] == [[EMB]]
            assert sum(len(g["names"]) for g in s["groups"]) == 20  # every parameter once
        assert t["report"] == [f"tied: {EMB} = {HEAD} at 0.1 x the LR of param group 0 (peak lr 0.001)"]
    # two rates asked for the one tied parameter: the same error on every rank
    assert r0["tied_conflict"] == r1["tied_conflict"]
    assert r0["tied_conflict"]["error"] == "EmbeddingLRError"
    assert "is one tied parameter" in r0["tied_conflict"]["message"]
    assert r0["tied_conflict"]["message"].endswith("(all ranks)")


@pytest.mark.slow
def test_tie_guards_train_save_resume_a_full_state_dict_checkpoint_under_fsdp2(ranks):
    """FULL_STATE_DICT: the Trainer gathers each name's full tensor, so model.safetensors holds the tied weight
    under both names. TiedWeightsGuard's tie record says it was tied: the resume is not refused as 'trained
    untied' (it was, on every rank), and the resumed model is still tied. Without the record (saved without the
    guard) the values decide: equal under both names, one tie."""
    _, r0, r1 = ranks
    _no_error(ranks, "full")
    f0, f1 = r0["full"], r1["full"]
    assert f0["facts"]["distributed_type"] == "DistributedType.FSDP"
    assert {"model.safetensors", "trainer_guard_ties.json", "pytorch_model_fsdp.bin"} <= set(f0["checkpoint"])
    assert {EMB, HEAD} <= set(f0["safetensors_keys"])  # stored under both names (what the guard must accept)
    for f in (f0, f1):
        assert f["step_run2"] == 4 and f["tied_after_resume"]
        for rep in (f["reports_run1"], f["reports"]):
            assert rep["TiedWeightsGuard"] == [f"tied groups: [['{EMB}', '{HEAD}']]"]
            assert rep["HeadGuard"] == []
            assert rep["EmbeddingLRGuard"] == [f"tied: {EMB} = {HEAD} at 0.1 x the LR of param group 0 (peak lr 0.001)"]
    assert f0["fingerprint"] == f1["fingerprint"]
    # saved without TiedWeightsGuard (no tie record): the same values under both names make it one tie saved twice
    for f in (f0, f1):
        n = f["norecord"]
        assert n["step"] == 4 and n["tied"] and n["fingerprint"] == f0["fingerprint"]  # = the resume with a record
        assert n["reports"]["TiedWeightsGuard"] == [
            f"checkpoint-2 stores the tie ['{EMB}', '{HEAD}'] under each name with the same values (a gathered "
            f"save, e.g. FSDP's FULL_STATE_DICT): resumed tied", f"tied groups: [['{EMB}', '{HEAD}']]"]
        assert n["reports"]["HeadGuard"] == []
    for key in ("reports_run1", "reports"):
        assert {k: v for k, v in f0[key].items() if k != "IntegrityGuard"} == \
               {k: v for k, v in f1[key].items() if k != "IntegrityGuard"}


# -- the decision, without a launch ---------------------------------------------------------------------------
def test_sharded_optimizer_problems_per_engine(monkeypatch):
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    monkeypatch.setattr(sharding, "engine", lambda: None)
    assert lr_groups.sharded_optimizer_problems(lin, opt) == []
    monkeypatch.setattr(sharding, "engine", lambda: "fsdp")
    assert lr_groups.sharded_optimizer_problems(lin, opt) == []  # FSDP2: DTensor parameters, split as usual

    class FullyShardedDataParallel(torch.nn.Module):  # FSDP1's wrapper, by name
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

    fsdp1 = FullyShardedDataParallel()
    (msg,) = lr_groups.sharded_optimizer_problems(fsdp1, torch.optim.SGD(fsdp1.parameters(), lr=0.1))
    assert "FSDP1" in msg and "'version': 2" in msg


def test_embedding_lr_guard_refuses_fsdp1_before_changing_anything(monkeypatch):
    """The refusal is an EmbeddingLRError at train begin, the optimizer left as it was."""
    from transformers import TrainerControl, TrainerState

    from conftest import make_args
    from trainer_guard import EmbeddingLRGuard
    from trainer_guard.tiny import tiny_model

    monkeypatch.setattr(sharding, "engine", lambda: "fsdp")
    model = tiny_model("llama-untied")

    class FullyShardedDataParallel(torch.nn.Module):
        pass

    model.add_module("fsdp1_marker", FullyShardedDataParallel())
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    guard = EmbeddingLRGuard(ratio=0.1)
    with pytest.raises(EmbeddingLRError, match="FSDP1"):
        guard.on_train_begin(make_args("unused"), TrainerState(), TrainerControl(), model=model, optimizer=opt,
                             lr_scheduler=None)
    assert len(opt.param_groups) == 1 and guard.split is None


# -- DeepSpeed ZeRO (tests/dist_scripts/zero_lr.py, one launch per stage) ------------------------------------------
@pytest.fixture(scope="module", params=[(2, "lr", "dsopt"), (3, "lr", "noguard", "tied")], ids=["zero2", "zero3"])
def zero(request, tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    from test_distributed import ROOT

    stage, *phases = request.param
    tmp = tmp_path_factory.mktemp(f"zero_lr{stage}")
    out, res = dirs(tmp)
    with pytest.MonkeyPatch.context() as mp:  # only the launched processes see these (as tests/test_deepspeed.py)
        mp.setenv("DS_ACCELERATOR", "cpu")
        mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR")
                  or os.path.join(ROOT, ".torch_extensions"))
        r0, r1 = launch("zero_lr.py", out, res, str(stage), *phases, tmp_path=tmp)
    for r in (r0, r1):
        assert r.get("hung") is None, f"rank {r['rank']} hung in {r['hung']}:\n{r.get('hung_stack')}"
    return stage, out, r0, r1


@pytest.mark.slow
def test_embedding_lr_under_deepspeed_zero_splits_at_creation_and_resumes(zero):
    """The guard splits the Trainer's optimizer as it is created; ZeRO flattens each group and steps it at its own
    LR. Run 1 stops after checkpoint-2, run 2 resumes it (another init), run 3 trains straight."""
    stage, out, r0, r1 = zero
    for r in (r0, r1):
        rec = r["lr"]
        assert rec["error"] is None, rec.get("traceback", rec["error"])
        assert rec["distributed_type"] == "DistributedType.DEEPSPEED" and rec["zero_stage"] == stage
        assert rec["optimizer_class"] == ("DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3")
        assert (rec["run1"]["step"], rec["run2"]["step"], rec["straight"]["step"]) == (2, 4, 4)
        for name, first in (("run1", 1), ("run2", 3), ("straight", 1)):
            run = rec[name]
            assert [s["step"] for s in run["steps"]] == list(range(first, 5 if name != "run1" else 3))
            for s in run["steps"]:  # DeepSpeed's own groups: the Trainer's two, then the guard's two
                roles = [g["role"] for g in s["groups"]]
                assert roles == [None, None, "embeddings", "lm_head"], s
                base, emb, head = s["groups"][0], s["groups"][2], s["groups"][3]
                assert math.isclose(base["lr"], _lr_at(s["step"], 4), rel_tol=1e-9)
                assert math.isclose(emb["lr"], 0.1 * base["lr"], rel_tol=1e-9)
                assert math.isclose(head["lr"], 0.5 * base["lr"], rel_tol=1e-9)
                assert 0.07 < s["delta"]["embed"] / s["delta"]["layer"] < 0.13, s["delta"]
                if s["step"] == 1:  # Adam's first step: every element with a gradient moves by its group's lr
                    assert math.isclose(s["delta"]["embed"], 1e-3, rel_tol=0.01), s["delta"]
                    assert math.isclose(s["delta"]["head"], 5e-3, rel_tol=0.01), s["delta"]
                    assert math.isclose(s["delta"]["layer"], 1e-2, rel_tol=0.01), s["delta"]
            assert run["report"] == [
                f"embeddings: {EMB} at 0.1 x the LR of param group 0 (peak lr 0.001)",
                f"lm_head: {HEAD} at 0.5 x the LR of param group 0 (peak lr 0.005)"]
            for e in run["logged"]:
                assert math.isclose(e["learning_rate/embeddings"], 0.1 * e["learning_rate"], rel_tol=1e-9)
        # the resumed run (DeepSpeed's optimizer state loaded into the same split groups) equals the straight one
        assert rec["run2"]["fingerprint"] == rec["straight"]["fingerprint"] != rec["run1"]["fingerprint"]
    assert r0["lr"]["run2"]["fingerprint"] == r1["lr"]["run2"]["fingerprint"]
    assert "global_step2" in r0["lr"]["checkpoint"] and "trainer_guard_embedding_lr.json" in r0["lr"]["checkpoint"]
    side = json.load(open(os.path.join(out, "lr", "checkpoint-2", "trainer_guard_embedding_lr.json"), encoding="utf-8"))
    assert [(g["role"], g["factor"], g["names"]) for g in side["groups"]] == [
        ("embeddings", 0.1, [EMB]), ("lm_head", 0.5, [HEAD])]
    assert not any("trainer_guard" in w for w in r1["writes"])


@pytest.mark.slow
def test_embedding_lr_under_deepspeed_refuses_what_it_cannot_split(zero):
    """ZeRO-2: a DeepSpeed "optimizer" section (DeepSpeed builds the optimizer, the Trainer's is never created).
    ZeRO-3: resuming a checkpoint trained without the guard (its optimizer state has the Trainer's groups).
    The same EmbeddingLRError on both ranks, before any step of that run."""
    stage, _, r0, r1 = zero
    phase = "dsopt" if stage == 2 else "noguard"
    assert r0[phase] == r1[phase]
    rec = r0[phase]
    assert rec["error"] == "EmbeddingLRError", rec.get("traceback", rec["error"])
    assert rec["message"].endswith("(all ranks)")
    if stage == 2:
        assert rec["step"] == 0
        assert 'the DeepSpeed config has an "optimizer" section' in rec["message"]
        assert "remove that section" in rec["message"]
    else:
        assert rec["step"] == 2  # checkpoint-2's state, not one step further
        assert "checkpoint-2 was trained without EmbeddingLRGuard's groups" in rec["message"]


@pytest.mark.slow
def test_tied_embedding_is_one_group_under_deepspeed_zero3(zero):
    stage, _, r0, r1 = zero
    if stage != 3:
        pytest.skip("the tied run is in the ZeRO-3 launch")
    for r in (r0, r1):
        t = r["tied"]
        assert t["error"] is None, t.get("traceback", t["error"])
        assert t["tied"] and t["n_params"] == 20
        assert t["report"] == [f"tied: {EMB} = {HEAD} at 0.1 x the LR of param group 0 (peak lr 0.001)"]
        for s in t["steps"]:
            assert [g["role"] for g in s["groups"]] == [None, None, "tied"]
            assert math.isclose(s["groups"][2]["lr"], 0.1 * s["groups"][0]["lr"], rel_tol=1e-9)
        assert math.isclose(t["steps"][0]["delta"]["embed"], 1e-3, rel_tol=0.01), t["steps"][0]["delta"]
        assert math.isclose(t["steps"][0]["delta"]["layer"], 1e-2, rel_tol=0.01), t["steps"][0]["delta"]
