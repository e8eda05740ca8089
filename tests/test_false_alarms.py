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
