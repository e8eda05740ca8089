"""EmbeddingLRGuard and the adapter-size preflight (issue 5; field reports R3, R4).

Every run is a real Trainer on a tiny model (hidden 32, 2 layers), CPU, 1-4 steps.
"""

import math
import os
import warnings

import pytest
import torch
from conftest import make_args
from transformers import Trainer, TrainerCallback

from trainer_guard import AdapterSizeGuard, EmbeddingLRGuard, adapter_preflight, callbacks_from_dict
from trainer_guard.core.lr_groups import ROLE_KEY, SPLIT_FILE, embedding_parameters
from trainer_guard.errors import ConfigError, EmbeddingLRError
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

warnings.filterwarnings("ignore", category=UserWarning)


class Probe(TrainerCallback):
    """Records, at every optimizer step, each param group and the scheduler's per-group lists."""

    def __init__(self):
        self.steps = []

    def on_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        groups = [dict(role=g.get(ROLE_KEY), lr=float(g["lr"]), initial_lr=float(g["initial_lr"]),
                       wd=g["weight_decay"], params=list(g["params"])) for g in optimizer.param_groups]
        self.steps.append(dict(step=state.global_step + 1, groups=groups, base_lrs=list(lr_scheduler.base_lrs),
                               n_lambdas=len(lr_scheduler.lr_lambdas)))


def make_trainer(model, out, callbacks, n=32, **kw):
    args = make_args(out, **kw)
    return Trainer(model=model, args=args, train_dataset=tiny_dataset(n, 16), callbacks=callbacks)


def check_ratios(probe, model, factors, base_wd=(0.01, 0.0)):
    """At every recorded step: role groups at factor x their source group's LR, schedule lists consistent."""
    roles = {id(p): r for r, ps in embedding_parameters(model).items() for _, p in ps}
    assert probe.steps
    for rec in probe.steps:
        base = [g for g in rec["groups"] if g["role"] is None]
        extra = [g for g in rec["groups"] if g["role"] is not None]
        assert [g["wd"] for g in base] == list(base_wd)
        assert extra, f"step {rec['step']}: no embedding group"
        assert len(rec["base_lrs"]) == rec["n_lambdas"] == len(rec["groups"])
        for g in extra:
            src = next(b for b in base if b["wd"] == g["wd"])
            f = factors[g["role"]]
            assert math.isclose(g["lr"], f * src["lr"], rel_tol=1e-9, abs_tol=1e-15), (rec["step"], g["role"])
            assert math.isclose(g["initial_lr"], f * src["initial_lr"], rel_tol=1e-9)
            i = rec["groups"].index(g)
            assert math.isclose(rec["base_lrs"][i], f * src["initial_lr"], rel_tol=1e-9)
            for p in g["params"]:
                assert id(p) in roles  # the very parameters of the model: no copy
        for g in base:
            assert all(id(p) not in roles for p in g["params"])


# -- exact effect on an update (SGD) ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,opts,factors", [
    ("llama-untied", dict(embed_ratio=0.1, head_ratio=0.5), {"embeddings": 0.1, "lm_head": 0.5}),
    ("llama-tied", dict(ratio=0.1), {"tied": 0.1}),
    ("plain-gpt", dict(lr=1e-3), {"tied": 0.1}),  # absolute LR: 1e-3 / 1e-2
])
@pytest.mark.slow
def test_sgd_update_of_embedding_rows_is_ratio_times_unguarded(tmp_path, kind, opts, factors):
    """R4 advice "~1/10 of the LR": with SGD one step moves embedding/head rows by exactly ratio x (float64, so
    that the delta is not drowned by rounding of the weights)."""
    deltas = {}
    for guarded in (False, True):
        model = tiny_model(kind).double()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cbs = [EmbeddingLRGuard(**opts)] if guarded else []
        make_trainer(model, tmp_path / str(guarded), cbs, optim="sgd", max_steps=1, save_strategy="no",
                     lr_scheduler_type="constant").train()
        deltas[guarded] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    roles = {n: r for r, ps in embedding_parameters(tiny_model(kind)).items() for n, _ in ps}
    if "tied" in factors:
        roles = {n: "tied" for n in roles}
    assert roles
    for n, d in deltas[True].items():
        expected = deltas[False][n] * factors.get(roles.get(n), 1.0)
        assert torch.allclose(d, expected, rtol=1e-9, atol=1e-15), n
        if n in roles:
            assert d.abs().max() > 0 and not torch.allclose(d, deltas[False][n])  # unguarded: full LR


