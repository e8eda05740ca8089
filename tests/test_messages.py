"""Guard messages follow transformers' verbosity; a clean run and a healthy resume say so at INFO, never WARNING
(issue 17, "messages users see")."""

import logging
import warnings

import pytest
from conftest import make_args
from transformers import Trainer
from transformers.utils import logging as hf_logging

import trainer_guard
from trainer_guard import ResumeGuard
from trainer_guard.callbacks import GUARDS
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")

MTS = ["embed_tokens", "lm_head"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records = []

    def emit(self, record):
        if record.name == "trainer_guard":
            self.records.append(record)

    def at(self, level):
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def shown():
    """What transformers' handlers receive from the trainer_guard logger; transformers' verbosity restored after."""
    records, verbosity = _Records(), hf_logging.get_verbosity()
    hf_logging.add_handler(records)  # transformers' own utility: the guard lines must reach its handlers
    try:
        yield records
    finally:
        hf_logging.remove_handler(records)
        hf_logging.set_verbosity(verbosity)


def _defaults():
    return trainer_guard.callbacks_from_yaml(trainer_guard.default_config_path())


def _run(model, out, resume=None, callbacks=None, **kw):
    trainer = Trainer(model=model, args=make_args(out, **kw), train_dataset=tiny_dataset(8, 16, 128),
                      callbacks=_defaults() if callbacks is None else callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_guard_info_lines_follow_set_verbosity_info(shown, tmp_path):
    hf_logging.set_verbosity_warning()
    _run(tiny_model("llama-tied"), tmp_path / "a", max_steps=1, save_strategy="no")
    assert shown.at(logging.INFO) == []  # transformers' default verbosity: no guard INFO line
    hf_logging.set_verbosity_info()
    _run(tiny_model("llama-tied"), tmp_path / "b", max_steps=1, save_strategy="no")
    assert any("guards active" in m for m in shown.at(logging.INFO))


def test_guard_lines_are_silenced_by_set_verbosity_error(shown, tmp_path):
    hf_logging.set_verbosity_error()
    trainer_guard.DtypeGuard().note("a warning to act on", "warning")
    assert shown.records == []
    hf_logging.set_verbosity_warning()
    trainer_guard.DtypeGuard().note("a warning to act on", "warning")
    assert shown.at(logging.WARNING) == ["[DtypeGuard] a warning to act on"]


def test_log_level_info_in_training_arguments_shows_guard_lines(shown, tmp_path):
    hf_logging.set_verbosity_warning()
    _run(tiny_model("llama-tied"), tmp_path, max_steps=1, save_strategy="no", log_level="info")  # --log_level info
    assert any("guards active" in m for m in shown.at(logging.INFO))


def test_one_info_line_at_train_begin_names_the_active_guards(shown, tmp_path):
    hf_logging.set_verbosity_info()
    guards = list(reversed(_defaults()))  # the line lists them in the order they act, not the callback order
    _run(tiny_model("llama-tied"), tmp_path, max_steps=1, save_strategy="no", callbacks=guards)
    lines = [m for m in shown.at(logging.INFO) if "guards active" in m]
    names = [cls.__name__ for cls in GUARDS.values() if any(type(g) is cls for g in guards)]
    assert lines == [f"trainer_guard: {len(names)} guards active: {', '.join(names)}"]


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied+lora-mts", "plain-gpt"])
def test_a_healthy_resume_prints_no_guard_warning(shown, kind, tmp_path):
    def model():
        if kind.endswith("lora-mts"):
            return tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS)
        return tiny_model(kind)

    hf_logging.set_verbosity_info()
    _run(model(), tmp_path / "out", max_steps=2)
    shown.records.clear()
    _run(model(), tmp_path / "out", resume=str(tmp_path / "out" / "checkpoint-2"), max_steps=4)
    assert shown.at(logging.WARNING) == []
    assert "[ResumeGuard] trainable set matches checkpoint-2" in shown.at(logging.INFO)
    assert not any("trainable parameters at train begin" in m for m in shown.at(logging.INFO))  # the table: DEBUG


def test_a_changed_trainable_set_in_warn_mode_still_warns(shown, tmp_path):
    _run(tiny_lora(tiny_model("llama-untied"), modules_to_save=MTS), tmp_path / "out", max_steps=2,
         callbacks=[ResumeGuard()])
    adapter_then_default = tiny_lora(tiny_model("llama-untied"))
    g = ResumeGuard(mode="warn", adapter_dir=str(tmp_path / "out" / "checkpoint-2"))
    shown.records.clear()
    _run(adapter_then_default, tmp_path / "fresh", max_steps=1, save_strategy="no", callbacks=[g])
    warned = shown.at(logging.WARNING)
    assert any("frozen now" in m for m in warned), warned
    assert not any("trainable set matches" in m for m in shown.at(logging.INFO))
