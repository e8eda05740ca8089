"""trainer_guard.callbacks.hooks: the one module that replaces a Trainer's own methods (issue 15).

Structure: no other module of the package assigns to a Trainer method. Behaviour: every hook fires on every guard of
the Trainer in the fixed ``GUARDS`` order whatever the callback order, once per call however often the Trainer is
wired.
"""

import ast
import pathlib

import pytest
from conftest import make_args
from transformers import Trainer

import trainer_guard
from trainer_guard import Guard, guard
from trainer_guard.callbacks import GUARDS, hooks
from trainer_guard.tiny import tiny_dataset, tiny_model

PACKAGE = pathlib.Path(trainer_guard.__file__).parent
TRAINER_METHODS = {n for n in dir(Trainer) if callable(getattr(Trainer, n, None)) and not n.startswith("__")}


def _assigned_trainer_methods(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every ``x.<Trainer method> = ...`` and ``setattr(x, "<Trainer method>", ...)``."""
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and sub.attr in TRAINER_METHODS:
                    found.append((node.lineno, sub.attr))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) >= 2):
            name = node.args[1]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                if "trainer" in ast.unparse(node.args[0]).lower():  # a computed name set on a Trainer
                    found.append((node.lineno, "setattr(<computed name>)"))
            elif name.value in TRAINER_METHODS:
                found.append((node.lineno, name.value))
    return found


def test_only_hooks_py_replaces_trainer_methods():
    hooks_py = PACKAGE / "callbacks" / "hooks.py"
    elsewhere = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = _assigned_trainer_methods(ast.parse(path.read_text(), filename=str(path)))
        if path != hooks_py and found:
            elsewhere[str(path.relative_to(PACKAGE))] = found
    assert elsewhere == {}, f"Trainer methods replaced outside callbacks/hooks.py: {elsewhere}"
    names = {name for _, name in _assigned_trainer_methods(ast.parse(hooks_py.read_text()))}
    assert names == {"setattr(<computed name>)"}  # the one loop over the replaced methods


def test_the_scan_sees_a_replacement():
    tree = ast.parse("trainer.train = f\nself.trainer.save_model, x = g, 1\nsetattr(t, 'create_optimizer', h)\n"
                     "setattr(self.trainer, name, h)\nsetattr(module, name, p)\n")
    assert sorted(_assigned_trainer_methods(tree)) == [(1, "train"), (2, "save_model"), (3, "create_optimizer"),
                                                       (4, "setattr(<computed name>)")]


# -- firing order -------------------------------------------------------------------------------------------------
class _Mine(Guard):
    """A user's own guard: not in GUARDS, fires after every built-in guard."""

    name = "mine"

    def __init__(self) -> None:
        super().__init__()


def _record(guards, calls):
    for g in guards:
        for hook in hooks.HOOKS:
            setattr(g, hook, lambda trainer, *a, _g=g, _h=hook: calls.append((_h, type(_g).__name__, a)))


def test_hooks_fire_in_guards_order_whatever_the_callback_order(tmp_path):
    Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path / "out", max_steps=1, save_steps=1),
            train_dataset=tiny_dataset(8)).train()
    ckpt = str(tmp_path / "out" / "checkpoint-1")
    guards = [_Mine()] + [cls() for cls in reversed(list(GUARDS.values()))]
    calls: list = []
    _record(guards, calls)
    trainer = guard(Trainer(model=tiny_model("llama-tied"), train_dataset=tiny_dataset(8), callbacks=guards,
                            args=make_args(tmp_path / "out", max_steps=2, save_strategy="no")))
    trainer.train(resume_from_checkpoint=ckpt)
    trainer.save_model(str(tmp_path / "final"))
    order = [cls.__name__ for cls in GUARDS.values()] + ["_Mine"]
    fired = {}
    for hook, name, args in calls:
        fired.setdefault(hook, []).append(name)
    assert fired == {hook: order for hook in hooks.HOOKS}
    by_hook = {hook: args for hook, _, args in calls}
    assert by_hook["before_train"] == (ckpt,) and by_hook["before_weights_load"] == (ckpt, None)
    assert by_hook["before_optimizer_load"] == (ckpt,) and by_hook["after_save_model"] == (str(tmp_path / "final"),)


def test_wiring_twice_does_not_double_wrap(tmp_path):
    calls = []

    class Counting(Guard):
        name = "counting"

        def __init__(self) -> None:
            super().__init__()

        def before_optimizer_create(self, trainer):
            calls.append("create")

        def after_save_model(self, trainer, output_dir):
            calls.append(output_dir)

    g = Counting()
    trainer = Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path), callbacks=[g])
    guard(trainer)
    methods = {name: getattr(trainer, name) for name in ("train", "save_model", "create_optimizer",
                                                          "_load_from_checkpoint", "_load_optimizer_and_scheduler")}
    guard(guard(trainer))
    hooks.wire(trainer)
    g.wire(trainer)
    assert {name: getattr(trainer, name) for name in methods} == methods and hooks.is_wired(trainer)
    trainer.create_optimizer()
    trainer.save_model(str(tmp_path / "final"))
    assert calls == ["create", str(tmp_path / "final")]


def test_a_guard_added_after_wiring_fires_without_rewiring(tmp_path):
    trainer = guard(Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path), callbacks=[]))
    late = _Mine()
    calls: list = []
    _record([late], calls)
    trainer.add_callback(late)
    trainer.create_optimizer()
    assert calls == [("before_optimizer_create", "_Mine", ())]
    trainer.remove_callback(late)
    trainer.create_optimizer()
    assert len(calls) == 1


@pytest.mark.parametrize("hook", hooks.HOOKS)
def test_every_hook_is_a_no_op_on_the_base_guard(hook):
    assert getattr(hooks.GuardHooks, hook).__doc__ and hook in vars(hooks.GuardHooks)
