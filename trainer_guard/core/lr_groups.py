"""Separate learning rates for the input embeddings and the output head, as extra optimizer param groups.

Pure functions, no Trainer. Parameters are found by identity: the trainable parameters inside the modules that
``get_input_embeddings()`` / ``get_output_embeddings()`` return, which covers a full fine-tune, PEFT
``ModulesToSaveWrapper`` copies (only the active copy is trainable), LoRA A/B on those modules and PEFT trainable
tokens, whatever the adapter is called. A tied embedding/head is one parameter and gets one role, ``"tied"``.

:func:`split_param_groups` moves those parameters out of each of the optimizer's groups into a new group per
(role, source group) appended at the end: weight decay and every other hyper-parameter are copied from the source
group, ``lr`` and ``initial_lr`` are scaled, and the scheduler's ``base_lrs`` / ``lr_lambdas`` / ``_last_lr`` grow
to match. Optimizer state is keyed by parameter, so moments are kept. :func:`merge_param_groups` undoes it;
:func:`base_layout_optimizer_state` / :func:`base_layout_scheduler_state` rewrite saved states into the layout the
optimizer had before the split, which is the layout a freshly created optimizer has on resume.

Example:
    >>> import torch
    >>> from trainer_guard.tiny import tiny_model
    >>> from trainer_guard.core.lr_groups import embedding_parameters, split_param_groups
    >>> model = tiny_model("llama-untied")
    >>> roles = embedding_parameters(model)
    >>> sorted(roles), [n for n, _ in roles["embeddings"]]
    (['embeddings', 'lm_head'], ['model.embed_tokens.weight'])
    >>> opt = torch.optim.SGD([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=1.0)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    >>> split = split_param_groups(opt, sched, roles, {"embeddings": 0.1, "lm_head": 0.5})
    >>> [(g.get("trainer_guard_role"), g["lr"]) for g in opt.param_groups]
    [(None, 1.0), ('embeddings', 0.1), ('lm_head', 0.5)]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import EmbeddingLRError
from ..files import SPLIT_FILE
from .io import atomic_write

__all__ = [
    "ROLES",
    "ROLE_KEY",
    "SOURCE_KEY",
    "POSITIONS_KEY",
    "base_param_groups",
    "SPLIT_FILE",
    "Split",
    "embedding_modules",
    "embedding_parameters",
    "unwrap_optimizer",
    "role_of_parameters",
    "tied_rate_problems",
    "peak_lr",
    "sharded_optimizer_problems",
    "split_param_groups",
    "merge_param_groups",
    "base_layout_optimizer_state",
    "base_layout_scheduler_state",
    "group_lrs",
    "atomic_torch_save",
]

ROLES = ("embeddings", "lm_head", "tied")
ROLE_KEY = "trainer_guard_role"
SOURCE_KEY = "trainer_guard_source"  # index of the group an added group was split from
POSITIONS_KEY = "trainer_guard_positions"  # where its parameters sat in that group

# Per-group lists kept by the schedulers we know how to extend; anything else is refused before any change.
_SCHED_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs")
_CLOSED_FORM_SCHEDULERS = {
    "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
    "CosineAnnealingLR", "PolynomialLR", "ReduceLROnPlateau",
}


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` (accelerate's ``AcceleratedOptimizer`` wraps one)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def sharded_optimizer_problems(model: nn.Module, optimizer: Any) -> list[str]:
    """Why the optimizer's groups cannot be split under the sharding engine accelerate runs (empty when they can).

    - single process, DDP (also ``fsdp=...`` on a host where accelerate falls back to DDP): nothing.
    - FSDP2 (``fully_shard``): the model's parameters are ``DTensor`` s and the optimizer holds those very objects
      (the Trainer builds it over the model's parameters, accelerate's ``prepare`` switches it to the sharded ones),
      so groups are split by identity as usual; optimizer state is keyed by parameter and torch.distributed.checkpoint
      saves it by parameter name: nothing.
    - FSDP1 (``FullyShardedDataParallel``): refused. Its optimizer holds ``FlatParameter`` s (many tensors in one),
      and with ``use_orig_params`` its optimizer state dict is rebuilt by FSDP1 itself; neither is tested here.
    - DeepSpeed: nothing here. ZeRO flattens each param group into one partition when it wraps the optimizer and
      steps each group at its own ``lr``, so the groups cannot change per step; ``EmbeddingLRGuard`` splits them
      once, as the Trainer creates its optimizer, before DeepSpeed wraps it.
    """
    from .sharding import engine

    kind = engine()
    if kind == "fsdp":
        fsdp1 = any(c.__name__ == "FullyShardedDataParallel" for m in model.modules() for c in type(m).__mro__)
        flat = any(type(p).__name__ == "FlatParameter" for g in unwrap_optimizer(optimizer).param_groups
                   for p in g["params"])
        if fsdp1 or flat:
            return ["FSDP1 (fsdp_config version 1) hands the optimizer flat parameters that hold many tensors "
                    "each, so the embeddings cannot get a param group of their own; use FSDP2 (fsdp_config "
                    "{'version': 2}), where EmbeddingLRGuard splits the groups of the DTensor parameters, or "
                    "remove EmbeddingLRGuard"]
        return []
    return []


def _hf_model(model: nn.Module) -> nn.Module:
    base = model
    for _ in range(4):  # DDP/compile wrappers, then PEFT's get_base_model
        if hasattr(base, "get_base_model"):
            base = base.get_base_model()
        elif isinstance(getattr(base, "module", None), nn.Module) and not hasattr(base, "get_input_embeddings"):
            base = base.module
        elif isinstance(getattr(base, "_orig_mod", None), nn.Module):
            base = base._orig_mod
        else:
            break
    return base


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{"embeddings": module, "lm_head": module}`` from ``get_input_embeddings``/``get_output_embeddings`` of the
    underlying Hugging Face model (PEFT and DDP wrappers looked through); a role is absent when not available."""
    base = _hf_model(model)
    out = {}
    for role, getter in (("embeddings", "get_input_embeddings"), ("lm_head", "get_output_embeddings")):
        fn = getattr(base, getter, None)
        if not callable(fn):
            continue
        try:
            module = fn()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(module, nn.Module):
            out[role] = module
    return out


