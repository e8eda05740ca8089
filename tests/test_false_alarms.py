"""No false alarm in real clients (issue 17): what TRL, axolotl and CLI users hit with a healthy run."""

import warnings

import pytest
import torch
from conftest import make_args

import trainer_guard
from trainer_guard.core.audit import UpdateAudit
from trainer_guard.tiny import tiny_model

warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")


# -- UpdateAuditGuard: steps without a learning signal ------------------------------------------------------------
def _linear_run(grad_scale):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    run = UpdateAudit(dict(lin.named_parameters()), every=100, min_grad_steps=2)
    run.baseline()
    found = []
    for scale in grad_scale:
        opt.zero_grad()
        (lin(torch.ones(1, 3)).sum() * scale).backward()
        opt.step()
        found += run.step(opt)
    return run, found


def test_core_steps_whose_gradients_are_all_zero_are_no_evidence():
    """Every gradient exactly zero (RL with all-zero rewards): nothing is judged, however many such steps."""
    run, found = _linear_run([0.0] * 5)
    assert found == [] and run.silent_steps == 5
    run, found = _linear_run([0.0, 0.0, 1.0, 1.0])  # the signal arrives: trained tensors changed, nothing reported
    assert found == [] and run.silent_steps == 2


def test_core_a_tensor_without_gradient_is_still_found_when_others_have_one():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    run = UpdateAudit(dict(lin.named_parameters()), every=100, min_grad_steps=2)
    run.baseline()
    found = []
    for _ in range(3):
        opt.zero_grad()
        (lin(torch.ones(1, 3)) * torch.tensor([1.0, 0.0])).sum().backward()  # row 1 of weight/bias: zero gradient
        lin.bias.grad.zero_()
        opt.step()
        found += run.step(opt)
    assert [(f.name, f.cause) for f in found] == [("bias", "grad_zero")] and run.silent_steps == 0


