"""TiedWeightsGuard (field report R1): tied embeddings save once, reload bit-identical and tied, train unchanged."""

import json

import pytest
import safetensors.torch as st
import torch
from conftest import make_args

import trainer_guard
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer

from trainer_guard import TiedWeightsGuard, TiedWeightsError, find_tied_groups, restore_ties
from trainer_guard.core.ties import TIES_FILE
from trainer_guard.tiny import TinyGPT, tiny_dataset, tiny_lora, tiny_model

TIED = {
    "llama-tied": [["model.embed_tokens.weight", "lm_head.weight"]],
    "llama-manual-tie": [["model.embed_tokens.weight", "lm_head.weight"]],
    "qwen2": [["model.embed_tokens.weight", "lm_head.weight"]],
    "gemma": [["model.embed_tokens.weight", "lm_head.weight"]],
    "gpt2": [["transformer.wte.weight", "lm_head.weight"]],
    "llama-untied": [],
    "plain-gpt": [["tok_emb.weight", "out_head.weight"]],
}


def _train(kind, out, guard=True, **kw):
    model = tiny_model(kind)
    cbs = [TiedWeightsGuard()] if guard else []
    trainer = Trainer(model=model, args=make_args(out, **kw), train_dataset=tiny_dataset(16), callbacks=cbs)
    trainer.train(resume_from_checkpoint=kw.pop("resume", None))
    return trainer


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def _unique_bytes(model):
    seen = {}
    for p in model.parameters():  # deduplicated by identity
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("kind", list(TIED))
def test_find_tied_groups_by_identity(kind):
    assert find_tied_groups(tiny_model(kind)) == TIED[kind]


def test_find_tied_groups_ignores_names():
    """A tie between oddly named modules is found; equal-named but separate tensors are not."""
    m = TinyGPT()
    m.extra = torch.nn.Linear(32, 128, bias=False)
    m.extra.weight = m.tok_emb.weight
    assert find_tied_groups(m) == [["tok_emb.weight", "out_head.weight", "extra.weight"]]
    m2 = TinyGPT()
    m2.out_head.weight = torch.nn.Parameter(m2.tok_emb.weight.detach().clone())  # equal values, own storage
    assert find_tied_groups(m2) == []


@pytest.mark.parametrize("kind", list(TIED))
def test_checkpoints_store_ties_once_reload_identical_and_tied(kind, tmp_path):
    trainer = _train(kind, tmp_path / "run")
    model = trainer.model
    final = _snapshot(model)
    groups = TIED[kind]
    assert find_tied_groups(model) == groups, "the live model must stay tied"

    ckpt = tmp_path / "run" / "checkpoint-4"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        stored = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                     else torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
    for g in groups:
        assert sum(name in keys for name in g) == 1, f"{g} must be stored exactly once, file has {sorted(keys)}"
    assert stored * 4 == _unique_bytes(model), "no duplicated embedding bytes on disk"
    if groups:
        rec = json.loads((ckpt / TIES_FILE).read_text())
        assert rec["groups"] == groups

    trainer.save_model(str(tmp_path / "final"))
    for where in (ckpt, tmp_path / "final"):
        if kind == "plain-gpt":
            fresh = tiny_model(kind, seed=1)
            res = fresh.load_state_dict(st.load_file(str(where / "model.safetensors")), strict=False)
            assert res.missing_keys == ["out_head.weight"] and res.unexpected_keys == []
            fresh2 = tiny_model(kind, seed=2)
            st.load_model(fresh2, str(where / "model.safetensors"))  # safetensors' own loader agrees
            _assert_same(_snapshot(fresh2), final)
        else:
            fresh = AutoModelForCausalLM.from_pretrained(str(where))
        _assert_same(_snapshot(fresh), final)
        assert find_tied_groups(fresh) == groups


