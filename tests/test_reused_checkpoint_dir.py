"""A checkpoint directory saved into again by a later run (same output_dir, same step) without IntegrityGuard: the
earlier run's manifest stays behind. The resume check must not only say "does not match" but why, and what to do."""

import os
import time

import pytest
from test_integrity import _train

from trainer_guard import IntegrityGuard
from trainer_guard.core.checkpoint import rewritten_since
from trainer_guard.checkpoint.manifest import MANIFEST_FILE, read_manifest
from trainer_guard.errors import IntegrityError
from trainer_guard.tiny import tiny_model


@pytest.mark.slow
def test_stale_manifest_in_a_reused_checkpoint_dir_is_explained(tmp_path):
    _train(tiny_model("llama-untied"), tmp_path, [IntegrityGuard()])
    ckpt = tmp_path / "checkpoint-2"
    manifest = read_manifest(ckpt)
    assert rewritten_since(ckpt, manifest) == []  # the run's own manifest: files unchanged since
    time.sleep(0.05)
    _train(tiny_model("llama-untied", seed=5), tmp_path)  # same dir, same step, no guard: files rewritten
    assert rewritten_since(ckpt, manifest) == ["model.safetensors"]
    with pytest.raises(IntegrityError) as e:
        _train(tiny_model("llama-untied", seed=1), tmp_path, [IntegrityGuard()], resume=str(ckpt), max_steps=3)
    msg = str(e.value)
    assert f"model.safetensors in {ckpt} changed after its {MANIFEST_FILE} was written" in msg
    assert "delete it and resume again" in msg
    os.remove(ckpt / MANIFEST_FILE)  # what the message says to do: the resume then goes on (with a warning)
    guard = IntegrityGuard()
    _train(tiny_model("llama-untied", seed=1), tmp_path, [guard], resume=str(ckpt), max_steps=3)
    assert any("no trainer_guard_manifest.json" in line for line in guard.report())


def test_a_genuine_mismatch_with_untouched_files_gets_no_rewrite_hint(tmp_path):
    """A tensor the load got wrong while the files are the save's own: no hint about a reused directory."""
    _train(tiny_model("llama-untied"), tmp_path, [IntegrityGuard()])
    ckpt = tmp_path / "checkpoint-2"

    class Corrupt(IntegrityGuard):
        def after_weights_load(self, trainer, checkpoint, model):
            trainer.model.lm_head.weight.data.add_(1.0)  # after the Trainer's load, before the check
            return super().after_weights_load(trainer, checkpoint, model)

    with pytest.raises(IntegrityError) as e:
        _train(tiny_model("llama-untied", seed=1), tmp_path, [Corrupt()], resume=str(ckpt), max_steps=3)
    assert "lm_head.weight" in str(e.value) and "changed after its" not in str(e.value)