# -- schedule, optimizers, resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("optim,sched", [("adamw_torch", "linear"), ("adamw_torch_fused", "cosine"),
                                         ("sgd", "linear"), ("adafactor", "cosine")])
@pytest.mark.slow
def test_ratio_every_step_and_resume_keeps_moments(tmp_path, optim, sched):
    """Decaying schedule with warmup; resume from checkpoint-2 continues bit-for-bit like the uninterrupted run."""
    kw = dict(optim=optim, lr_scheduler_type=sched, warmup_steps=1, weight_decay=0.01, max_steps=4, save_steps=2)
    full, probe = tiny_model("llama-untied"), Probe()
    make_trainer(full, tmp_path / "full", [EmbeddingLRGuard(ratio=0.1), probe], **kw).train()
    factors = {"embeddings": 0.1, "lm_head": 0.1}
    check_ratios(probe, full, factors)
    assert [r["groups"][2]["lr"] for r in probe.steps][1] > [r["groups"][2]["lr"] for r in probe.steps][3] > 0

    ckpt = tmp_path / "full" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in saved["param_groups"]] == [16, 5]  # the Trainer's own layout
    assert os.path.isfile(ckpt / SPLIT_FILE)

    resumed, probe2 = tiny_model("llama-untied", seed=1), Probe()
    t = make_trainer(resumed, tmp_path / "full", [EmbeddingLRGuard(ratio=0.1), probe2], **kw)
    t.train(resume_from_checkpoint=str(ckpt))
    assert [r["step"] for r in probe2.steps] == [3, 4]
    check_ratios(probe2, resumed, factors)
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n  # moments and step counts survived the round trip
    assert len(t.optimizer.param_groups) == 2 and len(t.lr_scheduler.base_lrs) == 2  # merged after train()


class NaiveSplit(EmbeddingLRGuard):
    """What a split without layout care does: saves the extra groups into optimizer.pt."""

    def on_step_end(self, *a, **k):
        pass

    def on_save(self, *a, **k):
        pass


@pytest.mark.slow
def test_naive_split_breaks_resume_and_late_save_is_rewritten(tmp_path):
    """Without the merge/rewrite the resume dies in the Trainer's optimizer load, before any callback runs."""
    kw = dict(max_steps=3, save_steps=2)
    make_trainer(tiny_model("llama-untied"), tmp_path / "naive", [NaiveSplit(ratio=0.1)], **kw).train()
    with pytest.raises(ValueError, match="loaded state dict has a different number of parameter groups"):
        make_trainer(tiny_model("llama-untied"), tmp_path / "naive", [NaiveSplit(ratio=0.1)], **kw).train(
            resume_from_checkpoint=str(tmp_path / "naive" / "checkpoint-2"))

    class LateSave(TrainerCallback):  # decides to save after the guard's on_step_end, like save_strategy="best"
        def on_step_end(self, args, state, control, **k):
            control.should_save = state.global_step == 2

    probe = Probe()
    make_trainer(tiny_model("llama-untied"), tmp_path / "late", [EmbeddingLRGuard(ratio=0.1), LateSave()],
                 save_strategy="no", **kw).train()
    saved = torch.load(tmp_path / "late" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in saved["param_groups"]] == [16, 5]
    assert len(saved["state"]) == 21
    m = tiny_model("llama-untied")
    make_trainer(m, tmp_path / "late", [EmbeddingLRGuard(ratio=0.1), probe], save_strategy="no", **kw).train(
        resume_from_checkpoint=str(tmp_path / "late" / "checkpoint-2"))
    check_ratios(probe, m, {"embeddings": 0.1, "lm_head": 0.1}, base_wd=(0.0, 0.0))


