"""ResumeGuard and trainer_guard.guard(): field report R3 (trainable modules silently lost when training continues).

Each case of issue 4 is reproduced on a tiny Llama (tied and untied) with LoRA on CPU: first without the guard
(raw ValueError / RuntimeError, or silent loss of trainable modules), then with it.
"""

import os
import warnings

import pytest
import torch
from conftest import make_args
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

import trainer_guard
from trainer_guard import ResumeGuard, ResumeMismatchError, guard
from trainer_guard.core.trainable import (TRAINABLE_FILE, compare_records, count_table, describe_changes,
                                          layout_problems, param_kind, trainable_record)
from trainer_guard.core.trainable import adapted_module as module_of
from trainer_guard.errors import ConfigError, UsageError
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
warnings.filterwarnings("ignore", category=FutureWarning)

MTS = ["embed_tokens", "lm_head"]
KINDS = ["llama-tied", "llama-untied"]


class Steps(TrainerCallback):
    """Counts optimizer steps that began in this run."""

    def __init__(self):
        self.steps = 0

    def on_step_begin(self, args, state, control, **kw):
        self.steps += 1


def ds():
    return tiny_dataset(8, 16, 128)


def first_run(tmp_path, kind, **lora):
    """Train LoRA + full embed_tokens/lm_head copies (R3's first run) for 2 steps; return checkpoint-2."""
    model = tiny_lora(tiny_model(kind), modules_to_save=MTS, **lora)
    Trainer(model=model, args=make_args(tmp_path / "out", max_steps=2), train_dataset=ds(),
            callbacks=[ResumeGuard()]).train()
    return tmp_path / "out" / "checkpoint-2"


def second_trainer(tmp_path, model, *callbacks, cls=Trainer, **kw):
    steps = Steps()
    trainer = cls(model=model, args=make_args(tmp_path / "out", **{"max_steps": 4, **kw}), train_dataset=ds(),
                  callbacks=[*callbacks, steps])
    return trainer, steps


