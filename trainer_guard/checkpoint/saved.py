"""What a ``Trainer`` save of a model writes: its stored tensors and names, tie groups, adapter layout.

transformers reverts its load-time weight conversions on save (per-expert MoE weights, a vision-language model's
original names) and PEFT saves each adapter on its own; these functions say, from the live model, which tensors end
up under which names in which directory. Pure functions, no Trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core.ties import find_tied_groups
from ..files import adapter_subdirs  # noqa: F401  (re-exported: where a save puts named adapters)

__all__ = [
    "saved_layout",
    "saved_tensors",
    "stored_groups",
    "stored_names",
    "converted_names",
    "as_saved",
    "peft_adapter_names",
    "adapter_subdirs",
]


def saved_layout(model: torch.nn.Module) -> dict[str, tuple[dict[str, torch.Tensor], list[list[str]]]]:
    """Where a ``Trainer`` save of ``model`` puts its tensors: sub-directory -> :func:`saved_tensors` of it.

    ``""`` is the checkpoint directory itself. A PEFT model's adapters are saved as ``PeftModel.save_pretrained``
    lays them out: ``"default"`` in the directory, every other adapter name in ``<directory>/<name>/`` (this is
    where ``Trainer`` looks for them on resume). Any other model: ``{"": saved_tensors(model)}``.

    Example:
        >>> from trainer_guard.tiny import tiny_model
        >>> list(saved_layout(tiny_model("llama-tied")))
        ['']
    """
    names = peft_adapter_names(model)
    if not names:
        return {"": saved_tensors(model)}
    return {("" if n == "default" else n): saved_tensors(model, adapter_name=n) for n in names}


def peft_adapter_names(model: Any) -> list[str]:
    """The adapter names a ``PeftModel`` saves (all of ``peft_config``); ``[]`` for any other model."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return []
    return sorted(model.peft_config) if isinstance(model, PeftModel) else []


def saved_tensors(
    model: torch.nn.Module, adapter_name: str | None = None
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """The tensors a ``Trainer`` save of ``model`` writes, keyed by their stored names, and its tie groups.

    - PEFT model: the state dict of adapter ``adapter_name`` (default: the active one) as
      ``PeftModel.save_pretrained`` writes it (``get_peft_model_state_dict``, embedding layers ``"auto"``), no tie
      groups. Several adapters are saved into several directories: see :func:`saved_layout`.
    - Hugging Face model: ``state_dict()`` minus ``_keys_to_ignore_on_save``, under the names ``save_pretrained``
      writes (load-time weight conversions such as fused MoE experts reverted); tie groups found by identity (the
      save keeps one member per group).
    - Any other module: ``state_dict()`` (a guard's state-dict hook may already have dropped tie aliases).
    """
    try:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError:  # pragma: no cover
        PeftModel = None
    if PeftModel is not None and isinstance(model, PeftModel):
        from transformers.utils import logging as hf_logging

        adapter = adapter_name or (model.active_adapter if isinstance(model.active_adapter, str)
                                   else model.active_adapters[0])
        verbosity = hf_logging.get_verbosity()
        try:
            sd = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers="auto")
        finally:
            hf_logging.set_verbosity(verbosity)
        return dict(sd), []
    sd = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        sd.pop(key, None)
    return as_saved(model, dict(sd)), stored_groups(model, find_tied_groups(model), sd)


def stored_groups(model: torch.nn.Module, groups: list[list[str]],
                  sd: Mapping[str, torch.Tensor] | None = None) -> list[list[str]]:
    """Tie ``groups`` under the names ``save_pretrained`` stores (a vision-language model's ``lm_head.weight`` is
    ``language_model.lm_head.weight`` on disk); names it stores unchanged stay as they are."""
    sd = model.state_dict() if sd is None else sd
    return [[_saved_name(model, n, sd.get(n)) for n in g] for g in groups]


def _saved_name(model: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> str:
    """The name ``save_pretrained`` stores ``name`` under when it only renames it (a vision-language model's
    ``lm_head.weight`` -> ``language_model.lm_head.weight``); ``name`` itself otherwise."""
    if tensor is None:
        return name
    out = stored_names(model, name, tensor)
    return next(iter(out)) if len(out) == 1 else name


def stored_names(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> set[str]:
    """The names ``save_pretrained`` stores the live tensor ``name`` under (``{name}`` when unchanged), decided on a
    meta tensor of its shape: nothing is allocated or copied."""
    return set(as_saved(model, {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")}))


def converted_names(model: torch.nn.Module) -> set[str]:
    """Stored names that exist only in the layout ``save_pretrained`` writes, not in ``model.state_dict()``
    (transformers' load-time weight conversions, e.g. per-expert MoE tensors). ``Trainer``'s resume loads weights
    with ``load_state_dict(strict=False)``, which skips every one of them."""
    if peft_adapter_names(model):
        return set()
    sd = model.state_dict()
    return {k for n, t in sd.items() for k in stored_names(model, n, t)} - set(sd)


def as_saved(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` under the names and layout ``save_pretrained`` writes: transformers reverts its load-time weight
    conversions on save (e.g. Mixtral's fused ``mlp.experts.gate_up_proj`` becomes per-expert
    ``block_sparse_moe.experts.N.w1/w3.weight``). Uses transformers' own ``revert_weight_conversion``; models it
    does not convert come back unchanged. Where it is unavailable or fails, the names stay as they are and the
    renamed tensors are checksummed from the files (:func:`reconcile`)."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - transformers < 5
        return sd
    if not isinstance(model, PreTrainedModel):
        return sd
    try:
        return dict(revert_weight_conversion(model, sd))
    except Exception:  # pragma: no cover - a conversion this version cannot revert: files answer for it
        return sd