# -- PEFT ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_kw,expect", [
    (dict(modules_to_save=["embed_tokens", "lm_head"]),
     {"embeddings": ["base_model.model.model.embed_tokens.modules_to_save.default.weight"],
      "lm_head": ["base_model.model.lm_head.modules_to_save.default.weight"]}),
    (dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
     {"embeddings": ["base_model.model.model.embed_tokens.lora_embedding_A.default",
                     "base_model.model.model.embed_tokens.lora_embedding_B.default"],
      "lm_head": ["base_model.model.lm_head.lora_A.default.weight", "base_model.model.lm_head.lora_B.default.weight"]}),
])
@pytest.mark.slow
def test_peft_adapter_embeddings_found_by_identity_and_resume(tmp_path, lora_kw, expect):
    model = tiny_lora(tiny_model("llama-untied"), **lora_kw)
    guard, probe = EmbeddingLRGuard(ratio=0.1), Probe()
    make_trainer(model, tmp_path, [guard, probe], max_steps=3, save_steps=2, lr_scheduler_type="linear").train()
    found = {g["role"]: g["names"] for g in guard.record["groups"]}
    assert found == expect
    check_ratios(probe, model, {"embeddings": 0.1, "lm_head": 0.1}, base_wd=(0.0, 0.0))
    model2, probe2 = tiny_lora(tiny_model("llama-untied"), **lora_kw), Probe()
    make_trainer(model2, tmp_path, [EmbeddingLRGuard(ratio=0.1), probe2], max_steps=3, save_steps=2,
                 lr_scheduler_type="linear").train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [r["step"] for r in probe2.steps] == [3]
    check_ratios(probe2, model2, {"embeddings": 0.1, "lm_head": 0.1}, base_wd=(0.0, 0.0))


def test_tied_trainable_tokens_are_one_group(tmp_path):
    model = tiny_lora(tiny_model("llama-tied"), trainable_token_indices=[1, 2, 3])
    guard = EmbeddingLRGuard(ratio=0.2)
    make_trainer(model, tmp_path, [guard], max_steps=1, save_strategy="no").train()
    assert [(g["role"], len(g["names"])) for g in guard.record["groups"]] == [("tied", 1)]


# -- errors, options, logging ---------------------------------------------------------------------------------------
def test_two_lrs_for_a_tied_pair_is_an_error(tmp_path):
    with pytest.raises(EmbeddingLRError) as e:
        make_trainer(tiny_model("llama-tied"), tmp_path, [EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5)])
    assert str(e.value) == (
        "EmbeddingLRGuard options conflict with the model:\n  - model.embed_tokens.weight = lm_head.weight is one "
        "tied parameter (input embedding and output head share it), so it can have only one learning rate, but the "
        "embeddings were asked for embed_ratio=0.1 and the lm_head for head_ratio=0.5; give both the same value (or "
        "use `ratio=`/`lr=` alone)")
    make_trainer(tiny_model("llama-untied"), tmp_path, [EmbeddingLRGuard(embed_ratio=0.1, head_ratio=0.5)])
    make_trainer(tiny_model("llama-tied"), tmp_path, [EmbeddingLRGuard(embed_ratio=0.1, head_lr=1e-3)])  # 1e-3/1e-2


def test_option_errors_list_every_problem():
    with pytest.raises(ConfigError) as e:
        callbacks_from_dict({"embedding_lr": {"ratio": 0.1, "lr": 1e-4, "head_ratio": 0, "when_absent": "stop"}})
    assert str(e.value) == (
        "Invalid trainer_guard config:\n"
        "  - embedding_lr.when_absent: got 'stop'; expected one of 'warn', 'ignore', 'raise'\n"
        "  - embedding_lr.head_ratio: got 0; must be a finite number > 0 (ratios are fractions of the Trainer's LR, e.g. "
        "0.1)\n"
        "  - embedding_lr.ratio/lr: both given (0.1, 0.0001); give one of them")
    with pytest.raises(ConfigError) as e:
        EmbeddingLRGuard(ratio=0.1, lr=1e-4, head_ratio=0)
    assert str(e.value) == (
        "Invalid options:\n"
        "  - EmbeddingLRGuard.head_ratio: got 0; must be a finite number > 0 (ratios are fractions of the Trainer's LR, e.g. "
        "0.1)\n"
        "  - EmbeddingLRGuard.ratio/lr: both given (0.1, 0.0001); give one of them")
    assert [type(c).__name__ for c in callbacks_from_dict({"embedding_lr": {"ratio": 0.1}, "adapter_size": True})] \
        == ["AdapterSizeGuard", "EmbeddingLRGuard"]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.1])
