"""The axolotl plugin (issue 17), driven through the calls axolotl's PluginManager makes, without axolotl installed.

axolotl (``src/axolotl/integrations/base.py``, ``train.py``): ``load_plugin("module.Class")`` imports and builds the
plugin; ``register(cfg)``; ``get_input_args()``; ``pre_model_load`` ... ``post_model_load``; the Trainer is built
with ``add_callbacks_pre_trainer(cfg, model)``'s callbacks; ``post_trainer_create``; ``add_callbacks_post_trainer``
(added with ``add_callback``); ``train``; the final ``trainer.save_model(cfg.output_dir)``; ``post_train(cfg, model)``.
"""

import importlib
import os

import pytest
from conftest import make_args
from transformers import Trainer

import trainer_guard
from trainer_guard.callbacks import hooks
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

PLUGIN = "trainer_guard.integrations.axolotl.TrainerGuardPlugin"


class DictDefault(dict):
    """axolotl's config object: a dict whose missing keys read as None, also as attributes."""

    def __getattr__(self, name):
        return self.get(name)


def load_plugin(name):
    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)()


def axolotl_train(cfg, model, resume=None):
    """What axolotl's train() does with one registered plugin; returns the plugin and the trainer."""
    plugin = load_plugin(PLUGIN)
    plugin.register(cfg)
    assert plugin.get_input_args() == "trainer_guard.integrations.axolotl.TrainerGuardArgs"
    plugin.pre_model_load(cfg)
    plugin.post_model_build(cfg, model)
    plugin.post_model_load(cfg, model)
    trainer = Trainer(model=model, args=make_args(cfg.output_dir, max_steps=2),
                      train_dataset=tiny_dataset(8, 16, 128), callbacks=plugin.add_callbacks_pre_trainer(cfg, model))
    plugin.post_trainer_create(cfg, trainer)
    for cb in plugin.add_callbacks_post_trainer(cfg, trainer):
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(cfg.output_dir)
    plugin.post_train(cfg, model)
    plugin.post_train_unload(cfg)
    return plugin, trainer


@pytest.mark.parametrize("kind", ["llama-tied", "llama-tied+lora"])
def test_the_plugin_guards_axolotls_trainer_and_checks_the_final_save(tmp_path, kind):
    model = tiny_lora(tiny_model("llama-tied")) if kind.endswith("lora") else tiny_model("llama-tied")
    cfg = DictDefault(output_dir=str(tmp_path / "out"), plugins=[PLUGIN])
    plugin, trainer = axolotl_train(cfg, model)
    default = [type(g).__name__ for g in trainer_guard.callbacks_from_yaml()]
    assert [type(g).__name__ for g in hooks.guards_of(trainer)] == default and hooks.is_wired(trainer)
    assert os.path.isfile(tmp_path / "out" / "trainer_guard_manifest.json")
    assert plugin.checked == [cfg.output_dir]


def test_a_damaged_final_save_stops_at_post_train(tmp_path):
    cfg = DictDefault(output_dir=str(tmp_path / "out"))
    plugin = load_plugin(PLUGIN)
    model = tiny_model("llama-tied")
    trainer = Trainer(model=model, args=make_args(cfg.output_dir, max_steps=1, save_strategy="no"),
                      train_dataset=tiny_dataset(8, 16, 128), callbacks=plugin.add_callbacks_pre_trainer(cfg, model))
    trainer.train()
    trainer.save_model(cfg.output_dir)
    weights = tmp_path / "out" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(trainer_guard.IntegrityError, match="the final save in .* is not sound"):
        plugin.post_train(cfg, model)
    plugin.post_train(DictDefault(cfg, trainer_guard={"check_final": False}), model)  # asked not to check


def test_options_under_one_key_and_advice_in_axolotl_terms(tmp_path):
    cfg = DictDefault(output_dir=str(tmp_path), trainer_guard={"resume": {"mode": "warn"}, "embedding_lr": False})
    guards = load_plugin(PLUGIN).add_callbacks_pre_trainer(cfg, None)
    resume = next(g for g in guards if isinstance(g, trainer_guard.ResumeGuard))
    assert resume.options["mode"] == "warn"
    assert resume.advise(mode="fix") == "trainer_guard: {resume: {mode: fix}} in your axolotl config"
    with pytest.raises(trainer_guard.ConfigError, match="unknown option 'mdoe'"):
        load_plugin(PLUGIN).register(DictDefault(trainer_guard={"resume": {"mdoe": "fix"}}))


def test_a_trainer_built_without_the_callbacks_is_guarded_at_post_trainer_create(tmp_path):
    cfg = DictDefault(output_dir=str(tmp_path))
    plugin = load_plugin(PLUGIN)
    trainer = Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path, max_steps=1))
    plugin.post_trainer_create(cfg, trainer)
    assert len(hooks.guards_of(trainer)) == len(trainer_guard.callbacks_from_yaml()) and hooks.is_wired(trainer)
