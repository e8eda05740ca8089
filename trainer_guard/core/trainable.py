"""The trainable set of a model: record it, compare two records, explain the difference by module with counts.

Pure functions, no Trainer. Answers field report R3: a LoRA run that also trained ``embed_tokens`` and ``lm_head``
(PEFT ``modules_to_save``) was continued with those two modules frozen, and nothing said so.

Parameter names are made independent of PEFT wrapping: ``base_model.model.`` is dropped and each parameter is
given a *module* (``model.embed_tokens``) and a *kind*:

- ``lora_A`` / ``lora_B`` / ``lora``: LoRA factors (``lora`` for magnitude vectors and other LoRA extras),
- ``modules_to_save``: PEFT's full trainable copy of a module,
- ``trainable_tokens``: PEFT's trainable token rows,
- ``full``: any other parameter (base weights, full fine-tuning).

A *record* (JSON-ready dict, written as :data:`TRAINABLE_FILE` into checkpoints) holds the trainable parameters
with their counts, totals by module and by kind, the optimizer's group layout and the PEFT adapter configs.

Example:
    >>> from trainer_guard.tiny import tiny_model, tiny_lora
    >>> from trainer_guard.core.trainable import trainable_record, compare_records, describe_changes
    >>> then = trainable_record(tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"]))
    >>> now = trainable_record(tiny_lora(tiny_model("llama-untied")))
    >>> describe_changes(compare_records(then, now), "checkpoint-2")
    ['lm_head, model.embed_tokens: 8,192 params trainable in checkpoint-2 (modules_to_save), frozen now']
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..files import ADAPTER_CONFIG as ADAPTER_CONFIG_FILE
from ..files import TRAINABLE_FILE
from ..names import dotted_prefixes
from .lr_groups import base_param_groups
from .sharding import full_numel, optimizer_param_groups

__all__ = [
    "TRAINABLE_FILE",
    "ADAPTER_CONFIG_FILE",
    "Change",
    "canonical_name",
    "param_kind",
    "adapted_module",
    "trainable_record",
    "optimizer_layout",
    "peft_summary",
    "compare_records",
    "describe_changes",
    "layout_problems",
    "hyperparameter_changes",
    "frozen_adapter_params",
    "mark_adapter_training",
    "describe_frozen_adapter",
    "is_no_decay",
    "missing_copies",
    "adapter_source",
    "saved_group_sizes",
    "add_to_trainer_groups",
    "add_modules_to_save",
    "adapter_dir",
    "adapter_load_gaps",
    "adapter_config_problems",
    "read_adapter_config",
    "count_table",
    "continuation_problems",
]

RECORD_FORMAT = "trainer_guard.trainable/1"

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+?)\.(?P<what>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|"
                   r"lora_[A-Za-z_]+)\.(?P<adapter>[^.]+)(?:\.(?P<leaf>.+))?$")
_WRAPPED = re.compile(r"^(?P<module>.+?)\.(?P<what>modules_to_save|token_adapter\.trainable_tokens_delta)\."
                      r"(?P<adapter>[^.]+)(?:\.(?P<leaf>.+))?$")
_BASE = re.compile(r"^(?P<module>.+?)\.(?:original_module|base_layer|token_adapter\.base_layer)\.(?P<leaf>.+)$")


def canonical_name(name: str) -> str:
    """``name`` without PEFT's ``base_model.model.`` prefix (or a DDP/compile ``module.``/``_orig_mod.`` one)."""
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def param_kind(name: str) -> str:
    """The kind of parameter ``name``: lora_A, lora_B, lora, modules_to_save, trainable_tokens or full."""
    m = _LORA.match(name)
    if m:
        what = m["what"]
        return "lora_A" if what.endswith("_A") else "lora_B" if what.endswith("_B") else "lora"
    m = _WRAPPED.match(name)
    if m:
        return "modules_to_save" if m["what"] == "modules_to_save" else "trainable_tokens"
    return "full"