# -- core ------------------------------------------------------------------------------------------------------
def test_kinds_and_modules_of_peft_names():
    assert param_kind("model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora_A"
    assert param_kind("base_model.model.lm_head.modules_to_save.default.weight") == "modules_to_save"
    assert param_kind("model.embed_tokens.token_adapter.trainable_tokens_delta.default") == "trainable_tokens"
    assert param_kind("model.layers.0.mlp.up_proj.weight") == "full"
    assert module_of("base_model.model.model.embed_tokens.modules_to_save.default.weight") == "model.embed_tokens"
    assert module_of("base_model.model.model.layers.1.self_attn.v_proj.base_layer.weight") == "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("kind", KINDS)
def test_record_counts_lora_and_modules_to_save(kind):
    rec = trainable_record(tiny_lora(tiny_model(kind), modules_to_save=MTS))
    assert rec["by_kind"] == {"lora_A": 512, "lora_B": 384, "modules_to_save": 8192}
    assert rec["by_module"]["lm_head"] == {"modules_to_save": 4096}
    assert rec["peft"]["default"]["modules_to_save"] == MTS and rec["peft"]["default"]["r"] == 4
    table = count_table(rec).splitlines()
    assert table[5].split() == ["modules_to_save", "lm_head", "4,096"]
    total, pct = ("31,776", "(28.60%)") if kind == "llama-tied" else ("35,872", "(25.33%)")
    assert table[-1].split() == ["total", "trainable", "9,088", "of", total, pct]


def test_describe_changes_groups_layers_and_counts():
    full = tiny_model("llama-untied")
    then = trainable_record(full)
    for p in full.model.layers[1].mlp.parameters():
        p.requires_grad_(False)
    for p in full.model.layers[0].mlp.parameters():
        p.requires_grad_(False)
    lines = describe_changes(compare_records(then, trainable_record(full)), "checkpoint-6")
    assert lines == ["model.layers.{0-1}.mlp.down_proj, model.layers.{0-1}.mlp.gate_proj, model.layers.{0-1}.mlp.up_proj: "
                     "12,288 params trainable in checkpoint-6 (full), frozen now"]


def test_layout_problems_names_missing_modules():
    names = ["a.lora_A.default.weight", "lm_head.modules_to_save.default.weight"]
    then = [{"lr": 1e-3, "weight_decay": 0.0, "params": names, "numel": 10}]
    now = [{"lr": 1e-3, "weight_decay": 0.0, "params": ["a.lora_A.default.weight"], "numel": 4}]
    assert layout_problems(then, now, "checkpoint-2") == [
        "optimizer group 0 (lr 0.001): 1 params (4) now, 2 (10) in checkpoint-2; missing now: lm_head"]


# -- records at save -------------------------------------------------------------------------------------------
def test_record_written_at_every_save(tmp_path):
    ckpt = first_run(tmp_path, "llama-untied")
    rec = trainer_guard.core.io.read_json(ckpt / TRAINABLE_FILE)
    assert rec["global_step"] == 2 and rec["trainable_params"] == 512 + 384 + 8192
    assert [len(g["params"]) for g in rec["optimizer"]] == [10, 0] and rec["optimizer"][0]["lr"] == 1e-2
    assert "lm_head.modules_to_save.default.weight" in rec["optimizer"][0]["params"]



def test_run_without_records_drops_an_earlier_runs_record(tmp_path):
    """write_record=False saving into a checkpoint dir an earlier run left: its record (a different trainable set)
    is removed, not left to fail this run's resume."""
    ckpt = first_run(tmp_path, "llama-untied")
    assert (ckpt / TRAINABLE_FILE).is_file()
    Trainer(model=tiny_lora(tiny_model("llama-untied")), args=make_args(tmp_path / "out", max_steps=2),
            train_dataset=ds(), callbacks=[ResumeGuard(write_record=False)]).train()
    assert not (ckpt / TRAINABLE_FILE).exists()

# -- case 1: resume_from_checkpoint with a changed trainable set --------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_case1_resume_with_default_lora(tmp_path, kind):
    ckpt = first_run(tmp_path, kind)
    trainer, steps = second_trainer(tmp_path, tiny_lora(tiny_model(kind)))
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):  # no guard: raw error
        trainer.train(resume_from_checkpoint=str(ckpt))

    trainer, steps = second_trainer(tmp_path, tiny_lora(tiny_model(kind)), ResumeGuard())
    with pytest.raises(ResumeMismatchError) as e:
        guard(trainer).train(resume_from_checkpoint=str(ckpt))
    msg = str(e.value)
    assert msg.startswith(f"ResumeGuard: the trainable set differs from checkpoint-2 ({ckpt}); no training step ran.")
    assert "\n  - lm_head, model.embed_tokens: 8,192 params trainable in checkpoint-2 (modules_to_save), frozen now" in msg
    assert steps.steps == 0 and trainer.optimizer is None


@pytest.mark.parametrize("kind", ["llama-tied"])
def test_unchanged_resume_passes_and_logs_table(tmp_path, kind, caplog):
    ckpt = first_run(tmp_path, kind)
    g = ResumeGuard()
    trainer, steps = second_trainer(tmp_path, tiny_lora(tiny_model(kind), modules_to_save=MTS), g)
    guard(trainer).train(resume_from_checkpoint=True)  # the Trainer resolves the path; the guard still sees it
    assert steps.steps == 2 and trainer.state.global_step == 4
    assert g.report()[0].startswith("trainable parameters at train begin:\n  kind ")
    assert "modules_to_save  lm_head" in g.report()[0] and "trainable 9,088 of " in g.report()[0]
    assert (tmp_path / "out" / "checkpoint-4" / TRAINABLE_FILE).is_file()


def test_adapter_source_detected_from_model_path(tmp_path):
    adapter = _saved_adapter(tmp_path, "llama-untied")
    model = tiny_lora(tiny_model("llama-untied"))
    model.get_base_model().name_or_path = str(adapter)  # as when the model was loaded from that directory
    trainer, steps = second_trainer(tmp_path, model, ResumeGuard())
    with pytest.raises(ResumeMismatchError, match="differs from adapter"):
        guard(trainer).train()
    assert steps.steps == 0


