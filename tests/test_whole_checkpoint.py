"""Issue 16: a verified checkpoint is the whole checkpoint; an interrupted save never breaks a resume.

Fault tests on real Trainer checkpoints (each fails without the change): a deleted optimizer.pt / scheduler.pt, a
flipped bit in optimizer.pt, an edited trainer_state.json, a truncated weights file or trainer_guard record, an
edited adapter_config.json, a half-written newest checkpoint with resume_from_checkpoint=True, a checkpoint
directory half-written and then saved into again.
"""

import json
import logging
import os
import shutil

import pytest
from conftest import make_args
from transformers import Trainer

import trainer_guard
from trainer_guard import IntegrityGuard, TiedWeightsGuard
from trainer_guard.checkpoint.contents import check_files, commit, listing
from trainer_guard.checkpoint.manifest import MANIFEST_FILE, read_manifest
from trainer_guard.core.io import read_json
from trainer_guard.doctor import diagnose
from trainer_guard.errors import DamagedFileError, IntegrityError
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model


def _train(out, callbacks, resume=None, max_steps=4, model=None, **kw):
    trainer = Trainer(model=model or tiny_model("llama-tied"), args=make_args(out, max_steps=max_steps, **kw),
                      train_dataset=tiny_dataset(16, 16, 128), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "out"
    _train(out, [TiedWeightsGuard(), IntegrityGuard()])
    return out


@pytest.fixture
def out(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "out")


def _resume_error(out, ckpt="checkpoint-4", **guard):
    with pytest.raises(IntegrityError) as e:
        _train(out, [TiedWeightsGuard(), IntegrityGuard(**guard)], resume=str(out / ckpt), max_steps=6)
    return str(e.value)


def test_the_manifest_lists_every_file_with_its_checksum(out):
    ckpt = out / "checkpoint-4"
    m = read_manifest(ckpt)
    assert m["version"] == 2 and len(m["digest"]) == 16
    assert set(m["files"]) == set(listing(ckpt)) == {f for f in os.listdir(ckpt) if f != MANIFEST_FILE}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
            "config.json", "trainer_guard_ties.json", "model.safetensors"} <= set(m["files"])
    assert all("checksum" in e and e["size"] == os.path.getsize(ckpt / f) for f, e in m["files"].items()
               if f != "model.safetensors")
    assert "header" in m["files"]["model.safetensors"] and m["files"]["model.safetensors"]["tensors"] == len(
        m["tensors"])
    assert check_files(ckpt, m) == [] and diagnose(ckpt).exit_code == 0
    assert trainer_guard.verify_checkpoint(ckpt).problems == []


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_deleted_optimizer_or_scheduler_stops_the_resume(out, name):
    ckpt = out / "checkpoint-4"
    size = os.path.getsize(ckpt / name)
    os.remove(ckpt / name)  # the Trainer would load neither, silently, and restart the schedule
    msg = _resume_error(out)
    assert msg.split("\n")[0] == f"{ckpt / name} is missing (the save wrote {size:,} bytes)."
    assert "Stopped before loading anything from it. Resume from an earlier checkpoint" in msg
    assert any(f.message.startswith(f"{name} is missing") for f in diagnose(ckpt).problems)


def test_a_flipped_bit_in_optimizer_pt_stops_the_resume(out):
    ckpt = out / "checkpoint-4"
    data = bytearray((ckpt / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # torch.load does not check the zip CRC: it would load silently
    (ckpt / "optimizer.pt").write_bytes(bytes(data))
    msg = _resume_error(out)
    assert msg.split("\n")[0] == (f"{ckpt / 'optimizer.pt'} changed since the checkpoint was saved (same size, "
                                  f"{len(data):,} bytes, other bytes).")
    report = diagnose(ckpt)
    assert report.exit_code == 1 and [f.message for f in report.problems] == [
        f"optimizer.pt changed since the checkpoint was saved (same size, {len(data):,} bytes, other bytes)"]


def test_optimizer_pt_copied_from_another_checkpoint_is_named_as_its_copy(out):
    shutil.copy(out / "checkpoint-2" / "optimizer.pt", out / "checkpoint-4" / "optimizer.pt")
    msgs = [f.message for f in diagnose(out / "checkpoint-4").problems]
    assert any(m.startswith("optimizer.pt changed since the checkpoint was saved") and
               m.endswith("it is checkpoint-2's copy of it)") for m in msgs), msgs


def test_an_edited_trainer_state_step_stops_the_resume(out):
    ckpt = out / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "global_step": 2}))
    msg = _resume_error(out)
    assert msg.split("\n")[0].startswith(f"{ckpt / 'trainer_state.json'} changed since the checkpoint was saved "
                                         f"(global_step 4 -> 2")


