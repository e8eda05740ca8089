"""Tied (shared-storage) parameters: find them by identity, save them once, restore them after a load.

Pure functions, no Trainer. A *tie group* is a list of parameter names that are views of the same storage with
the same offset, shape and stride (so the same values); the first name is the one kept when saving (the first
registered, which is the input embedding for ``embed_tokens``/``lm_head`` pairs).

Example:
    >>> from trainer_guard.tiny import tiny_model
    >>> from trainer_guard.core.ties import find_tied_groups
    >>> find_tied_groups(tiny_model("plain-gpt"))
    [['tok_emb.weight', 'out_head.weight']]
    >>> find_tied_groups(tiny_model("llama-untied"))
    []
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, TiedWeightsError
from ..files import TIES_FILE
from ..formats.safetensors import weight_files

__all__ = [
    "find_tied_groups",
    "dedupe_state_dict",
    "declare_embedding_tie",
    "restore_ties",
    "broken_ties",
    "declared_tie",
    "tied_now_untied_then",
    "stored_alike",
    "tied_then_untied_now",
    "describe_tie_change",
    "TIES_FILE",
]


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory ``t`` views. Tensors whose storage cannot be inspected (meta, empty ZeRO-3
    placeholders, sharded FSDP2 DTensors) are keyed by the tensor object itself: only the same Parameter
    registered twice counts as a tie there."""
    if t.device.type == "meta" or t.numel() == 0 or type(t).__name__ == "DTensor":
        return ("object", id(t))
    try:
        st = t.untyped_storage()
        ptr = st.data_ptr()
    except (RuntimeError, NotImplementedError):
        return ("object", id(t))
    return (t.device.type, t.device.index, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def find_tied_groups(model: nn.Module, include_buffers: bool = False) -> list[list[str]]:
    """Groups of parameter names that share one storage, found by identity, never by name.

    Args:
        model: any ``nn.Module`` (Hugging Face, PEFT-wrapped or plain).
        include_buffers: also group buffers.

    Returns:
        One list per group of two or more names, in registration order; groups ordered by their first name.
    """
    _check_model(model, "find_tied_groups")
    seen: dict[tuple, list[str]] = {}
    named: Iterable = model.named_parameters(remove_duplicate=False)
    if include_buffers:
        named = list(named) + list(model.named_buffers(remove_duplicate=False))
    for name, p in named:
        seen.setdefault(_storage_key(p), []).append(name)
    return [names for names in seen.values() if len(names) > 1]


def dedupe_state_dict(
    state_dict: dict[str, Any], groups: list[list[str]], prefix: str = ""
) -> dict[str, str]:
    """Drop, in place, every alias of a tie group from ``state_dict``; return ``{alias: kept_name}``.

    An alias is dropped only when it still shares storage with the kept tensor (a state dict built from
    an untied model loses nothing).
    """
    aliases = {}
    for group in groups:
        kept = prefix + group[0]
        if kept not in state_dict:
            continue
        for alias in group[1:]:
            key = prefix + alias
            t, k = state_dict.get(key), state_dict[kept]
            if isinstance(t, torch.Tensor) and isinstance(k, torch.Tensor) and _storage_key(t) == _storage_key(k):
                del state_dict[key]
                aliases[key] = kept
    return aliases


def declare_embedding_tie(model: nn.Module) -> list[str]:
    """Make a Hugging Face model's config agree with a hand tie of its input and output embeddings.

    A ``PreTrainedModel`` whose ``lm_head.weight`` *is* ``embed_tokens.weight`` while its config says
    ``tie_word_embeddings=False`` saves without the head and reloads it at random (report R1b). Setting the flag
    makes ``save_pretrained`` write the tensor once and ``from_pretrained`` tie it again.

    Returns:
        What was changed, one message per change (empty when nothing needed changing).
    """
    base = getattr(model, "get_base_model", None)
    hf = base() if callable(base) else model
    get_in, get_out = getattr(hf, "get_input_embeddings", None), getattr(hf, "get_output_embeddings", None)
    cfg = getattr(hf, "config", None)
    if cfg is None or not callable(get_in) or not callable(get_out):
        return []
    try:
        emb, head = get_in(), get_out()
    except (NotImplementedError, AttributeError):
        return []
    if emb is None or head is None or getattr(head, "weight", None) is None:
        return []
    if head.weight is not emb.weight:
        return []
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    changed = []
    for c in {id(cfg): cfg, id(text_cfg): text_cfg}.values():
        if getattr(c, "tie_word_embeddings", True) is False:
            c.tie_word_embeddings = True
            changed.append(
                f"{type(hf).__name__}: the output head is tied to the input embedding by identity but "
                f"config.tie_word_embeddings was False; set it to True so checkpoints store the tensor once and "
                f"from_pretrained restores the trained head instead of a random one"
            )
    return changed


def _check_model(model: Any, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TiedWeightsError(f"{caller}() needs a torch nn.Module (the model itself, not its state_dict), got "
                               f"{type(model).__name__}")


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name, aliases included (the names tie groups use)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def broken_ties(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """The recorded ``groups`` (parameters, or buffers: ``find_tied_groups(include_buffers=True)``) whose members no
    longer share one storage in ``model``."""
    params = _state_tensors(model)
    out = []
    for group in groups:
        present = [n for n in group if n in params]
        if len(present) < 2:
            continue
        if len({_storage_key(params[n]) for n in present}) > 1:
            out.append(present)
    return out


def _set_param(model: nn.Module, name: str, param: torch.Tensor) -> None:
    """Make ``name`` (a parameter or a buffer) the tensor ``param``, keeping its kind (a buffer stays a buffer)."""
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if attr in module._buffers:
        module._buffers[attr] = param.detach() if isinstance(param, nn.Parameter) else param
    elif isinstance(param, nn.Parameter):
        setattr(module, attr, param)
    else:  # a parameter tied to a buffer: a Parameter over the same storage
        old = module._parameters[attr]
        setattr(module, attr, nn.Parameter(param, requires_grad=bool(old is not None and old.requires_grad)))


def restore_ties(model: nn.Module, groups: list[list[str]], stored: Collection[str] | None = None) -> list[str]:
    """Re-tie every recorded group whose members were split by a load (e.g. ``load_state_dict(assign=True)``).

    A split alias is re-tied to the group's first (kept) name when both hold the same values, or when ``stored``
    (the tensor names in the checkpoint just loaded) holds the kept name but not the alias: a tie is saved once,
    so only the kept name received the checkpoint's value and the alias holds a stale one. All groups are checked
    before any is changed: otherwise a group whose copies differ raises and the model is left untouched, since
    choosing one copy would silently discard the other.

    Args:
        model: the model to repair.
        groups: tie groups recorded when they were tied (first name kept); parameters, or buffers too
            (``find_tied_groups(model, include_buffers=True)``).
        stored: names stored in the checkpoint that was loaded, when known.

    Returns:
        One message per alias re-tied.

    Raises:
        TiedWeightsError: a split group's copies differ and the checkpoint does not say which is right.
    """
    _check_model(model, "restore_ties")
    groups = list(groups) if isinstance(groups, Iterable) and not isinstance(groups, (str, bytes)) else groups
    if not isinstance(groups, list) or not all(
            isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in groups):
        raise TiedWeightsError(f"restore_ties(): `groups` must be a list of tie groups, each a list of names (as "
                               f"find_tied_groups returns), got {groups!r:.200}")
    if isinstance(stored, (str, bytes)):
        raise TiedWeightsError(f"restore_ties(): `stored` must be a collection of tensor names, got the string "
                               f"{stored!r:.200}; wrap it in a list")
    params = _state_tensors(model)
    stored = set(stored) if stored is not None else None
    todo, problems = [], []
    for group in broken_ties(model, groups):
        kept = params[group[0]]
        for alias in group[1:]:
            other = params[alias]
            if stored is not None and group[0] in stored and alias not in stored:
                todo.append((alias, group[0], f"the checkpoint stores the tie once, as {group[0]}"))
                continue
            same = other.shape == kept.shape and other.dtype == kept.dtype and torch.equal(
                other.detach().cpu(), kept.detach().cpu()
            ) if other.device.type != "meta" and kept.device.type != "meta" else False
            if not same:
                problems.append(f"{alias} differs from {group[0]} (they were tied when recorded)")
            else:
                todo.append((alias, group[0], "values identical"))
    if problems:
        raise TiedWeightsError(
            "Tied parameters were split and now hold different values; nothing was changed:\n  - "
            + "\n  - ".join(problems)
            + "\nLoad the checkpoint without `assign=True`, or re-tie by hand choosing which copy to keep."
        )
    for alias, kept, _ in todo:
        _set_param(model, alias, params[kept])
    return [f"re-tied {alias} to {kept} (split by a load; {why})" for alias, kept, why in todo]


def ties_record(groups: list[list[str]], stored: list[list[str]] | None = None) -> dict[str, Any]:
    """The JSON-able record of ``groups`` written next to a checkpoint.

    ``stored``: the same groups under the names the files use, when the save renames them (vision-language models);
    recorded as ``stored_aliases`` for tools that read the files (``trainer-guard doctor``).
    """
    record = {"format": 1, "groups": groups, "aliases": {a: g[0] for g in groups for a in g[1:]}}
    if stored is not None and stored != groups:
        record["stored_aliases"] = {a: g[0] for g in stored for a in g[1:]}
    return record


def aliases_of(record: Mapping[str, Any]) -> dict[str, str]:
    return dict(record.get("aliases", {}))


def declared_tie(model: nn.Module) -> bool | None:
    """``config.tie_word_embeddings`` of a Hugging Face model (its text config's, PEFT unwrapped), ``None`` when
    it has no such setting."""
    base = getattr(model, "get_base_model", None)
    hf = base() if callable(base) else model
    cfg = getattr(hf, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    value = getattr(text_cfg, "tie_word_embeddings", None)
    return value if isinstance(value, bool) else None


def tied_now_untied_then(model: nn.Module, stored: Collection[str] | None,
                         recorded: Iterable[Iterable[str]] | None = None) -> list[list[str]]:
    """Tie groups of ``model`` that a checkpoint storing the tensor names ``stored`` holds as separate tensors: the
    checkpoint was trained untied (a tie is stored once: safetensors cannot hold shared tensors, transformers and
    :class:`~trainer_guard.TiedWeightsGuard` keep one name), the model ties them now.

    ``recorded``: the tie groups the checkpoint's tie record (``trainer_guard_ties.json``) says the model had when
    it was saved. A group recorded as one tie was tied then, even with every name stored: FSDP2's FULL_STATE_DICT
    save gathers each name's full tensor (one copy per name, so transformers sees no shared storage to drop).

    Example:
        >>> from trainer_guard.tiny import tiny_model
        >>> tied_now_untied_then(tiny_model("llama-tied"), {"model.embed_tokens.weight", "lm_head.weight"})
        [['model.embed_tokens.weight', 'lm_head.weight']]
        >>> tied_now_untied_then(tiny_model("llama-tied"), {"model.embed_tokens.weight"})
        []
        >>> tied_now_untied_then(tiny_model("llama-tied"), {"model.embed_tokens.weight", "lm_head.weight"},
        ...                      recorded=[["model.embed_tokens.weight", "lm_head.weight"]])
        []
    """
    if not stored:
        return []
    tied_then = [set(g) for g in recorded or ()]
    return [g for g in find_tied_groups(model)
            if all(n in stored for n in g) and not any(set(g) <= r for r in tied_then)]


def stored_alike(directory: str, names: list[str]) -> bool:
    """Whether the safetensors weights of ``directory`` store every name of ``names`` with one dtype, shape and the
    same values: one tie saved under each name (FSDP2's FULL_STATE_DICT save gathers a full copy per name), not
    tensors trained apart. Reads those tensors (only asked when every name of a tie is stored and no tie record
    says how it was saved). ``False`` when a name is not in a safetensors file.

    Raises:
        LoadError, OSError: the directory's safetensors files cannot be listed or read.
    """
    from safetensors import safe_open

    where: dict[str, str] = {}
    for f in weight_files(directory, LoadError):
        with safe_open(f, "pt") as h:
            where.update({n: f for n in names if n in h.keys()})
    if set(where) != set(names):
        return False
    first = None
    for n in names:
        with safe_open(where[n], "pt") as h:
            t = h.get_tensor(n)
        if first is None:
            first = t
        elif t.dtype != first.dtype or t.shape != first.shape or not torch.equal(t, first):
            return False
    return True


def _embedding_pair(model: nn.Module) -> list[str] | None:
    """``[input embedding weight, output head weight]`` names of a Hugging Face model, or ``None``."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    try:
        emb, head = (get_in(), get_out()) if callable(get_in) and callable(get_out) else (None, None)
    except (NotImplementedError, AttributeError):
        return None
    emb_w, head_w = getattr(emb, "weight", None), getattr(head, "weight", None)
    if emb_w is None or head_w is None:
        return None
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    emb_n = names.get(id(emb_w), [])
    head_n = [n for n in names.get(id(head_w), []) if n not in emb_n] or names.get(id(head_w), [])
    return [emb_n[0], head_n[-1]] if emb_n and head_n else None


def tied_then_untied_now(model: nn.Module, stored: Collection[str] | None,
                         saved_config: Mapping[str, Any] | None) -> list[list[str]]:
    """The embedding/head tie a checkpoint without a tie record was saved with (its ``config.json`` says
    ``tie_word_embeddings: true`` and it stores the embedding, not the head), as a tie group of ``model``'s names;
    ``[]`` otherwise. :func:`broken_ties` then says whether ``model`` is untied now."""
    if not stored or not isinstance(saved_config, Mapping):
        return []
    text = saved_config.get("text_config") if isinstance(saved_config.get("text_config"), Mapping) else {}
    if saved_config.get("tie_word_embeddings", text.get("tie_word_embeddings")) is not True:
        return []
    pair = _embedding_pair(model)
    return [pair] if pair and pair[0] in stored and pair[1] not in stored else []


def describe_tie_change(group: list[str], where: str, tied_now: bool, declared: bool | None = None) -> str:
    """What a tie change at resume means and the two ways on. ``tied_now``: the model ties ``group`` and ``where``
    (the checkpoint) stores its tensors apart; else ``where`` stores the tie once and the model is untied.
    ``declared``: the model's ``config.tie_word_embeddings``."""
    kept, aliases = group[0], ", ".join(group[1:])
    if tied_now:
        return (f"tie change at resume: {where} was trained untied ({aliases} stored apart from {kept}), this model "
                f"ties them{' (config.tie_word_embeddings=True)' if declared else ''}, so a resume would load two "
                f"trained tensors into one and optimizer.pt holds one more tensor than the model. Two ways on: "
                f"continue untied as saved: build the model with tie_word_embeddings=False "
                f"(from_pretrained(..., tie_word_embeddings=False), or tie_word_embeddings: false in the model's "
                f"config), then resume {where}; or train tied from here: start a new run (no resume_from_checkpoint) "
                f"from {where}'s weights loaded with tie_word_embeddings=True ({kept} is kept, the trained "
                f"{aliases} dropped)")
    setting = " (config.tie_word_embeddings=False)" if declared is False else ""
    return (f"tie change at resume: {where} was trained with {aliases} tied to {kept} (stored once), this model "
            f"is untied{setting}; to resume {where} as saved the tie is restored"
            f"{' and config.tie_word_embeddings set to True, overriding your setting' if declared is False else ''}. "
            f"To train untied instead, do not resume: load {where} tied, give {aliases} its own copy of {kept} "
            f"(e.g. model.lm_head.weight = nn.Parameter(model.get_input_embeddings().weight.clone()), "
            f"config.tie_word_embeddings=False), re-save it untied with save_pretrained and start a new run from "
            f"that folder")