@pytest.mark.slow
def test_case1_checkpoint_saved_without_guard(tmp_path):
    """No trainer_guard record: the checkpoint's adapter_config.json and optimizer.pt group sizes are the reference."""
    Trainer(model=tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS), args=make_args(tmp_path / "out", max_steps=2),
            train_dataset=ds()).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    trainer, steps = second_trainer(tmp_path, tiny_lora(tiny_model("llama-untied")), ResumeGuard())
    with pytest.raises(ResumeMismatchError, match="lm_head, model.embed_tokens: 8,192 params trainable in checkpoint-2 "
                                                  r"\(modules_to_save\), frozen now"):
        guard(trainer).train(resume_from_checkpoint=str(ckpt))

    Trainer(model=_full_run(tmp_path, []), args=make_args(tmp_path / "full", max_steps=2), train_dataset=ds()).train()
    trainer = guard(Trainer(model=_full_run(tmp_path, [0]), args=make_args(tmp_path / "full", max_steps=4),
                            train_dataset=ds(), callbacks=[ResumeGuard()]))
    with pytest.raises(ResumeMismatchError, match=r"set requires_grad as in the saved run[^\n]*\n  - optimizer groups hold \[9, 3\] params now, \[16, 5\] in "
                                                  r"checkpoint-2/optimizer.pt"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))


def test_all_default_guards_together(tmp_path):
    """Every guard of configs/default.yaml, wired: an unchanged resume passes, R3's resume stops with our error."""
    def cbs():
        return trainer_guard.callbacks_from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", "default.yaml"))

    Trainer(model=tiny_lora(tiny_model("llama-tied"), modules_to_save=MTS), args=make_args(tmp_path / "out", max_steps=2),
            train_dataset=ds(), callbacks=cbs()).train()
    ckpt = str(tmp_path / "out" / "checkpoint-2")
    trainer = guard(Trainer(model=tiny_lora(tiny_model("llama-tied"), modules_to_save=MTS),
                            args=make_args(tmp_path / "out", max_steps=4), train_dataset=ds(), callbacks=cbs()))
    trainer.train(resume_from_checkpoint=ckpt)
    assert trainer.state.global_step == 4
    trainer = guard(Trainer(model=tiny_lora(tiny_model("llama-tied")), args=make_args(tmp_path / "out", max_steps=4),
                            train_dataset=ds(), callbacks=cbs()))
    with pytest.raises(ResumeMismatchError, match="lm_head, model.embed_tokens: 8,192 params trainable in checkpoint-2"):
        trainer.train(resume_from_checkpoint=ckpt)


@pytest.mark.parametrize("kind", KINDS)
def test_case1_fix_restores_missing_copies_with_trained_values(tmp_path, kind):
    """R3 itself: resumed with a default LoRA config. fix adds the embed_tokens/lm_head copies back, the Trainer
    loads their trained values and Adam moments, and training goes on with all 9,088 params."""
    ckpt = first_run(tmp_path, kind)
    model = tiny_lora(tiny_model(kind))
    g = ResumeGuard(mode="fix")
    trainer, steps = second_trainer(tmp_path, model, g)
    _stop_after_load(guard(trainer))
    with pytest.raises(_Loaded):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainable_record(model)["trainable_params"] == 9088 and "lm_head" in model.peft_config["default"].modules_to_save[0]
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert torch.equal(head, saved["base_model.model.lm_head.weight"])
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    i = [k for k, p in enumerate(trainer.optimizer.param_groups[0]["params"]) if p is head][0]
    assert torch.equal(trainer.optimizer.state[head]["exp_avg"], opt["state"][i]["exp_avg"])
    assert g.report()[0].startswith("fix: added modules_to_save copies of lm_head, model.embed_tokens to the adapter")


def test_case1_fix_without_trained_copies_changes_nothing(tmp_path):
    ckpt = first_run(tmp_path, "llama-untied")
    os.remove(ckpt / "adapter_model.safetensors")
    model = tiny_lora(tiny_model("llama-untied"))
    trainer, steps = second_trainer(tmp_path, model, ResumeGuard(mode="fix"))
    with pytest.raises(ResumeMismatchError) as e:
        guard(trainer).train(resume_from_checkpoint=str(ckpt))
    assert str(e.value).endswith(f"\n  - lm_head, model.embed_tokens: no trained copy in {ckpt}/adapter_model.safetensors "
                                 f"to restore (mode='fix' cannot restore this)")
    assert steps.steps == 0 and trainable_record(model)["trainable_params"] == 896  # model left as it was


def _full_run(tmp_path, freeze):
    model = tiny_model("llama-untied")
    for i in freeze:
        model.model.layers[i].requires_grad_(False)
    return model