def test_infinite_or_nan_ratio_is_refused(value):
    with pytest.raises(ConfigError, match="embedding_lr.ratio: got .*; must be a finite number > 0"):
        callbacks_from_dict({"embedding_lr": {"ratio": value}})

def test_nothing_trainable_warns_or_raises(tmp_path):
    """R3: after a reload the embeddings silently stopped training; when_absent='raise' stops the run."""
    guard = EmbeddingLRGuard()
    make_trainer(tiny_lora(tiny_model("llama-untied")), tmp_path, [guard], max_steps=1, save_strategy="no").train()
    assert "no embedding or output-head parameter is being trained" in guard.report()[0]
    with pytest.raises(EmbeddingLRError, match="no embedding or output-head parameter is being trained"):
        make_trainer(tiny_lora(tiny_model("llama-untied")), tmp_path, [EmbeddingLRGuard(when_absent="raise")],
                     max_steps=1, save_strategy="no").train()


def test_logs_each_groups_lr(tmp_path):
    t = make_trainer(tiny_model("llama-tied"), tmp_path, [EmbeddingLRGuard(ratio=0.25)], max_steps=3,
                     save_strategy="no", lr_scheduler_type="linear", warmup_steps=1)
    t.train()
    logs = [h for h in t.state.log_history if "learning_rate" in h]
    assert len(logs) == 3 and logs[1]["learning_rate"] > 0
    for h in logs:
        assert h["learning_rate/tied"] == pytest.approx(0.25 * h["learning_rate"], rel=1e-9, abs=1e-15)


# -- adapter-size preflight -----------------------------------------------------------------------------------------
def test_preflight_reproduces_report_r3_numbers_on_meta():
    """R3: rank-32 LoRA on all linears + embed_tokens/lm_head on Llama-3.1-8B: 1,134,559,232 trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(
            r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            modules_to_save=["embed_tokens", "lm_head"]))
    r = adapter_preflight(model, "adamw_torch")
    per_layer_lora = 2_621_440
    assert r.extra_trainable == 2 * 128_256 * 4_096 == 1_050_673_152
    assert r.total_trainable - r.extra_trainable == 2 * per_layer_lora  # x 32 layers = R3's 83,886,080
    assert r.extra_trainable + 32 * per_layer_lora == 1_134_559_232
    assert r.extra_adapter_bytes == 2 * 1_050_673_152 and r.extra_grad_bytes == 2 * 1_050_673_152
    assert r.extra_optimizer_bytes == 4 * 1_050_673_152  # two bf16 moments
    assert "+1,050,673,152 trainable parameters" in r.message() and "+3.9 GiB optimizer state" in r.message()


def test_preflight_guard_tiny(tmp_path):
    model = tiny_lora(tiny_model("llama-untied"), target_modules=["q_proj", "embed_tokens", "lm_head"])
    r = adapter_preflight(model, "adamw_torch")
    assert [(c.role, c.how, c.trainable) for c in r.items] == [
        ("embeddings", "target_modules (LoRA)", 4 * 128 + 32 * 4),
        ("lm_head", "target_modules (LoRA)", 4 * 32 + 128 * 4)]
    assert r.extra_adapter_bytes == 4 * (640 + 640 + 2 * 128 * 32)  # LoRA also saves the base embedding layers
    guard = AdapterSizeGuard()
    make_trainer(tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"]), tmp_path,
                 [guard], max_steps=1, save_strategy="no", optim="adafactor").train()
    assert guard.last_report.extra_trainable == 2 * 128 * 32
    assert guard.last_report.extra_optimizer_bytes == 2 * (128 + 32) * 4
    assert guard.report()[0].startswith("the embeddings / output head are trained inside the adapter: +8,192 ")
    assert adapter_preflight(tiny_lora(tiny_model("llama-tied"), trainable_token_indices=[1, 2])) is None
    assert adapter_preflight(tiny_model("llama-untied")) is None  # a full fine-tune has no adapter


# -- with Trainer subclasses and with every other guard ---------------------------------------------------------------
class ThreeGroupTrainer(Trainer):
    """A subclass with its own groups: norms at 2x the LR in a third group."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            norm = [p for n, p in named if "norm" in n]
            rest = [p for n, p in named if "norm" not in n]
            lr = self.args.learning_rate
            self.optimizer = torch.optim.AdamW([{"params": rest, "weight_decay": 0.01},
                                                {"params": norm, "weight_decay": 0.0, "lr": 2 * lr}], lr=lr)
        return self.optimizer


