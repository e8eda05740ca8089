"""Head check (field reports R5 and R1b): a causal-LM checkpoint without its output head reloads a random head."""

import os

import pytest
import torch

from conftest import make_args
from trainer_guard import HeadGuard, HeadMissingError, TiedWeightsGuard, missing_head_problems
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model


def train(tmp_path, model, callbacks=(), max_steps=2):
    from transformers import Trainer

    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=max_steps, save_steps=2),
                      train_dataset=tiny_dataset(8, 8, 128), callbacks=list(callbacks))
    trainer.train()
    return trainer


def r1b_message(ckpt):
    return (f"{ckpt}: config.json names LlamaForCausalLM, a causal LM, but no output-head tensor (lm_head.weight) is "
            "stored and tie_word_embeddings is false, so LlamaForCausalLM.from_pretrained initialises the head at "
            "random. If the head was tied to the input embedding by hand, set config.tie_word_embeddings=True "
            "before saving (TiedWeightsGuard does); otherwise save the LlamaForCausalLM that holds the trained head "
            "again with save_pretrained.")


def test_r1b_without_guard_the_trained_head_is_silently_lost(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_model("llama-manual-tie")
    train(tmp_path, model)
    ckpt = os.path.join(tmp_path, "checkpoint-2")
    reloaded = LlamaForCausalLM.from_pretrained(ckpt)
    assert not torch.equal(reloaded.lm_head.weight, model.lm_head.weight)  # random head, no error
    assert missing_head_problems(ckpt) == [r1b_message(ckpt)]


def test_r1b_head_guard_stops_at_the_first_bad_checkpoint(tmp_path):
    guard = HeadGuard()
    with pytest.raises(HeadMissingError) as e:
        train(tmp_path, tiny_model("llama-manual-tie"), [guard], max_steps=4)
    ckpt = os.path.join(tmp_path, "checkpoint-2")
    assert str(e.value) == r1b_message(ckpt)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoint-4"))


@pytest.mark.slow
def test_r1b_warn_mode_continues(tmp_path):
    guard = HeadGuard(mode="warn")
    trainer = train(tmp_path, tiny_model("llama-manual-tie"), [guard], max_steps=4)
    assert trainer.state.global_step == 4
    assert guard.report() == [r1b_message(os.path.join(tmp_path, f"checkpoint-{s}")) for s in (2, 4)]


def test_tied_weights_guard_fixes_what_head_guard_detects(tmp_path):
    guard = HeadGuard()
    train(tmp_path, tiny_model("llama-manual-tie"), [TiedWeightsGuard(), guard])
    assert guard.checked == [os.path.join(tmp_path, "checkpoint-2")] and guard.report() == []


def test_r5_model_saved_from_automodel(tmp_path):
    from transformers import LlamaForCausalLM

    full = tiny_model("llama-untied")
    full.model.save_pretrained(tmp_path)  # what AutoModel.from_pretrained(...).save_pretrained(...) writes
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert not torch.equal(reloaded.lm_head.weight, full.lm_head.weight)  # the head is gone: random
    assert missing_head_problems(tmp_path) == [
        f"{tmp_path}: saved from LlamaModel, the llama model without its output head (loaded with AutoModel?); "
        "config.json declares no tie, so LlamaForCausalLM.from_pretrained / AutoModelForCausalLM would initialise "
        "the head at random. For generation, load the original checkpoint with AutoModelForCausalLM "
        "(LlamaForCausalLM) and save that."
    ]


@pytest.mark.parametrize("kind", ["llama-untied", "llama-tied", "gpt2", "qwen2"])
def test_healthy_saves_have_no_problem(tmp_path, kind):
    tiny_model(kind).save_pretrained(tmp_path, max_shard_size="20KB")
    assert missing_head_problems(tmp_path) == []


def test_tied_base_model_and_non_model_dirs_have_no_problem(tmp_path):
    tiny_model("llama-tied").model.save_pretrained(tmp_path / "tied-base")  # the head IS the embedding
    assert missing_head_problems(tmp_path / "tied-base") == []
    tiny_lora(tiny_model("llama-untied")).save_pretrained(tmp_path / "adapter")
    assert missing_head_problems(tmp_path / "adapter") == []
    (tmp_path / "empty").mkdir()
    assert missing_head_problems(tmp_path / "empty") == []


def test_config_options_validated():
    with pytest.raises(Exception, match="HeadGuard.mode: got 'fix'; expected one of 'raise', 'warn'"):
        HeadGuard(mode="fix")


def test_truncated_weights_file_is_a_usage_error(tmp_path):
    """An unreadable file is named with the fix, not a raw safetensors exception."""
    import os

    from trainer_guard import UsageError

    model = tiny_model("llama-tied")
    model.save_pretrained(tmp_path)
    p = tmp_path / "model.safetensors"
    os.truncate(p, os.path.getsize(p) - 64)
    with pytest.raises(UsageError, match="model.safetensors in .* is not a readable safetensors file"):
        missing_head_problems(tmp_path)


def test_wired_final_save_model_is_checked(tmp_path):
    """trainer.save_model() fires no callback event; guard(trainer) makes HeadGuard check it too."""
    from transformers import Trainer

    from trainer_guard import guard

    head = HeadGuard()
    trainer = guard(Trainer(model=tiny_model("llama-manual-tie"), train_dataset=tiny_dataset(8, 8, 128),
                            args=make_args(tmp_path, max_steps=1, save_strategy="no"), callbacks=[head]))
    trainer.train()
    final = os.path.join(tmp_path, "final")
    with pytest.raises(HeadMissingError) as e:
        trainer.save_model(final)
    assert str(e.value) == r1b_message(final)
    assert head.checked == [final]
    head.wire(trainer)  # idempotent: still one check per save
    with pytest.raises(HeadMissingError):
        trainer.save_model(final + "2")
    assert head.checked == [final, final + "2"]
    ok = HeadGuard()
    healthy = guard(Trainer(model=tiny_model("llama-tied"), train_dataset=tiny_dataset(8, 8, 128),
                            args=make_args(tmp_path / "ok", max_steps=1, save_strategy="no"), callbacks=[ok]))
    healthy.save_model(tmp_path / "ok" / "final")
    assert ok.checked == [str(tmp_path / "ok" / "final")] and ok.report() == []


@pytest.mark.parametrize("text, says", [
    ('{"metadata": {}, "weight_map": null}', r"malformed index \('weight_map' must map tensor names to shard file "
                                             r"names\); fix or delete it"),
    ('{"weight_map": ["lm_head.weight"]}', r"malformed index"),
    ("[" * 100_000 + "]" * 100_000, r"unreadable index \(JSON nested too deeply\); fix or delete it"),
    ("{", r"unreadable index \(Expecting property name"),
])
def test_malformed_shard_index_is_a_usage_error_naming_it(tmp_path, text, says):
    """A bad index is named with the fix, as file_checksums names it, not a TypeError or RecursionError."""
    from trainer_guard import UsageError
    from trainer_guard.core.head import stored_tensor_names

    tiny_model("llama-untied").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(UsageError, match=r"model.safetensors.index.json: " + says):
        stored_tensor_names(tmp_path)
    with pytest.raises(UsageError, match=r"model.safetensors.index.json: " + says):
        missing_head_problems(tmp_path)


@pytest.mark.parametrize("text, says", [("[" * 100_000, r"JSON nested too deeply"), ("{", r"Expecting property")])
def test_unreadable_config_is_a_usage_error_naming_it(tmp_path, text, says):
    from trainer_guard import UsageError

    tiny_model("llama-untied").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UsageError, match=r"config.json: unreadable config \(" + says):
        missing_head_problems(tmp_path)
