"""DtypeGuard and core.dtype (field report R2: an fp32 head on a bf16 model -> "mat1 and mat2 must have the same
dtype")."""

import pytest
import torch
from torch import nn

from conftest import make_args
from trainer_guard import DtypeGuard, DtypeMismatchError, callbacks_from_dict
from trainer_guard.core.dtype import cast_mismatches, find_dtype_mismatches, is_quantized
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model


def bf16_model_with_fp32_head():
    """R2: a bf16 model whose output head was replaced by a fresh (float32) nn.Linear."""
    model = tiny_model("llama-untied").to(torch.bfloat16)
    model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    return model


def make_trainer(tmp_path, model, callbacks=(), **kw):
    from transformers import Trainer

    ds = tiny_dataset(8, 8, model.config.vocab_size)
    return Trainer(model=model, args=make_args(tmp_path, max_steps=2, save_strategy="no", **kw), train_dataset=ds,
                   callbacks=list(callbacks))


def test_without_guard_training_fails_with_dtype_error(tmp_path):
    trainer = make_trainer(tmp_path, bf16_model_with_fp32_head())
    with pytest.raises(RuntimeError, match="dtype"):
        trainer.train()


def test_fix_mode_casts_head_and_training_runs(tmp_path):
    model = bf16_model_with_fp32_head()
    guard = DtypeGuard()
    trainer = make_trainer(tmp_path, model, [guard])
    assert model.lm_head.weight.dtype == torch.bfloat16  # cast at on_init_end, before the optimizer exists
    head = model.lm_head.weight
    trainer.train()
    assert trainer.state.global_step == 2
    assert model.lm_head.weight is head and head.dtype == torch.bfloat16
    assert guard.report() == ["cast lm_head.weight (Linear, torch.float32, 4,096 elements) to torch.bfloat16 "
                              "(found at init)"]


def test_fix_at_train_begin_keeps_optimizer_references(tmp_path):
    model = tiny_model("llama-untied").to(torch.bfloat16)
    guard = DtypeGuard()
    trainer = make_trainer(tmp_path, model, [guard])
    model.lm_head = nn.Linear(32, 128, bias=False)  # replaced after the Trainer was built
    trainer.train()
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert any("found at train begin" in e for e in guard.report())
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(model.lm_head.weight) in opt_params


def test_raise_mode_names_parameters_and_changes_nothing(tmp_path):
    model = bf16_model_with_fp32_head()
    with pytest.raises(DtypeMismatchError) as e:
        make_trainer(tmp_path, model, [DtypeGuard(mode="raise")])
    assert str(e.value) == (
        "LlamaForCausalLM: the model's dominant dtype is torch.bfloat16 but 1 parameter(s) differ (found at init):\n"
        "  - lm_head.weight (Linear, torch.float32, 4,096 elements)\n"
        "Create the new module with dtype=torch.bfloat16 (or call .to(torch.bfloat16) on it), use "
        "DtypeGuard(mode='fix') to cast automatically, or list modules that must stay in their dtype in keep_fp32."
    )
    assert model.lm_head.weight.dtype == torch.float32


def test_warn_mode_only_reports(tmp_path):
    model = bf16_model_with_fp32_head()
    guard = DtypeGuard(mode="warn")
    make_trainer(tmp_path, model, [guard])
    assert model.lm_head.weight.dtype == torch.float32
    assert "lm_head.weight (Linear, torch.float32, 4,096 elements)" in guard.report()[0]


def test_keep_fp32_patterns_and_model_fp32_modules():
    model = tiny_model("llama-untied").to(torch.bfloat16)
    model.model.norm.float()
    report = find_dtype_mismatches(model)
    assert [i.name for i in report.mismatched] == ["model.norm.weight"]
    report = find_dtype_mismatches(model, keep_fp32=["*norm"])
    assert report.mismatched == [] and report.kept[0].reason == "keep_fp32 pattern '*norm'"
    model._keep_in_fp32_modules = {"norm"}
    report = find_dtype_mismatches(model)
    assert report.mismatched == [] and "_keep_in_fp32_modules" in report.kept[0].reason


def test_peft_fp32_adapters_are_intentional():
    model = tiny_lora(tiny_model("llama-untied").to(torch.bfloat16))
    report = find_dtype_mismatches(model)
    assert report.dominant == torch.bfloat16
    assert report.mismatched == []
    assert len(report.kept) == 8 and all(i.reason == "PEFT adapter weight" for i in report.kept)
    assert find_dtype_mismatches(model, allow_peft_adapters=False).mismatched  # they are fp32 indeed


class FakeLinear4bit(nn.Module):
    """Stands in for a bitsandbytes layer: recognised by its module's package, whatever its name."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.float16), requires_grad=False)


FakeLinear4bit.__module__ = "bitsandbytes.nn.modules"


def test_quantised_weights_never_touched():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).to(torch.bfloat16)
    model.add_module("q8", nn.Module())
    model.q8.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    model.add_module("nf4", FakeLinear4bit())
    assert is_quantized(model.q8, model.q8.weight) and is_quantized(model.nf4, model.nf4.weight)
    report = find_dtype_mismatches(model)
    assert report.dominant == torch.bfloat16 and report.mismatched == [] and report.quantized == 2
    assert cast_mismatches(model, report) == []
    assert model.nf4.weight.dtype == torch.float16 and model.q8.weight.dtype == torch.int8


def test_tied_parameters_cast_once_and_stay_tied():
    model = tiny_model("plain-gpt").to(torch.bfloat16)
    model.tok_emb.float()  # also the head's weight: one tensor
    report = find_dtype_mismatches(model)
    assert [i.name for i in report.mismatched] == ["tok_emb.weight"]
    cast_mismatches(model, report)
    assert model.out_head.weight is model.tok_emb.weight and model.tok_emb.weight.dtype == torch.bfloat16


def test_config_options_validated():
    assert type(callbacks_from_dict({"dtype": {"mode": "warn", "keep_fp32": ["*norm*"]}})[0]) is DtypeGuard
    with pytest.raises(Exception) as e:
        DtypeGuard(mode="cast")
    assert "DtypeGuard.mode: got 'cast'; expected one of 'fix', 'raise', 'warn'" in str(e.value)


def test_cast_also_casts_grads_and_existing_optimizer_state():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch.bfloat16)
    model[1] = nn.Linear(8, 2)
    opt = torch.optim.AdamW(model.parameters())
    head = model[1].weight
    head.grad = torch.ones_like(head)
    opt.state[head] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(head),
                       "exp_avg_sq": torch.zeros_like(head)}
    cast_mismatches(model, find_dtype_mismatches(model), opt)
    assert model[1].weight is head and head.dtype == head.grad.dtype == torch.bfloat16
    assert opt.state[head]["exp_avg"].dtype == opt.state[head]["exp_avg_sq"].dtype == torch.bfloat16
    assert opt.state[head]["step"].dtype == torch.float32  # scalar step count untouched