def test_case1_full_finetune_same_group_sizes_is_silent_without_guard(tmp_path):
    """Layer 1 trained, then layer 0 instead: group sizes and shapes match, so the Trainer loads layer 1's Adam
    moments into layer 0 without a word. (Swap modules of different shapes instead and CPU fused AdamW segfaults.)
    The guard names both layers."""
    Trainer(model=_full_run(tmp_path, [0]), args=make_args(tmp_path / "out", max_steps=2), train_dataset=ds(),
            callbacks=[ResumeGuard()]).train()
    ckpt = str(tmp_path / "out" / "checkpoint-2")
    trainer, steps = second_trainer(tmp_path, _full_run(tmp_path, [1]))
    trainer.train(resume_from_checkpoint=ckpt)  # no guard: runs
    assert steps.steps == 2

    trainer, steps = second_trainer(tmp_path, _full_run(tmp_path, [1]), ResumeGuard())
    with pytest.raises(ResumeMismatchError) as e:
        guard(trainer).train(resume_from_checkpoint=ckpt)
    lines = str(e.value).split("\n  - ")[1:]
    assert lines[0].startswith("model.layers.1.input_layernorm, model.layers.1.mlp.down_proj, ")
    assert lines[0].endswith(" and 1 more: 9,280 params trainable in checkpoint-2 (full), frozen now")
    assert lines[1].startswith("model.layers.0.input_layernorm, ")
    assert lines[1].endswith(" and 1 more: 9,280 params trainable now (full), frozen in checkpoint-2")
    assert len(lines) == 2
    assert steps.steps == 0


def test_case1_full_finetune_fix_restores_and_loads_moments(tmp_path):
    Trainer(model=_full_run(tmp_path, []), args=make_args(tmp_path / "out", max_steps=2), train_dataset=ds(),
            callbacks=[ResumeGuard()]).train()
    ckpt = str(tmp_path / "out" / "checkpoint-2")
    model = _full_run(tmp_path, [0])
    trainer, steps = second_trainer(tmp_path, model, ResumeGuard(mode="fix"), max_steps=3)
    _stop_after_load(guard(trainer))
    with pytest.raises(_Loaded):
        trainer.train(resume_from_checkpoint=ckpt)
    assert all(p.requires_grad for p in model.parameters())
    saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    up = model.model.layers[0].mlp.up_proj.weight
    idx = [i for i, p in enumerate(trainer.optimizer.param_groups[0]["params"]) if p is up]
    assert idx and torch.equal(trainer.optimizer.state[up]["exp_avg"], saved["state"][idx[0]]["exp_avg"])


class _Loaded(Exception):
    pass


def _stop_after_load(trainer):
    """Let the Trainer load the optimizer state, then stop before any step (to inspect what was loaded)."""
    load = trainer._load_optimizer_and_scheduler

    def load_then_stop(ckpt):
        load(ckpt)
        raise _Loaded

    trainer._load_optimizer_and_scheduler = load_then_stop


