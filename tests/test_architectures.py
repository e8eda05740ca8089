"""Model families beyond trainer_guard.tiny's: encoder-decoder (T5, BART, Marian) under Seq2SeqTrainer, masked LMs
(BERT, RoBERTa: a tied decoder weight plus a tied decoder bias), sequence classifiers (no LM head at all), GPT-NeoX
(its head is saved as ``embed_out``), and a model whose class keeps parameters in float32 (Flint's attention sinks).

Every model is built from a tiny config; nothing is downloaded."""

import os

import pytest
import torch

from conftest import make_args

import trainer_guard
from trainer_guard import HeadGuard, HeadMissingError, missing_head_problems
from trainer_guard.doctor import diagnose

V, H = 128, 32


def build(kind, seed=0, **cfg):
    import transformers as tf

    torch.manual_seed(seed)
    dec = dict(vocab_size=V, hidden_size=H, intermediate_size=H * 2, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64)
    bart = dict(vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=H * 2, decoder_ffn_dim=H * 2, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    bert = dict(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=H * 2,
                max_position_embeddings=64)
    if kind == "t5":  # transformers 5 always ties shared, encoder/decoder embed_tokens and lm_head: a 4-way group
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=H * 2, num_layers=1,
                                                         num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                                         eos_token_id=1, **cfg))
    if kind == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(**{**bart, **cfg}))
    if kind == "marian":
        return tf.MarianMTModel(tf.MarianConfig(**{**bart, "pad_token_id": 0, **cfg}))
    if kind == "bert-mlm":
        return tf.BertForMaskedLM(tf.BertConfig(**bert, **cfg))
    if kind == "roberta-mlm":
        return tf.RobertaForMaskedLM(tf.RobertaConfig(**{**bert, "max_position_embeddings": 80, "pad_token_id": 1},
                                                      **cfg))
    if kind == "bert-cls":
        return tf.BertForSequenceClassification(tf.BertConfig(**bert, num_labels=3, **cfg))
    if kind == "llama-cls":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(**dec, num_labels=3, pad_token_id=0, **cfg))
    if kind == "gptneox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2,
                                                      num_attention_heads=2, intermediate_size=H * 2,
                                                      max_position_embeddings=64, **cfg))
    if kind == "flint":  # _keep_in_fp32_modules_strict = ["gate.weight", "sinks"]: parameter names, not modules
        return tf.FlintForCausalLM(tf.FlintConfig(**dec, head_dim=16, **cfg))
    raise ValueError(kind)


SEQ2SEQ, MLM, CLS = {"t5", "bart", "marian"}, {"bert-mlm", "roberta-mlm"}, {"bert-cls", "llama-cls"}


def data(kind, n=16, length=12):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (n, length), generator=g)
    if kind in SEQ2SEQ:
        labels = torch.randint(3, V, (n, 6), generator=g)
    elif kind in MLM:
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    elif kind in CLS:
        labels = torch.randint(0, 3, (n,), generator=g)
    else:
        labels = ids
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                              "labels": labels.tolist()})


def trainer_for(kind, model, out, callbacks, **kw):
    import transformers as tf

    kw = dict(dict(max_steps=4, save_steps=2, per_device_train_batch_size=4), **kw)
    if kind in SEQ2SEQ:
        args = tf.Seq2SeqTrainingArguments(**make_args(out, **kw).to_dict() | {
            "predict_with_generate": True, "generation_max_length": 6})
        return tf.Seq2SeqTrainer(model=model, args=args, train_dataset=data(kind), eval_dataset=data(kind, n=4),
                                 callbacks=list(callbacks))
    return tf.Trainer(model=model, args=make_args(out, **kw), train_dataset=data(kind), callbacks=list(callbacks))


def auto_class(kind):
    import transformers as tf

    return (tf.AutoModelForSeq2SeqLM if kind in SEQ2SEQ else tf.AutoModelForMaskedLM if kind in MLM
            else tf.AutoModelForSequenceClassification if kind in CLS else tf.AutoModelForCausalLM)


