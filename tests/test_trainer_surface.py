"""Parts of the Trainer API the other tests do not drive, with the guards on: evaluate/predict with and without
train(), eval_on_start, guards given as classes or added/removed after the Trainer was built, one guard shared by
two Trainers, train() twice, unusual step/epoch/optimizer settings, save_model() at the end, and memory that a
finished run's guards must let go of."""

import gc
import shutil
import weakref

import pytest
import torch
from conftest import make_args
from torch import nn
from transformers import Trainer

import trainer_guard
from trainer_guard import (EmbeddingLRGuard, HeadGuard, IntegrityGuard, ResumeGuard, TiedWeightsGuard,
                           UpdateAuditGuard)
from trainer_guard.callbacks import GUARDS
from trainer_guard.doctor import diagnose
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

MANIFEST = "trainer_guard_manifest.json"


def _default_guards():
    return trainer_guard.callbacks_from_yaml(trainer_guard.default_config_path())


def _trainer(model, out, callbacks, wire=True, ds=16, eval_ds=None, **kw):
    trainer = Trainer(model=model, args=make_args(out, **kw), train_dataset=tiny_dataset(ds) if ds else None,
                      eval_dataset=eval_ds, callbacks=callbacks)
    return trainer_guard.guard(trainer) if wire else trainer


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# -- healthy runs: the guards change nothing and every checkpoint passes the doctor -------------------------------
SETTINGS = {
    "eval_on_start": dict(eval_on_start=True, eval_strategy="steps", eval_steps=2),
    "max_steps_below_accumulation": dict(max_steps=2, gradient_accumulation_steps=4, save_steps=1),
    "dataset_below_one_batch": dict(ds=2, max_steps=3, save_steps=1),
    "epochs_saved_per_epoch": dict(max_steps=-1, num_train_epochs=2, save_strategy="epoch"),
    "sgd_constant": dict(optim="sgd", lr_scheduler_type="constant"),
    "adafactor": dict(optim="adafactor"),
    "neftune": dict(neftune_noise_alpha=5.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-tied", "plain-gpt"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_default_guards_leave_training_unchanged_across_trainer_settings(kind, setting, tmp_path):
    kw = dict(SETTINGS[setting])
    ds = kw.pop("ds", 16)
    runs = {}
    for guarded in (True, False):
        # the plain module cannot be checkpointed without TiedWeightsGuard (report R1a): no saves unguarded
        save = {} if guarded or kind != "plain-gpt" else dict(save_strategy="no")
        trainer = _trainer(tiny_model(kind), tmp_path / str(guarded), _default_guards() if guarded else [],
                           wire=guarded, ds=ds, eval_ds=tiny_dataset(8, seed=1), **{**kw, **save})
        trainer.train()
        runs[guarded] = (_weights(trainer.model), [h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert runs[True][1] == runs[False][1] and _same(runs[True][0], runs[False][0])
    ckpts = sorted(p for p in (tmp_path / "True").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts and all(diagnose(str(c)).exit_code == 0 for c in ckpts)


@pytest.mark.parametrize("kind, lora", [("llama-manual-tie", False), ("plain-gpt", False), ("llama-tied", True)])
def test_evaluate_and_predict_before_and_after_train_then_save_model_passes_doctor(kind, lora, tmp_path):
    model = tiny_model(kind)
    model = tiny_lora(model) if lora else model
    trainer = _trainer(model, tmp_path, _default_guards(), max_steps=2, save_strategy="no")
    trainer.eval_dataset = tiny_dataset(8, seed=1)
    before = trainer.evaluate()["eval_loss"]
    assert trainer.predict(tiny_dataset(4, seed=2)).metrics["test_loss"] > 0
    assert trainer.evaluate()["eval_loss"] == before  # evaluation changes nothing, guards included
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / MANIFEST).is_file()
    assert diagnose(str(tmp_path / "final")).exit_code == 0


@pytest.mark.parametrize("kind", ["plain-gpt", "llama-manual-tie"])
def test_guards_given_as_classes_are_built_and_wired_by_the_trainer(kind, tmp_path):
    trainer = _trainer(tiny_model(kind), tmp_path, [TiedWeightsGuard, IntegrityGuard, HeadGuard], max_steps=2)
    trainer.train()  # the plain module saves (R1a), the hand-tied head is declared (R1b)
    trainer.save_model(str(tmp_path / "final"))
    assert all(diagnose(str(tmp_path / d)).exit_code == 0 for d in ("checkpoint-2", "final"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain-gpt", "llama-manual-tie"])
def test_guards_added_with_add_callback_after_init_then_a_resume(kind, tmp_path):
    """add_callback comes after the Trainer's on_init_end: the guards must still make the saves safe (R1a/R1b)."""
    for resume in (None, str(tmp_path / "checkpoint-1")):
        trainer = _trainer(tiny_model(kind), tmp_path, [], wire=False, max_steps=2, save_steps=1)
        for cb in _default_guards():
            trainer.add_callback(cb if resume is None else type(cb))  # an instance, or a class to build
        trainer_guard.guard(trainer).train(resume_from_checkpoint=resume)
    assert all(diagnose(str(tmp_path / f"checkpoint-{s}")).exit_code == 0 for s in (1, 2))


@pytest.mark.slow
def test_train_twice_on_one_trainer_matches_the_unguarded_trainer(tmp_path):
    runs = {}
    for guarded in (True, False):
        trainer = _trainer(tiny_model("llama-tied"), tmp_path / str(guarded),
                           _default_guards() if guarded else [], wire=guarded, max_steps=2)
        trainer.train()
        trainer.train()
        runs[guarded] = _weights(trainer.model)
    assert _same(runs[True], runs[False])


# -- a guard removed from the Trainer after guard(trainer) --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["remove_callback(class)", "remove_callback(instance)", "pop_callback"])
def test_a_removed_guard_stops_acting_through_what_guard_wired(how, tmp_path, monkeypatch):
    """guard(trainer) wraps train/save_model/the checkpoint loads; a guard taken out of the Trainer afterwards must
    not go on re-tying, verifying resumes, writing manifests or checking saves."""
    _trainer(tiny_model("llama-tied"), tmp_path, [], wire=False, max_steps=1, save_steps=1).train()
    tied, integrity, head, resume = TiedWeightsGuard(), IntegrityGuard(), HeadGuard(), ResumeGuard()
    calls = []
    for guard, method in ((tied, "attach"), (tied, "_retie_before_load"), (integrity, "verify_resume"),
                          (resume, "verify")):
        monkeypatch.setattr(guard, method, lambda *a, _m=method, **kw: calls.append(_m))
    trainer = _trainer(tiny_model("llama-tied"), tmp_path, [tied, integrity, head, resume], max_steps=2,
                       save_strategy="no")
    calls.clear()  # attach ran at the Trainer's init, while the guard was one of its callbacks
    for cb in (tied, integrity, head, resume):
        if how == "pop_callback":
            assert trainer.pop_callback(type(cb)) is cb
        else:
            trainer.remove_callback(type(cb) if how.endswith("(class)") else cb)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / MANIFEST).exists()
    assert head.checked == [] and calls == []


# -- one guard given to two Trainers -------------------------------------------------------------------------------
@pytest.mark.parametrize("head_init", ["copy of the embedding", "random"])
def test_a_tied_weights_guard_shared_by_two_trainers_never_ties_the_untied_model(head_init, tmp_path):
    """Trainer B's (tied) groups were applied to trainer A's untied model at A's train begin: a head equal to the
    embedding was silently tied to it (and config.tie_word_embeddings set), a different one raised
    TiedWeightsError."""
    shared = [TiedWeightsGuard()]
    a = tiny_model("llama-untied")
    if head_init.startswith("copy"):
        with torch.no_grad():
            a.lm_head.weight.copy_(a.model.embed_tokens.weight)
    trainer_a = _trainer(a, tmp_path / "a", shared, max_steps=1, save_strategy="no")
    _trainer(tiny_model("llama-tied"), tmp_path / "b", shared, max_steps=1, save_strategy="no")
    trainer_a.train()
    assert a.lm_head.weight is not a.model.embed_tokens.weight and a.config.tie_word_embeddings is False


@pytest.mark.slow
def test_default_guards_shared_by_two_trainers_of_different_models(tmp_path):
    shared = _default_guards()
    trainer_a = _trainer(tiny_model("llama-untied"), tmp_path / "a", shared, max_steps=2, save_steps=1)
    trainer_b = _trainer(tiny_model("plain-gpt"), tmp_path / "b", shared, max_steps=2)
    trainer_a.train()
    straight = _weights(trainer_a.model)
    trainer_b.train()
    assert all(diagnose(str(tmp_path / d / "checkpoint-2")).exit_code == 0 for d in ("a", "b"))
    shutil.rmtree(tmp_path / "a" / "checkpoint-2")
    resumed = _trainer(tiny_model("llama-untied"), tmp_path / "a", shared, max_steps=2, save_steps=1)
    resumed.train(resume_from_checkpoint=True)  # picks checkpoint-1
    assert resumed.state.global_step == 2 and _same(_weights(resumed.model), straight)
    assert trainer_guard.find_tied_groups(resumed.model) == []


# -- identity, not id(): ids of freed objects are reused -----------------------------------------------------------
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 2)
        self.head = nn.Linear(2, 4, bias=False)
        self.head.weight = self.emb.weight


def test_a_shared_tied_weights_guard_hooks_every_new_model_even_at_a_reused_address():
    """The guard remembered hooked modules by id(): a sweep's next model allocated where a freed one was went
    unhooked, and its checkpoint crashed with "Some tensors share memory" again (R1a)."""
    guard = TiedWeightsGuard()
    for _ in range(20):
        model = _Tied()
        guard.attach(model)
        assert list(model.state_dict()) == ["emb.weight"]
        del model
        gc.collect(1)  # young generations only: a full collection costs ~0.2 s here


class _StubTrainer:
    """What wire() touches on a Trainer: the methods it wraps."""

    def __init__(self):
        noop = lambda *a, **kw: None  # noqa: E731
        self.train = self._load_from_checkpoint = self.create_optimizer = self._load_optimizer_and_scheduler = noop


@pytest.mark.parametrize("cls", [TiedWeightsGuard, ResumeGuard])
def test_a_guard_wires_every_new_trainer_even_at_a_reused_address(cls):
    guard = cls()
    for _ in range(20):
        trainer = _StubTrainer()
        before = trainer.train
        guard.wire(trainer)
        assert trainer.train is not before, "a new Trainer was taken for one already wired"
        del trainer, before
        gc.collect(1)  # young generations only: a full collection costs ~0.2 s here


def test_guard_wires_a_replacement_callback_even_at_a_reused_address():
    class Handler:
        callbacks: list = []

    class Wired:
        def __init__(self):
            self.wired = 0

        def wire(self, trainer):
            self.wired += 1

    trainer = _StubTrainer()
    trainer.callback_handler = Handler()
    for _ in range(20):
        cb = Wired()
        trainer.callback_handler.callbacks = [cb]  # the previous one was removed (remove_callback) and freed
        trainer_guard.guard(trainer)
        trainer_guard.guard(trainer)  # idempotent
        assert cb.wired == 1
        del cb
        trainer.callback_handler.callbacks = []
        gc.collect(1)  # young generations only: a full collection costs ~0.2 s here


# -- a finished run's guards let go of its model ------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: UpdateAuditGuard(), lambda: EmbeddingLRGuard(ratio=0.5)],
                         ids=["update_audit", "embedding_lr"])
@pytest.mark.slow
def test_a_guard_kept_after_training_does_not_keep_the_model_in_memory(make, tmp_path):
    """Notebooks keep the callbacks (to read reports, or for the next run) and `del trainer, model`: the guard must
    not hold the weights (UpdateAuditGuard: the model; EmbeddingLRGuard: the optimizer and its moments)."""
    guard = make()
    model = tiny_model("llama-untied")
    trainer = _trainer(model, tmp_path, [guard], max_steps=2, save_strategy="no")
    trainer.train()
    param, optimizer = weakref.ref(model.lm_head.weight), weakref.ref(trainer.optimizer)
    del trainer, model
    gc.collect()
    assert param() is None and optimizer() is None
    if isinstance(guard, UpdateAuditGuard):
        assert guard.audit.steps == 2 and guard.findings == []  # what the run found stays readable


@pytest.mark.slow
def test_every_guard_alone_as_a_class_survives_evaluate_train_predict_and_save_model(tmp_path):
    for name, cls in GUARDS.items():
        out = tmp_path / name
        trainer = _trainer(tiny_model("llama-tied"), out, [cls], max_steps=1, save_strategy="no")
        trainer.eval_dataset = tiny_dataset(4, seed=1)
        trainer.evaluate()
        trainer.train()
        trainer.predict(tiny_dataset(4, seed=2))
        trainer.save_model(str(out / "final"))
        assert (out / "final" / "model.safetensors").is_file()
        assert (out / "final" / MANIFEST).is_file() == (cls is IntegrityGuard), name
