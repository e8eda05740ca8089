"""Every guard of configs/default.yaml together, wired with trainer_guard.guard, on every tiny model kind:
train with checkpoints, resume a fresh model from the middle, end bit-identical to the uninterrupted run, and
the doctor finds every checkpoint healthy. Guards must not change training or trip over each other."""

import pytest
import torch
from conftest import make_args
from transformers import Trainer

import trainer_guard
from trainer_guard.doctor import diagnose
from trainer_guard.tiny import KINDS, tiny_dataset, tiny_lora, tiny_model

CONFIG = "configs/default.yaml"


def _run(kind, out, resume=None, guards=True, seed=0):
    model = tiny_model(kind.removesuffix("+lora"), seed=seed)
    if kind.endswith("+lora"):
        model = tiny_lora(model)
    cbs = trainer_guard.callbacks_from_yaml(CONFIG) if guards else []
    trainer = Trainer(model=model, args=make_args(out, save_strategy="steps" if guards else "no"),
                      train_dataset=tiny_dataset(16), callbacks=cbs)
    if guards:
        trainer = trainer_guard.guard(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KINDS, "plain-gpt+lora", "llama-tied+lora"])
def test_all_default_guards_on_every_model_kind(kind, tmp_path):
    full = _run(kind, tmp_path / "run")
    plain = _run(kind, tmp_path / "plain", guards=False)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(full) == losses(plain), "the default guards must not change training"

    resumed = _run(kind, tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"), seed=0)
    a, b = _weights(full.model), _weights(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert trainer_guard.find_tied_groups(resumed.model) == trainer_guard.find_tied_groups(full.model)

    for step in (2, 4):
        report = diagnose(str(tmp_path / "run" / f"checkpoint-{step}"))
        assert report.exit_code == 0, report.to_json()