# -- every default guard, end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5", "bart", "marian", "bert-mlm", "roberta-mlm", "bert-cls", "llama-cls", "gptneox"])
def test_default_guards_round_trip_bit_identical(tmp_path, kind):
    """Train with every default guard, checkpoint, resume a fresh model, save_model, reload with the Auto class,
    doctor and diff: no false alarm, and the weights are those of an unguarded run, bit for bit."""
    from trainer_guard.diff import diff

    model = build(kind)
    trainer = trainer_guard.guard(trainer_for(kind, model, tmp_path / "g", trainer_guard.callbacks_from_yaml()))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    guarded = {k: v.clone() for k, v in model.state_dict().items()}

    plain = build(kind)
    trainer_for(kind, plain, tmp_path / "u", []).train()
    assert [k for k, v in plain.state_dict().items() if not torch.equal(v, guarded[k])] == []

    resumed = build(kind, seed=1)
    trainer_guard.guard(trainer_for(kind, resumed, tmp_path / "g", trainer_guard.callbacks_from_yaml())).train(
        resume_from_checkpoint=str(tmp_path / "g" / "checkpoint-2"))
    assert [k for k, v in resumed.state_dict().items() if not torch.equal(v, guarded[k])] == []

    reloaded = auto_class(kind).from_pretrained(tmp_path / "final")
    assert [k for k, v in reloaded.state_dict().items() if not torch.equal(v, guarded[k])] == []
    for d in ("g/checkpoint-2", "g/checkpoint-4", "final"):
        report = diagnose(tmp_path / d)
        assert report.exit_code == 0 and report.warnings == [], (d, report.problems, report.warnings)
    for source in ("manifest", "files"):  # the resumed run's checkpoint-4 against the first run's final save
        assert diff(tmp_path / "g" / "checkpoint-4", tmp_path / "final", source=source)["identical"]
    if kind in SEQ2SEQ:
        assert trainer.evaluate()["eval_loss"] > 0  # predict_with_generate on the guarded model


def test_gpt_neox_resume_restores_the_head_the_trainer_skips(tmp_path):
    """transformers 5.23 saves GPT-NeoX's ``lm_head.weight`` as ``embed_out.weight`` and the Trainer's resume
    (``load_state_dict(strict=False)``) skips it: without IntegrityGuard the resumed model trains on with its own
    head. The guard loads it and says so."""
    model = build("gptneox")
    trainer_for("gptneox", model, tmp_path, [], max_steps=2).train()
    saved = model.lm_head.weight.detach().clone()

    unguarded = build("gptneox", seed=1)
    trainer_for("gptneox", unguarded, tmp_path, [], max_steps=2)._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    assert not torch.equal(unguarded.lm_head.weight, saved)  # the Trainer's own resume: head not restored

    guard = trainer_guard.IntegrityGuard()
    fresh = build("gptneox", seed=1)
    trainer_guard.guard(trainer_for("gptneox", fresh, tmp_path, [guard], max_steps=2))._load_from_checkpoint(
        str(tmp_path / "checkpoint-2"))
    assert torch.equal(fresh.lm_head.weight, saved)
    assert any("lm_head.weight" in r and "skipped" in r for r in guard.report())


# -- HeadGuard / missing_head_problems --------------------------------------------------------------------------------
def _hand_tied(kind):
    if kind == "llava":
        from trainer_guard.tiny import tiny_model

        model = tiny_model("llava")
        model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
        return model
    model = build(kind, tie_word_embeddings=False)
    if kind == "bart":
        model.lm_head.weight = model.model.shared.weight
    else:
        model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
    return model


