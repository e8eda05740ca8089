"""Rank-asymmetric failures on 2 CPU processes: one rank fails or sees a problem, the others must not hang.

Project rule (docs/DISTRIBUTED.md): only the main process writes; every rank ends a failing check with the same
``trainer_guard`` error, in bounded time; no rank is left waiting in a collective (a DDP all-reduce or a guard's
own gather) for a rank that already raised. The scripts run each scenario under a watchdog and meet through
files, not collectives (tests/dist_scripts/_asym.py), so a hang is recorded as ``hung`` (with where that rank
waits) instead of blocking the test.

Launches: ``asym.py`` (one launch: a healthy run with every default guard, gradient accumulation,
``save_total_limit=1`` and ``load_best_model_at_end``; a failed manifest write on rank 0; resumes where rank 1's
weights differ; ReplicaDivergenceGuard with replicas of different structure) and ``asym_sidecar.py`` (guards
outside this helper's files, xfail until fixed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
LAUNCH_TIMEOUT_S = 600  # the scripts' own watchdogs end a hung scenario long before this
SCENARIO_TIMEOUT_S = 120  # a scenario (or a rank's wait for the others after it) longer than this is a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, tmp_path, *script_args: str, nproc: int = 2) -> list[dict]:
    """Run ``script OUT RESULTS *script_args`` on ``nproc`` CPU ranks (as tests/test_distributed.py's ``launch``);
    return each rank's result JSON."""
    out, res = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    res.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="warning", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(SCRIPTS, script), str(out), str(res),
           *script_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{script} did not finish in {LAUNCH_TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{log[-4000:]}"
    return [json.load(open(res / f"rank{r}.json", encoding="utf-8")) for r in range(nproc)]


def same_guard_error(ranks: list[dict], name: str, error: str | None = None) -> dict:
    """Every rank ended scenario ``name`` with the same trainer_guard error (none hung); return rank 0's record."""
    recs = [r.get(name) for r in ranks]
    assert all(recs), f"{name} did not run on every rank: {[r['ended_by'] for r in ranks]}"
    for i, rec in enumerate(recs):
        assert rec["outcome"] == "error", f"rank {i}: {name} ended {rec['outcome']} {rec.get('stack') or ''}"
        assert rec["guard_error"], f"rank {i}: {name} raised {rec['error']}, not a TrainerGuardError: {rec['message']}"
        assert "peers_hung" not in rec, f"rank {i}: {name}: ranks {rec['peers_hung']} hung"
    assert len({(r["error"], r["message"]) for r in recs}) == 1, [(r["error"], r["message"]) for r in recs]
    if error:
        assert recs[0]["error"] == error, recs[0]
    return recs[0]


def ok_everywhere(ranks: list[dict], name: str) -> list[dict]:
    recs = [r.get(name) for r in ranks]
    assert all(recs), f"{name} did not run on every rank: {[r['ended_by'] for r in ranks]}"
    for i, rec in enumerate(recs):
        assert rec["outcome"] == "ok", f"rank {i}: {name}: {rec['outcome']} {rec.get('error')}: {rec.get('message')}"
    return recs


@pytest.fixture(scope="module")
def asym_run(tmp_path_factory):
    """One 2-process launch of dist_scripts/asym.py, shared by the tests below."""
    return launch("asym.py", tmp_path_factory.mktemp("asym"), str(SCENARIO_TIMEOUT_S))


# -- every default guard, gradient accumulation, save_total_limit=1, load_best_model_at_end -------------------------
@pytest.mark.distributed
def test_healthy_run_with_every_default_guard_agrees_and_only_rank0_writes(asym_run):
    r0, r1 = ok_everywhere(asym_run, "healthy")
    assert r0["step"] == r1["step"] == 6
    assert r0["divergence_checks"] == r1["divergence_checks"] == 7  # every step, and the best model at train end
    assert r0["fingerprint"] == r1["fingerprint"]
    assert r0["best"] == r1["best"] and r0["left"] == [os.path.basename(r0["best"])]  # the limit kept the best only
    assert set(r0["best_files"]) >= {"trainer_guard_manifest.json", "trainer_guard_ties.json",
                                     "trainer_guard_trainable.json"}
    # the best model the Trainer loaded at train end was checked against its manifest, on both ranks
    for r in (r0, r1):
        assert any(line.startswith("best model matches ") for line in r["reports"]["IntegrityGuard"]), r["reports"]
    assert r0["reports"].keys() == r1["reports"].keys()
    for g in ("TiedWeightsGuard", "ReplicaDivergenceGuard", "UpdateAuditGuard", "HeadGuard"):
        assert r0["reports"][g] == r1["reports"][g], g
    # rank 1 wrote only the Trainer's own per-rank RNG files (one per checkpoint), none of trainer_guard's
    assert r1["writes"] and all(os.path.basename(w) == "rng_state_1.pth" for w in r1["writes"]), r1["writes"]
    assert {os.path.basename(w) for w in r0["writes"]} >= set(r0["best_files"])


@pytest.mark.distributed
def test_manifest_write_failing_on_rank0_stops_every_rank_alike(asym_run):
    rec = same_guard_error(asym_run, "manifest_write_fails", "IntegrityError")
    assert "trainer_guard_manifest.json could not be written" in rec["message"]
    assert "No space left on device" in rec["message"] and "(rank 0)" in rec["message"]
    assert rec["step"] == 3  # joined (and agreed) at the step after checkpoint-2's save


# -- resumes where rank 1's weights differ ------------------------------------------------------------------------
@pytest.mark.distributed
def test_resume_rank1_load_differs_wired_every_rank_raises(asym_run):
    rec = same_guard_error(asym_run, "resume_wired_rank1_bad_load", "IntegrityError")
    assert "model.layers.0.mlp.up_proj.weight" in rec["message"] and "(rank 1)" in rec["message"]
    assert "The resumed model does not match" in rec["message"]


@pytest.mark.distributed
def test_resume_rank1_changed_after_wrap_every_rank_raises(asym_run):
    rec = same_guard_error(asym_run, "resume_unwired_rank1_after_wrap", "IntegrityError")
    assert "model.layers.0.mlp.up_proj.weight" in rec["message"] and "(rank 1)" in rec["message"]


@pytest.mark.distributed
def test_resume_rank1_load_differs_unwired_ddp_broadcast_repairs_it(asym_run):
    """Not wired, the check runs after DDP's wrap, which broadcast rank 0's weights: no false alarm, equal replicas."""
    r0, r1 = ok_everywhere(asym_run, "resume_unwired_rank1_before_wrap")
    assert r0["step"] == r1["step"] == 8 and r0["fingerprint"] == r1["fingerprint"]


@pytest.mark.distributed
def test_best_model_loaded_differently_on_rank1_is_caught_at_train_end(asym_run):
    """The train-end check ran before only when the last step had not been checked: the best model the Trainer
    loads at train end (load_best_model_at_end) was never compared, so a rank whose load differed went unnoticed."""
    rec = same_guard_error(asym_run, "best_load_rank1_differs", "ReplicaDivergenceError")
    assert "at step 4: rank 1 differs from rank 0" in rec["message"]
    assert "first differing tensors: model.layers.0.mlp.up_proj.weight\n" in rec["message"]


@pytest.mark.distributed
def test_dtype_raise_seen_on_rank1_only_stops_every_rank_alike(asym_run):
    rec = same_guard_error(asym_run, "dtype_rank1_only", "DtypeMismatchError")
    assert "model.norm.weight (LlamaRMSNorm, torch.float64, 32 elements)" in rec["message"]
    assert rec["message"].endswith("(rank 1)")


# -- helpers -----------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_agreed_call_turns_one_ranks_exception_into_one_error_everywhere(asym_run):
    rec = same_guard_error(asym_run, "agreed_call", "IntegrityError")
    assert rec["message"].startswith("could not write the record:\n  - OSError: [Errno 28] No space left on device")
    assert rec["message"].endswith("x.json' (rank 0)")


def test_agreed_call_single_process():
    from trainer_guard._dist import agreed_call
    from trainer_guard.errors import IntegrityError

    assert agreed_call(True, lambda: 3) == 3 and agreed_call(False, lambda: 1 / 0) is None
    with pytest.raises(IntegrityError, match=r"^head:\n  - ZeroDivisionError: division by zero$"):
        agreed_call(True, lambda: 1 / 0, IntegrityError, "head:")


# -- ReplicaDivergenceGuard: replicas of different structure -------------------------------------------------------
@pytest.mark.distributed
def test_divergence_equal_small_models_agree(asym_run):
    r0, r1 = ok_everywhere(asym_run, "div_equal")
    assert r0["fingerprint"] == r1["fingerprint"] is not None


@pytest.mark.distributed
@pytest.mark.parametrize("name,named", [("div_extra", "extra (extra)"), ("div_missing", "1.bias (missing)"),
                                        ("div_dtype", "first differing tensors: 0.weight\n")])
def test_divergence_parameter_sets_and_dtypes_differ(asym_run, name, named):
    rec = same_guard_error(asym_run, name, "ReplicaDivergenceError")
    assert "at step 7: rank 1 differs from rank 0" in rec["message"] and named in rec["message"]


@pytest.mark.distributed
def test_divergence_unexpected_exception_on_one_rank_does_not_hang(asym_run):
    """A ValueError (not a ChecksumError) from rank 1's checksums: rank 0 used to wait in the all-gather forever."""
    rec = same_guard_error(asym_run, "div_value_error", "ChecksumError")
    assert "  - rank 1: ValueError: simulated: numpy cannot view this buffer" in rec["message"]


@pytest.mark.distributed
def test_divergence_sharded_on_one_rank_only_does_not_hang(asym_run):
    """Whether to gather was decided from the local model (is_sharded): rank 1 skipped, rank 0 waited forever."""
    rec = same_guard_error(asym_run, "div_zero3_rank1", "ChecksumError")
    assert "rank 1: holds sharded parameters (FSDP/ZeRO-3), rank 0 does not" in rec["message"]


# -- one rank fails alone inside a guard, or alone skips its collective ----------------------------------------------
@pytest.mark.distributed
def test_one_rank_failing_inside_a_guard_stops_every_rank_alike(tmp_path):
    names = ["ties_write", "trainable_write", "manifest_eio", "head_unreadable", "resume_rank1_frozen",
             "untrained_rank1_only"]
    ranks = launch("asym_sidecar.py", tmp_path, ",".join(names), "60")  # each takes a few seconds
    for name in names:
        same_guard_error(ranks, name)