def test_a_truncated_weights_file_is_named_before_the_load(out):
    ckpt = out / "checkpoint-4"
    size = os.path.getsize(ckpt / "model.safetensors")
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)  # the Trainer's load: a raw SafetensorError naming no file
    msg = _resume_error(out)
    assert msg.split("\n")[0] == (f"{ckpt / 'model.safetensors'} changed since the checkpoint was saved (truncated: "
                                  f"size {size:,} -> {size // 2:,} bytes).")
    os.remove(ckpt / MANIFEST_FILE)  # and without a manifest: the checks that need none name it too
    for m in ("checkpoint-2",):
        os.remove(out / m / MANIFEST_FILE)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(0)
    msg = _resume_error(out)
    assert msg.split("\n")[0].startswith(f"{ckpt / 'model.safetensors'} is damaged: ")


def test_a_truncated_trainer_guard_record_is_named(out, tmp_path):
    ckpt = out / "checkpoint-4"
    ties = ckpt / "trainer_guard_ties.json"
    ties.write_text(ties.read_text()[:20])
    msg = _resume_error(out)
    assert msg.split("\n")[0].startswith(f"{ties} changed since the checkpoint was saved (truncated: size ")
    assert "trainer_guard_ties.json 20 B of 177 B as in checkpoint-2" in _resume_error(out).split("\n")[0] if \
        os.remove(ckpt / MANIFEST_FILE) is None else False  # no manifest: an interrupted save, beside checkpoint-2
    os.remove(out / "checkpoint-2" / MANIFEST_FILE)  # no manifest anywhere: read_json names the file (was a bare
    with pytest.raises(DamagedFileError, match=rf"^{ties}: damaged, not valid JSON \("):
        read_json(ties)
    msg = _resume_error(out)
    assert msg.split("\n")[0].startswith(f"{ties} is damaged: not valid JSON (")


def test_an_edited_manifest_does_not_match_itself(out):
    ckpt = out / "checkpoint-4"
    m = json.loads((ckpt / MANIFEST_FILE).read_text())
    m["files"]["optimizer.pt"]["size"] += 1
    (ckpt / MANIFEST_FILE).write_text(json.dumps(m))
    assert "does not match its own digest" in _resume_error(out).split("\n")[0]
    assert "does not match its own digest" in diagnose(ckpt).unusable[0].message


def test_a_file_not_written_by_the_save_is_named(out):
    (out / "checkpoint-4" / "rng_state_1.pth").write_bytes(b"from another run")  # rank 1 would load it
    msg = _resume_error(out)
    assert msg.split("\n")[0] == (f"{out / 'checkpoint-4' / 'rng_state_1.pth'} is not part of the checkpoint: its "
                                  f"manifest does not list it (written after the save, or copied in).")