@pytest.mark.parametrize("kind, arch, what, head", [
    ("bart", "BartForConditionalGeneration", "a sequence-to-sequence LM", "lm_head.weight"),
    ("bert-mlm", "BertForMaskedLM", "a masked LM", "cls.predictions.decoder.weight"),
    ("llava", "LlavaForConditionalGeneration", "a vision-language model", "lm_head.weight"),
])
def test_r1b_on_seq2seq_and_masked_lm_is_reported(tmp_path, kind, arch, what, head):
    """R1b outside causal LMs (report R1b): a head tied by hand while tie_word_embeddings=False is not saved and reloads at
    random; missing_head_problems (HeadGuard, doctor) said nothing."""
    model = _hand_tied(kind)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    live = model.get_output_embeddings().weight
    assert not torch.equal(reloaded.get_output_embeddings().weight, live)  # silently random
    assert missing_head_problems(tmp_path) == [
        f"{tmp_path}: config.json names {arch}, {what}, but no output-head tensor ({head}) is stored and "
        f"tie_word_embeddings is false, so {arch}.from_pretrained initialises the head at random. If the head was "
        f"tied to the input embedding by hand, set config.tie_word_embeddings=True before saving (TiedWeightsGuard "
        f"does); otherwise save the {arch} that holds the trained head again with save_pretrained."]
    assert [f.check for f in diagnose(tmp_path, no_manifest_ok=True).problems] == ["head"]


def test_head_guard_stops_a_seq2seq_run_whose_checkpoint_lost_its_head(tmp_path):
    with pytest.raises(HeadMissingError, match="BartForConditionalGeneration, a sequence-to-sequence LM"):
        trainer_for("bart", _hand_tied("bart"), tmp_path, [HeadGuard()]).train()
    assert not (tmp_path / "checkpoint-4").exists()


def test_bare_encoder_decoder_base_model_gets_seq2seq_advice(tmp_path):
    """A MarianModel (AutoModel) saved with an untied config has no head; the advice named AutoModelForCausalLM
    and MarianForCausalLM (a decoder without the encoder)."""
    full = build("marian", tie_word_embeddings=False)
    full.model.save_pretrained(tmp_path)
    assert missing_head_problems(tmp_path) == [
        f"{tmp_path}: saved from MarianModel, the marian model without its output head (loaded with AutoModel?); "
        "config.json declares no tie, so MarianMTModel.from_pretrained / AutoModelForSeq2SeqLM would initialise the "
        "head at random. For generation, load the original checkpoint with AutoModelForSeq2SeqLM (MarianMTModel) "
        "and save that."]


@pytest.mark.parametrize("kind, cfg", [
    ("t5", {}), ("bart", {}), ("bart", {"tie_word_embeddings": False}), ("marian", {"tie_word_embeddings": False}),
    ("bert-mlm", {}), ("bert-mlm", {"tie_word_embeddings": False}), ("roberta-mlm", {}), ("bert-cls", {}),
    ("llama-cls", {}), ("gptneox", {}),
])
def test_healthy_saves_of_other_families_have_no_head_problem(tmp_path, kind, cfg):
    build(kind, **cfg).save_pretrained(tmp_path)
    assert missing_head_problems(tmp_path) == []


def test_healthy_untied_vision_language_model_has_no_head_problem(tmp_path):
    """An untied LLaVA stores its head as ``language_model.lm_head.weight`` (original layout)."""
    import transformers as tf
    from trainer_guard.tiny import tiny_model

    cfg = tiny_model("llava").config
    text = tf.LlamaConfig(**{**cfg.text_config.to_dict(), "tie_word_embeddings": False})
    tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text, vision_config=cfg.vision_config,
                                                    image_token_index=cfg.image_token_index,
                                                    tie_word_embeddings=False)).save_pretrained(tmp_path)
    assert missing_head_problems(tmp_path) == []


