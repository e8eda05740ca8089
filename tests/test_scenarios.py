"""Every default guard together (``callbacks_from_yaml()`` + ``trainer_guard.guard(trainer)``) under
TrainingArguments combinations and call sequences that the per-guard tests do not cover: a run stopped by an
exception and resumed on the same Trainer, checkpoint rotation, best-model loading, ... Each test is a tiny CPU run."""

import pytest
import torch
from conftest import make_args
from transformers import Trainer, TrainerCallback

import trainer_guard
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

ELR = {"embedding_lr": {"enabled": True, "ratio": 0.1}}


def _model(kind):
    model = tiny_model(kind.removesuffix("+lora"))
    if kind.endswith("+lora"):
        model = tiny_lora(model, modules_to_save=["embed_tokens", "lm_head"])
    return model


def _trainer(kind, out, callbacks=(), guards=True, overrides=None, eval_dataset=None, **kw):
    cbs = trainer_guard.callbacks_from_yaml(**(overrides or {})) if guards else []
    trainer = Trainer(model=_model(kind), args=make_args(out, **kw), train_dataset=tiny_dataset(16),
                      eval_dataset=eval_dataset, callbacks=[*cbs, *callbacks])
    return trainer_guard.guard(trainer) if guards else trainer


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


class _Interrupt(TrainerCallback):
    """Raise once from ``event`` during optimizer step ``at`` (1-based), like Ctrl-C or an error mid-step."""

    def __init__(self, event, at):
        self.at, self.armed = at, True
        setattr(self, event, self._maybe_raise)

    def _maybe_raise(self, args, state, control, **kwargs):
        if self.armed and state.global_step + 1 == self.at:
            self.armed = False
            raise KeyboardInterrupt("stopped inside the optimizer step")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied+lora"])
def test_embedding_lr_run_stopped_inside_the_optimizer_step_resumes_on_the_same_trainer(kind, tmp_path):
    # Stopped between on_pre_optimizer_step (groups split) and on_step_end (merged): the Trainer keeps its optimizer
    # for the next train(), whose optimizer load failed with "loaded state dict has a different number of
    # parameter groups".
    trainer = _trainer(kind, tmp_path / "run", callbacks=[_Interrupt("on_optimizer_step", at=3)], overrides=ELR,
                       max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 2
    trainer.train(resume_from_checkpoint=True)
    straight = _trainer(kind, tmp_path / "straight", overrides=ELR, max_steps=4, save_steps=2)
    straight.train()
    assert trainer.state.global_step == 4
    assert _same(_weights(trainer.model), _weights(straight.model))


class _FirstEvalIsBest(TrainerCallback):
    """Adds ``eval_order`` = -step to each evaluation's metrics: with ``greater_is_better`` the first one is best."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_order"] = -state.global_step


@pytest.mark.slow
def test_best_model_with_save_total_limit_1_leaves_no_checkpoint_dir_behind(tmp_path, monkeypatch):
    # At train end the Trainer loads the best checkpoint and, with save_total_limit=1, deletes every other one with
    # shutil.rmtree(ignore_errors=True). The last checkpoint's manifest was still being written in the background:
    # a write landing while the rmtree empties the directory made it undeletable, leaving checkpoint-6 holding only
    # trainer_guard_manifest.json, which train(resume_from_checkpoint=True) then picked and failed on ("Can't find
    # a valid checkpoint"). Seen under load; made deterministic here with a slower write and a slower rmtree.
    import os
    import shutil
    import time

    import trainer_guard.checkpoint.writer as manifest

    real_write, real_rmtree = manifest.write_manifest, shutil.rmtree

    def slow_write(directory, m):
        time.sleep(0.3)
        return real_write(directory, m)

    def slow_rmtree(path, ignore_errors=False, **kw):
        names = os.listdir(path)  # what a real rmtree sees first; it unlinks those, then removes the directory
        time.sleep(0.8)
        for name in names:
            os.unlink(os.path.join(path, name))
        try:
            os.rmdir(path)
        except OSError:
            if not ignore_errors:
                raise

    monkeypatch.setattr(manifest, "write_manifest", slow_write)
    out = tmp_path / "run"
    trainer = _trainer("llama-untied", out, callbacks=[_FirstEvalIsBest()], max_steps=6, save_steps=2,
                       eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, save_total_limit=1,
                       metric_for_best_model="order", greater_is_better=True, eval_dataset=tiny_dataset(4, seed=1))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **kw: (slow_rmtree if "checkpoint-6" in os.fspath(path)
                                                                  else real_rmtree)(path, *a, **kw))
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    resumed = _trainer("llama-untied", out, max_steps=8, save_steps=2, save_total_limit=1)
    resumed.train(resume_from_checkpoint=True)  # the latest checkpoint is the best one, and it is whole
    assert resumed.state.global_step == 8


class _Warnings:
    """Collects the warnings that trainer_guard logs (guards log through the ``trainer_guard`` logger)."""

    def __init__(self):
        import logging

        self.messages, self.logger = [], logging.getLogger("trainer_guard")
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    def unexpected(self):
        expected = ("trainable parameters at train begin",  # ResumeGuard's table after a resume
                    "is expected: lm_head.weight is stored once")  # IntegrityGuard on the Trainer's tied-head warning
        return [m for m in self.messages if not any(e in m for e in expected)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-tied", "plain-gpt", "mixtral"])
def test_default_guards_leave_training_unchanged_with_rotation_accumulation_and_epoch_saves(kind, tmp_path):
    kw = dict(max_steps=-1, num_train_epochs=2, save_strategy="epoch", save_total_limit=1,
              gradient_accumulation_steps=2)
    with _Warnings() as warnings:
        guarded = _trainer(kind, tmp_path / "run", **kw)
        guarded.train()
    assert warnings.unexpected() == []
    plain = _trainer(kind, tmp_path / "plain", guards=False, **dict(kw, save_strategy="no"))  # plain-gpt: R1a
    plain.train()
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert guarded.state.global_step == 4 and losses(guarded) == losses(plain)
    assert _same(_weights(guarded.model), _weights(plain.model))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-4"]
    assert (tmp_path / "run" / "checkpoint-4" / "trainer_guard_manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-tied+lora", "mixtral"])
def test_resuming_a_resumed_run_twice_equals_the_straight_run(kind, tmp_path):
    # resume_from_checkpoint=True picks the latest checkpoint, written by the previous resumed run (mixtral: whose
    # experts the Trainer's own resume would not restore, transformers#48805)
    kw = dict(save_steps=2, lr_scheduler_type="constant")
    with _Warnings() as warnings:
        for steps in (2, 4, 6):
            legs = _trainer(kind, tmp_path / "run", max_steps=steps, **kw)
            legs.train(resume_from_checkpoint=True if steps > 2 else None)
    straight = _trainer(kind, tmp_path / "straight", max_steps=6, **kw)
    straight.train()
    assert legs.state.global_step == 6
    assert _same(_weights(legs.model), _weights(straight.model))
    assert [m for m in warnings.unexpected() if "AdapterSizeGuard" not in m] == []