def _half_written(ckpt):
    """What a kill -9 in the middle of the Trainer's save leaves: weights and a prefix of optimizer.pt, no manifest,
    scheduler, RNG or trainer state."""
    os.remove(ckpt / MANIFEST_FILE)
    for name in ("scheduler.pt", "rng_state.pth", "trainer_state.json", "trainer_guard_ties.json"):
        os.remove(ckpt / name)
    with open(ckpt / "optimizer.pt", "r+b") as f:
        f.truncate(os.path.getsize(ckpt / "optimizer.pt") // 2)


def test_resume_true_skips_a_half_written_newest_checkpoint(out, caplog):
    _half_written(out / "checkpoint-4")
    guard = IntegrityGuard()
    with caplog.at_level(logging.WARNING, logger="trainer_guard"):
        trainer = _train(out, [TiedWeightsGuard(), guard], resume=True, max_steps=3, save_strategy="no")
    assert trainer.state.global_step == 3  # resumed at step 2, not 4
    (warning,) = [w for w in guard.report() if "skipped" in w]
    assert warning.startswith(f"{out / 'checkpoint-4'} skipped: interrupted save (no commit mark {MANIFEST_FILE}; "
                              f"optimizer.pt ")
    assert warning.endswith(f"resuming from {out / 'checkpoint-2'}, the newest complete, verified checkpoint "
                            f"(IntegrityGuard(fallback=False) stops instead)")
    # fallback off: one trainer_guard error naming the checkpoint and why
    with pytest.raises(IntegrityError, match=rf"^{out / 'checkpoint-4'}: interrupted save \(no commit mark"):
        _train(out, [IntegrityGuard(fallback=False)], resume=True, max_steps=6)
    # doctor says what happened
    (problem,) = [f.message for f in diagnose(out / "checkpoint-4").problems if f.check == "manifest"]
    assert problem.startswith(f"interrupted save (no commit mark {MANIFEST_FILE}; optimizer.pt ")
    assert "as in checkpoint-2" in problem and "no rng_state.pth, scheduler.pt, trainer_guard_ties.json, trainer_state.json)" in problem


def test_resume_true_skips_a_newest_checkpoint_with_a_changed_file(out):
    (out / "checkpoint-4" / "scheduler.pt").write_bytes(b"garbage")
    guard = IntegrityGuard()
    trainer = _train(out, [TiedWeightsGuard(), guard], resume=True, max_steps=3, save_strategy="no")
    assert trainer.state.global_step == 3
    assert any(w.startswith(f"{out / 'checkpoint-4'} skipped: scheduler.pt changed since") for w in guard.report())


def test_a_half_written_directory_saved_into_again_keeps_no_old_file(out):
    _half_written(out / "checkpoint-4")
    (out / "checkpoint-4" / "scaler.pt").write_bytes(b"an fp16 run's scaler")  # this run writes none
    guard = IntegrityGuard()
    _train(out, [TiedWeightsGuard(), guard], resume=True, max_steps=4)  # from checkpoint-2, saves checkpoint-4
    ckpt = out / "checkpoint-4"
    assert not (ckpt / "scaler.pt").exists()
    assert any("removed scaler.pt: left in this directory by an earlier save" in w for w in guard.report())
    m = read_manifest(ckpt)
    assert set(m["files"]) == set(listing(ckpt)) and check_files(ckpt, m) == []
    assert diagnose(ckpt).exit_code == 0


def test_adapter_config_is_checked_against_the_adapter_weights(tmp_path):
    out = tmp_path / "lora"
    _train(out, [IntegrityGuard()], max_steps=2, model=tiny_lora(tiny_model("llama-untied")))
    ckpt = out / "checkpoint-2"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] * 2}))
    write = read_manifest(ckpt)
    from trainer_guard.checkpoint.manifest import write_manifest

    write_manifest(ckpt, commit(ckpt, write))  # as if saved like this: only the config check can tell
    problems = [f.message for f in trainer_guard.verify_checkpoint(ckpt).problems]
    assert len(problems) == 1 and problems[0].startswith(
        f"adapter_config.json: r = {cfg['r'] * 2}, but adapter_model.safetensors stores rank {cfg['r']} for ")
    targets = sorted(cfg["target_modules"])
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": targets[1:]}))
    write_manifest(ckpt, commit(ckpt, write))
    problems = [f.message for f in diagnose(ckpt).problems]
    assert problems == [f"adapter_config.json: target_modules does not name {targets[0]}, whose LoRA weights the "
                        f"adapter stores (2 module(s), e.g. " + problems[0].split("e.g. ", 1)[1]]
