"""Trainer subclasses and user-supplied optimizers with the guards on: a DPO-style frozen reference model (as an
attribute and as a submodule of a wrapper), LoRA+-style groups from an overridden ``create_optimizer``,
``Trainer(optimizers=...)`` (a parameter left out of it, EmbeddingLRGuard's absolute LR over the user's LR)."""

import copy

import pytest
import torch
from conftest import make_args
from torch import nn
from transformers import Trainer, TrainerCallback

import trainer_guard
from trainer_guard import EmbeddingLRGuard
from trainer_guard.errors import UpdateAuditError
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _guards(**overrides):
    return trainer_guard.callbacks_from_yaml(update_audit={"every": 1}, **overrides)


class RefTrainer(Trainer):
    """DPO-like: a frozen reference model held as an attribute adds a KL-ish term to the loss."""

    def __init__(self, *a, ref_model=None, **kw):
        super().__init__(*a, **kw)
        self.ref_model = ref_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        with torch.no_grad():
            ref = self.ref_model(**inputs)
        loss = out.loss + 0.1 * ((out.logits - ref.logits) ** 2).mean()
        return (loss, out) if return_outputs else loss


class Wrapper(nn.Module):
    """Research-code wrapper: the tied LM inside, and a frozen copy of it as a reference submodule."""

    def __init__(self, lm, with_ref=True):
        super().__init__()
        self.lm = lm
        if with_ref:
            self.ref = copy.deepcopy(lm).requires_grad_(False)

    def forward(self, input_ids, labels=None, attention_mask=None, **_):
        out = self.lm(input_ids=input_ids, labels=labels)
        loss = out.loss
        if hasattr(self, "ref"):
            with torch.no_grad():
                ref = self.ref(input_ids=input_ids).logits
            loss = loss + 0.1 * ((out.logits - ref) ** 2).mean()
        return {"loss": loss, "logits": out.logits}


@pytest.mark.parametrize("wire", [True, False])
def test_a_reference_model_held_by_a_subclass_is_untouched_and_training_unchanged(wire, tmp_path):
    def run(guards, out):
        model = tiny_model("llama-manual-tie")
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        ref_cfg, ref_before = ref.config.tie_word_embeddings, _weights(ref)
        cbs = _guards() if guards else []
        t = RefTrainer(model=model, args=make_args(out), train_dataset=tiny_dataset(16), callbacks=cbs, ref_model=ref)
        if guards and wire:
            trainer_guard.guard(t)
        t.train()
        assert _same(ref_before, _weights(ref)) and ref.config.tie_word_embeddings == ref_cfg  # not looked at
        return _weights(model)

    assert _same(run(False, tmp_path / "plain"), run(True, tmp_path / "guarded"))


@pytest.mark.slow
def test_wrapper_with_a_frozen_reference_submodule_trains_saves_and_resumes_as_unguarded(tmp_path):
    def run(guards, out, resume=None, **kw):
        model = Wrapper(tiny_model("llama-tied"))
        ref_before = _weights(model.ref)
        cbs = _guards() if guards else []
        t = Trainer(model=model, args=make_args(out, **kw), train_dataset=tiny_dataset(16), callbacks=cbs)
        if guards:
            trainer_guard.guard(t)
        t.train(resume_from_checkpoint=resume)
        assert _same(ref_before, _weights(model.ref))  # frozen and, the audit agrees, not drifted
        return _weights(model), cbs

    plain, _ = run(False, tmp_path / "plain", save_strategy="no")  # unguarded: the tied wrapper cannot be saved
    straight, _ = run(True, tmp_path / "g")
    resumed, cbs = run(True, tmp_path / "g", resume=str(tmp_path / "g" / "checkpoint-2"))
    assert _same(plain, straight) and _same(plain, resumed)
    report = [e for cb in cbs for e in cb.report()]
    assert any("resumed model matches" in e for e in report)
    assert any("total  trainable 22,688 of 45,376 (50.00%)" in e for e in report)  # the frozen ref counted


