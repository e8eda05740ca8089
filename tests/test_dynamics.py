"""UpdateAuditGuard under realistic training dynamics: mixture-of-experts routing, schedules that reach or start at
LR 0, requires_grad changed by a schedule mid-run, EMA copies; healthy runs stay silent, real faults are named."""

import copy

import pytest
import torch
from conftest import make_args
from transformers import Trainer, TrainerCallback

from trainer_guard import UpdateAuditError, UpdateAuditGuard
from trainer_guard.core.audit import Finding, ParamFacts, UpdateAudit, audit, expert_of, summarize
from trainer_guard.tiny import tiny_dataset, tiny_model


def train(model, tmp_path, guard=None, optimizers=(None, None), callbacks=(), ds=None, **kw):
    kw.setdefault("max_steps", 4)
    kw.setdefault("save_strategy", "no")
    trainer = Trainer(model=model, args=make_args(tmp_path, **kw), train_dataset=ds or tiny_dataset(16),
                      callbacks=([guard] if guard else []) + list(callbacks), optimizers=optimizers)
    trainer.train()
    return trainer


# -- mixture of experts -----------------------------------------------------------------------------------------
def switch_moe():
    """A tiny Switch Transformers model: per-expert modules (``mlp.experts.expert_3.wi``), top-1 routing, 8 experts.
    With 8 tokens a step some experts get no token, hence no gradient, for a few steps: routing, not a bug."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.SwitchTransformersConfig(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                      num_heads=2, num_experts=8, expert_capacity=8, num_sparse_encoder_layers=1,
                                      num_sparse_decoder_layers=1, decoder_start_token_id=0, pad_token_id=0)
    return tf.SwitchTransformersForConditionalGeneration(cfg)


def moe_train(tmp_path, guard, model=None, max_steps=6):
    return train(model or switch_moe(), tmp_path, guard, ds=tiny_dataset(16, seq_len=4), per_device_train_batch_size=2,
                 max_steps=max_steps)


def test_moe_experts_without_tokens_do_not_stop_a_healthy_run(tmp_path):
    # default options: before the fix, "no gradient reached it" raised at step 2 for the experts not yet routed to
    guard = UpdateAuditGuard()
    moe_train(tmp_path, guard)
    assert guard.findings == [] and guard.report() == []


def test_moe_experts_unrouted_for_a_whole_window_warn_and_name_ignore(tmp_path):
    guard = UpdateAuditGuard(every=4)  # raise mode: a dead expert is a warning, the run goes on
    trainer = moe_train(tmp_path, guard, max_steps=8)
    assert trainer.state.global_step == 8
    assert guard.findings and {f.cause for f in guard.findings} == {"unrouted"}
    assert all(".mlp.experts.expert_" in f.name for f in guard.findings)
    line = guard.report()[0]
    assert line.startswith("UpdateAuditGuard at optimizer step 4 (warning only):")
    assert "no token was routed to in 4 optimizer steps" in line and "ignore=['*.experts.*']" in line


def test_moe_experts_that_never_get_a_gradient_still_raise(tmp_path):
    """Every expert detached (a wiring bug, not routing): no expert of the layer trains, so it is no routing
    artefact and raises as before."""
    model = switch_moe()
    for name, mod in model.named_modules():
        if name.endswith(".mlp.experts"):
            for expert in mod.values():
                expert.register_forward_hook(lambda m, a, out: out.detach())
    with pytest.raises(UpdateAuditError,
                       match=r"(?s)step 2:.*experts\.expert_.* - no gradient reached it \(\.grad is None"):
        moe_train(tmp_path, UpdateAuditGuard(), model=model)


def test_expert_of_and_the_unrouted_verdict():
    assert expert_of("encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight") == "encoder.block.1.layer.1.mlp.experts"
    assert expert_of("model.layers.2.block_sparse_moe.experts.7.w1.lora_A.default.weight") == \
        "model.layers.2.block_sparse_moe.experts"
    assert expert_of("model.layers.0.mlp.experts.gate_up_proj") is None  # fused: every expert in one tensor
    assert expert_of("model.layers.0.mlp.gate.weight") is None
    f = dict(trainable=True, group=0, lr=1e-3, initial_lr=1e-3, grad="none", expert=True)
    status = {"a": "same", "b": "same"}
    facts = {"a": ParamFacts(effective_steps=3, **f), "b": ParamFacts(effective_steps=10, **f)}
    findings, pending = audit(status, facts, min_expert_steps=10)
    assert pending == ["a"] and [(x.name, x.cause) for x in findings] == [("b", "unrouted")]
    assert "in 10 optimizer steps" in findings[0].detail


# -- learning rates -----------------------------------------------------------------------------------------------
def test_learning_rate_zero_everywhere_names_the_training_argument(tmp_path):
    with pytest.raises(UpdateAuditError) as e:
        train(tiny_model("llama-untied"), tmp_path, UpdateAuditGuard(), learning_rate=0.0)
    msg = str(e.value)
    assert msg.startswith("UpdateAuditGuard at optimizer step 1:")
    assert "every optimizer group has LR 0" in msg and "TrainingArguments.learning_rate" in msg
    assert len(msg.splitlines()) == 2  # one line for all 21 tensors of both Trainer groups


def test_lr_zero_groups_are_each_named(tmp_path):
    """Two groups frozen by LR 0 (and one training): each line names its own group, not the first one's."""
    model = tiny_model("llama-untied")
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    head = [model.lm_head.weight]
    rest = [p for n, p in model.named_parameters() if "norm" not in n and n != "lm_head.weight"]
    opt = torch.optim.AdamW([{"params": rest}, {"params": norms, "lr": 0.0}, {"params": head, "lr": 0.0}], lr=1e-2)
    with pytest.raises(UpdateAuditError) as e:
        train(model, tmp_path, UpdateAuditGuard(), optimizers=(opt, None))
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 2
    assert "in lm_head - its optimizer group 2 has LR 0" in lines[0]  # before the fix: one line, "group 2" for all
    assert "model.norm - its optimizer group 1 has LR 0" in lines[1] and "5 tensors" in lines[1]
    assert "every optimizer group" not in str(e.value)  # group 0 trains: not the TrainingArguments message