@pytest.mark.parametrize("kind", ["t5", "bert-mlm"])
def test_ties_split_by_an_assign_load_are_restored_on_resume(tmp_path, kind):
    """T5's 4-way group (shared, encoder/decoder embed_tokens, lm_head) and BERT's two groups (decoder weight, and
    decoder bias with cls.predictions.bias) split by ``load_state_dict(assign=True)`` are re-tied before the resume."""
    import safetensors.torch

    from trainer_guard import find_tied_groups

    model = build(kind)
    trainer_guard.guard(trainer_for(kind, model, tmp_path, trainer_guard.callbacks_from_yaml())).train()
    groups = find_tied_groups(model)
    fresh = build(kind, seed=1)
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "checkpoint-2" / "model.safetensors"),
                          strict=False, assign=True)
    assert find_tied_groups(fresh) != groups  # split
    trainer_guard.guard(trainer_for(kind, fresh, tmp_path, trainer_guard.callbacks_from_yaml())).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert find_tied_groups(fresh) == groups
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_bare_encoders_are_not_reported(tmp_path):
    build("bert-mlm", tie_word_embeddings=False).bert.save_pretrained(tmp_path / "bert")  # an encoder, used bare
    build("bart", tie_word_embeddings=False).model.save_pretrained(tmp_path / "bart")  # BART in the MLM mapping too
    assert missing_head_problems(tmp_path / "bert") == [] and missing_head_problems(tmp_path / "bart") == []


# -- DtypeGuard and _keep_in_fp32_modules ---------------------------------------------------------------------------
def test_dtype_guard_keeps_parameters_the_model_class_keeps_in_fp32(tmp_path):
    """transformers 5 loads Flint's attention ``sinks`` (``_keep_in_fp32_modules_strict``, a parameter name) in
    float32 in a bf16 model; DtypeGuard matched the patterns to module names only and cast them to bf16."""
    from transformers import FlintForCausalLM

    build("flint").save_pretrained(tmp_path / "base")
    model = FlintForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    sinks = [n for n, p in model.named_parameters() if p.dtype == torch.float32]
    assert sinks and all(n.endswith(".sinks") for n in sinks)
    guard = trainer_guard.DtypeGuard()
    trainer_for("flint", model, tmp_path / "run", [guard], max_steps=1, save_strategy="no").train()
    assert all(dict(model.named_parameters())[n].dtype == torch.float32 for n in sinks)
    assert not any(r.startswith("cast") for r in guard.report())


def test_dtype_guard_model_patterns_are_not_substrings():
    """T5 keeps ``wo`` in fp32; a new float32 ``word_head`` on a float16 T5 is still cast (R2)."""
    from trainer_guard.core.dtype import find_dtype_mismatches

    model = build("t5").half()
    model.encoder.block[0].layer[1].DenseReluDense.wo.float()  # as from_pretrained(dtype=float16) leaves it
    model.word_head = torch.nn.Linear(H, 3)
    report = find_dtype_mismatches(model)
    assert [i.name for i in report.mismatched] == ["word_head.weight", "word_head.bias"]
    assert [i.name for i in report.kept] == ["encoder.block.0.layer.1.DenseReluDense.wo.weight"]


# -- doctor on these layouts -------------------------------------------------------------------------------------------
def test_doctor_accepts_a_sequence_classification_adapter(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(build("bert-cls"), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    report = diagnose(tmp_path, no_manifest_ok=True)
    assert report.problems == []


def test_doctor_accepts_modules_the_model_class_keeps_in_fp32(tmp_path):
    from transformers import T5ForConditionalGeneration

    build("t5").save_pretrained(tmp_path / "base")
    T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float16).save_pretrained(tmp_path / "h")
    assert [w.message for w in diagnose(tmp_path / "h", no_manifest_ok=True).warnings if w.check == "dtypes"] == []


def test_doctor_still_names_an_fp32_matrix_the_model_class_does_not_keep(tmp_path):
    """The fp32 exemption covers only what _keep_in_fp32_modules names: another fp32 matrix is still a dtype mix."""
    from safetensors.torch import load_file, save_file
    from transformers import T5ForConditionalGeneration

    build("t5").save_pretrained(tmp_path / "base")
    T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float16).save_pretrained(tmp_path / "h")
    f = tmp_path / "h" / "model.safetensors"
    sd = load_file(f)
    q = next(k for k in sd if k.endswith("SelfAttention.q.weight"))
    sd[q] = sd[q].float()
    save_file(sd, f, metadata={"format": "pt"})
    (msg,) = [w.message for w in diagnose(tmp_path / "h", no_manifest_ok=True).warnings if w.check == "dtypes"]
    assert f"{q} (float32)" in msg and ".wo." not in msg, msg
