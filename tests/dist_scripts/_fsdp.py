"""FSDP2 through the Hugging Face ``Trainer`` on CPU processes (gloo), for the fsdp*.py scripts (tests/test_sharded.py).

accelerate (1.15/1.16) only switches FSDP on for GPU-like distributed types: ``AcceleratorState.__init__`` turns
the ``fsdp_plugin`` it is given into ``DistributedType.FSDP`` for ``MULTI_GPU``, ``MULTI_XPU``, ... but not for
``MULTI_CPU``, and the ``Trainer`` then trains plain DDP without a word. :func:`allow_fsdp_on_cpu` patches that one
decision, in the test process only (never in the package): when the state came out ``MULTI_CPU`` although an FSDP
plugin was given, it becomes ``FSDP`` with that plugin. Everything else (wrapping with ``fully_shard``, DTensor
parameters, ``pytorch_model_fsdp_0`` / ``optimizer_0`` checkpoints through torch.distributed.checkpoint) is
accelerate's and torch's own code.

- :func:`fsdp_args`: ``TrainingArguments`` for a tiny FSDP2 run (``fsdp="full_shard"``, ``fsdp_config`` version 2).
- :func:`sharding_facts`: what actually wraps the model on this rank (DTensor parameters, their placements, FSDP
  modules), so a test can assert that the run is really sharded.
- :func:`watchdog`: end this rank with its results written when a phase takes longer than it should (a rank left
  waiting in a collective), instead of hanging CI.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

import _common
from _common import RANK, dump

_PATCHED = False


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's ``AcceleratorState`` take an FSDP plugin on ``MULTI_CPU`` (test harness only; idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    real = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
    _PATCHED = True


def fsdp_args(output_dir: str, *, state_dict_type: str = "SHARDED_STATE_DICT", layer_cls: str = "LlamaDecoderLayer",
              **kw):
    """``TrainingArguments`` for a tiny FSDP2 run on CPU (``conftest.make_args`` plus the FSDP settings)."""
    from conftest import make_args

    return make_args(output_dir, fsdp="full_shard", fsdp_config={
        "version": 2, "transformer_layer_cls_to_wrap": [layer_cls], "state_dict_type": state_dict_type,
        "reshard_after_forward": True, "cpu_ram_efficient_loading": False}, **kw)


def sharding_facts(trainer) -> dict:
    """What wraps the Trainer's model on this rank: distributed type, FSDP2 modules, DTensor parameters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model = trainer.model
    params = list(model.named_parameters())
    dt = [(n, p) for n, p in params if isinstance(p, DTensor)]
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "fsdp_modules": [n or "<model>" for n, m in model.named_modules() if isinstance(m, FSDPModule)],
        "n_params": len(params),
        "n_dtensors": len(dt),
        "placements": sorted({str(p.placements) for _, p in dt}),
        "local_rows": {n: int(p.to_local().shape[0]) for n, p in dt if p.dim() == 2},
        "full_rows": {n: int(p.shape[0]) for n, p in dt if p.dim() == 2},
    }


class watchdog:
    """``with watchdog(results, result, "phase", seconds):`` ends this rank, its results written with
    ``result["hung"] = phase`` and the main thread's stack, when the block runs longer than ``seconds``."""

    def __init__(self, results: str, result: dict, phase: str, seconds: float = 240.0):
        self.results, self.result, self.phase, self.seconds = results, result, phase, seconds

    def _fire(self) -> None:
        frame = sys._current_frames().get(threading.main_thread().ident)
        stack = traceback.format_stack(frame)[-8:] if frame is not None else []
        self.result.update(hung=self.phase, hung_stack="".join(stack))
        dump(self.results, self.result)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def __enter__(self):
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


__all__ = ["allow_fsdp_on_cpu", "fsdp_args", "sharding_facts", "watchdog", "RANK", "_common"]
