"""``callbacks=[...]`` alone gives every protection (issue 17): guards wire the Trainer that builds them.

Clients such as LLaMA-Factory (``run_exp(callbacks=...)``) and TRL build the Trainer inside their own function and
never hand it back, so ``trainer_guard.guard(trainer)`` cannot be called. These tests build the Trainer that way.
"""

import logging
import warnings

import pytest
from conftest import make_args
from transformers import Trainer

import trainer_guard
from trainer_guard import HeadGuard, IntegrityGuard, ResumeGuard, ResumeMismatchError, TrainerGuardError
from trainer_guard.callbacks import hooks
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")

MTS = ["embed_tokens", "lm_head"]
MANIFEST = "trainer_guard_manifest.json"


def run_exp(model, output_dir, callbacks, resume=None, final=None, cls=Trainer, **args):
    """A client's entry point: builds its own Trainer from ``callbacks``, trains, saves; returns nothing."""
    trainer = cls(model=model, args=make_args(output_dir, **args), train_dataset=tiny_dataset(8, 16, 128),
                  callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    if final:
        trainer.save_model(final)


def test_a_wrong_resume_in_a_client_stops_with_the_guards_error(tmp_path):
    """LoRA + modules_to_save resumed with the default LoRA: without the guard the Trainer's optimizer load dies with
    a bare ValueError; with the guard only in callbacks, ResumeGuard stops first, naming the modules."""
    run_exp(tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS), tmp_path / "out", [ResumeGuard()],
            max_steps=2)
    ckpt = str(tmp_path / "out" / "checkpoint-2")
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):  # no guard: the bare error
        run_exp(tiny_lora(tiny_model("llama-untied")), tmp_path / "out", [], resume=ckpt)
    with pytest.raises(TrainerGuardError) as e:
        run_exp(tiny_lora(tiny_model("llama-untied")), tmp_path / "out", trainer_guard.callbacks_from_yaml(
            trainer_guard.default_config_path()), resume=ckpt)
    assert isinstance(e.value, ResumeMismatchError)
    assert str(e.value).startswith("ResumeGuard: the trainable set differs from checkpoint-2")
    assert "lm_head, model.embed_tokens: 8,192 params trainable in checkpoint-2 (modules_to_save), frozen now" in str(
        e.value)


def test_mode_fix_restores_the_set_in_a_client(tmp_path):
    run_exp(tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS), tmp_path / "out", [ResumeGuard()],
            max_steps=2)
    g = ResumeGuard(mode="fix")
    run_exp(tiny_lora(tiny_model("llama-untied")), tmp_path / "out", [g], max_steps=3,
            resume=str(tmp_path / "out" / "checkpoint-2"))
    assert (tmp_path / "out" / "checkpoint-3").is_dir()
    assert any(ev.startswith("fixed, trainable set restored") for ev in g.report()), g.report()


@pytest.mark.parametrize("kind", ["llama-tied", "llama-tied+lora"])
def test_a_clients_save_model_output_gets_a_manifest_and_a_head_check(kind, tmp_path):
    model = tiny_model("llama-tied")
    model = tiny_lora(model) if kind.endswith("lora") else model
    head = HeadGuard()
    run_exp(model, tmp_path / "out", [IntegrityGuard(), head], final=str(tmp_path / "final"), max_steps=1,
            save_strategy="no")
    manifests = list((tmp_path / "final").rglob(MANIFEST))
    assert len(manifests) == 1
    assert head.checked == [str(tmp_path / "final")]


def test_guard_stays_valid_and_idempotent_on_a_self_wired_trainer(tmp_path):
    trainer = Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path), callbacks=[IntegrityGuard()])
    assert hooks.is_wired(trainer)
    train = trainer.train
    assert trainer_guard.guard(trainer) is trainer and trainer.train is train


def test_a_trainer_subclass_is_found_too(tmp_path):
    class ClientTrainer(Trainer):  # as TRL's trainers: their own __init__ around Trainer's
        def __init__(self, *a, **kw):
            kw.setdefault("callbacks", [])
            super().__init__(*a, **kw)

    trainer = ClientTrainer(model=tiny_model("llama-tied"), args=make_args(tmp_path), callbacks=[HeadGuard()])
    assert hooks.is_wired(trainer)


def test_a_trainer_without_guards_is_left_alone(tmp_path):
    trainer = Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path))
    assert not hooks.is_wired(trainer) and "train" not in vars(trainer)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_an_event_fired_outside_a_trainer_warns_once_to_call_guard(monkeypatch, tmp_path):
    monkeypatch.setattr(hooks, "_warned_unfound", False)
    records = _Records()
    logger = logging.getLogger("trainer_guard")
    logger.addHandler(records)
    try:
        args = make_args(tmp_path)
        for g in (ResumeGuard(), IntegrityGuard(), ResumeGuard()):
            g.on_init_end(args, None, None)  # a hand-made event loop: no Trainer up the stack
    finally:
        logger.removeHandler(records)
    said = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
    assert said == ["trainer_guard: ResumeGuard could not find the Trainer it belongs to, so its checks before the "
                    "Trainer's checkpoint loads and of save_model() do not run; call trainer = "
                    "trainer_guard.guard(trainer) after building the Trainer"]


def test_guards_added_after_init_are_wired_by_guard(tmp_path):
    trainer = Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path, max_steps=1, save_strategy="no"),
                      train_dataset=tiny_dataset(8, 16, 128))
    trainer.add_callback(IntegrityGuard())
    assert not hooks.is_wired(trainer)  # no event reached the guard before train(): guard() is the way
    trainer_guard.guard(trainer).train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / MANIFEST).is_file()


# -- TRL ----------------------------------------------------------------------------------------------------------
def _sft(model, output_dir, callbacks, resume=None, final=None, **args):
    """TRL's SFT entry as a client calls it: SFTTrainer built and trained inside, never returned."""
    trl = pytest.importorskip("trl")
    config = trl.SFTConfig(**{**make_args(output_dir, **args).to_dict(), "output_dir": str(output_dir),
                              "dataset_kwargs": {"skip_prepare_dataset": True}, "remove_unused_columns": False})
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                  pad_token="<pad>", unk_token="<unk>")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=tiny_dataset(8, 16, 128), processing_class=tok,
                             data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    if final:
        trainer.save_model(final)


def test_trl_sft_trainer_with_callbacks_only(tmp_path):
    pytest.importorskip("trl")
    _sft(tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS), tmp_path / "out", [ResumeGuard()], max_steps=2)
    with pytest.raises(ResumeMismatchError, match="trainable set differs from checkpoint-2"):
        _sft(tiny_lora(tiny_model("llama-untied")), tmp_path / "out", [ResumeGuard()],
             resume=str(tmp_path / "out" / "checkpoint-2"))
    _sft(tiny_model("llama-tied"), tmp_path / "plain", [IntegrityGuard()], final=str(tmp_path / "final"),
         max_steps=1, save_strategy="no")
    assert (tmp_path / "final" / MANIFEST).is_file()