def _grpo(output_dir, max_steps, resume=None):
    """TRL's GRPO with a reward function that returns 0 for everything: every gradient is exactly zero."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    tk = Tokenizer(models.WordLevel(vocab, "<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{(i * 7 + j) % 125}" for j in range(4)) for i in range(8)]})
    base = make_args(output_dir, max_steps=max_steps, save_steps=2).to_dict()
    config = trl.GRPOConfig(**{**base, "output_dir": str(output_dir), "num_generations": 4,
                               "max_completion_length": 4, "bf16": False})
    guards = trainer_guard.callbacks_from_yaml(trainer_guard.default_config_path())
    trainer = trl.GRPOTrainer(model=tiny_model("llama-tied"), reward_funcs=lambda completions, **kw: [0.0] * len(
        completions), args=config, train_dataset=prompts, processing_class=tok, callbacks=guards)
    trainer.train(resume_from_checkpoint=resume)
    return next(g for g in guards if isinstance(g, trainer_guard.UpdateAuditGuard))


@pytest.mark.slow
def test_grpo_with_all_zero_rewards_trains_and_resumes(tmp_path):
    """Field run: GRPO, rewards all zero, default guards (UpdateAuditGuard in raise mode) stopped at step 2 with
    "no gradient reached it ... 21 tensors"."""
    audit = _grpo(tmp_path / "out", 2)
    assert audit.findings == [] and audit.audit.silent_steps == 2
    assert any("every gradient was exactly zero" in e for e in audit.report())
    audit = _grpo(tmp_path / "out", 4, resume=str(tmp_path / "out" / "checkpoint-2"))
    assert audit.findings == [] and (tmp_path / "out" / "checkpoint-4").is_dir()


# -- tie changes at resume ----------------------------------------------------------------------------------------
def _run(kind, output_dir, guards, resume=None, max_steps=2):
    from transformers import Trainer

    from trainer_guard.tiny import tiny_dataset

    model = tiny_model(kind)
    Trainer(model=model, args=make_args(output_dir, max_steps=max_steps), train_dataset=tiny_dataset(8, 16, 128),
            callbacks=guards).train(resume_from_checkpoint=resume)
    return model


def _defaults():
    return trainer_guard.callbacks_from_yaml(trainer_guard.default_config_path())


@pytest.mark.parametrize("guards", ["defaults", "resume fix only"])
def test_untied_checkpoint_resumed_tied_is_named_a_tie_change(tmp_path, guards):
    """Field run: 'lm_head ... frozen now' with the advice mode='fix', which then failed with the same advice."""
    _run("llama-untied", tmp_path, _defaults())
    ckpt = str(tmp_path / "checkpoint-2")
    with pytest.raises(trainer_guard.TrainerGuardError) as e:
        _run("llama-tied", tmp_path, _defaults() if guards == "defaults" else [trainer_guard.ResumeGuard(mode="fix")],
             resume=ckpt, max_steps=4)
    msg = str(e.value)
    assert ("tie change at resume: checkpoint-2 was trained untied (lm_head.weight stored apart from "
            "model.embed_tokens.weight), this model ties them (config.tie_word_embeddings=True)") in msg
    assert "build the model with tie_word_embeddings=False" in msg and "start a new run" in msg
    assert "frozen now" not in msg and "mode='fix'" not in msg


def test_tied_checkpoint_resumed_untied_says_it_overrides_the_config(tmp_path):
    """Field run: the reverse re-tied and flipped tie_word_embeddings back with only a message about a load split."""
    _run("llama-tied", tmp_path, _defaults())
    guards = _defaults()
    model = _run("llama-untied", tmp_path, guards, resume=str(tmp_path / "checkpoint-2"), max_steps=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings is True
    tied = next(g for g in guards if isinstance(g, trainer_guard.TiedWeightsGuard))
    change = [e for e in tied.report() if e.startswith("tie change at resume")]
    assert change == [
        "tie change at resume: checkpoint-2 was trained with lm_head.weight tied to model.embed_tokens.weight (stored "
        "once), this model is untied (config.tie_word_embeddings=False); to resume checkpoint-2 as saved the tie is "
        "restored and config.tie_word_embeddings set to True, overriding your setting. To train untied instead, do "
        "not resume: load checkpoint-2 tied, give lm_head.weight its own copy of model.embed_tokens.weight (e.g. "
        "model.lm_head.weight = nn.Parameter(model.get_input_embeddings().weight.clone()), "
        "config.tie_word_embeddings=False), re-save it untied with save_pretrained and start a new run from that "
        "folder"]


# -- UntrainedTokensGuard: a certain crash stops before step 1; prompt datasets are text by design ---------------
def _grown_tokenizer(n_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}, "<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")


@pytest.mark.parametrize("mode", ["raise", "fix", "report"])
def test_token_ids_past_the_embedding_stop_before_step_1(tmp_path, mode):
    """Tokens added to the tokenizer without model.resize_token_embeddings: ids 128-129 in the data."""
    from transformers import Trainer

    from trainer_guard.tiny import tiny_dataset

    ds = tiny_dataset(8, 16, 130, seed=1)
    assert max(max(r) for r in ds["input_ids"]) >= 128
    trainer = Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path, max_steps=2), train_dataset=ds,
                      processing_class=_grown_tokenizer(130), callbacks=[trainer_guard.UntrainedTokensGuard(mode=mode)])
    if mode == "report":  # reports only: the crash happens, at the first batch
        with pytest.raises(IndexError):
            trainer.train()
        return
    with pytest.raises(trainer_guard.UntrainedTokensError) as e:
        trainer.train()
    assert trainer.state.global_step == 0
    assert "token id(s) past the input embedding's 128 rows" in str(e.value) or mode == "raise"
    assert "model.resize_token_embeddings(len(tokenizer))" in str(e.value)


def test_a_prompt_dataset_of_raw_text_gets_no_advice_to_tokenize():
    """GRPO/DPO prompt datasets hold text by design: the field run advised tokenizing one."""
    from datasets import Dataset

    model = tiny_model("llama-tied")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = 0  # a never-trained row: the data scan runs
    prompts = Dataset.from_dict({"prompt": ["w3 w4 w5", "w6 w7"]})
    guard = trainer_guard.UntrainedTokensGuard()
    lines = guard.check(model, prompts, _grown_tokenizer(128))
    assert "training data not scanned: it holds text ('prompt') that the trainer tokenizes as it trains" in lines
    assert not any("tokenize the dataset" in line for line in lines)
    chats = Dataset.from_dict({"prompt": [[{"role": "user", "content": "w3"}]], "answer": ["w4"]})
    assert any("it holds text ('prompt', 'answer')" in line for line in guard.check(model, chats, _grown_tokenizer(128)))


# -- EmbeddingLRGuard: a client's own embedding LR compounds with the ratio ---------------------------------------
def test_embedding_lr_compounding_with_a_clients_own_scale_is_a_warning(tmp_path):
    """axolotl embedding_lr_scale: 0.5 puts embeddings in their own group at 0.5 x LR; ratio 0.1 on top = 0.05."""
    from transformers import Trainer

    from trainer_guard.tiny import tiny_dataset

    class ScaledEmbeddingTrainer(Trainer):  # what axolotl's create_optimizer does with embedding_lr_scale
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                emb = self.model.get_input_embeddings().weight
                rest = [p for p in self.model.parameters() if p.requires_grad and p is not emb]
                lr = self.args.learning_rate
                self.optimizer = torch.optim.AdamW([{"params": rest}, {"params": [emb], "lr": 0.5 * lr}], lr=lr)
            return self.optimizer

    guard = trainer_guard.EmbeddingLRGuard(ratio=0.1)
    ScaledEmbeddingTrainer(model=tiny_model("llama-untied"), args=make_args(tmp_path, max_steps=1, save_strategy="no"),
                           train_dataset=tiny_dataset(8, 16, 128), callbacks=[guard]).train()
    warned = [e for e in guard.report() if "compounds" in e]
    assert warned == [
        "embeddings: param group 1 already runs at peak lr 0.005, not the Trainer's learning_rate 0.01 (an embedding LR "
        "of your own, e.g. axolotl's embedding_lr_scale / embedding_lr?); the ratio 0.1 compounds with it: effective "
        "peak lr 0.0005 (0.1 x 0.005). To keep one of them, drop the other, or give EmbeddingLRGuard an absolute lr"]
    guard = trainer_guard.EmbeddingLRGuard(lr=1e-3)  # an absolute LR does not compound
    ScaledEmbeddingTrainer(model=tiny_model("llama-untied"), args=make_args(tmp_path, max_steps=1, save_strategy="no"),
                           train_dataset=tiny_dataset(8, 16, 128), callbacks=[guard]).train()
    assert not any("compounds" in e for e in guard.report())


# -- advice in the terms the user configured the guards in -------------------------------------------------------
def test_advice_names_the_yaml_key_for_guards_from_yaml(tmp_path):
    from datasets import Dataset
    from transformers import Trainer

    from trainer_guard.tiny import tiny_dataset, tiny_lora

    model = tiny_model("llama-tied")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = 0
    ids = Dataset.from_dict({"input_ids": [[5, 6, 7]]})
    (yaml_guard,) = trainer_guard.callbacks_from_dict({"untrained_tokens": {"mode": "raise"}})
    with pytest.raises(trainer_guard.UntrainedTokensError) as e:
        yaml_guard.check(model, ids)
    assert "Use untrained_tokens: {mode: fix} in your trainer_guard YAML to set them" in str(e.value)
    with pytest.raises(trainer_guard.UntrainedTokensError) as e:
        trainer_guard.UntrainedTokensGuard(mode="raise").check(model, ids)
    assert "Use UntrainedTokensGuard(mode='fix') to set them" in str(e.value)

    def run(model, callbacks, resume=None):
        Trainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset(8, 16, 128),
                callbacks=callbacks).train(resume_from_checkpoint=resume)

    run(tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"]), _defaults())
    with pytest.raises(trainer_guard.ResumeMismatchError) as e:
        run(tiny_lora(tiny_model("llama-untied")), _defaults(), resume=str(tmp_path / "checkpoint-2"))
    assert "or set resume: {mode: fix} in your trainer_guard YAML; resume: {mode: warn} in your" in str(e.value)
    assert "ResumeGuard(mode=" not in str(e.value)


def test_tied_checkpoint_saved_without_guards_resumed_untied(tmp_path):
    """No tie record (the first run had no guards): the checkpoint's config.json says tied and stores the embedding
    only. Was: a random head loaded, then ResumeGuard's 'optimizer groups hold [16, 5] params now' with mode='fix'."""
    _run("llama-tied", tmp_path, [])
    guards = _defaults()
    model = _run("llama-untied", tmp_path, guards, resume=str(tmp_path / "checkpoint-2"), max_steps=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tied = next(g for g in guards if isinstance(g, trainer_guard.TiedWeightsGuard))
    assert any(e.startswith("tie change at resume: checkpoint-2 was trained with lm_head.weight tied to "
                            "model.embed_tokens.weight (stored once), this model is untied") for e in tied.report())