class EmbedLRTrainer(Trainer):
    """R3's first run: embed_tokens / lm_head copies at a 10x smaller LR, in a group of their own."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            emb = [p for n, p in named if "modules_to_save" in n]
            rest = [p for n, p in named if "modules_to_save" not in n]
            lr = self.args.learning_rate
            self.optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": emb, "lr": lr / 10}], lr=lr)
        return self.optimizer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-tied"])
def test_case1_fix_frozen_adapter_keeps_lr_groups(tmp_path, kind):
    """Resume from a PeftModel loaded without is_trainable=True: fix restores LoRA + copies before the optimizer
    is built, so the copies land in their 10x smaller LR group and get their own Adam moments."""
    model = tiny_lora(tiny_model(kind), modules_to_save=MTS)
    EmbedLRTrainer(model=model, args=make_args(tmp_path / "out", max_steps=2), train_dataset=ds(),
                   callbacks=[ResumeGuard()]).train()
    ckpt = str(tmp_path / "out" / "checkpoint-2")
    trainer, _ = second_trainer(tmp_path, PeftModel.from_pretrained(tiny_model(kind), ckpt), cls=EmbedLRTrainer)
    with pytest.raises(ValueError, match="doesn't match the size"):
        trainer.train(resume_from_checkpoint=ckpt)

    model = PeftModel.from_pretrained(tiny_model(kind), ckpt)
    g = ResumeGuard(mode="fix")
    trainer, steps = second_trainer(tmp_path, model, g, cls=EmbedLRTrainer)
    _stop_after_load(guard(trainer))
    with pytest.raises(_Loaded):
        trainer.train(resume_from_checkpoint=ckpt)
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    group = [grp for grp in trainer.optimizer.param_groups if any(p is head for p in grp["params"])]
    assert head.requires_grad and group[0]["initial_lr"] == pytest.approx(1e-3)
    saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    i = len(saved["param_groups"][0]["params"]) + [k for k, p in enumerate(group[0]["params"]) if p is head][0]
    assert torch.equal(trainer.optimizer.state[head]["exp_avg"], saved["state"][i]["exp_avg"])
    assert any(ev.startswith("fixed, trainable set restored to the checkpoint's (before the fix: ") and "frozen now"
               in ev for ev in g.report()), g.report()


# -- case 2: fresh run continuing from a saved adapter directory ------------------------------------------------
def _defaults_then_weights(adapter_dir, kind):
    """R3's reload: a default LoRA config, then the saved adapter weights (copies of embed/lm_head dropped)."""
    model = tiny_lora(tiny_model(kind))
    set_peft_model_state_dict(model, load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_case2_fresh_run_from_adapter_dir(tmp_path, kind):
    adapter = tmp_path / "adapter"
    tiny_lora(tiny_model(kind), modules_to_save=MTS).save_pretrained(adapter)
    assert not (adapter / TRAINABLE_FILE).exists()  # only adapter_config.json says what trained

    model = _defaults_then_weights(adapter, kind)
    trainer, steps = second_trainer(tmp_path, model, max_steps=2)
    before = model.base_model.model.lm_head.weight.detach().clone()
    trainer.train()  # no guard: trains, silently, without the head
    assert steps.steps == 2 and torch.equal(before, model.base_model.model.lm_head.weight)

    trainer, steps = second_trainer(tmp_path, _defaults_then_weights(adapter, kind), ResumeGuard(adapter_dir=str(adapter)))
    with pytest.raises(ResumeMismatchError) as e:
        guard(trainer).train()
    assert f"differs from adapter ({adapter}); no training step ran" in str(e.value)
    assert "\n  - lm_head, model.embed_tokens: 8,192 params trainable in adapter (modules_to_save), frozen now" in str(e.value)
    assert steps.steps == 0


class _Interrupt(TrainerCallback):
    """Stops the first train() call at its first step, as an exception or Ctrl-C does (no on_train_end)."""

    def __init__(self):
        self.fired = False

    def on_step_begin(self, args, state, control, **kw):
        if not self.fired:
            self.fired = True
            raise RuntimeError("interrupted")


def test_unwired_check_runs_again_after_an_interrupted_train(tmp_path):
    adapter = tmp_path / "adapter"
    tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS).save_pretrained(adapter)
    g = ResumeGuard(adapter_dir=str(adapter), mode="warn")
    trainer, steps = second_trainer(tmp_path, _defaults_then_weights(adapter, "llama-untied"), g, _Interrupt(),
                                    max_steps=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.train()
    trainer.train()  # the same Trainer again, not wired: train begin checks again (nothing reset it before)
    said = [ev for ev in g.report() if "8,192 params trainable in adapter (modules_to_save), frozen now" in ev]
    assert len(said) == 2, g.report()


def test_case2_fix_restores_copies_from_adapter_dir(tmp_path):
    adapter = tmp_path / "adapter"
    trained = tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS)
    with torch.no_grad():
        trained.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)  # "trained" head copy
    trained.save_pretrained(adapter)
    model = _defaults_then_weights(adapter, "llama-untied")
    trainer, steps = second_trainer(tmp_path, model, ResumeGuard(mode="fix", adapter_dir=str(adapter)), max_steps=2)
    head = None

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            nonlocal head
            head = model.base_model.model.lm_head.modules_to_save["default"].weight
            assert torch.equal(head, trained.base_model.model.lm_head.modules_to_save["default"].weight)
            assert any(p is head for p in optimizer.param_groups[0]["params"])

    trainer.add_callback(Probe())
    guard(trainer).train()
    assert steps.steps == 2 and head is not None and head.requires_grad
    assert trainable_record(model)["trainable_params"] == 9088


def test_trainable_tokens_kind_and_config_check(tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[1, 2, 3])
    model = get_peft_model(tiny_model("llama-untied"), LoraConfig(**cfg))
    assert trainable_record(model)["by_kind"]["trainable_tokens"] == 3 * 32
    from trainer_guard.core.trainable import adapter_config_problems
    saved = model.peft_config["default"].to_dict()
    plain = tiny_lora(tiny_model("llama-untied"), target_modules=["q_proj"])
    assert adapter_config_problems(saved, plain, "adapter") == [
        "trainable_token_indices [1, 2, 3] in adapter, no trainable token rows now"]