@pytest.mark.parametrize("kind", ["llama-manual-tie", "plain-gpt", "gpt2"])
def test_resume_from_checkpoint_is_bit_identical(kind, tmp_path):
    full = _train(kind, tmp_path / "a")
    model = tiny_model(kind, seed=7)  # different init: everything must come from the checkpoint
    resumed = Trainer(model=model, args=make_args(tmp_path / "a"), train_dataset=tiny_dataset(16),
                      callbacks=[TiedWeightsGuard()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    _assert_same(_snapshot(resumed.model), _snapshot(full.model))
    assert find_tied_groups(resumed.model) == TIED[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-tied", "llama-manual-tie", "gpt2", "plain-gpt"])
def test_training_unaffected_by_guard(kind, tmp_path):
    with_guard = _train(kind, tmp_path / "g")
    without = _train(kind, tmp_path / "n", guard=False, save_strategy="no")
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(with_guard) == losses(without) and len(losses(without)) == 4
    _assert_same(_snapshot(with_guard.model), _snapshot(without.model))


def test_r1a_plain_module_crashes_without_guard(tmp_path):
    with pytest.raises(RuntimeError, match="share memory"):
        _train("plain-gpt", tmp_path, guard=False)


def test_r1b_manual_tie_loses_head_without_guard(tmp_path):
    trainer = _train("llama-manual-tie", tmp_path, guard=False)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoint-4"))
    assert not torch.equal(reloaded.lm_head.weight, trainer.model.lm_head.weight)  # the silent loss


def test_r1b_fix_is_logged_and_config_saved(tmp_path):
    guard = TiedWeightsGuard()
    model = tiny_model("llama-manual-tie")
    Trainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset(8), callbacks=[guard]).train()
    assert any("tie_word_embeddings" in line for line in guard.report())
    saved = json.loads((tmp_path / "checkpoint-2" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True


def test_fix_config_false_only_warns(tmp_path):
    guard = TiedWeightsGuard(fix_config=False)
    model = tiny_model("llama-manual-tie")
    Trainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset(8), callbacks=[guard])
    assert model.config.tie_word_embeddings is False
    assert any("random head" in line for line in guard.report())


def test_untied_model_is_noop(tmp_path):
    guard = TiedWeightsGuard()
    trainer = Trainer(model=tiny_model("llama-untied"), args=make_args(tmp_path, max_steps=2),
                      train_dataset=tiny_dataset(8), callbacks=[guard])
    trainer.train()
    assert guard.groups == [] and trainer.model.config.tie_word_embeddings is False
    assert not (tmp_path / "checkpoint-2" / TIES_FILE).exists()
    keys = st.load_file(str(tmp_path / "checkpoint-2" / "model.safetensors")).keys()
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(keys)


def test_peft_lora_on_plain_tied_module(tmp_path):
    def run(out, resume=None, seed=0):
        model = tiny_lora(tiny_model("plain-gpt", seed=seed))
        tr = Trainer(model=model, args=make_args(out), train_dataset=tiny_dataset(16), callbacks=[TiedWeightsGuard()])
        tr.train(resume_from_checkpoint=resume)
        return tr

    full = run(tmp_path)
    base = full.model.get_base_model()
    assert base.out_head.weight is base.tok_emb.weight
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "checkpoint-2" / TIES_FILE).exists(), "adapter checkpoints hold no base tensors"
    resumed = run(tmp_path, resume=str(tmp_path / "checkpoint-2"))
    _assert_same(_snapshot(resumed.model), _snapshot(full.model))
    rb = resumed.model.get_base_model()
    assert rb.out_head.weight is rb.tok_emb.weight


def test_restore_ties_after_assign_load():
    model = tiny_model("plain-gpt")
    groups = find_tied_groups(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["out_head.weight"] = sd["tok_emb.weight"].clone()
    model.load_state_dict(sd, assign=True)  # assign=True splits the tie
    assert find_tied_groups(model) == []
    msgs = restore_ties(model, groups)
    assert msgs == ["re-tied out_head.weight to tok_emb.weight (split by a load; values identical)"]
    assert model.out_head.weight is model.tok_emb.weight


def test_restore_ties_refuses_when_copies_differ():
    model = tiny_model("plain-gpt")
    groups = find_tied_groups(model)
    model.out_head.weight = torch.nn.Parameter(model.tok_emb.weight.detach() + 1)
    before = _snapshot(model)
    with pytest.raises(TiedWeightsError, match="out_head.weight differs from tok_emb.weight"):
        restore_ties(model, groups)
    _assert_same(_snapshot(model), before)  # nothing changed


def test_guarded_module_loads_strict(tmp_path):
    model = tiny_model("plain-gpt")
    TiedWeightsGuard().attach(model)
    sd = model.state_dict()
    assert "out_head.weight" not in sd and "tok_emb.weight" in sd
    st.save_file(sd, str(tmp_path / "m.safetensors"))
    other = tiny_model("plain-gpt", seed=3)
    TiedWeightsGuard().attach(other)
    other.load_state_dict(st.load_file(str(tmp_path / "m.safetensors")), strict=True)
    _assert_same(_snapshot(other), _snapshot(model))


def test_empty_placeholders_are_not_false_ties():
    """ZeRO-3 empties parameters to size 0 (all at data pointer 0): they must not become one false tie group."""
    model = tiny_model("llama-untied")
    for p in model.parameters():
        p.data = torch.empty(0)
    assert find_tied_groups(model) == []
    model = tiny_model("llama-tied")
    for p in model.parameters():
        p.data = torch.empty(0)
    # on placeholders only object identity can be judged: the same Parameter registered twice is still a tie
    assert find_tied_groups(model) == TIED["llama-tied"]


def _split_head(model):
    """``load_state_dict(assign=True)`` with separate copies replaces both Parameters: the tie is gone."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    model.load_state_dict(sd, assign=True)
    assert find_tied_groups(model) == []


@pytest.mark.slow
def test_resume_reties_from_checkpoint_record(tmp_path):
    """A split head after a resume holds a stale value (the checkpoint stores the tie once, under the embedding
    name): the guard re-ties it to the loaded embedding and the run ends as if never split."""
    full = _train("llama-manual-tie", tmp_path)
    model = tiny_model("llama-manual-tie", seed=4)
    _split_head(model)
    guard = TiedWeightsGuard()
    resumed = Trainer(model=model, args=make_args(tmp_path), train_dataset=tiny_dataset(16))
    resumed.add_callback(guard)  # after the Trainer was built: not wired
    with pytest.raises(ValueError, match="parameter group"):  # unwired: the optimizer load fails first
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = trainer_guard.guard(Trainer(model=model, args=make_args(tmp_path), train_dataset=tiny_dataset(16),
                                          callbacks=[guard]))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert model.lm_head.weight is model.model.embed_tokens.weight, "re-tied from trainer_guard_ties.json"
    assert ("re-tied lm_head.weight to model.embed_tokens.weight (split by a load; the checkpoint stores the tie "
            "once, as model.embed_tokens.weight)") in guard.report()
    _assert_same(_snapshot(model), _snapshot(full.model))


def test_resume_split_without_restore_is_not_repaired(tmp_path):
    """What the re-tie prevents: with restore=False the split stays and the resume fails in the optimizer load."""
    _train("llama-manual-tie", tmp_path)
    model = tiny_model("llama-manual-tie", seed=4)
    _split_head(model)
    guard = TiedWeightsGuard(restore=False)
    trainer = trainer_guard.guard(Trainer(model=model, args=make_args(tmp_path), train_dataset=tiny_dataset(16),
                                          callbacks=[guard]))
    with pytest.raises(ValueError, match="parameter group"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert find_tied_groups(model) == []


def test_restore_ties_trusts_the_stored_name_only_when_alias_absent():
    model = tiny_model("plain-gpt")
    groups = find_tied_groups(model)
    model.out_head.weight = torch.nn.Parameter(model.tok_emb.weight.detach() + 1)
    with pytest.raises(TiedWeightsError):
        restore_ties(model, groups, stored={"tok_emb.weight", "out_head.weight"})  # both stored: ambiguous
    assert restore_ties(model, groups, stored={"tok_emb.weight"}) == [
        "re-tied out_head.weight to tok_emb.weight (split by a load; the checkpoint stores the tie once, as "
        "tok_emb.weight)"]
    assert model.out_head.weight is model.tok_emb.weight


def test_model_init_resume_of_a_plain_tied_module(tmp_path):
    """Trainer(model_init=...) builds the model again inside train(), after the guard's train wrapper ran: the new
    module had no alias-filling load hook, so the resume's load_state_dict(strict=False) missed out_head.weight and
    transformers crashed on it ("'TinyGPT' object has no attribute '_keys_to_ignore_on_save'")."""
    def trainer(max_steps):
        return trainer_guard.guard(Trainer(model_init=lambda: tiny_model("plain-gpt"), train_dataset=tiny_dataset(16),
                                           args=make_args(tmp_path, max_steps=max_steps),
                                           callbacks=[TiedWeightsGuard()]))

    full = trainer(4)
    full.train()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert find_tied_groups(resumed.model) == TIED["plain-gpt"]
    _assert_same(_snapshot(full.model), _snapshot(resumed.model))


@pytest.mark.slow
def test_reused_output_dir_drops_a_stale_tie_record(tmp_path):
    """A later untied run saving into checkpoint dirs an earlier tied run left must not inherit its tie record
    (resume would report 'tie groups split' / re-tie an untied head)."""
    _train("llama-tied", tmp_path, max_steps=2)
    assert (tmp_path / "checkpoint-2" / TIES_FILE).exists()
    guard = TiedWeightsGuard()
    untied = Trainer(model=tiny_model("llama-untied"), args=make_args(tmp_path, max_steps=2),
                     train_dataset=tiny_dataset(8), callbacks=[guard])
    untied.train()
    assert not (tmp_path / "checkpoint-2" / TIES_FILE).exists(), "stale tie record left in the checkpoint"
    resumed_guard = TiedWeightsGuard()
    model = tiny_model("llama-untied", seed=3)
    Trainer(model=model, args=make_args(tmp_path, max_steps=3), train_dataset=tiny_dataset(8),
            callbacks=[resumed_guard]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not any("split" in line or "re-tied" in line for line in resumed_guard.report()), resumed_guard.report()