def embedding_parameters(model: nn.Module, trainable_only: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters of the input embedding and of the output head, found by identity.

    Args:
        model: a Hugging Face model, a PEFT model, or any module with ``get_input_embeddings`` /
            ``get_output_embeddings``.
        trainable_only: keep only parameters with ``requires_grad`` (the active PEFT copy, LoRA A/B, trainable
            tokens, or the weight itself in a full fine-tune).

    Returns:
        ``{"embeddings": [(name, param)], "lm_head": [(name, param)]}`` with names as in
        ``model.named_parameters()``; a role is absent when the model has no such module. A tied parameter appears
        under both roles.
    """
    prefixes: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        prefixes.setdefault(id(m), n + "." if n else "")
    out: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for role, module in embedding_modules(model).items():
        seen, items = set(), []
        for local, p in module.named_parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            items.append((prefixes.get(id(module), "") + local, p))
        out[role] = items
    return out


def role_of_parameters(roles: Mapping[str, list[tuple[str, nn.Parameter]]]) -> dict[int, tuple[str, str]]:
    """``{id(param): (role, name)}`` where a parameter under both roles is ``"tied"``."""
    emb = {id(p): n for n, p in roles.get("embeddings", [])}
    head = {id(p): n for n, p in roles.get("lm_head", [])}
    out = {}
    for pid, name in emb.items():
        out[pid] = ("tied" if pid in head else "embeddings", name if pid not in head else f"{name} = {head[pid]}")
    for pid, name in head.items():
        out.setdefault(pid, ("lm_head", name))
    return out


def tied_rate_problems(roles: Mapping[str, list[tuple[str, nn.Parameter]]], factors: Mapping[str, float],
                       how: Mapping[str, str] | None = None) -> list[str]:
    """Messages for tied parameters asked to train at two different rates (empty when consistent)."""
    tied = [name for _, (role, name) in role_of_parameters(roles).items() if role == "tied"]
    views = _shared_storage(roles)
    fe, fh = factors.get("embeddings"), factors.get("lm_head")
    if not (tied or views) or fe is None or fh is None or math.isclose(fe, fh, rel_tol=1e-9):
        return []
    how = how or {}
    asked = (f"the embeddings were asked for {how.get('embeddings', f'ratio {fe:g}')} and the lm_head for "
             f"{how.get('lm_head', f'ratio {fh:g}')}; give both the same value (or use `ratio=`/`lr=` alone)")
    return [
        f"{name} is one tied parameter (input embedding and output head share it), so it can have only one "
        f"learning rate, but {asked}"
        for name in tied
    ] + [
        f"{emb} and {head} are views of one tensor (PEFT's ensure_weight_tying ties the output head's adapter to "
        f"the input embedding's), so each step would update the same values at two learning rates, but {asked}"
        for emb, head in views
    ]


def _shared_storage(roles: Mapping[str, list[tuple[str, nn.Parameter]]]) -> list[tuple[str, str]]:
    """``(embedding name, head name)`` of distinct parameters that view the same memory (a transposed tie).

    Views of disjoint parts of one buffer (a flat parameter) do not count: their element ranges must overlap."""
    def key(p: nn.Parameter) -> tuple[str, int] | None:
        try:
            ptr = p.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # meta / sharded tensors: no storage to compare
            return None
        return (str(p.device), ptr) if ptr and p.numel() else None

    def extent(p: nn.Parameter) -> tuple[int, int]:
        start = p.storage_offset()
        return start, start + sum((n - 1) * st for n, st in zip(p.shape, p.stride())) + 1

    emb: dict[tuple[str, int], list[tuple[str, nn.Parameter]]] = {}
    for n, p in roles.get("embeddings", []):
        k = key(p)
        if k is not None:
            emb.setdefault(k, []).append((n, p))
    out = []
    for hn, hp in roles.get("lm_head", []):
        k = key(hp)
        for en, ep in emb.get(k, []) if k is not None else []:
            (a0, a1), (b0, b1) = extent(ep), extent(hp)
            if ep is not hp and ep.dtype == hp.dtype and a0 < b1 and b0 < a1:
                out.append((en, hn))
    return out


@dataclass
class Split:
    """What :func:`split_param_groups` did, enough to undo it and to describe it in a sidecar file."""

    base_groups: int
    layout: list[list[nn.Parameter]]  # each base group's params in their original order (references, no copies)
    groups: list[dict[str, Any]] = field(default_factory=list)  # per added group: role, source, positions, factor

    def record(self) -> dict[str, Any]:
        """JSON-able description written next to a checkpoint."""
        return {"format": 1, "base_groups": self.base_groups, "groups": self.groups}


def _scale(value: Any, factor: float) -> Any:
    return value.clone() * factor if isinstance(value, torch.Tensor) else value * factor


def _scheduler_problems(scheduler: Any, n_groups: int) -> list[str]:
    if scheduler is None:
        return []
    name = type(scheduler).__name__
    if name not in _CLOSED_FORM_SCHEDULERS and not hasattr(scheduler, "lr_lambdas"):
        return [f"learning-rate scheduler {name} keeps per-group state this guard cannot extend; use a "
                f"Trainer lr_scheduler_type built on LambdaLR (linear, cosine, constant, ...)"]
    probs = []
    for key in _SCHED_LISTS:
        v = getattr(scheduler, key, None)
        if isinstance(v, list) and len(v) != n_groups:
            probs.append(f"scheduler {name}.{key} has {len(v)} entries for {n_groups} optimizer param groups; "
                         f"create the scheduler after the optimizer's groups are final")
    return probs


def peak_lr(group: Mapping[str, Any]) -> float:
    """A group's peak LR: ``initial_lr`` (set by the scheduler), else its current ``lr``.

    Example:
        >>> peak_lr({"lr": 0.0, "initial_lr": 2e-5}), peak_lr({"lr": 1e-3})
        (2e-05, 0.001)
    """
    lr = group.get("initial_lr", group["lr"])
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def split_param_groups(optimizer: Any, scheduler: Any, roles: Mapping[str, list[tuple[str, nn.Parameter]]],
                       factors: Mapping[str, float], targets: Mapping[str, float] | None = None) -> Split:
    """Move embedding/head parameters into their own param groups at ``factor x`` the source group's LR.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (or a wrapper with ``.optimizer``), not yet split.
        scheduler: its LR scheduler (or ``None``): ``base_lrs``, ``lr_lambdas``, ``_last_lr``, ``min_lrs`` are
            extended so every new group follows the source group's schedule.
        roles: from :func:`embedding_parameters`.
        factors: ``{"embeddings": f, "lm_head": f, "tied": f}``; a role without a factor is left alone.
        targets: ``{role: lr}``, absolute peak LRs that replace ``factors`` for those roles: each added group gets
            ``lr / peak LR of its source group`` (``initial_lr``, else ``lr``), so the role trains at ``lr`` whatever
            LR the group it came from has (a user-built optimizer, a subclass's own groups).

    Returns:
        A :class:`Split`; parameters not in the optimizer are ignored.

    Raises:
        EmbeddingLRError: a tied parameter with two factors, a factor <= 0, or a scheduler that cannot follow;
            nothing is changed.
    """
    opt = unwrap_optimizer(optimizer)
    by_id = role_of_parameters(roles)
    problems = tied_rate_problems(roles, factors)
    if any(g.get(ROLE_KEY) for g in opt.param_groups):
        problems.append("the optimizer's param groups are already split; merge them first")
    problems += [f"factor for {r} must be > 0, got {f!r}" for r, f in factors.items() if not f > 0]
    problems += _scheduler_problems(scheduler, len(opt.param_groups))
    if problems:
        raise EmbeddingLRError("Cannot give the embeddings their own learning rate; nothing was changed:\n  - "
                               + "\n  - ".join(problems))
    fac, tgt = dict(factors), dict(targets or {})
    if "tied" not in fac and "embeddings" in fac:
        fac["tied"] = fac["embeddings"]
    if "tied" not in tgt and "embeddings" in tgt and "tied" not in factors:
        tgt["tied"] = tgt["embeddings"]
    for role, lr in tgt.items():
        fac.setdefault(role, lr)  # placeholder: the factor is computed per source group below
    split = Split(base_groups=len(opt.param_groups), layout=[list(g["params"]) for g in opt.param_groups])
    plan = []  # (source index, role, positions, params)
    for gi, group in enumerate(opt.param_groups):
        for role in ROLES:
            if role not in fac:
                continue
            pos = [i for i, p in enumerate(group["params"]) if by_id.get(id(p), ("",))[0] == role]
            if pos and role in tgt and not peak_lr(group) > 0:
                problems.append(f"param group {gi} holds {by_id[id(group['params'][pos[0]])][1]} at lr "
                                f"{peak_lr(group)!r}; an absolute lr for {role} cannot follow its schedule as a "
                                f"fraction of it: give that group an lr > 0, or use a ratio")
            elif pos:
                plan.append((gi, role, pos, [group["params"][i] for i in pos]))
    if problems:
        raise EmbeddingLRError("Cannot give the embeddings their own learning rate; nothing was changed:\n  - "
                               + "\n  - ".join(problems))
    moved = {id(p) for *_, ps in plan for p in ps}
    for group in opt.param_groups:  # all checks done above: change now
        group["params"] = [p for p in group["params"] if id(p) not in moved]
    for gi, role, pos, params in plan:
        src = opt.param_groups[gi]
        f = tgt[role] / peak_lr(src) if role in tgt else fac[role]
        new = {k: v for k, v in src.items() if k != "params"}
        new.update(params=params, lr=_scale(src["lr"], f), **{ROLE_KEY: role, SOURCE_KEY: gi, POSITIONS_KEY: pos})
        if "initial_lr" in src:
            new["initial_lr"] = _scale(src["initial_lr"], f)
        opt.add_param_group(new)
        if scheduler is not None:
            for key in ("base_lrs", "_last_lr", "min_lrs"):
                v = getattr(scheduler, key, None)
                if isinstance(v, list):
                    v.append(v[gi] if key == "min_lrs" else _scale(v[gi], f))
            if isinstance(getattr(scheduler, "lr_lambdas", None), list):
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[gi])
        split.groups.append({"role": role, "source": gi, "positions": pos, "factor": f,
                             "names": [by_id[id(p)][1] for p in params]})
    return split


def base_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer's groups as they were before :func:`split_param_groups` (pure: nothing is changed).

    Groups added by the split are folded back into their source group at their original positions, so a
    record of the layout taken while split (e.g. a save decided after ``on_step_end``) matches the Trainer's.

    Example:
        >>> g = [{"params": ["a", "c"], "lr": 1.0}, {"params": ["b"], "lr": 0.1, ROLE_KEY: "embeddings",
        ...      SOURCE_KEY: 0, POSITIONS_KEY: [1]}]
        >>> base_param_groups(g)
        [{'params': ['a', 'b', 'c'], 'lr': 1.0}]
    """
    base = [dict(g, params=list(g["params"])) for g in param_groups if ROLE_KEY not in g]
    inserts: dict[int, list[tuple[int, Any]]] = {}
    for g in param_groups:
        if ROLE_KEY in g:
            inserts.setdefault(g[SOURCE_KEY], []).extend(zip(g[POSITIONS_KEY], g["params"]))
    for gi, pairs in inserts.items():
        for pos, p in sorted(pairs, key=lambda t: t[0]):
            base[gi]["params"].insert(pos, p)
    return base


def merge_param_groups(optimizer: Any, scheduler: Any, split: Split) -> None:
    """Undo :func:`split_param_groups`: base groups get back their parameters in the original order."""
    opt = unwrap_optimizer(optimizer)
    n = split.base_groups
    del opt.param_groups[n:]
    for group, params in zip(opt.param_groups, split.layout):
        group["params"] = list(params)
    if scheduler is not None:
        for key in _SCHED_LISTS:
            v = getattr(scheduler, key, None)
            if isinstance(v, list):
                del v[n:]


def base_layout_optimizer_state(state_dict: Mapping[str, Any], current_groups: list[dict[str, Any]],
                                split: Split) -> dict[str, Any]:
    """Rewrite an optimizer ``state_dict`` saved while split into the base layout (no tensor is copied).

    Args:
        state_dict: ``optimizer.state_dict()`` taken while split (indices follow ``current_groups``' order).
        current_groups: the live ``param_groups`` it was taken from.
        split: the :class:`Split` in force.

    Returns:
        A state dict with ``split.base_groups`` groups, loadable by a freshly created (unsplit) optimizer, with
        every parameter's state (moments, step) under that parameter's new index.
    """
    cur = [p for g in current_groups for p in g["params"]]
    new_index = {id(p): i for i, p in enumerate(p for layout in split.layout for p in layout)}
    if len(cur) != len(new_index) or any(id(p) not in new_index for p in cur):
        raise EmbeddingLRError(
            f"the optimizer holds {len(cur)} parameters but the recorded layout {len(new_index)}; parameters were "
            f"added or removed after the embedding LR split, so optimizer.pt cannot be rewritten for resume")
    state = {new_index[id(cur[i])]: s for i, s in state_dict["state"].items()}
    groups = []
    for gi in range(split.base_groups):
        g = {k: v for k, v in state_dict["param_groups"][gi].items() if k != "params"}
        g["params"] = [new_index[id(p)] for p in split.layout[gi]]
        groups.append(g)
    return {"state": state, "param_groups": groups}


def base_layout_scheduler_state(state_dict: Mapping[str, Any], split: Split) -> dict[str, Any]:
    """A scheduler ``state_dict`` with its per-group lists cut back to the base groups."""
    out = dict(state_dict)
    for key in _SCHED_LISTS:
        if isinstance(out.get(key), list):
            out[key] = list(out[key][: split.base_groups])
    return out


def group_lrs(optimizer: Any) -> dict[str, float]:
    """``{role: lr}`` of the added groups (the first group of each role), as floats."""
    out: dict[str, float] = {}
    for g in unwrap_optimizer(optimizer).param_groups:
        role = g.get(ROLE_KEY)
        if role and role not in out:
            lr = g["lr"]
            out[role] = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    return out


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path`` (no torn file)."""
    atomic_write(path, lambda f: torch.save(obj, f))
