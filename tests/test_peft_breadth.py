"""Every default guard with PEFT setups beyond plain LoRA: DoRA, PiSSA, IA3, LoHa/LoKr, AdaLoRA, prompt/prefix
tuning, layers_to_transform, ensure_weight_tying, named adapters.

Healthy runs must stay untouched (same weights as without the guards, bit-identical resume, healthy ``doctor``);
continuations from saved adapters of non-LoRA methods must not be refused; what PEFT/the Trainer cannot resume
(AdaLoRA after its budget pruned ranks) gets a clear error; rates that would step one tensor twice are refused.
"""

import pytest
import torch
from conftest import make_args

pytest.importorskip("peft")

import peft  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import trainer_guard  # noqa: E402
from trainer_guard import EmbeddingLRGuard, ResumeGuard, UpdateAuditGuard  # noqa: E402
from trainer_guard.core.trainable import continuation_problems  # noqa: E402
from trainer_guard.doctor import diagnose  # noqa: E402
from trainer_guard.errors import EmbeddingLRError, ResumeMismatchError  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

QV = ["q_proj", "v_proj"]


def _peft(kind, config_cls, **kw):
    return get_peft_model(tiny_model(kind), getattr(peft, config_cls)(**kw))


def _train(model, out, guards=True, resume=None, callbacks=(), **args):
    cbs = (trainer_guard.callbacks_from_yaml() if guards else []) + list(callbacks)
    trainer = Trainer(model=model, args=make_args(out, **args), train_dataset=tiny_dataset(n=16),
                      callbacks=cbs)
    if guards:
        trainer = trainer_guard.guard(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _AdaLoraAllocate(TrainerCallback):
    """What AdaLoRA needs from the training loop: ``update_and_allocate`` after each optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


BREADTH = {
    # PiSSA rewrites the base weights at init (base = residual); the checkpoint holds only the adapter
    "pissa": lambda: _peft("llama-tied", "LoraConfig", r=4, target_modules=QV, init_lora_weights="pissa"),
    "dora": lambda: _peft("llama-tied", "LoraConfig", r=4, target_modules=QV, use_dora=True),
    "ia3": lambda: _peft("llama-tied", "IA3Config", target_modules=["q_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
    "prefix": lambda: _peft("llama-tied", "PrefixTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=4),
    # one trainable copy for the tied pair, stored under both names in the adapter
    "tied_copies": lambda: _peft("llama-tied", "LoraConfig", r=4, target_modules=QV,
                                 modules_to_save=["lm_head", "embed_tokens"], ensure_weight_tying=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BREADTH))
def test_default_guards_leave_peft_methods_untouched(tmp_path, kind):
    """Same final weights with and without the guards; a resume from checkpoint-2 reproduces them; doctor finds
    every checkpoint and the final save_model healthy."""
    plain = _train(BREADTH[kind](), tmp_path / "plain", guards=False)
    guarded = _train(BREADTH[kind](), tmp_path / "g")
    want = _weights(plain.model)
    got = _weights(guarded.model)
    assert [n for n in want if not torch.equal(want[n], got[n])] == []
    guarded.save_model(str(tmp_path / "final"))
    resumed = _train(BREADTH[kind](), tmp_path / "g", resume=str(tmp_path / "g" / "checkpoint-2"))
    again = _weights(resumed.model)
    assert [n for n in want if not torch.allclose(want[n], again[n], atol=1e-6)] == []
    for d in (tmp_path / "g" / "checkpoint-2", tmp_path / "g" / "checkpoint-4", tmp_path / "final"):
        report = diagnose(d)
        assert report.exit_code == 0, report.to_json()


# -- ResumeGuard: continuing from a saved adapter of another PEFT method (no trainable record) ------------------

SAVED = {
    "ia3": ("IA3Config", dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "loha": ("LoHaConfig", dict(r=4, target_modules=QV)),
    "lokr": ("LoKrConfig", dict(r=4, target_modules=QV)),
    "layers_to_transform": ("LoraConfig", dict(r=4, target_modules=QV, layers_to_transform=[1])),
}


@pytest.mark.parametrize("kind", sorted(SAVED))
def test_adapter_continuation_of_other_methods_is_not_refused(tmp_path, kind):
    """An IA3/LoHa/LoKr adapter (or LoRA on some layers only) reloaded with is_trainable=True trains exactly as
    saved. ResumeGuard used to refuse it ("LoRA targets in adapter, no trainable LoRA now"): only LoRA A/B counted
    as training a target, and layers_to_transform was ignored."""
    cls, kw = SAVED[kind]
    _peft("llama-untied", cls, **kw).save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(tiny_model("llama-untied"), tmp_path / "adapter", is_trainable=True)
    assert continuation_problems(model, str(tmp_path / "adapter"))[0] == []
    trainer = trainer_guard.guard(Trainer(
        model=model, args=make_args(tmp_path / "run", max_steps=1, save_steps=10), train_dataset=tiny_dataset(n=8),
        callbacks=trainer_guard.callbacks_from_yaml(resume={"adapter_dir": str(tmp_path / "adapter")})))
    trainer.train()  # no ResumeMismatchError


def test_adapter_continuation_of_ia3_still_names_a_lost_target(tmp_path):
    """The real problem is still found, named with the method and its config class."""
    _peft("llama-untied", "IA3Config", target_modules=QV, feedforward_modules=[]).save_pretrained(tmp_path / "a")
    now = _peft("llama-untied", "IA3Config", target_modules=["q_proj"], feedforward_modules=[])
    problems, _ = continuation_problems(now, str(tmp_path / "a"))
    assert len(problems) == 1  # the saved list's order is PEFT's set order
    assert problems[0].startswith("model.layers.{0-1}.self_attn.v_proj: IA3 targets in a (['")
    assert problems[0].endswith("]), no trainable IA3 now")
    with pytest.raises(ResumeMismatchError, match=r"or the saved IA3Config with its modules_to_save"):
        ResumeGuard(adapter_dir=str(tmp_path / "a")).verify(now, None)


def test_layers_to_transform_lost_layer_is_named(tmp_path):
    """Saved on both layers, LoRA on layer 1 only now: layer 0 is named, layer 1 is not."""
    _peft("llama-untied", "LoraConfig", r=4, target_modules=QV).save_pretrained(tmp_path / "a")
    now = _peft("llama-untied", "LoraConfig", r=4, target_modules=QV, layers_to_transform=[1])
    problems, _ = continuation_problems(now, str(tmp_path / "a"))
    assert len(problems) == 1
    assert problems[0].startswith("model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj: LoRA targets "
                                  "in a (['")
    assert problems[0].endswith("]), no trainable LoRA now")


# -- AdaLoRA ----------------------------------------------------------------------------------------------------

def _adalora():
    return _peft("llama-tied", "AdaLoraConfig", init_r=6, target_r=1, tinit=1, tfinal=2, deltaT=1, total_step=8,
                 target_modules=QV)


def test_adalora_resume_after_pruning_is_refused_clearly(tmp_path):
    """PEFT saves an AdaLoRA adapter cut to its rank_pattern once the budget pruned ranks; the Trainer's resume
    then dies in load_state_dict ("size mismatch", plain) and AdaLoRA's allocator cannot continue either. With the
    guards wired, a ResumeMismatchError says so, and how to go on, before anything is loaded."""
    _train(_adalora(), tmp_path, guards=False, callbacks=[_AdaLoraAllocate()], max_steps=4, save_steps=4)
    ckpt = str(tmp_path / "checkpoint-4")
    with pytest.raises(RuntimeError, match="size mismatch"):  # what the user gets without the guards
        _train(_adalora(), tmp_path, guards=False, resume=ckpt, callbacks=[_AdaLoraAllocate()], max_steps=8)
    with pytest.raises(ResumeMismatchError, match=r"(?s)checkpoint-4 holds an AdaLoRA adapter whose ranks its "
                                                  r"budget already pruned.*PeftModel.from_pretrained\(base, "
                                                  r".*checkpoint-4', is_trainable=True\) without "
                                                  r"resume_from_checkpoint"):
        _train(_adalora(), tmp_path, resume=ckpt, callbacks=[_AdaLoraAllocate()], max_steps=8)


def test_adalora_pruned_ranks_are_not_stalled_updates(tmp_path):
    """AdaLoRA's update_and_allocate zeroes pruned entries of lora_E after each step. When it runs before the audit
    (a callback listed first, or a Trainer subclass), a fully pruned lora_E stays 0 and the audit warns "updates
    too small for float32 ... raise the LR", which is wrong advice: the rank allocator pruned them."""
    audit = UpdateAuditGuard(mode="warn", every=1)
    trainer = Trainer(model=_adalora(), args=make_args(tmp_path, max_steps=6, save_steps=100),
                      train_dataset=tiny_dataset(n=24), callbacks=[_AdaLoraAllocate(), audit])
    trainer.train()
    assert [f.name for f in audit.findings if ".lora_E." in f.name] == []


# -- EmbeddingLRGuard with ensure_weight_tying ----------------------------------------------------------------

def _tied_lora_embeddings():
    # PEFT ties the lm_head's LoRA to the embedding's as transposed views: distinct Parameters, one memory
    return _peft("llama-tied", "LoraConfig", r=4, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)


def test_embedding_lr_refuses_two_rates_for_transposed_tied_lora(tmp_path):
    """embed_ratio != head_ratio would step the shared LoRA values twice per step at two rates; the guard accepted
    it because the parameters are not the same object."""
    with pytest.raises(EmbeddingLRError, match=r"embed_tokens.lora_embedding_B.default and "
                                               r"base_model.model.lm_head.lora_A.default.weight are views of one "
                                               r"tensor"):
        Trainer(model=_tied_lora_embeddings(), args=make_args(tmp_path), train_dataset=tiny_dataset(n=8),
                callbacks=[EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5)])


def test_embedding_lr_one_rate_for_transposed_tied_lora_trains(tmp_path):
    """One rate for both is fine: the run trains and logs it for both parts."""
    guard = EmbeddingLRGuard(ratio=0.1)
    trainer = Trainer(model=_tied_lora_embeddings(), args=make_args(tmp_path, max_steps=2, save_steps=10),
                      train_dataset=tiny_dataset(n=8), callbacks=[guard])
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["learning_rate/embeddings"] == pytest.approx(0.1 * logged["learning_rate"])
    assert logged["learning_rate/lm_head"] == pytest.approx(0.1 * logged["learning_rate"])
