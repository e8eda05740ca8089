"""Contract every guard in the registry must honour (Composer-style): built from YAML with its defaults,
survives repeated train begin/end and a second train() on the same Trainer, raises only trainer_guard errors
for bad options, and documents itself."""

import inspect

import pytest
from conftest import make_args
from transformers import Trainer, TrainerCallback

from trainer_guard import GUARDS, ConfigError, TrainerGuardError, callbacks_from_dict
from trainer_guard.tiny import tiny_dataset, tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GUARDS))
def test_guard_contract(name, tmp_path):
    cls = GUARDS[name]
    assert issubclass(cls, TrainerCallback) and issubclass(cls, TrainerGuardError) is False
    assert cls.name == name
    assert cls.__doc__ and "Example" in cls.__doc__, f"{cls.__name__} needs a docstring with an Example"
    [cb] = callbacks_from_dict({name: {}})
    assert isinstance(cb, cls)
    model = tiny_model("llama-tied")
    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=2, save_steps=2),
                      train_dataset=tiny_dataset(8), callbacks=[cb])
    trainer.train()
    trainer.train()  # a second full run on the same objects
    for _ in range(2):
        cb.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model,
                          optimizer=trainer.optimizer, lr_scheduler=trainer.lr_scheduler)
        cb.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)


@pytest.mark.parametrize("name", list(GUARDS))
def test_unknown_option_is_a_config_error(name):
    with pytest.raises(ConfigError, match=f"{name}: unknown option 'no_such_option'; valid options: "):
        callbacks_from_dict({name: {"no_such_option": 1}})


@pytest.mark.parametrize("name", list(GUARDS))
def test_options_are_typed(name):
    sig = inspect.signature(GUARDS[name].__init__)
    for p in list(sig.parameters.values())[1:]:
        assert p.annotation is not inspect.Parameter.empty, f"{name}.{p.name} needs a type hint"
        assert p.default is not inspect.Parameter.empty, f"{name}.{p.name} needs a default"