class LoraPlusTrainer(Trainer):
    """LoRA+: lora_B at 16x the LR, norms/biases without weight decay, all in groups the Trainer did not build."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            b = [p for n, p in named if "lora_B" in n]
            nd = [p for n, p in named if "lora_B" not in n and ("norm" in n or "bias" in n)]
            rest = [p for n, p in named if "lora_B" not in n and not ("norm" in n or "bias" in n)]
            lr = self.args.learning_rate
            self.optimizer = torch.optim.AdamW([{"params": rest, "weight_decay": 0.01},
                                                {"params": nd, "weight_decay": 0.0},
                                                {"params": b, "weight_decay": 0.01, "lr": 16 * lr}], lr=lr)
        return self.optimizer


@pytest.mark.slow
def test_lora_plus_optimizer_of_a_subclass_trains_and_resumes_as_unguarded(tmp_path):
    def run(guards, out, resume=None):
        model = tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"])
        cbs = _guards() if guards else []
        t = LoraPlusTrainer(model=model, args=make_args(out), train_dataset=tiny_dataset(16), callbacks=cbs)
        if guards:
            trainer_guard.guard(t)
        t.train(resume_from_checkpoint=resume)
        return _weights(model)

    plain = run(False, tmp_path / "plain")
    assert _same(plain, run(True, tmp_path / "g"))
    assert _same(plain, run(True, tmp_path / "g", resume=str(tmp_path / "g" / "checkpoint-2")))


@pytest.mark.parametrize("wire", [True, False])
def test_a_parameter_left_out_of_a_user_optimizer_is_reported_by_name(wire, tmp_path):
    model = tiny_model("llama-untied")
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "embed_tokens" not in n], lr=1e-2)
    t = Trainer(model=model, args=make_args(tmp_path), train_dataset=tiny_dataset(16), callbacks=_guards(),
                optimizers=(opt, None))
    if wire:
        trainer_guard.guard(t)
    with pytest.raises(UpdateAuditError, match=r"model\.embed_tokens - not in any optimizer group"):
        t.train()


class _LRs(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({g.get("trainer_guard_role"): g["lr"] for g in optimizer.param_groups})


@pytest.mark.parametrize("key", ["lr", "embed_lr"])
def test_absolute_embedding_lr_holds_with_a_user_optimizer_at_another_lr(key, tmp_path):
    """EmbeddingLRGuard(lr=1e-4) over a user optimizer at 1e-3 (args.learning_rate 1e-2): the embeddings train at
    1e-4, not at 1e-4 / 1e-2 x 1e-3 = 1e-6 (the factor used to be taken from args.learning_rate)."""
    model = tiny_model("llama-untied")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    probe, guard = _LRs(), EmbeddingLRGuard(**{key: 1e-4})
    t = Trainer(model=model, args=make_args(tmp_path, max_steps=2, save_steps=2), train_dataset=tiny_dataset(16),
                callbacks=[guard, probe], optimizers=(opt, sched))
    t.train()
    assert probe.steps[0][None] == pytest.approx(1e-3)
    assert probe.steps[0]["embeddings"] == pytest.approx(1e-4, rel=1e-9)
    assert probe.steps[0]["lm_head"] == pytest.approx(1e-4, rel=1e-9)  # embed_lr: the default ratio, 0.1 x 1e-3
    assert any("peak lr 0.0001" in e for e in guard.report())


def test_absolute_embedding_lr_from_a_subclass_group_at_its_own_lr(tmp_path):
    """The embeddings sit in a subclass's group at 2x the LR: an absolute LR is still that LR, and a resume with
    the same options warns about nothing."""

    class EmbedGroupTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                named = list(self.model.named_parameters())
                emb = [p for n, p in named if "embed_tokens" in n]
                rest = [p for n, p in named if "embed_tokens" not in n]
                lr = self.args.learning_rate
                self.optimizer = torch.optim.AdamW([{"params": rest}, {"params": emb, "lr": 2 * lr}], lr=lr)
            return self.optimizer

    def run(resume=None):
        probe, guard = _LRs(), EmbeddingLRGuard(lr=1e-3)
        t = EmbedGroupTrainer(model=tiny_model("llama-untied"), args=make_args(tmp_path, max_steps=3, save_steps=2),
                              train_dataset=tiny_dataset(16), callbacks=[guard, probe])
        t.train(resume_from_checkpoint=resume)
        return probe, guard

    probe, _ = run()
    assert probe.steps[0]["embeddings"] == pytest.approx(1e-3, rel=1e-9)  # from group 1 (2e-2): factor 0.05
    assert probe.steps[0]["lm_head"] == pytest.approx(1e-3, rel=1e-9)  # from group 0 (1e-2): factor 0.1
    probe, guard = run(str(tmp_path / "checkpoint-2"))  # step 3 of 3 on the linear schedule: 1/3 of the peak
    assert probe.steps[0]["embeddings"] == pytest.approx(1e-3 / 3, rel=1e-9)
    assert probe.steps[0]["lm_head"] == pytest.approx(1e-3 / 3, rel=1e-9)
    assert not any("resumed run uses" in e for e in guard.report())


class InnerSaveTrainer(Trainer):
    """Research code that saves only the inner LM of its wrapper (its own file layout)."""

    def _save(self, output_dir=None, state_dict=None):
        self.model.lm.save_pretrained(output_dir or self.args.output_dir)


class _Wrapper(Wrapper):
    _keys_to_ignore_on_save = None  # transformers 5.23's resume warnings read it from any model (upstream bug)


def test_a_resume_whose_checkpoint_stores_no_model_name_is_not_called_verified(tmp_path):
    """A _save override that saves a submodule stores every tensor under a name the model does not have: the resume
    check compared nothing and must say so, not log that the resumed model 'matches' the manifest."""
    from trainer_guard import IntegrityGuard

    def trainer(guard, max_steps):
        return InnerSaveTrainer(model=_Wrapper(tiny_model("llama-untied"), with_ref=False),
                                args=make_args(tmp_path, max_steps=max_steps, save_steps=2),
                                train_dataset=tiny_dataset(16, 16, 128), callbacks=[guard])

    trainer(IntegrityGuard(), 2).train()
    guard = IntegrityGuard()
    trainer(guard, 4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    said = guard.report()
    assert not any("matches" in line for line in said), said
    assert any("none of its" in line and "not compared" in line for line in said), said
