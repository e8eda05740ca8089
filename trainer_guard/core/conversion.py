"""Load what a ``Trainer`` resume skips: tensors a checkpoint stores in transformers' converted layout.

transformers 5 converts some weights at load time (Mixtral's per-expert ``block_sparse_moe.experts.N.w1/w3`` are
fused into ``mlp.experts.gate_up_proj``) and reverts the conversion when it saves. ``Trainer`` loads checkpoints
(resume, ``load_best_model_at_end``) with ``load_state_dict(strict=False)``, which matches none of the stored
names: the experts and router keep whatever they held, with one logged warning (transformers issue #48805).
Vision-language models (LLaVA, Qwen2-VL) are saved under their original names (``language_model.model.*``), so a
resume loads none of their weights at all (transformers issue #43701).

:func:`load_converted` loads them. It asks transformers' own ``revert_weight_conversion`` where each element of a
live tensor is stored, by running it on tensors of element indices: the conversions are pure data movement (split,
concatenate, stack, transpose, permute, rename), so the result maps every stored element to its live position.
Live tensors that share a stored tensor (``q_proj``, ``k_proj``, ``v_proj`` stored as one ``qkv_proj``) are mapped
together. The map is checked to be a bijection and every stored tensor's dtype and shape are checked before
anything is written; then each group of live tensors is filled, one group at a time. Extra memory, per group: the
index maps (4 bytes an element, plus the copies transformers' split operations make) and one buffer of the group's
size: measured 745 MB of CPU memory for a 134 MB bf16 Mixtral ``gate_up_proj`` (5.5x), released before the next
group. An I/O error while filling leaves the model partly loaded (the guard then stops the run).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .manifest import _as_saved, dtype_name, read_index, stored_names

__all__ = ["ConvertedLoad", "conversion_map", "group_map", "load_converted"]


class ConvertedLoad(NamedTuple):
    """Result of :func:`load_converted`: live names ``loaded``, and ``problems`` (nothing was loaded when any)."""

    loaded: list[str]
    problems: list[str]


def conversion_map(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Where ``save_pretrained`` stores the live tensor ``name``: stored name -> index tensor (of the stored shape)
    of positions in ``tensor.reshape(-1)``; ``None`` when it is stored unchanged under its own name. For a tensor
    stored together with others (fused on disk, split in memory) see :func:`group_map`.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
        >>> w = model.model.layers[0].mlp.experts.gate_up_proj
        >>> sorted(conversion_map(model, "model.layers.0.mlp.experts.gate_up_proj", w))[0]
        'model.layers.0.block_sparse_moe.experts.0.w1.weight'
    """
    if stored_names(model, name, tensor) == {name}:
        return None  # decided on a meta tensor: nothing allocated for the tensors stored as they are
    return group_map(model, {name: tensor})


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def group_map(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored name -> index tensor of positions in the concatenation of ``tensors``' flattened values (in the given
    order): where ``save_pretrained`` stores each of their elements when it saves them together."""
    total = sum(t.numel() for t in tensors.values())
    dtype, tags, offset = _index_dtype(total), {}, 0
    for name, t in tensors.items():
        tags[name] = torch.arange(offset, offset + t.numel(), dtype=dtype).view(t.shape)
        offset += t.numel()
    return dict(_as_saved(model, tags))


def _bijective(maps: dict[str, torch.Tensor], numel: int) -> bool:
    if sum(t.numel() for t in maps.values()) != numel:
        return False
    seen = torch.zeros(numel, dtype=torch.bool)
    for t in maps.values():
        seen[t.reshape(-1)] = True
    return bool(seen.all())


def _groups(model: torch.nn.Module, live: dict[str, torch.Tensor], index: dict) -> list[list[str]]:
    """Live names the Trainer's load missed whose stored names the checkpoint holds, grouped when they share a
    stored tensor (union of overlapping stored-name sets), in model order."""
    stored: dict[str, set[str]] = {}
    for name, tensor in live.items():
        if name in index:
            continue  # the Trainer's load matched it by name
        names = stored_names(model, name, tensor)
        if names != {name} and not names.isdisjoint(index):
            stored[name] = names
    groups: list[tuple[list[str], set[str]]] = []
    for name, names in stored.items():
        hit = [g for g in groups if g[1] & names]
        merged = ([n for g in hit for n in g[0]] + [name], set().union(names, *(g[1] for g in hit)))
        groups = [g for g in groups if not any(g is h for h in hit)] + [merged]
    order = {n: i for i, n in enumerate(live)}
    return sorted((sorted(g[0], key=order.get) for g in groups), key=lambda g: order[g[0]])


def load_converted(model: torch.nn.Module, directory: str | os.PathLike) -> ConvertedLoad:
    """Load into ``model`` every tensor the checkpoint ``directory`` stores in transformers' converted layout and
    no live tensor has by name (what ``load_state_dict(strict=False)`` skipped). Everything is checked first;
    nothing is loaded when anything is wrong.

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
    groups = _groups(model, live, index)
    problems: list[str] = []
    for group in groups:  # check everything before writing anything
        what = group[0] if len(group) == 1 else f"{', '.join(group)} (stored together)"
        maps = group_map(model, {n: live[n] for n in group})
        absent = sorted(k for k in maps if k not in index)
        if absent:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            problems.append(f"{what}: the checkpoint lacks {absent[0]}{more} of the {len(maps)} tensors it is "
                            f"stored as")
            continue
        dtypes = {dtype_name(live[n].dtype) for n in group}
        for k, idx in sorted(maps.items()):
            info = index[k]
            if dtypes != {info.dtype} or info.shape != tuple(idx.shape):
                problems.append(f"{what}: stored part {k} is {info.dtype} {list(info.shape)} in {info.file}, the "
                                f"model expects {'/'.join(sorted(dtypes))} {list(idx.shape)}")
        if not _bijective(maps, sum(live[n].numel() for n in group)):
            problems.append(f"{what}: transformers' conversion of it is not a plain re-arrangement; not loaded")
    if problems:
        return ConvertedLoad([], problems)
    for group in groups:  # one group at a time: its map, its stored parts, one copy into each parameter
        maps = group_map(model, {n: live[n] for n in group})
        buf = torch.empty(sum(live[n].numel() for n in group), dtype=live[group[0]].dtype)
        by_file: dict[str, list[str]] = {}
        for k in sorted(maps):
            by_file.setdefault(index[k].file, []).append(k)
        for fname, keys in by_file.items():
            with safe_open(os.path.join(directory, fname), framework="pt") as f:
                for k in keys:
                    buf[maps.pop(k).reshape(-1)] = f.get_tensor(k).reshape(-1)
        offset = 0
        with torch.no_grad():
            for n in group:
                t = live[n]
                t.copy_(buf[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
        del buf, maps
    return ConvertedLoad([n for g in groups for n in g], [])
