"""axolotl plugin: every guard from an axolotl YAML, the final save checked after training.

In the axolotl config::

    plugins:
      - trainer_guard.integrations.axolotl.TrainerGuardPlugin
    trainer_guard:            # optional; absent = the default guards
      config: default         # or the path of a trainer_guard YAML
      resume: {mode: fix}     # per-guard options over that config (keys as in configs/default.yaml)
      check_final: true       # check output_dir's final save at post_train (manifest, tensors, output head)

The guards are handed to the Trainer axolotl builds (``add_callbacks_pre_trainer``), so they wire it themselves;
``post_trainer_create`` wires it in any case. Advice in messages names the keys under ``trainer_guard:``.
axolotl is not imported unless installed: the plugin also runs where it is driven through the same calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from ..errors import ConfigError, IntegrityError

__all__ = ["TrainerGuardPlugin", "TrainerGuardArgs", "final_save_problems", "KEY"]

KEY = "trainer_guard"
_OWN = ("config", "check_final")

try:  # axolotl's base class when installed (every hook a no-op), else the same no-op hooks here
    from axolotl.integrations.base import BasePlugin as _Base
except ImportError:
    class _Base:  # the hooks axolotl's PluginManager calls
        def register(self, cfg: Any) -> None: ...
        def get_input_args(self) -> Optional[str]: ...
        def load_datasets(self, cfg: Any, preprocess: bool = False) -> Any: ...
        def pre_model_load(self, cfg: Any) -> None: ...
        def post_model_build(self, cfg: Any, model: Any) -> None: ...
        def pre_lora_load(self, cfg: Any, model: Any) -> None: ...
        def post_lora_load(self, cfg: Any, model: Any) -> None: ...
        def post_model_load(self, cfg: Any, model: Any) -> None: ...
        def get_trainer_cls(self, cfg: Any) -> Any: ...
        def post_trainer_create(self, cfg: Any, trainer: Any) -> None: ...
        def create_optimizer(self, cfg: Any, trainer: Any) -> Any: ...
        def create_lr_scheduler(self, cfg: Any, trainer: Any, optimizer: Any, num_training_steps: int) -> Any: ...
        def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list: return []
        def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list: return []
        def post_train(self, cfg: Any, model: Any) -> None: ...
        def post_train_unload(self, cfg: Any) -> None: ...

try:  # the schema axolotl merges into its config (get_input_args)
    from pydantic import BaseModel

    class TrainerGuardArgs(BaseModel):
        """``trainer_guard:`` in an axolotl config (validated by trainer_guard itself, every problem listed)."""

        trainer_guard: Optional[dict] = None
except ImportError:  # pragma: no cover
    TrainerGuardArgs = None  # type: ignore[assignment,misc]


def _options(cfg: Any) -> dict:
    raw = cfg.get(KEY) if isinstance(cfg, Mapping) else getattr(cfg, KEY, None)
    if raw is None or raw is True:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{KEY}: expected a mapping of options (config, check_final, guard keys), got {raw!r}")
    return dict(raw)


def _guards(cfg: Any) -> list:
    from ..config import callbacks_from_yaml

    opts = _options(cfg)
    config = opts.pop("config", "default")
    opts.pop("check_final", None)
    guards = callbacks_from_yaml(None if config in (None, "default") else config, **opts)
    for g in guards:
        g.from_config = "axolotl"  # advice: trainer_guard: {resume: {mode: fix}} in your axolotl config
    return guards


def final_save_problems(path: str) -> list[str]:
    """What is wrong with the model folder ``path`` a run saved last: damaged or missing files against its
    manifest, tensors that do not read, an output head that would reload at random (empty when sound)."""
    from ..checkpoint.verify import verify_checkpoint
    from ..core.head import missing_head_problems

    found = verify_checkpoint(path)
    return [f.message for f in found.problems] + list(missing_head_problems(path))


class TrainerGuardPlugin(_Base):
    """``plugins: [trainer_guard.integrations.axolotl.TrainerGuardPlugin]``: the guards of ``trainer_guard:``
    (default: every default guard) on axolotl's Trainer, and its final save checked at ``post_train``.

    Raises:
        ConfigError: at ``register``, every problem of ``trainer_guard:`` at once.
        IntegrityError: at ``post_train``, the final save in ``output_dir`` is damaged or reloads a random head.
    """

    def __init__(self) -> None:
        super().__init__()
        self.guards: list = []
        self.checked: list[str] = []  # the final save folders checked

    def register(self, cfg: Any) -> None:
        _guards(cfg)  # validate now, before any model loads

    def get_input_args(self) -> Optional[str]:
        return f"{__name__}.TrainerGuardArgs" if TrainerGuardArgs is not None else None

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        self.guards = _guards(cfg)
        return list(self.guards)

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        from ..callbacks import hooks
        from ..wiring import guard

        have = hooks.guards_of(trainer)
        if not have:  # a trainer built without the pre-trainer callbacks
            self.guards = self.guards or _guards(cfg)
            for g in self.guards:
                trainer.add_callback(g)
        guard(trainer)

    def post_train(self, cfg: Any, model: Any) -> None:
        opts = _options(cfg)
        output_dir = cfg.get("output_dir") if isinstance(cfg, Mapping) else getattr(cfg, "output_dir", None)
        if not opts.get("check_final", True) or not output_dir or int(os.environ.get("RANK", "0")) != 0:
            return  # after axolotl's cleanup_distributed: the main process checks alone
        problems = final_save_problems(str(output_dir))
        self.checked.append(str(output_dir))
        if problems:
            raise IntegrityError(f"trainer_guard: the final save in {output_dir} is not sound:\n  - "
                                 + "\n  - ".join(problems))
        from ..log import logger

        logger.info(f"trainer_guard: final save in {output_dir} verified")