def adapted_module(name: str) -> str:
    """The module PEFT adapted or wrapped that a parameter belongs to, its wrapper segments and prefix removed
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` -> ``model.layers.0.self_attn.q_proj``;
    a top-level tensor -> ``""``). The plain parent module of a name is :func:`trainer_guard.names.module_of`."""
    name = canonical_name(name)
    for pattern in (_LORA, _WRAPPED, _BASE):
        m = pattern.match(name)
        if m:
            return m["module"]
    return name.rsplit(".", 1)[0] if "." in name else ""


def optimizer_layout(optimizer: Any, model: nn.Module) -> list[dict[str, Any]]:
    """Per optimizer group: its LR (``initial_lr`` when a scheduler set one), weight decay, parameter names, count.
    A DeepSpeed ZeRO optimizer's groups are read with the model parameters it steps in them (the same names on every
    rank and with or without DeepSpeed), not its flat fp32 partitions."""
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    out = []
    for group in base_param_groups(optimizer_param_groups(optimizer)):  # EmbeddingLRGuard's split groups folded back
        params = list(group["params"])
        out.append({
            "lr": float(group.get("initial_lr", group.get("lr", 0.0))),
            # "lr" falls back to the live LR when no scheduler set initial_lr (ReduceLROnPlateau lowers it)
            "lr_scheduled": "initial_lr" in group,
            "weight_decay": float(group.get("weight_decay", 0.0)),
            "params": [names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in params],
            "numel": sum(full_numel(p) for p in params),
        })
    return out


