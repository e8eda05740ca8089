"""Load what a ``Trainer`` resume skips: tensors a checkpoint stores in transformers' converted layout.

transformers 5 converts some weights at load time (Mixtral's per-expert ``block_sparse_moe.experts.N.w1/w3`` are
fused into ``mlp.experts.gate_up_proj``) and reverts the conversion when it saves. ``Trainer`` loads checkpoints
(resume, ``load_best_model_at_end``) with ``load_state_dict(strict=False)``, which matches none of the stored
names: the experts and router keep whatever they held, with one logged warning (transformers issue #48805).
Vision-language models (LLaVA, Qwen2-VL) are saved under their original names (``language_model.model.*``), so a
resume loads none of their weights at all (transformers issue #43701).

:func:`load_converted` loads them. It asks transformers' own ``revert_weight_conversion`` where each element of a
live tensor is stored, by running it on a tensor of element indices: the conversions are pure data movement
(split, concatenate, stack, transpose, permute), so the result maps every stored element to its live position.
The map is checked to be a bijection and every stored tensor's dtype and shape are checked before anything is
written; then each live tensor is filled in one piece (peak extra memory: one live tensor).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .manifest import _as_saved, dtype_name, read_index

__all__ = ["ConvertedLoad", "conversion_map", "load_converted"]


class ConvertedLoad(NamedTuple):
    """Result of :func:`load_converted`: live names ``loaded``, and ``problems`` (nothing was loaded when any)."""

    loaded: list[str]
    problems: list[str]


def conversion_map(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Where ``save_pretrained`` stores the live tensor ``name``: stored name -> index tensor (of the stored shape)
    of positions in ``tensor.reshape(-1)``; ``None`` when it is stored unchanged under its own name.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
        >>> w = model.model.layers[0].mlp.experts.gate_up_proj
        >>> sorted(conversion_map(model, "model.layers.0.mlp.experts.gate_up_proj", w))[0]
        'model.layers.0.block_sparse_moe.experts.0.w1.weight'
    """
    n = tensor.numel()
    dtype = torch.int32 if n < 2**31 else torch.int64
    if set(_as_saved(model, {name: torch.empty(tensor.shape, dtype=dtype, device="meta")})) == {name}:
        return None  # decided on a meta tensor: nothing allocated for the tensors stored as they are
    return dict(_as_saved(model, {name: torch.arange(n, dtype=dtype).view(tensor.shape)}))


def _bijective(maps: dict[str, torch.Tensor], numel: int) -> bool:
    if sum(t.numel() for t in maps.values()) != numel:
        return False
    seen = torch.zeros(numel, dtype=torch.bool)
    for t in maps.values():
        seen[t.reshape(-1).long()] = True
    return bool(seen.all())


def load_converted(model: torch.nn.Module, directory: str | os.PathLike) -> ConvertedLoad:
    """Load into ``model`` every tensor the checkpoint ``directory`` stores in transformers' converted layout and
    no live tensor has by name (what ``load_state_dict(strict=False)`` skipped). All or nothing.

    Only Hugging Face models converted by transformers are touched; any other model returns ``([], [])``.

    Example:
        >>> import tempfile
        >>> from trainer_guard.tiny import tiny_model
        >>> model, d = tiny_model("llama-tied"), tempfile.mkdtemp()
        >>> model.save_pretrained(d)
        >>> load_converted(model, d)  # a dense Llama stores every tensor under its own name
        ConvertedLoad(loaded=[], problems=[])
    """
    from safetensors import safe_open

    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return ConvertedLoad([], [])
    if not isinstance(model, PreTrainedModel):  # PEFT wrappers too: their checkpoints hold adapters only
        return ConvertedLoad([], [])
    directory = os.fspath(directory)
    index = read_index(directory)
    live = model.state_dict()
    plan: list[tuple[str, list[str]]] = []
    problems: list[str] = []
    for name, tensor in live.items():
        if name in index:
            continue  # the Trainer's load matched it by name
        maps = conversion_map(model, name, tensor)
        if maps is None or not any(k in index for k in maps):
            continue  # not converted, or this checkpoint does not store it (an alias, another kind of save)
        absent = sorted(k for k in maps if k not in index)
        if absent:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            problems.append(f"{name}: the checkpoint lacks {absent[0]}{more} of the {len(maps)} tensors it is "
                            f"stored as")
            continue
        for k, idx in sorted(maps.items()):
            info = index[k]
            if info.dtype != dtype_name(tensor.dtype) or info.shape != tuple(idx.shape):
                problems.append(f"{name}: stored part {k} is {info.dtype} {list(info.shape)} in {info.file}, the "
                                f"model expects {dtype_name(tensor.dtype)} {list(idx.shape)}")
        if not _bijective(maps, tensor.numel()):
            problems.append(f"{name}: transformers' conversion of it is not a plain re-arrangement; not loaded")
        plan.append((name, sorted(maps)))
    if problems:
        return ConvertedLoad([], problems)
    for name, stored in plan:  # one live tensor at a time: its map, its stored parts, one copy into the parameter
        tensor = live[name]
        maps = conversion_map(model, name, tensor)
        buf = torch.empty(tensor.numel(), dtype=tensor.dtype)
        by_file: dict[str, list[str]] = {}
        for k in stored:
            by_file.setdefault(index[k].file, []).append(k)
        for fname, keys in by_file.items():
            with safe_open(os.path.join(directory, fname), framework="pt") as f:
                for k in keys:
                    buf[maps[k].reshape(-1).long()] = f.get_tensor(k).reshape(-1)
        with torch.no_grad():
            tensor.copy_(buf.view(tensor.shape))
    return ConvertedLoad([name for name, _ in plan], [])