def test_trainer_subclass_with_own_groups_and_resume(tmp_path):
    def run(resume=None, ratio=0.1):
        model, probe, guard = tiny_model("llama-untied"), Probe(), EmbeddingLRGuard(ratio=ratio)
        args = make_args(tmp_path, max_steps=3, save_steps=2, lr_scheduler_type="linear")
        t = ThreeGroupTrainer(model=model, args=args, train_dataset=tiny_dataset(32, 16), callbacks=[guard, probe])
        t.train(resume_from_checkpoint=resume)
        return model, probe, guard

    model, probe, _ = run()
    check_ratios(probe, model, {"embeddings": 0.1, "lm_head": 0.1}, base_wd=(0.01, 0.0))
    assert probe.steps[0]["groups"][1]["initial_lr"] == 2e-2  # the subclass's own group untouched
    model, probe, guard = run(str(tmp_path / "checkpoint-2"), ratio=0.2)  # resumed with another ratio: said so
    check_ratios(probe, model, {"embeddings": 0.2, "lm_head": 0.2}, base_wd=(0.01, 0.0))
    assert "embeddings: resumed run uses 0.2 x the LR, the checkpoint was trained with 0.1 x" in guard.report()


@pytest.mark.slow
def test_epoch_saves_with_gradient_accumulation_resume_exactly(tmp_path):
    kw = dict(max_steps=-1, num_train_epochs=2, save_strategy="epoch", gradient_accumulation_steps=2,
              lr_scheduler_type="linear", weight_decay=0.01)
    full, probe = tiny_model("llama-untied"), Probe()
    make_trainer(full, tmp_path, [EmbeddingLRGuard(), probe], n=16, **kw).train()
    assert [r["step"] for r in probe.steps] == [1, 2, 3, 4]
    check_ratios(probe, full, {"embeddings": 0.1, "lm_head": 0.1})
    resumed, probe = tiny_model("llama-untied", seed=1), Probe()
    make_trainer(resumed, tmp_path, [EmbeddingLRGuard(), probe], n=16, **kw).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [r["step"] for r in probe.steps] == [3, 4]
    check_ratios(probe, resumed, {"embeddings": 0.1, "lm_head": 0.1})
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_default_config_all_guards_wired_peft_resume(tmp_path):
    """Every guard of configs/default.yaml together (embedding_lr, opt-in there, switched on), wired, PEFT
    modules_to_save (R3's setup): save and resume."""
    import trainer_guard

    def run(resume=None):
        model, probe = tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"]), Probe()
        cbs = trainer_guard.callbacks_from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                             "default.yaml"), embedding_lr={"enabled": True})
        t = trainer_guard.guard(make_trainer(model, tmp_path, cbs + [probe], max_steps=3, save_steps=2,
                                             lr_scheduler_type="linear"))
        t.train(resume_from_checkpoint=resume)
        return model, probe

    run()
    model, probe = run(str(tmp_path / "checkpoint-2"))
    assert [r["step"] for r in probe.steps] == [3]
    check_ratios(probe, model, {"embeddings": 0.1, "lm_head": 0.1}, base_wd=(0.0, 0.0))