def test_case2_uses_record_when_adapter_dir_is_a_checkpoint(tmp_path):
    ckpt = first_run(tmp_path, "llama-tied", r=8)
    trainer, _ = second_trainer(tmp_path / "b", tiny_lora(tiny_model("llama-tied")), ResumeGuard(adapter_dir=str(ckpt)))
    with pytest.raises(ResumeMismatchError, match=r"q_proj, model\.layers\.\{0-1\}\.self_attn\.v_proj: 1,792 params "
                                                  r"trainable in checkpoint-2 \(lora_A, lora_B\), 896 now"):
        guard(trainer).train()


def test_case2_warn_mode_logs_and_trains(tmp_path):
    adapter = tmp_path / "adapter"
    tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS).save_pretrained(adapter)
    g = ResumeGuard(mode="warn", adapter_dir=str(adapter))
    trainer, steps = second_trainer(tmp_path, _defaults_then_weights(adapter, "llama-untied"), g, max_steps=2)
    guard(trainer).train()
    assert steps.steps == 2
    assert g.report()[0] == "lm_head, model.embed_tokens: 8,192 params trainable in adapter (modules_to_save), frozen now"
    assert "trainable parameters at train begin" in g.report()[1] and "896" in g.report()[1]


# -- case 3: adapter loaded frozen -----------------------------------------------------------------------------
def _saved_adapter(tmp_path, kind):
    adapter = tmp_path / "adapter"
    tiny_lora(tiny_model(kind), modules_to_save=MTS).save_pretrained(adapter)
    return adapter


@pytest.mark.parametrize("kind", KINDS)
def test_case3_from_pretrained_without_is_trainable(tmp_path, kind):
    adapter = _saved_adapter(tmp_path, kind)
    trainer, steps = second_trainer(tmp_path, PeftModel.from_pretrained(tiny_model(kind), adapter), max_steps=2)
    with pytest.raises(RuntimeError, match="does not require grad"):  # no guard: fails inside step 1
        trainer.train()

    trainer, steps = second_trainer(tmp_path, PeftModel.from_pretrained(tiny_model(kind), adapter), ResumeGuard())
    with pytest.raises(ResumeMismatchError) as e:
        guard(trainer).train()
    assert str(e.value).startswith("ResumeGuard: the trainable set differs from the active adapter's config; no "
                                   "training step ran.")
    assert ("\n  - lm_head, model.embed_tokens, model.layers.{0-1}.self_attn.q_proj, model.layers.{0-1}.self_attn.v_proj:"
            " 9,088 params of the active adapter (lora_A, lora_B, modules_to_save) are frozen;") in str(e.value)
    assert steps.steps == 0


@pytest.mark.parametrize("wired", [True, False])
def test_case3_frozen_modules_to_save_copies_fixed(tmp_path, wired):
    """The usual snippet re-enables only lora_ params: the embed/lm_head copies stay frozen, training is silent."""
    adapter = _saved_adapter(tmp_path, "llama-untied")

    def load():
        model = PeftModel.from_pretrained(tiny_model("llama-untied"), adapter)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        return model

    model = load()
    trainer, _ = second_trainer(tmp_path, model, max_steps=2)
    trainer.train()
    assert torch.equal(model.base_model.model.lm_head.modules_to_save["default"].weight,
                       load().base_model.model.lm_head.modules_to_save["default"].weight)  # no guard: never trained

    model = load()
    trainer, steps = second_trainer(tmp_path, model, ResumeGuard(mode="fix"), max_steps=2)
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    before = head.detach().clone()
    (guard(trainer) if wired else trainer).train()
    assert steps.steps == 2 and head.requires_grad and not torch.equal(before, head)
    assert any(p is head for p in trainer.optimizer.param_groups[0]["params"])


def test_deliberate_partial_freeze_is_no_finding(tmp_path):
    """LoRA-FA style: lora_A frozen on purpose in an adapter created for training; nothing was saved before."""
    model = tiny_lora(tiny_model("llama-tied"))
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    trainer, steps = second_trainer(tmp_path, model, ResumeGuard(), max_steps=2)
    guard(trainer).train()
    assert steps.steps == 2