def test_summarize_keeps_different_details_apart():
    f = [Finding("a.w", "unchanged", "lr_zero", "group 1", 1), Finding("b.w", "unchanged", "lr_zero", "group 2", 1)]
    assert summarize(f) == ["trainable but unchanged: 1 tensor (1 value) in a - group 1",
                            "trainable but unchanged: 1 tensor (1 value) in b - group 2"]


SCHEDULES = {
    "cosine-restarts": dict(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2},
                            warmup_steps=1, max_steps=8),
    "polynomial-to-0": dict(lr_scheduler_type="polynomial", lr_scheduler_kwargs={"lr_end": 0.0}, max_steps=7),
    "warmup-longer-than-every": dict(warmup_steps=5, max_steps=7),
    "constant-with-warmup": dict(lr_scheduler_type="constant_with_warmup", warmup_steps=3, max_steps=5),
    "partial-final-accumulation": dict(gradient_accumulation_steps=3, per_device_train_batch_size=2, max_steps=-1,
                                       num_train_epochs=1, ds=tiny_dataset(10)),
    "clipped-to-tiny-norm-dropout": dict(max_grad_norm=1e-3, max_steps=3),
}


@pytest.mark.parametrize("setup", sorted(SCHEDULES))
def test_healthy_schedules_are_silent(setup, tmp_path):
    import transformers as tf

    kw = dict(SCHEDULES[setup])
    model = tiny_model("llama-untied")
    if setup.endswith("dropout"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**model.config.to_dict(), "attention_dropout": 0.5}))
    guard = UpdateAuditGuard(every=3)  # max_steps not a multiple of every
    train(model, tmp_path, guard, **kw)
    assert guard.findings == [] and guard.report() == []


# -- requires_grad changed mid-run ----------------------------------------------------------------------------------
class SetRequiresGrad(TrainerCallback):
    """A schedule: at step ``at``, set ``requires_grad`` of the input embedding (gradual (un)freezing)."""

    def __init__(self, at, value):
        self.at, self.value = at, value

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            model.model.embed_tokens.weight.requires_grad_(self.value)


def test_gradual_unfreezing_with_the_weights_in_the_optimizer_is_silent(tmp_path):
    model = tiny_model("llama-untied")
    model.model.embed_tokens.weight.requires_grad_(False)
    w0 = model.model.embed_tokens.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen params get no .grad: skipped until un-frozen
    guard = UpdateAuditGuard(every=4)
    train(model, tmp_path, guard, optimizers=(opt, None), callbacks=[SetRequiresGrad(2, True)], max_steps=6)
    assert not torch.equal(w0, model.model.embed_tokens.weight)  # it trained from step 3 on, as scheduled
    assert guard.findings == []  # before the fix: "frozen but changed ... something un-froze it"


