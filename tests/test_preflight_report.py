"""AdapterSizeGuard reports once per run: a second ``train()`` of the same model (a resume on the same Trainer, a
second call) does not repeat the same numbers; a model whose numbers changed is reported again."""

import logging

from conftest import make_args
from transformers import Trainer

from trainer_guard import AdapterSizeGuard
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model


def _lora(**kw):
    return tiny_lora(tiny_model("llama-untied"), **kw)


def test_one_report_per_run_not_per_train_call(tmp_path, caplog):
    guard = AdapterSizeGuard()
    trainer = Trainer(model=_lora(modules_to_save=["embed_tokens", "lm_head"]),
                      args=make_args(tmp_path, max_steps=2, save_steps=1), train_dataset=tiny_dataset(16),
                      callbacks=[guard])
    with caplog.at_level(logging.INFO, logger="trainer_guard"):
        trainer.train()
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "[AdapterSizeGuard]" in r.getMessage()]
    assert len(said) == 1 and "+8,192" in said[0], said
    assert len(guard.report()) == 1 and guard.last_report.extra_trainable == 2 * 128 * 32


def test_a_changed_model_is_reported_again(tmp_path):
    guard = AdapterSizeGuard()
    for i, kw in enumerate(({"modules_to_save": ["embed_tokens", "lm_head"]}, {"modules_to_save": ["lm_head"]})):
        Trainer(model=_lora(**kw), args=make_args(tmp_path / str(i), max_steps=1, save_strategy="no"),
                train_dataset=tiny_dataset(8), callbacks=[guard]).train()
    assert len(guard.report()) == 2 and "+8,192" in guard.report()[0] and "+4,096" in guard.report()[1]