def peft_summary(model: nn.Module) -> dict[str, dict[str, Any]] | None:
    """The fields of each PEFT adapter config that decide what trains, or None for a model without PEFT."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    return {name: _config_fields(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
            for name, cfg in configs.items()}


def _config_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("peft_type", "target_modules", "modules_to_save", "trainable_token_indices", "r", "lora_alpha",
                "inference_mode"):
        value = cfg.get(key)
        if isinstance(value, (set, frozenset, tuple)):
            value = sorted(value)
        out[key] = getattr(value, "value", value)
    return out


def trainable_record(model: nn.Module, optimizer: Any = None, global_step: int | None = None) -> dict[str, Any]:
    """A JSON-ready record of what trains in ``model`` (and how ``optimizer`` groups it).

    Example:
        >>> from trainer_guard.tiny import tiny_model, tiny_lora
        >>> rec = trainable_record(tiny_lora(tiny_model("llama-tied")))
        >>> rec["by_kind"], rec["trainable_params"]
        ({'lora_A': 512, 'lora_B': 384}, 896)
    """
    params: dict[str, list] = {}
    by_module: dict[str, dict[str, int]] = {}
    by_kind: dict[str, int] = {}
    total = 0
    for name, p in model.named_parameters():
        total += full_numel(p)  # a ZeRO-3 parameter's numel() is 0 outside forward
        if not p.requires_grad:
            continue
        cname, kind, n = canonical_name(name), param_kind(canonical_name(name)), full_numel(p)
        params[cname] = [n, kind]
        mod = by_module.setdefault(adapted_module(cname), {})
        mod[kind] = mod.get(kind, 0) + n
        by_kind[kind] = by_kind.get(kind, 0) + n
    return {
        "format": RECORD_FORMAT,
        "global_step": global_step,
        "total_params": int(total),
        "trainable_params": int(sum(v[0] for v in params.values())),
        "params": params,
        "by_module": by_module,
        "by_kind": dict(sorted(by_kind.items())),
        "optimizer": optimizer_layout(optimizer, model) if optimizer is not None else None,
        "peft": peft_summary(model),
    }


@dataclass(frozen=True)
class Change:
    """One module whose trainable parameters differ: counts by kind then (checkpoint) and now."""

    module: str
    then: tuple[tuple[str, int], ...]
    now: tuple[tuple[str, int], ...]

    @property
    def n_then(self) -> int:
        return sum(n for _, n in self.then)

    @property
    def n_now(self) -> int:
        return sum(n for _, n in self.now)


def compare_records(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[Change]:
    """Modules whose trainable counts by kind differ between two records, sorted by module name."""
    a, b = then.get("by_module", {}), now.get("by_module", {})
    out = []
    for module in sorted(set(a) | set(b)):
        ka, kb = tuple(sorted(a.get(module, {}).items())), tuple(sorted(b.get(module, {}).items()))
        if ka != kb:
            out.append(Change(module, ka, kb))
    return out


def _kinds(pairs: Iterable[tuple[str, int]]) -> str:
    return ", ".join(sorted({k for k, _ in pairs}))


def _compress(modules: list[str]) -> str:
    """``model.layers.{0-3}.mlp.up_proj`` for modules that differ only by a layer index, names joined by ', '."""
    groups: dict[str, list[int]] = {}
    plain = []
    for m in modules:
        hit = re.search(r"\.(\d+)\.", m)
        if hit:
            groups.setdefault(m[:hit.start(1)] + "{}" + m[hit.end(1):], []).append(int(hit[1]))
        else:
            plain.append(m)
    out = list(plain)
    for pattern, idx in groups.items():
        idx = sorted(set(idx))
        out.append(pattern.replace("{}", str(idx[0]) if len(idx) == 1 else "{" + _compress_ints(idx) + "}"))
    out.sort()
    return ", ".join(out[:8]) + (f" and {len(out) - 8} more" if len(out) > 8 else "")


def describe_changes(changes: Iterable[Change], where: str) -> list[str]:
    """One line per kind of change, modules grouped, e.g.
    ``"lm_head, model.embed_tokens: 8,192 params trainable in checkpoint-2 (modules_to_save), frozen now"``."""
    buckets: dict[tuple, list[Change]] = {}
    for c in changes:
        if not c.now:
            key = ("frozen", _kinds(c.then), "")
        elif not c.then:
            key = ("new", "", _kinds(c.now))
        else:
            key = ("changed", _kinds(c.then), _kinds(c.now))
        buckets.setdefault(key, []).append(c)
    lines = []
    order = {"frozen": 0, "changed": 1, "new": 2}
    for (status, k_then, k_now), cs in sorted(buckets.items(), key=lambda kv: order[kv[0][0]]):
        names = _compress([c.module for c in cs])
        n_then, n_now = sum(c.n_then for c in cs), sum(c.n_now for c in cs)
        if status == "frozen":
            lines.append(f"{names}: {n_then:,} params trainable in {where} ({k_then}), frozen now")
        elif status == "new":
            lines.append(f"{names}: {n_now:,} params trainable now ({k_now}), frozen in {where}")
        else:
            lines.append(f"{names}: {n_then:,} params trainable in {where} ({k_then}), {n_now:,} now ({k_now})")
    return lines


def layout_problems(then: list[Mapping[str, Any]], now: list[Mapping[str, Any]], where: str) -> list[str]:
    """Differences between two optimizer layouts in group count and members (which parameters, in which order),
    one line each. LR / weight-decay differences of groups with the same members are :func:`hyperparameter_changes`:
    they do not stop a resume (the Trainer restores the checkpoint's values with ``optimizer.pt``)."""
    if len(then) != len(now):
        return [f"optimizer has {len(now)} parameter groups now, {len(then)} in {where}"]
    problems = []
    for i, (a, b) in enumerate(zip(then, now)):
        if a["params"] != b["params"]:
            gone = [p for p in a["params"] if p not in set(b["params"])]
            new = [p for p in b["params"] if p not in set(a["params"])]
            detail = "; ".join(s for s in (
                f"missing now: {_compress(sorted({adapted_module(p) for p in gone}))}" if gone else "",
                f"not in {where}: {_compress(sorted({adapted_module(p) for p in new}))}" if new else "",
                "same parameters in a different order" if not gone and not new else "") if s)
            problems.append(f"optimizer group {i} (lr {b['lr']:g}): {len(b['params'])} params ({b['numel']:,}) now, "
                            f"{len(a['params'])} ({a['numel']:,}) in {where}; {detail}")
    return problems


def hyperparameter_changes(then: list[Mapping[str, Any]], now: list[Mapping[str, Any]], where: str) -> list[str]:
    """Groups holding the same parameters with another LR (both scheduled) or weight decay now, one line each.

    Example:
        >>> g = {"lr": 1e-2, "lr_scheduled": True, "weight_decay": 0.0, "params": ["w"], "numel": 4}
        >>> hyperparameter_changes([g], [dict(g, lr=5e-3)], "checkpoint-4")
        ['optimizer group 0: lr 0.005, weight_decay 0 now; lr 0.01, weight_decay 0 in checkpoint-4']
    """
    if len(then) != len(now):
        return []
    return [f"optimizer group {i}: lr {b['lr']:g}, weight_decay {b['weight_decay']:g} now; "
            f"lr {a['lr']:g}, weight_decay {a['weight_decay']:g} in {where}"
            for i, (a, b) in enumerate(zip(then, now))
            if a["params"] == b["params"] and ((a["lr"] != b["lr"] and a.get("lr_scheduled") and b.get("lr_scheduled"))
                                               or a["weight_decay"] != b["weight_decay"])]


def mark_adapter_training(model: nn.Module) -> None:
    """Set ``inference_mode=False`` on the active adapter config of a PEFT model whose adapter now trains, so the
    configs it saves say so; nothing for any other model (a transformers 4.x model has ``active_adapter`` too, a
    method of its ``PeftAdapterMixin``, but no ``peft_config`` until an adapter is loaded into it)."""
    configs = getattr(model, "peft_config", None)
    name = getattr(model, "active_adapter", None)
    if isinstance(configs, Mapping) and isinstance(name, str) and name in configs:
        configs[name].inference_mode = False


def frozen_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Frozen parameters (LoRA, modules_to_save copies, trainable tokens) of the active PEFT adapters that were
    loaded for inference (``inference_mode=True``: ``PeftModel.from_pretrained`` without ``is_trainable=True``).

    Adapters created for training are left out, so a deliberate partial freeze (LoRA-FA's frozen A) is no finding.

    Example:
        >>> from trainer_guard.tiny import tiny_model, tiny_lora
        >>> m = tiny_lora(tiny_model("llama-tied")).requires_grad_(False)
        >>> len(frozen_adapter_params(m))
        0
        >>> m.peft_config["default"].inference_mode = True
        >>> len(frozen_adapter_params(m))
        8
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        return {}
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")]
    active = [active] if isinstance(active, str) else list(active)
    active = [a for a in active if a in configs and getattr(configs[a], "inference_mode", False)]
    out = {}
    for name, p in model.named_parameters():
        cname = canonical_name(name)
        if p.requires_grad or param_kind(cname) == "full":
            continue
        m = _LORA.match(cname) or _WRAPPED.match(cname)
        if m and m["adapter"] in active:
            out[cname] = p
    return out


def describe_frozen_adapter(frozen: Mapping[str, Any]) -> list[str]:
    """One line for the frozen adapter parameters found by :func:`frozen_adapter_params` (empty when none)."""
    if not frozen:
        return []
    kinds = sorted({param_kind(n) for n in frozen})
    n = sum(full_numel(p) for p in frozen.values())
    mods = _compress(sorted({adapted_module(name) for name in frozen}))
    return [f"{mods}: {n:,} params of the active adapter ({', '.join(kinds)}) are frozen; a PeftModel loaded with "
            f"PeftModel.from_pretrained(...) without is_trainable=True trains nothing of its adapter"]


_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def is_no_decay(name: str) -> bool:
    """True when the Trainer's default optimizer puts parameter ``name`` in its no-weight-decay group."""
    return _NO_DECAY.search(name) is not None


def adapter_dir(model: nn.Module, source: str | os.PathLike | None) -> str | None:
    """The directory holding the files of ``model``'s active adapter inside ``source``: PEFT (and so the Trainer's
    checkpoints) saves an adapter not named ``"default"`` in ``source/<name>/``, and resumes it from there."""
    if not source:
        return None
    name = getattr(model, "active_adapter", None)
    sub = os.path.join(os.fspath(source), name) if isinstance(name, str) and name != "default" else None
    return sub if sub and os.path.isfile(os.path.join(sub, ADAPTER_CONFIG_FILE)) else os.fspath(source)


def missing_copies(model: nn.Module, recorded: Mapping[str, Any] | None, saved_config: Mapping[str, Any] | None,
                   source: str | os.PathLike | None) -> tuple[list[str], list[str]]:
    """Modules that trained as ``modules_to_save`` copies (per ``recorded`` or a saved adapter config) and have no
    copy in PeftModel ``model`` now: ``(restorable, problems)``.

    A module is restorable when it exists unwrapped now and ``source/adapter_model.safetensors`` holds its trained
    copy; ``problems`` says why the others are not.
    """
    if not isinstance(getattr(model, "peft_config", None), Mapping) or not hasattr(model, "base_model"):
        return [], []
    has_copy = {adapted_module(n) for n, _ in model.named_parameters() if param_kind(canonical_name(n)) == "modules_to_save"}
    if recorded:
        wanted = {adapted_module(n) for n, (_, kind) in recorded.get("params", {}).items() if kind == "modules_to_save"}
    else:
        mts = (saved_config or {}).get("modules_to_save") or []
        wanted = {adapted_module(n) for n, _ in model.named_parameters(remove_duplicate=False)
                  if _matches(adapted_module(n), mts)}
    wanted -= has_copy
    if not wanted:
        return [], []
    path = os.path.join(adapter_dir(model, source), "adapter_model.safetensors") if source else None
    keys: set[str] = set()
    if path and os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    stored = {adapted_module(k) for k in keys}
    ok = sorted(m for m in wanted if m in stored)
    bad = sorted(wanted - set(ok))
    problems = [f"{_compress(bad)}: no trained copy in {path or 'the source'} to restore"] if bad else []
    return ok, problems


def adapter_load_gaps(model: nn.Module, source: str | os.PathLike | None) -> list[str]:
    """Modules (canonical paths) whose PEFT wrapper in ``model`` (a ``modules_to_save`` copy, trainable tokens) the
    active adapter needs from ``source/adapter_model.safetensors`` and finds no tensor for there.

    ``PeftModel.load_adapter`` (the Trainer's resume) raises a bare ``KeyError`` on such a wrapper, whatever its
    ``requires_grad``: it cannot load a checkpoint saved before the wrapper was added. Empty when ``model`` is not a
    PeftModel or ``source`` holds no safetensors adapter file.
    """
    if not isinstance(getattr(model, "peft_config", None), Mapping) or not source:
        return []
    path = os.path.join(adapter_dir(model, source), "adapter_model.safetensors")
    if not os.path.isfile(path):
        return []
    from safetensors import safe_open

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover
        return []
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    adapter = getattr(model, "active_adapter", "default")
    gaps = []
    for name, module in model.named_modules():
        if not isinstance(module, AuxiliaryTrainingWrapper):
            continue
        try:
            wanted = [f"{name}.{k}" for k in module.adapter_state_dict_load_map(adapter)]
        except Exception:  # another PEFT version's wrapper: no verdict
            continue
        if wanted and not any(k in keys for k in wanted):
            gaps.append(canonical_name(name))
    return sorted(gaps)


def add_modules_to_save(model: nn.Module, modules: list[str], source: str | os.PathLike) -> None:
    """Give PeftModel ``model``'s active adapter ``modules_to_save`` copies of ``modules`` (canonical paths), loaded
    with their trained values from ``source/adapter_model.safetensors``; the config lists them, so saves keep them.
    """
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import set_additional_trainable_modules, set_peft_model_state_dict
    from safetensors import safe_open

    name = model.active_adapter
    cfg = model.peft_config[name]
    cfg.modules_to_save = sorted(set(cfg.modules_to_save or []) | set(modules))
    set_additional_trainable_modules(model=model.base_model, peft_config=cfg,
                                     model_config=BaseTuner.get_model_config(model), adapter_name=name)
    with safe_open(os.path.join(adapter_dir(model, source), "adapter_model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if adapted_module(k) in set(modules)}
    set_peft_model_state_dict(model, state, adapter_name=name)


def adapter_source(model: nn.Module) -> str | None:
    """The directory ``model`` was loaded from when it holds a saved adapter (``adapter_config.json``), else None.

    Looks at the base model's ``name_or_path`` and each PEFT config's ``base_model_name_or_path``. A full-model
    checkpoint used as the starting point of a NEW run (continued pre-training, then LoRA) is not a continuation:
    pass ``ResumeGuard(adapter_dir=...)`` to compare against such a directory explicitly.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cands = [getattr(base, "name_or_path", None)]
    cands += [getattr(c, "base_model_name_or_path", None) for c in (getattr(model, "peft_config", None) or {}).values()]
    for c in cands:
        if c and os.path.isdir(c) and os.path.isfile(os.path.join(c, ADAPTER_CONFIG_FILE)):
            return os.fspath(c)
    return None


def saved_group_sizes(directory: str | os.PathLike) -> list[int] | None:
    """Parameters per group of the ``optimizer.pt`` a Trainer saved in ``directory`` (memory-mapped), or None."""
    import torch

    path = os.path.join(os.fspath(directory), "optimizer.pt")
    if not os.path.isfile(path):
        return None
    return [len(g["params"]) for g in torch.load(path, weights_only=True, mmap=True)["param_groups"]]


def add_to_trainer_groups(optimizer: Any, params: Mapping[str, nn.Parameter]) -> list[str]:
    """Add ``{name: param}`` missing from a Trainer-built (decay, no-decay) optimizer to the group the Trainer would
    have chosen; their state starts empty, the scheduler is untouched (no group is added). Returns the names added.
    """
    present = {id(p) for g in optimizer.param_groups for p in g["params"]}
    added = []
    for name, p in params.items():
        if id(p) not in present:
            optimizer.param_groups[1 if is_no_decay(name) else 0]["params"].append(p)
            added.append(name)
    return added


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``adapter_config.json`` of a saved PEFT adapter directory, or None when there is none."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _matches(module: str, targets: Any) -> bool:
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in (targets or ()))


def _method_name(saved: Mapping[str, Any]) -> str:
    """``"LoRA"``, ``"IA3"``, ``"LOHA"``... from a saved adapter config's ``peft_type``."""
    kind = str(saved.get("peft_type") or "LORA")
    return "LoRA" if kind == "LORA" else kind


def _target_matcher(saved: Mapping[str, Any]):
    """``module -> bool``: whether a saved adapter config targets ``module`` (canonical path).

    PEFT's own matching (``check_target_module_exists``) honours ``layers_to_transform``/``layers_pattern`` and
    ``exclude_modules`` as well as ``target_modules``; a plain name/regex match is the fallback."""
    targets = saved.get("target_modules")
    if isinstance(targets, (list, tuple, set, frozenset)):
        targets = sorted(targets)
    try:
        from types import SimpleNamespace

        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:  # pragma: no cover
        return lambda m: _matches(m, targets)
    cfg = SimpleNamespace(target_modules=targets, target_parameters=saved.get("target_parameters"),
                          exclude_modules=saved.get("exclude_modules"), modules_to_save=None,
                          layers_to_transform=saved.get("layers_to_transform"),
                          layers_pattern=saved.get("layers_pattern"))

    def targeted(module: str) -> bool:
        if targets == "all-linear":  # saved configs hold the expanded list; a hand-written one may not
            return _matches(module, targets)
        try:
            return bool(check_target_module_exists(cfg, module))
        except Exception:  # another PEFT version's matcher: the plain match
            return _matches(module, targets)

    return targeted


def adapter_config_problems(saved: Mapping[str, Any], model: nn.Module, where: str) -> list[str]:
    """What a saved ``adapter_config.json`` says trained that does not train in ``model`` now, with counts.

    Checks ``modules_to_save`` (a trainable copy per module), ``target_modules`` (trainable LoRA factors),
    ``trainable_token_indices``, and ``r`` / ``lora_alpha`` against the live PEFT config.
    """
    now = trainable_record(model)
    frozen_sizes: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied lm_head is named too
        if not p.requires_grad and param_kind(canonical_name(name)) == "full":
            mod = adapted_module(name)
            frozen_sizes[mod] = frozen_sizes.get(mod, 0) + full_numel(p)
    problems = []
    saved_fields = _config_fields(saved)
    mts = saved_fields.get("modules_to_save") or []
    frozen = [m for m in sorted(frozen_sizes)
              if _matches(m, mts) and "modules_to_save" not in now["by_module"].get(m, {})]
    if frozen:
        n = sum(frozen_sizes[m] for m in frozen)
        problems.append(f"{_compress(frozen)}: {n:,} params trainable in {where} (modules_to_save), frozen now")
    tokens = saved_fields.get("trainable_token_indices")
    if tokens and "trainable_tokens" not in now["by_kind"]:
        problems.append(f"trainable_token_indices {tokens!r} in {where}, no trainable token rows now")
    targets = saved_fields.get("target_modules")
    if targets:
        # a target trains now when any trainable parameter sits inside it: LoRA A/B, and the other PEFT methods'
        # own names (IA3 ia3_l, LoHa hada_*, LoKr lokr_*, ...)
        inside = {m for n in now["params"] for m in dotted_prefixes(n)[:-1]}  # the modules holding each one
        targeted = _target_matcher(saved)
        missing = sorted({m for m in frozen_sizes if targeted(m) and m not in inside
                          and not _matches(m, mts)} - set(frozen))
        if missing:
            method = _method_name(saved)
            problems.append(f"{_compress(missing)}: {method} targets in {where} ({targets!r}), no trainable {method} "
                            f"now")
    live = (now.get("peft") or {})
    for adapter, fields in live.items():
        for key in ("r", "lora_alpha"):
            if saved_fields.get(key) is not None and fields.get(key) is not None and saved_fields[key] != fields[key]:
                problems.append(f"{key}={fields[key]} in adapter {adapter!r} now, {key}={saved_fields[key]} in {where}")
    return problems


def _pattern(module: str) -> tuple[str, int | None]:
    hit = re.search(r"\.(\d+)\.", module)
    return (module[:hit.start(1)] + "{}" + module[hit.end(1):], int(hit[1])) if hit else (module, None)


def count_table(record: Mapping[str, Any]) -> str:
    """A text table of trainable counts: one row per kind and module (layers folded), then the total.

    Example:
        >>> from trainer_guard.tiny import tiny_model, tiny_lora
        >>> print(count_table(trainable_record(tiny_lora(tiny_model("llama-untied"), target_modules=["q_proj"]))))
          kind    module                               params
          lora_A  model.layers.{0-1}.self_attn.q_proj     256
          lora_B  model.layers.{0-1}.self_attn.q_proj     256
          total   trainable 512 of 27,296 (1.88%)
    """
    total, trainable = record["total_params"], record["trainable_params"]
    rows: dict[tuple[str, str], list] = {}
    for module, kinds in sorted(record["by_module"].items()):
        pattern, idx = _pattern(module)
        for kind, n in kinds.items():
            row = rows.setdefault((kind, pattern), [set(), 0])
            row[1] += n
            if idx is not None:
                row[0].add(idx)
    lines = [("kind", "module", "params")]
    for (kind, pattern), (idx, n) in sorted(rows.items()):
        name = pattern.replace("{}", "{" + _compress_ints(sorted(idx)) + "}") if idx else pattern
        lines.append((kind, name, f"{n:,}"))
    pct = 100.0 * trainable / total if total else 0.0
    w0, w1 = max(len(r[0]) for r in lines), max(len(r[1]) for r in lines)
    w2 = max(len(r[2]) for r in lines)
    out = [f"  {a:<{w0}}  {b:<{w1}}  {c:>{w2}}" for a, b, c in lines]
    out.append(f"  {'total':<{w0}}  trainable {trainable:,} of {total:,} ({pct:.2f}%)")
    return "\n".join(out)


def _compress_ints(idx: list[int]) -> str:
    if len(idx) == 1:
        return str(idx[0])
    runs, start = [], idx[0]
    for i, j in zip(idx, idx[1:] + [None]):
        if j != i + 1:
            runs.append(str(start) if start == i else f"{start}-{i}")
            start = j
    return ",".join(runs)


def _adalora_resume_problems(model: nn.Module, source: str | os.PathLike | None, where: str) -> list[str]:
    """A Trainer checkpoint of an AdaLoRA adapter whose ranks its budget already pruned cannot be resumed.

    PEFT saves such an adapter cut to its ``rank_pattern``, while the resumed run builds ``init_r`` ranks (the
    Trainer's load fails with "size mismatch") or, loaded with ``from_pretrained``, has other shapes than the
    checkpoint's ``optimizer.pt``; AdaLoRA's rank allocator then fails on its masks, and its importance scores are
    not in the checkpoint either."""
    if not source or not os.path.isfile(os.path.join(os.fspath(source), "trainer_state.json")):
        return []  # an adapter directory a new run continues from: nothing is resumed
    saved = read_adapter_config(adapter_dir(model, source)) or {}
    if saved.get("peft_type") != "ADALORA" or not saved.get("rank_pattern"):
        return []
    pruned, directory = saved["rank_pattern"], os.fspath(adapter_dir(model, source))
    kept = sum(sum(bool(x) for x in v) for v in pruned.values())
    return [f"{where} holds an AdaLoRA adapter whose ranks its budget already pruned (rank_pattern in "
            f"adapter_config.json: {kept} of {sum(len(v) for v in pruned.values())} ranks kept in {len(pruned)} "
            f"modules); resume_from_checkpoint cannot continue it: the Trainer loads it into the init_r ranks "
            f"(\"size mismatch\"), and neither the optimizer state nor AdaLoRA's rank allocator fit the pruned "
            f"shapes. Resume from a checkpoint saved before the budget pruned ranks (no rank_pattern in its "
            f"adapter_config.json), or continue from its weights in a new run: PeftModel.from_pretrained(base, "
            f"{directory!r}, is_trainable=True) without resume_from_checkpoint"]


def continuation_problems(model: nn.Module, source: str | os.PathLike | None, optimizer: Any = None,
                          ignore_modules: Iterable[str] = ()) -> tuple[list[str], dict[str, Any]]:
    """``(problems, record)``: how ``model`` (and ``optimizer``, once built) differs from what it continues from.

    ``source`` is the checkpoint or adapter directory. With a ``trainer_guard_trainable.json`` there, the trainable
    sets (and optimizer layouts) are compared; without one, the adapter config and the saved optimizer's group
    sizes. A PEFT adapter loaded frozen is always a problem. ``record`` is the recorded trainable set (``{}``
    when none). ``ignore_modules``: modules whose trainable change is explained elsewhere (a tie change).
    """
    from .io import read_json

    where = os.path.basename(os.path.normpath(source)) if source else ""
    record_file = os.path.join(source, TRAINABLE_FILE) if source else ""
    recorded = read_json(record_file) if record_file and os.path.isfile(record_file) else None
    problems = describe_frozen_adapter(frozen_adapter_params(model)) + _adalora_resume_problems(model, source, where)
    if recorded is not None:
        ignore = set(ignore_modules)
        problems += describe_changes([c for c in compare_records(recorded, trainable_record(model))
                                      if c.module not in ignore], where)
        if optimizer is not None and recorded.get("optimizer") is not None:
            problems += layout_problems(recorded["optimizer"], optimizer_layout(optimizer, model), where)
    elif source:
        saved = read_adapter_config(adapter_dir(model, source))
        problems += adapter_config_problems(saved, model, where) if saved else []
        sizes = saved_group_sizes(source) if optimizer is not None else None
        now = [len(g["params"]) for g in optimizer_param_groups(optimizer)] if optimizer is not None else None
        if sizes is not None and sizes != now:
            problems.append(f"optimizer groups hold {now} params now, {sizes} in {where}/optimizer.pt")
    return problems, recorded or {}
