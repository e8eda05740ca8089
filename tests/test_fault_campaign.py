"""Issue 16's fault campaign ("How it is checked"), on real Trainer checkpoints of four model kinds: a tied Llama
(full fine-tune), an untied bf16 Qwen2, a LoRA with modules_to_save=[embed_tokens, lm_head], a Llama saved in 3
shards; the default guards, a checkpoint every 2 of 4 steps.

Each fault (tests/fault_campaign.py: delete / truncate / flip a bit / swap in checkpoint-4's copy of every file the
Trainer and trainer_guard write, edits of trainer_state.json, adapter_config.json and the manifest, the guard's
records truncated, interrupted saves) is applied to a fresh copy of checkpoint-2, which is then resumed (by path; the
interrupted saves, of checkpoint-4, with resume_from_checkpoint=True) and checked with ``trainer-guard doctor``. It
holds when:

1. every resume stops with a TrainerGuardError whose first line names the damaged file, or (interrupted save) falls
   back to checkpoint-2 with a warning naming checkpoint-4; none ends in another exception and none trains on into
   other weights than the uninterrupted run's. One fault trains on, by design: a checkpoint asked for by path whose
   manifest alone was deleted resumes with a warning (as one saved without IntegrityGuard, or whose reused-directory
   manifest the user deleted as told: tests/test_reused_checkpoint_dir.py); every file is the save's own, and the
   run ends in the uninterrupted run's weights (checked);
2. ``doctor`` exits non-zero for at least 95% of the faults (today: all);
3. healthy checkpoints raise no alarm, and resume bit-identically.
"""

import shutil

import pytest

import fault_campaign as fc

