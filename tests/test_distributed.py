"""Multi-process runs (issue 7) and the replica-divergence check.

The ``distributed`` tests launch 2 CPU processes (gloo) with ``accelerate launch --multi_gpu --num_processes 2``
and a subprocess timeout, so a deadlock fails the test instead of hanging CI. (With accelerate 1.15,
``accelerate launch --cpu --num_processes 2`` starts ONE process: ``--cpu`` selects the simple launcher, which
only spawns several CPU processes through ``mpirun``. ``--multi_gpu`` goes through torchrun; with
``TrainingArguments(use_cpu=True)`` accelerate then picks MULTI_CPU with gloo.)

FSDP: accelerate 1.15 leaves FSDP off on CPU (``AcceleratorState`` only turns ``fsdp_plugin`` on for GPU-like
distributed types; the Trainer then trains plain DDP without a word) and FSDP1 fails in
``FullyShardedDataParallelPlugin`` ("There are currently no available devices found"). torch's own
``fully_shard`` (FSDP2) does run on CPU/gloo, so the sharded-checksum test uses it directly.

The other tests exercise the pure core and the guard in one process, the all-gather replaced by a fake.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import make_args
from transformers import Trainer

import trainer_guard.callbacks.divergence as div_mod
from trainer_guard import (
    ChecksumError,
    ConfigError,
    ReplicaDivergenceError,
    ReplicaDivergenceGuard,
    callbacks_from_dict,
    callbacks_from_yaml,
)
from trainer_guard.core.divergence import (
    divergence_message,
    divergent_ranks,
    first_differences,
    is_sharded,
    model_checksums,
    model_fingerprint,
)
from trainer_guard.tiny import tiny_dataset, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
TIMEOUT_S = 300  # a hang fails here; a normal launch takes ~30 s on 2 busy cores


# -- helpers ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *script_args: str, tmp_path, nproc: int = 2) -> list[dict]:
    """Run ``script`` under ``accelerate launch`` on ``nproc`` CPU processes; return each rank's result JSON."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"),  # no user accelerate config file can change the launch
               TRANSFORMERS_VERBOSITY="warning", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(SCRIPTS, script), *script_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: our own process group
        out, _ = proc.communicate()
        pytest.fail(f"{script} did not finish in {TIMEOUT_S} s (deadlock?):\n{out[-4000:]}")
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{out[-4000:]}"
    results = script_args[1]
    return [json.load(open(os.path.join(results, f"rank{r}.json"), encoding="utf-8")) for r in range(nproc)]


def dirs(tmp_path):
    out, res = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    res.mkdir()
    return str(out), str(res)


class FakeWorld:
    """Stand-in for the all-gather: this process plays rank 0, the other ranks' values are given."""

    def __init__(self, monkeypatch, others: list):
        self.others, self.calls = others, 0
        monkeypatch.setattr(div_mod, "world_size", lambda: 1 + len(others))
        monkeypatch.setattr(div_mod, "rank", lambda: 0)
        monkeypatch.setattr(div_mod, "gather", self.gather)

    def gather(self, obj):
        self.calls += 1
        if isinstance(obj, tuple):  # (fingerprint, error) round
            return [obj] + [o[0] for o in self.others]
        return [obj] + [o[1] for o in self.others]  # per-tensor checksums round


# -- pure core --------------------------------------------------------------------------------------------------
def test_checksums_cover_each_tensor_once_and_see_one_element():
    model = tiny_model("llama-tied")
    sums = model_checksums(model)
    assert list(sums)[0] == "model.embed_tokens.weight" and "lm_head.weight" not in sums  # the tie, once
    fp = model_fingerprint(sums)
    import torch

    with torch.no_grad():
        model.get_parameter("model.norm.weight")[3] += 1e-6
    after = model_checksums(model)
    assert [n for n in sums if sums[n] != after[n]] == ["model.norm.weight"]
    assert model_fingerprint(after) != fp
    assert model_fingerprint(dict(reversed(list(sums.items())))) == fp  # order-independent


def test_divergent_ranks_names_the_minority():
    assert divergent_ranks([7, 7, 7]) == (0, [])
    assert divergent_ranks([5, 7, 7, 7]) == (1, [0])  # rank 0 is the odd one out: named, not trusted
    assert divergent_ranks([7, 5]) == (0, [1])  # a tie goes to the group holding rank 0
    assert divergent_ranks([1, 2, 2, 3]) == (1, [0, 3])