def test_fix_unwired_resume_asks_for_guard(tmp_path):
    """Without guard(trainer) the check can only run at on_train_begin, after the optimizer load: fix refuses."""
    Trainer(model=_full_run(tmp_path, [0]), args=make_args(tmp_path / "out", max_steps=2), train_dataset=ds(),
            callbacks=[ResumeGuard()]).train()
    trainer, steps = second_trainer(tmp_path, _full_run(tmp_path, [1]))
    trainer.add_callback(ResumeGuard(mode="fix"))  # after the Trainer was built: not wired
    with pytest.raises(ResumeMismatchError, match=r"mode='fix' needs trainer = trainer_guard.guard\(trainer\) before"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert steps.steps == 0


# -- guard() and options ---------------------------------------------------------------------------------------
def test_guard_wires_each_callback_once(tmp_path):
    calls = []

    class Wired(TrainerCallback):
        def wire(self, trainer):
            calls.append(trainer)

    trainer = Trainer(model=tiny_lora(tiny_model("llama-tied")), args=make_args(tmp_path), callbacks=[Wired()])
    trainer.add_callback(ResumeGuard())  # after the Trainer was built: not wired yet
    original = trainer.create_optimizer
    assert guard(trainer) is trainer
    wrapped = trainer.create_optimizer
    assert guard(guard(trainer)) is trainer and calls == [trainer] and trainer.create_optimizer is wrapped is not original
    with pytest.raises(UsageError, match="guard\\(\\) expects a transformers Trainer"):
        guard(object())


def test_options_from_yaml_dict():
    (g,) = trainer_guard.callbacks_from_dict({"resume": {"mode": "fix", "adapter_dir": "x"}})
    assert isinstance(g, ResumeGuard) and g.options["mode"] == "fix"
    with pytest.raises(ConfigError) as e:
        ResumeGuard(mode="repair")
    assert str(e.value) == "Invalid options:\n  - ResumeGuard.mode: got 'repair'; expected one of 'raise', 'fix', 'warn'"


def test_late_save_while_embedding_lr_split_resumes_cleanly(tmp_path):
    """A save decided after EmbeddingLRGuard split the optimizer groups (like save_strategy='best') must record the
    Trainer's own layout, so the resume is not flagged as an optimizer-group change."""
    import trainer_guard
    from transformers import TrainerCallback

    from trainer_guard import EmbeddingLRGuard, ResumeGuard
    from trainer_guard.core.io import read_json

    class LateSave(TrainerCallback):  # decides after every guard's on_step_end
        def on_step_end(self, args, state, control, **k):
            control.should_save = state.global_step == 2

    def trainer(extra=()):
        t = Trainer(model=tiny_model("llama-untied"), args=make_args(tmp_path, max_steps=3, save_strategy="no"),
                    train_dataset=tiny_dataset(16), callbacks=[ResumeGuard(), EmbeddingLRGuard(ratio=0.1), *extra])
        return trainer_guard.guard(t)

    trainer([LateSave()]).train()
    groups = read_json(tmp_path / "checkpoint-2" / "trainer_guard_trainable.json")["optimizer"]
    assert [len(g["params"]) for g in groups] == [16, 5]  # the Trainer's decay / no-decay layout, not the split
    t = trainer()
    t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # no ResumeMismatchError
    assert t.state.global_step == 3


def test_reduce_lr_on_plateau_resume_is_not_a_mismatch(tmp_path):
    """ReduceLROnPlateau lowers the live LR and sets no initial_lr: a resume after a drop changed nothing."""
    import trainer_guard
    from trainer_guard import ResumeGuard

    ds = tiny_dataset(16)

    def mk():
        args = make_args(tmp_path, lr_scheduler_type="reduce_lr_on_plateau", max_steps=4, save_steps=2,
                         lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "mode": "max"},
                         eval_strategy="steps", eval_steps=1)
        return trainer_guard.guard(Trainer(model=tiny_model("llama-untied"), args=args, train_dataset=ds,
                                           eval_dataset=ds.select(range(4)), callbacks=[ResumeGuard()]))

    mk().train()
    t = mk()
    t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert t.state.global_step == 4


def test_new_run_from_a_full_checkpoint_is_not_a_continuation(tmp_path):
    """Continued pre-training, then a NEW LoRA run on its checkpoint: not a resume, nothing to compare."""
    import trainer_guard
    from transformers import AutoModelForCausalLM

    from trainer_guard import ResumeGuard

    Trainer(model=tiny_model("llama-untied"), args=make_args(tmp_path / "cpt", max_steps=2),
            train_dataset=tiny_dataset(16), callbacks=[ResumeGuard()]).train()
    model = tiny_lora(AutoModelForCausalLM.from_pretrained(str(tmp_path / "cpt" / "checkpoint-2")))
    t = trainer_guard.guard(Trainer(model=model, args=make_args(tmp_path / "sft", max_steps=2),
                                    train_dataset=tiny_dataset(16), callbacks=[ResumeGuard()]))
    t.train()
    assert t.state.global_step == 2