TRAINS_ON = {"delete:trainer_guard_manifest.json"}  # see the module docstring: a warning, identical weights


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return fc.Campaign(tmp_path_factory.mktemp("campaign"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", fc.KINDS)
def test_healthy_checkpoints_raise_no_alarm_and_resume_bit_identically(campaign, kind, tmp_path):
    base, reference = campaign.trained(kind)
    out = shutil.copytree(base, tmp_path / "out")
    for ckpt in (fc.DAMAGED, fc.OTHER):
        assert fc.doctor(out / ckpt) == 0, ckpt
    resumed = fc.train(out, kind, resume=str(out / fc.DAMAGED), save_strategy="no")
    assert fc.same_weights(fc.weights(resumed.model), reference)
    resumed = fc.train(out, kind, resume=True, max_steps=6, save_strategy="no")  # the newest: checkpoint-4
    assert resumed.state.global_step == 6


def _acceptable(o) -> bool:
    if o.fault.startswith("interrupted"):
        return o.ending == "fallback"
    return o.ending == "stopped" or (o.ending == "identical" and o.fault in TRAINS_ON)


@pytest.mark.slow
@pytest.mark.parametrize("kind", fc.KINDS)
def test_every_fault_stops_the_resume_naming_the_file(campaign, kind):
    outcomes = campaign.outcomes(kind)
    wrong = [o for o in outcomes if not _acceptable(o)]
    assert not wrong, f"{len(wrong)} of {len(outcomes)} faults of {kind} ended otherwise:\n" + "\n".join(
        map(str, wrong))
    assert {"delete", "truncate", "flip", "swap"} <= {o.fault.split(":")[0] for o in outcomes}
    assert sum(o.fault.startswith("interrupted") for o in outcomes) == len(campaign.keeps)


@pytest.mark.slow
def test_doctor_flags_at_least_95_percent_of_the_faults(campaign):
    outcomes = [o for kind in fc.KINDS for o in campaign.outcomes(kind)]
    missed = [o for o in outcomes if o.doctor == 0]
    rate = 1 - len(missed) / len(outcomes)
    print(f"\nfault campaign: {len(outcomes)} faults; doctor flagged {rate:.1%}; endings: "
          + ", ".join(f"{e} {sum(o.ending == e for o in outcomes)}" for e in sorted({o.ending for o in outcomes})))
    assert len(outcomes) >= 130
    assert rate >= 0.95, f"doctor flagged {rate:.1%} of {len(outcomes)} faults; missed:\n" + "\n".join(map(str, missed))
    assert not missed, f"doctor flagged {rate:.1%}; missed:\n" + "\n".join(map(str, missed))


NAMES = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
         "model.safetensors.index.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
         "training_args.bin", "adapter_config.json", "trainer_guard_manifest.json", "trainer_guard_trainable.json",
         "config.json"]


def test_faults_for_lists_each_kind_of_fault(tmp_path):
    a, b = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    for d, body in ((a, b"A"), (b, b"B")):
        d.mkdir()
        for n in NAMES:
            (d / n).write_bytes(body if n != "rng_state.pth" else b"same")
    names = {f.name for f in fc.faults_for(str(a), str(b))}
    assert {f"{h}:model-00002-of-00003.safetensors" for h in ("delete", "truncate", "flip", "swap")} <= names
    assert not any(":model-00001-" in n or ":model-00003-" in n or n.endswith(":config.json") for n in names)
    assert "swap:rng_state.pth" not in names and "flip:rng_state.pth" in names  # a swap of equal bytes is none
    assert {"edit-global_step:trainer_state.json", "edit-r:adapter_config.json", "drop-target:adapter_config.json",
            "edit-value:trainer_guard_manifest.json", "swap:trainer_guard_manifest.json",
            "truncate:trainer_guard_trainable.json", "swap:model.safetensors.index.json"} <= names
    assert "delete:trainer_guard_trainable.json" not in names  # the guard's records: truncated only


def test_an_interrupted_save_keeps_a_prefix_of_the_trainers_files(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    for n in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
              "trainer_guard_trainable.json", "trainer_guard_manifest.json"):
        (ckpt / n).write_bytes(b"0123456789")
    fc.interrupt(str(ckpt), keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "scheduler.pt"]
    assert (ckpt / "optimizer.pt").stat().st_size == 10 and (ckpt / "scheduler.pt").stat().st_size == 5


# ------------------------------------------------------------------------------- regressions for what it found

def _checkpoint(parent, step, state_step=None, history=0):
    """A tiny committed checkpoint-<step> (manifest of ``step``; trainer_state.json at ``state_step``)."""
    import json
    import os

    import torch

    from trainer_guard.checkpoint.contents import commit
    from trainer_guard.checkpoint.manifest import build_manifest, write_manifest

    d = parent / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "optimizer.pt").write_bytes(b"state" * 10)
    state = {"global_step": step if state_step is None else state_step, "log_history": [{"loss": 1.0}] * history}
    (d / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(d, commit(d, build_manifest({"w": torch.ones(2)}, global_step=step, tie_groups=[])))
    assert os.path.isfile(d / "trainer_guard_manifest.json")
    return d


def test_a_manifest_swapped_in_from_another_checkpoint_is_named_first(tmp_path):
    """The campaign's swap:trainer_guard_manifest.json: the resume's first line named trainer_state.json (global_step
    4 -> 2), which is this checkpoint's own; the manifest is what was copied in."""
    from trainer_guard.checkpoint.choose import pick_checkpoint
    from trainer_guard.checkpoint.contents import check_files
    from trainer_guard.checkpoint.manifest import read_manifest

    ckpt = tmp_path / "checkpoint-2"
    _checkpoint(tmp_path / "other", 4, state_step=2).rename(ckpt)  # checkpoint-4's manifest over step 2's files
    problems = check_files(ckpt, read_manifest(ckpt))
    assert problems[0].file == "trainer_guard_manifest.json" and problems[0].message.startswith(
        "trainer_guard_manifest.json is the manifest of step 4, but this is checkpoint-2: it was copied from another "
        "checkpoint")
    assert pick_checkpoint(tmp_path, str(ckpt)).error.split("\n")[0].startswith(
        f"{ckpt / 'trainer_guard_manifest.json'} is the manifest of step 4")


def test_a_checkpoint_that_lost_only_its_manifest_is_no_interrupted_save(tmp_path):
    """The campaign's delete:trainer_guard_manifest.json: its trainer_state.json, smaller than a later checkpoint's
    (a shorter log history), was reported as "trainer_state.json 1.06 kB of 1.36 kB": a save cut short, which it is
    not. A JSON file that parses is whole; one that does not is still named."""
    import os

    from trainer_guard.checkpoint.contents import committed_sibling, interrupted_save
    from trainer_guard.doctor import diagnose

    older = _checkpoint(tmp_path, 2, history=1)
    _checkpoint(tmp_path, 4, history=20)
    os.remove(older / "trainer_guard_manifest.json")
    assert interrupted_save(older) is None and committed_sibling(older) == "checkpoint-4"
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(older / "model.safetensors"))  # weights, so that doctor reads the manifest
    report = diagnose(older)
    (msg,) = [f.message for f in report.unusable if f.check == "manifest"]
    assert report.exit_code == 2 and "no commit mark, though checkpoint-4 beside it has one" in msg
    state = older / "trainer_state.json"
    state.write_text(state.read_text()[:10])  # cut short: still an interrupted save
    assert "trainer_state.json 10 B of " in interrupted_save(older)