def test_first_differences_in_model_order_with_missing_and_extra():
    ref = {"a": 1, "b": 2, "c": 3, "d": 4}
    assert first_differences(ref, {"a": 1, "b": 9, "d": 0, "e": 5}) == ["b", "c (missing)", "d", "e (extra)"]
    assert first_differences(ref, {"a": 0, "b": 0, "c": 0, "d": 0}, limit=2) == ["a", "b"]


def test_divergence_message_exact():
    sums = [{"w1": 1, "w2": 2, "w3": 3}, {"w1": 1, "w2": 5, "w3": 6}, {"w1": 1, "w2": 2, "w3": 3}]
    msg = divergence_message(40, [0xA, 0xB, 0xA], sums, limit=1)
    assert msg == (
        "Data-parallel replicas hold different weights at step 40: rank 1 differs from rank 0 "
        "(fingerprint 000000000000000a).\n"
        "  - rank 1: fingerprint 000000000000000b; first differing tensors: w2 (+1 more)\n"
        "A replica skipped or repeated an update, ran a non-deterministic kernel, or has faulty hardware. Stop and "
        "resume from the last checkpoint saved before this step; if it recurs on the same rank, exclude that device."
    )
    assert divergence_message(40, [3, 3, 3], sums) == ""


@pytest.mark.parametrize("nbytes,cuts", [(2046, [8, 1024]), (4096, [4088]), (24, [8, 16]), (7, [])])
def test_word_sums_of_aligned_pieces_add_up_to_the_whole(nbytes, cuts):
    import numpy as np

    from trainer_guard.checksum.cpu import word_sum

    buf = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    edges = [0, *cuts, nbytes]
    parts = sum(word_sum(buf[a:b], first_word=a // 8) for a, b in zip(edges, edges[1:])) % (1 << 64)
    assert parts == word_sum(buf)


def test_is_sharded_detects_dtensor_and_zero3_params():
    model = tiny_model("llama-untied")
    assert not is_sharded(model)
    model.get_parameter("lm_head.weight").ds_id = 7  # how DeepSpeed ZeRO-3 marks its partitioned parameters
    assert is_sharded(model)


# -- guard, one process ----------------------------------------------------------------------------------------
def test_options_are_validated_with_every_problem_listed():
    with pytest.raises(ConfigError) as e:
        callbacks_from_dict({"replica_divergence": {"every": -1, "max_tensors": 0, "action": "ignore"}})
    assert str(e.value) == (
        "Invalid trainer_guard config:\n"
        "  - replica_divergence.action: got 'ignore'; expected one of 'raise', 'warn'\n"
        "  - replica_divergence.every: got -1; use 0 (off) or a positive number of steps\n"
        "  - replica_divergence.max_tensors: got 0; use 1 or more"
    )
    with pytest.raises(ConfigError) as e:
        ReplicaDivergenceGuard(every=-1, max_tensors=0)
    assert str(e.value) == (
        "Invalid options:\n"
        "  - ReplicaDivergenceGuard.every: got -1; use 0 (off) or a positive number of steps\n"
        "  - ReplicaDivergenceGuard.max_tensors: got 0; use 1 or more"
    )


def test_default_config_leaves_the_check_off():
    [guard] = [c for c in callbacks_from_yaml(os.path.join(ROOT, "configs", "default.yaml"))
               if isinstance(c, ReplicaDivergenceGuard)]
    assert guard.options["every"] == 0 and guard.options["at_train_end"] is False


def test_single_process_computes_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("checksums computed in a single process")

    monkeypatch.setattr(div_mod, "model_checksums", boom)
    guard = ReplicaDivergenceGuard(every=1, at_train_end=True)
    model = tiny_model("llama-tied")
    Trainer(model=model, args=make_args(tmp_path, max_steps=2, save_steps=10), train_dataset=tiny_dataset(8),
            callbacks=[guard]).train()
    assert guard.checks == 0
    assert guard.report() == ["replica check skipped: a single process, no replicas to compare"]


def test_guard_reads_sharding_from_the_model_not_from_args_fsdp(tmp_path, monkeypatch):
    """``fsdp=...`` where accelerate fell back to plain DDP (a CPU host): whole replicas, compared (issue 18: the
    guard skipped them, reading the arguments). Every rank holding only shards: skipped after the one gather."""
    model = tiny_model("llama-tied")
    fp = model_fingerprint(model_checksums(model))
    world = FakeWorld(monkeypatch, [((fp, ""), None)])
    guard = ReplicaDivergenceGuard(every=1, at_train_end=True)
    args = make_args(tmp_path)
    args.fsdp = True  # what TrainingArguments normalises an FSDP config to
    state = type("S", (), {"global_step": 1})()
    guard.on_step_end(args, state, None, model=model)
    assert world.calls == 1 and guard.checks == 1 and guard.last_fingerprint == fp
    sharded = tiny_model("llama-tied")
    for p in sharded.parameters():
        p.ds_id = 0  # how DeepSpeed ZeRO-3 marks its partitioned parameters
    world = FakeWorld(monkeypatch, [((None, None), None)])  # the other rank holds shards only too
    guard = ReplicaDivergenceGuard(every=1, at_train_end=True)
    guard.on_step_end(args, state, None, model=sharded)
    guard.on_train_end(args, state, None, model=sharded)
    assert world.calls == 2 and guard.checks == 0  # one gather per check point (step 1, train end), nothing more
    assert guard.report() == ["replica check skipped: sharded parameters (FSDP/ZeRO-3), no replicas to compare"]


def test_guard_agreeing_replicas_gather_one_value_per_check(monkeypatch):
    model = tiny_model("llama-tied")
    fp = model_fingerprint(model_checksums(model))
    world = FakeWorld(monkeypatch, [((fp, ""), None)])
    guard = ReplicaDivergenceGuard(every=1)
    assert guard.check(model, step=3) == fp
    assert world.calls == 1  # per-tensor checksums are gathered only on a mismatch


def test_guard_names_rank_and_tensor_on_mismatch(monkeypatch):
    import torch

    model = tiny_model("llama-tied")
    sums = model_checksums(model)
    other = dict(sums, **{"model.layers.0.self_attn.q_proj.weight": 1})
    world = FakeWorld(monkeypatch, [((model_fingerprint(other), ""), other)])
    guard = ReplicaDivergenceGuard(every=1)
    with pytest.raises(ReplicaDivergenceError, match=r"at step 6: rank 1 differs from rank 0 .*\n  - rank 1: "
                       r"fingerprint [0-9a-f]{16}; first differing tensors: model\.layers\.0\.self_attn\.q_proj"
                       r"\.weight\n"):
        guard.check(model, step=6)
    assert world.calls == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    warn = ReplicaDivergenceGuard(every=1, action="warn")
    FakeWorld(monkeypatch, [((model_fingerprint(other), ""), other)])
    assert warn.check(model, step=6) is None and "rank 1 differs from rank 0" in warn.report()[0]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # a check never changes weights


def test_guard_one_rank_failing_raises_checksum_error(monkeypatch):
    FakeWorld(monkeypatch, [((None, "rank 1: ChecksumError: tensor 'x' is on the meta device"), None)])
    with pytest.raises(ChecksumError) as e:
        ReplicaDivergenceGuard(every=1).check(tiny_model("llama-tied"), step=2)
    assert str(e.value) == (
        "Replica divergence check could not run at step 2 (every rank stops here, none is left waiting):\n"
        "  - rank 1: ChecksumError: tensor 'x' is on the meta device\n"
        "Fix the tensor or device named above, or turn the check off with every=0."
    )


# -- two processes ----------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["llama-tied", "mixtral"])  # mixtral: every rank repairs the Trainer's load
def test_ddp_train_checkpoint_resume_doctor(tmp_path, kind):
    out, res = dirs(tmp_path)
    r0, r1 = launch("train_resume.py", out, res, os.path.join(ROOT, "configs", "default.yaml"), kind,
                    tmp_path=tmp_path)
    for r in (r0, r1):
        assert r["error"] is None, r["error"]
        assert r["world_size_seen"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert (r["step_run1"], r["step_run2"]) == (2, 4)
        assert r["divergence_checks"] == 2  # steps 3 and 4 of the resumed run; train end = step 4, not redone
    # both ranks agree, and the resumed run equals an uninterrupted one, bit for bit
    assert r0["fingerprint"] == r1["fingerprint"] == r0["fingerprint_straight"] == r1["fingerprint_straight"]
    assert r0["reports"].keys() == r1["reports"].keys()  # the same guards ran (only rank 0 notes its writes)
    assert r0["reports"]["TiedWeightsGuard"] == r1["reports"]["TiedWeightsGuard"]
    # rank 1 wrote only the Trainer's own per-rank RNG files; every trainer_guard file came from rank 0
    assert all(os.path.basename(w) == "rng_state_1.pth" for w in r1["writes"]), r1["writes"]
    assert len(r1["writes"]) == 4  # checkpoint-2/4 of the resumed and the straight run: the recorder works
    guard_files = sorted(f for d in ("checkpoint-2", "checkpoint-4") for f in os.listdir(os.path.join(out, d))
                         if f.startswith("trainer_guard"))
    assert ("trainer_guard_ties.json" in {os.path.basename(f) for f in guard_files}) == (kind == "llama-tied")
    if kind == "mixtral":  # the Trainer's resume skipped the experts on both ranks; both loaded them
        for r in (r0, r1):
            assert any(line.startswith("resumed model: loaded 6 tensors") for line in r["reports"]["IntegrityGuard"])
    assert {os.path.basename(w) for w in r0["writes"]} >= set(guard_files)
    if importlib.util.find_spec("trainer_guard.doctor") is not None:
        for ckpt in ("checkpoint-2", "checkpoint-4"):
            doc = subprocess.run([sys.executable, "-m", "trainer_guard.cli", "doctor", os.path.join(out, ckpt)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert doc.returncode == 0, f"doctor {ckpt}: {doc.stdout}\n{doc.stderr}"


@pytest.mark.distributed
def test_save_model_called_on_the_main_process_only_does_not_hang(tmp_path):
    """The wired save_model checks (manifest, head) run on the main process alone: no collective to wait in."""
    out, res = dirs(tmp_path)
    r0, r1 = launch("save_on_main.py", out, res, tmp_path=tmp_path)
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r0["saved"] and r0["head_checked"] == [os.path.join(out, "final")] and not r1["saved"]
    assert r0["done"] and r1["done"]


@pytest.fixture(scope="module")
def diverge_run(tmp_path_factory):
    """One 2-process launch of dist_scripts/diverge.py, shared by the tests below (saves a launch)."""
    tmp = tmp_path_factory.mktemp("diverge")
    out, res = dirs(tmp)
    return launch("diverge.py", out, res, tmp_path=tmp)


@pytest.mark.distributed
def test_ddp_divergence_raises_the_same_error_on_every_rank(diverge_run):
    r0, r1 = diverge_run
    # without the guard: the nudged replica trains on silently and ends with different weights
    assert r0["silent"]["error"] is None and r0["silent"]["step"] == 4
    fps = r0["silent"]["fingerprints"]
    assert fps == r1["silent"]["fingerprints"] and fps[0] != fps[1]
    # with it: both ranks stop at step 2 with the same message, before checkpoint-2 is written
    g0, g1 = r0["guarded"], r1["guarded"]
    assert g0 == g1  # same error, same step, same message on both ranks
    assert g0["error"] == "ReplicaDivergenceError" and g0["step"] == 2 and g0["checks"] == 2
    assert "at step 2: rank 1 differs from rank 0 (fingerprint " in g0["message"]
    assert "first differing tensors: model.layers.1.mlp.down_proj.weight\n" in g0["message"]
    assert g0["saved"] == []
    # one rank unable to checksum: both raise the same ChecksumError, neither hangs in the all-gather
    assert r0["rank_fails"] == r1["rank_fails"]
    assert r0["rank_fails"]["error"] == "ChecksumError" and r0["rank_fails"]["step"] == 2
    assert "  - rank 1: ChecksumError: simulated: tensor 'model.norm.weight'" in r0["rank_fails"]["message"]


@pytest.mark.distributed
def test_fsdp2_shard_checksums_combine_to_the_unsharded_ones(diverge_run):
    r0, r1 = diverge_run
    f = r0["fsdp2"]
    assert f == r1["fsdp2"]
    assert f["n_tensors"] == f["n_dtensors"] == 21
    assert f["equal_unsharded"] is True  # combined from local shards, bit-identical to the unsharded model's
    assert f["changed_by_step"] == 21 and f["equal_full_after_step"] is True
    assert f["gathered"] == 5  # only the 5 norm weights (36-byte shard offset) were materialised
    assert f["guard"] == [None, ["replica check skipped: sharded parameters (FSDP/ZeRO-3), no replicas to compare"]]