def test_unfreezing_what_the_trainers_optimizer_does_not_hold_is_reported(tmp_path):
    """The Trainer builds its optimizer from the parameters trainable at the start: un-freezing later trains
    nothing, silently (before the fix the guard said nothing either)."""
    model = tiny_model("llama-untied")
    model.model.embed_tokens.weight.requires_grad_(False)
    w0 = model.model.embed_tokens.weight.detach().clone()
    train(model, tmp_path, callbacks=[SetRequiresGrad(2, True)], max_steps=6)
    assert torch.equal(w0, model.model.embed_tokens.weight)  # silent: un-frozen, never trained

    model = tiny_model("llama-untied")
    model.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(UpdateAuditError, match=r"optimizer step 3: .*\n  - trainable but unchanged: 1 tensor "
                       r"\(4,096 values\) in model\.embed_tokens - not in any optimizer group; .*add the tensors to "
                       r"a param group"):
        train(model, tmp_path, UpdateAuditGuard(), callbacks=[SetRequiresGrad(2, True)], max_steps=6)


@pytest.mark.parametrize("every", [1, 4])
def test_freezing_mid_run_is_silent(every, tmp_path):
    guard = UpdateAuditGuard(every=every)  # before the fix: "no gradient reached it ... or freeze it" (it was)
    train(tiny_model("llama-untied"), tmp_path, guard, callbacks=[SetRequiresGrad(2, False)], max_steps=6)
    assert guard.findings == []


def test_a_parameter_frozen_mid_run_then_drifting_is_still_reported(tmp_path):
    model = tiny_model("llama-untied")

    class FreezeThenDrift(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            w = model.model.embed_tokens.weight
            if state.global_step == 2:
                w.requires_grad_(False)
            if state.global_step >= 3:
                with torch.no_grad():
                    w.mul_(0.99)

    with pytest.raises(UpdateAuditError, match=r"frozen but changed: 1 tensor \(4,096 values\) in model\.embed_tokens"
                       r" - frozen and without gradient or weight decay in optimizer group 0: modified outside "
                       r"the optimizer"):  # it stays in the Trainer's group: before the fix "group 0 ... updated it"
        train(model, tmp_path, UpdateAuditGuard(every=1), callbacks=[FreezeThenDrift()], max_steps=6)


# -- drift on purpose: an EMA copy kept in the model -------------------------------------------------------------------
class EMA(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        with torch.no_grad():
            for e, p in zip(model.ema.parameters(), model.model.parameters()):
                e.mul_(0.9).add_(p.detach(), alpha=0.1)


def with_ema():
    model = tiny_model("llama-untied")
    model.ema = copy.deepcopy(model.model).requires_grad_(False)
    return model


def test_ema_copy_is_reported_as_drift_with_the_way_to_leave_it_out(tmp_path):
    with pytest.raises(UpdateAuditError) as e:
        train(with_ema(), tmp_path, UpdateAuditGuard(every=2), callbacks=[EMA()])
    msg = str(e.value)
    assert "frozen but changed: 20 tensors" in msg and "in ema.embed_tokens" in msg
    assert "modified outside the optimizer (an in-place op in forward, a hook or a callback)" in msg
    assert "an EMA of the weights kept in the model): leave it out with UpdateAuditGuard(ignore=[...])" in msg
    guard = UpdateAuditGuard(every=2, ignore=["ema.*"])
    train(with_ema(), tmp_path, guard, callbacks=[EMA()])
    assert guard.findings == []


def test_branch_used_by_some_batches_only_names_min_grad_steps_and_ignore():
    """A head only some batches use gets no gradient on the steps that skip it: the verdict says how to wait."""
    trunk, aux = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    params = {"trunk.weight": trunk.weight, "trunk.bias": trunk.bias, "aux.weight": aux.weight, "aux.bias": aux.bias}
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    run = UpdateAudit(params, every=100)
    run.baseline()
    found = []
    for step in range(3):
        x = trunk(torch.ones(2, 4))
        loss = x.sum() + (aux(x).sum() if step == 2 else 0)  # the aux task's batches come rarely
        loss.backward()
        opt.step()
        found += run.step(opt)
        opt.zero_grad()
    assert [(f.name, f.cause) for f in found] == [("aux.bias", "grad_none"), ("aux.weight", "grad_none")]
    assert "raise min_grad_steps or leave it out with UpdateAuditGuard(ignore=[...])" in found[0].detail