@pytest.mark.parametrize("mode", ["raise", "fix"])
def test_changed_learning_rate_or_weight_decay_warns_and_resumes(tmp_path, mode):
    """A resume with another learning_rate / weight_decay but the same trainable set is no mismatch: the Trainer
    restores the checkpoint's LR and weight decay from optimizer.pt, so the guard says the new values are ignored
    and lets the resume run (it used to stop it, even in mode='fix', with "set requires_grad as in the saved run")."""
    Trainer(model=tiny_model("llama-untied"), args=make_args(tmp_path / "out", max_steps=2), train_dataset=ds(),
            callbacks=[ResumeGuard()]).train()
    g = ResumeGuard(mode=mode)
    trainer, steps = second_trainer(tmp_path, tiny_model("llama-untied"), g, learning_rate=5e-3, weight_decay=0.1)
    guard(trainer).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert steps.steps == 2
    assert [(grp["initial_lr"], grp["weight_decay"]) for grp in trainer.optimizer.param_groups] == [(1e-2, 0.0)] * 2
    warned = [e for e in g.report() if "the Trainer restores checkpoint-2's values from optimizer.pt" in e]
    assert warned[0].startswith("optimizer group 0: lr 0.005, weight_decay 0.1 now; lr 0.01, weight_decay 0 in "
                                "checkpoint-2: ")
    assert len(warned) == 2  # one per group, said once although checked at the load and at the optimizer load


@pytest.mark.parametrize("added", [{"modules_to_save": ["lm_head"]}, {"trainable_token_indices": [1, 2]}])
def test_fix_refuses_wrappers_the_checkpoint_cannot_load(tmp_path, added):
    """A modules_to_save copy / trainable tokens added after the checkpoint: PEFT's load_adapter (the Trainer's
    resume) raises a bare KeyError on them. mode='fix' used to freeze them, log "fixed" and then crash in that load
    with the model changed; now it refuses before any change and says what to remove."""
    Trainer(model=tiny_lora(tiny_model("llama-untied")), args=make_args(tmp_path / "out", max_steps=2),
            train_dataset=ds(), callbacks=[ResumeGuard()]).train()
    model = tiny_lora(tiny_model("llama-untied"), **added)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    trainer, steps = second_trainer(tmp_path, model, ResumeGuard(mode="fix"))
    with pytest.raises(ResumeMismatchError) as e:
        guard(trainer).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    module = "lm_head" if "modules_to_save" in added else "model.embed_tokens"
    assert (f"\n  - {module}: a modules_to_save copy or trainable tokens now, none saved in checkpoint-2, so the "
            f"Trainer's load (PeftModel.load_adapter) would fail with a KeyError; remove them") in str(e.value)
    assert steps.steps == 0 and {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_fix_restores_copies_of_an_adapter_not_named_default(tmp_path):
    """PEFT and the Trainer keep an adapter named "sft" in checkpoint-N/sft/: mode='fix' looked for its trained
    modules_to_save copies in checkpoint-N/ and refused ("no trained copy ... to restore")."""
    from peft import LoraConfig, get_peft_model

    def model(**kw):
        return get_peft_model(tiny_model("llama-untied"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw),
                              adapter_name="sft")

    Trainer(model=model(modules_to_save=MTS), args=make_args(tmp_path / "out", max_steps=2), train_dataset=ds(),
            callbacks=[ResumeGuard()]).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    m = model()
    trainer, steps = second_trainer(tmp_path, m, ResumeGuard())
    with pytest.raises(ResumeMismatchError, match=f"PeftModel.from_pretrained\\(base, '{ckpt}/sft', "
                                                  f"adapter_name='sft', is_trainable=True\\)"):
        guard(trainer).train(resume_from_checkpoint=str(ckpt))
    trainer, steps = second_trainer(tmp_path, m, ResumeGuard(mode="fix"))
    guard(trainer).train(resume_from_checkpoint=str(ckpt))
    assert steps.steps == 2 and trainable_record(m)["trainable_params"] == 896 + 8192