def test_preflight_of_an_adapter_not_named_default(tmp_path):
    """get_peft_model(..., adapter_name="sft"): AdapterSizeGuard (on by default) crashed the run at train begin with
    a bare KeyError: 'default' (PEFT's state dict was asked for the adapter "default")."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama-untied"), LoraConfig(r=4, target_modules=["q_proj"],
                                                                  modules_to_save=["embed_tokens", "lm_head"]),
                           adapter_name="sft")
    guard = AdapterSizeGuard()
    make_trainer(model, tmp_path, [guard], max_steps=1, save_strategy="no").train()
    r = guard.last_report
    assert r.extra_trainable == 2 * 128 * 32 and r.extra_adapter_bytes == 4 * 2 * 128 * 32
    assert r.adapter_bytes == r.extra_adapter_bytes + 4 * 2 * (4 * 32 + 32 * 4)  # + LoRA on q_proj in 2 layers


@pytest.mark.slow
def test_adafactor_with_relative_step_is_refused(tmp_path):
    """Adafactor(relative_step=True) (the transformers docs' recipe with AdafactorSchedule) ignores every group's lr:
    the guard used to log "at 0.1 x the Trainer's LR" while the embeddings trained exactly as before."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    model = tiny_model("llama-untied")
    opt = Adafactor(model.parameters(), scale_parameter=True, relative_step=True, warmup_init=True, lr=None)
    t = Trainer(model=model, args=make_args(tmp_path, max_steps=1, save_strategy="no"),
                train_dataset=tiny_dataset(8, 16), callbacks=[EmbeddingLRGuard()],
                optimizers=(opt, AdafactorSchedule(opt)))
    with pytest.raises(EmbeddingLRError, match=r"optimizer group 0 \(Adafactor with relative_step=True\) computes its "
                                               r"own step size and ignores the group's lr"):
        t.train()
    assert len(opt.param_groups) == 1  # nothing was changed
    make_trainer(tiny_model("llama-untied"), tmp_path, [EmbeddingLRGuard()], max_steps=1, save_strategy="no",
                 optim="adafactor").train()  # the Trainer's Adafactor honours lr: accepted


@pytest.mark.slow
def test_run_stopped_mid_step_resumes_on_the_same_trainer(tmp_path):
    """A KeyboardInterrupt (or any error) in a forward pass fires no event. The groups used to stay split from
    on_step_begin on, and the Trainer's next train(resume_from_checkpoint=True), which reuses the optimizer, died in
    its optimizer load ("loaded state dict has a different number of parameter groups"). Without the guard it works."""
    model, probe = tiny_model("llama-untied"), Probe()
    calls = []

    def interrupt(module, inputs):
        calls.append(1)
        if len(calls) == 3:  # the third forward: after checkpoint-2 was written
            raise KeyboardInterrupt("stopped by the user")

    handle = model.register_forward_pre_hook(interrupt)
    t = make_trainer(model, tmp_path, [EmbeddingLRGuard(ratio=0.1), probe], max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert len(t.optimizer.param_groups) == 2  # the Trainer's own layout, although the run stopped mid-step
    handle.remove()
    probe.steps.clear()
    t.train(resume_from_checkpoint=True)
    assert [r["step"] for r in probe.steps] == [3, 4]
    check_ratios(probe, model, {"embeddings": 0.1, "lm_head": 0.1}, base_wd=(0.0, 0.0))


@pytest.mark.slow
def test_reused_checkpoint_dir_drops_an_earlier_runs_record(tmp_path):
    """A run with no split saving into the checkpoint dir of an earlier split run must not leave that run's
    record there (a resume would warn that the LR ratio changed)."""
    make_trainer(tiny_model("llama-untied"), tmp_path, [EmbeddingLRGuard(embed_ratio=0.1)], max_steps=2).train()
    assert os.path.isfile(tmp_path / "checkpoint-2" / SPLIT_FILE)
    make_trainer(tiny_lora(tiny_model("llama-untied")), tmp_path, [EmbeddingLRGuard()], max_steps=2).train()
    assert not os.path.exists(tmp_path / "checkpoint-2" / SPLIT_FILE)


def test_a_split_record_that_cannot_be_written_is_a_guard_error_naming_the_file(tmp_path, monkeypatch):
    """A full disk writing trainer_guard_embedding_lr.json is agreed on (every rank stops alike) and named."""
    import errno

    import trainer_guard.callbacks.embedding_lr as mod

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    monkeypatch.setattr(mod, "atomic_write_json", full)
    trainer = make_trainer(tiny_model("llama-untied"), tmp_path, [EmbeddingLRGuard()], max_steps=2, save_steps=2)
    with pytest.raises(EmbeddingLRError, match=rf"(?s)checkpoint-2 \(optimizer/scheduler state, {SPLIT_FILE}\) could "
                                               r"not be written; free disk space.*No space left on device"):
        trainer.train()
