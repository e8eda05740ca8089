"""Whether a model is sharded, decided from what actually wraps it, and the few shard-aware reductions the guards use.

The one owner of "sharded or not" (issue 18). A guard never decides from ``TrainingArguments.fsdp`` /
``.deepspeed``: with ``fsdp=...`` on a machine where accelerate falls back to plain DDP (CPU hosts) the parameters
are whole replicas, and a guard that skipped "because FSDP" would skip a run it can check. It asks the model:

- :func:`is_shard`: one parameter holds a piece of a tensor (FSDP2 ``DTensor``, FSDP1 ``FlatParameter``, DeepSpeed
  ZeRO-3 ``ds_id``).
- :func:`engine`: the sharding engine accelerate really runs (before the model is wrapped).
- :func:`is_sharded`: this rank's model is wrapped or holds shards (local knowledge, no collective).
- :func:`replicated`: the tensors a rank holds whole (what data-parallel replicas can compare).
- :func:`agreed_sharded`: the same answer on every rank: one collective vote; ranks that wrapped the model
  differently raise the same error on every rank instead of taking different code paths (a hang).
- :func:`is_row_sharded`: FSDP2's layout (``Shard(0)`` over a 1-D mesh of the whole world).
- :func:`row_layout`: where this rank's rows of an FSDP2 ``Shard(0)`` tensor sit in the full tensor.
- :func:`gather_rows`: the full per-row vector of a row-sharded tensor from each rank's values for its own rows
  (an all-gather of one small value per row, never of the tensor).
- :func:`is_zero3`, :func:`zero3_span`, :func:`full_shape`, :func:`full_numel`: a DeepSpeed ZeRO-3 parameter,
  this rank's contiguous range of its flattened elements, and its full shape and size (its ``.shape`` is empty
  outside forward/backward: every count of parameters goes through :func:`full_numel`).
  ZeRO-1/2 parameters are whole tensors on every rank (only optimizer state and gradients are partitioned):
  nothing here treats them as shards.
- :func:`local_grad`: this rank's part of a parameter's gradient after the step (a DTensor's local shard, a ZeRO-3
  partition kept by DeepSpeed's optimizer), without a collective.
- :func:`zero_optimizer`, :func:`zero_param_groups`, :func:`optimizer_param_groups`: DeepSpeed's ZeRO optimizer
  behind the Trainer's (accelerate's wrapper), which model parameters each of its param groups trains (its
  ``param_groups`` hold flat fp32 partitions, not the parameters), and any optimizer's groups with their model
  parameters.

Every function that takes ``gather`` runs a collective through it (default :func:`trainer_guard._dist.gather`):
every rank must call it at the same point, with the same tensors in the same order.

Example:
    >>> import torch
    >>> from trainer_guard.core.sharding import is_sharded, agreed_sharded
    >>> model = torch.nn.Linear(2, 2)
    >>> is_sharded(model), agreed_sharded(model)
    (False, False)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TrainerGuardError

__all__ = ["WRAPPERS", "is_shard", "is_dtensor", "engine", "is_sharded", "replicated", "agreed_sharded", "is_row_sharded", "RowLayout", "row_layout",
           "gather_rows", "local_part", "resolve_gather", "is_zero3", "zero3_span", "full_shape", "full_numel",
           "local_grad", "zero_optimizer", "zero_param_groups", "optimizer_param_groups"]

# Module classes (anywhere in the MRO) whose parameters are shards: FSDP1, FSDP2 (``fully_shard`` makes a subclass
# of FSDPModule), DeepSpeed's engine. FSDP1 with use_orig_params exposes plain Parameters that are views of the shard.
WRAPPERS = frozenset({"FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"})


def _dtensor_cls() -> type | tuple:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return ()
    return DTensor


def is_shard(t: torch.Tensor) -> bool:
    """True when ``t`` holds a piece of a tensor: an FSDP2 ``DTensor``, an FSDP1 ``FlatParameter``, a DeepSpeed
    ZeRO-3 parameter (``ds_id``).

    Example:
        >>> is_shard(torch.zeros(2))
        False
    """
    return isinstance(t, _dtensor_cls()) or hasattr(t, "ds_id") or type(t).__name__ == "FlatParameter"


def is_dtensor(t: Any) -> bool:
    """True for an FSDP2 / tensor-parallel ``DTensor``: the only shards whose pieces can be combined across ranks
    (:func:`trainer_guard.core.divergence.sharded_checksums`, :func:`gather_rows`)."""
    return isinstance(t, _dtensor_cls())


def engine() -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when accelerate's process state really runs that engine, else ``None``.

    Read from the ``AcceleratorState`` the ``Trainer`` built (process-wide, the same on every rank, no collective),
    not from ``TrainingArguments``: with ``fsdp=...`` on a host where accelerate falls back to plain DDP (CPU) this
    is ``None``. For decisions taken before the model is wrapped (a resume's checkpoint check); once it is,
    :func:`is_sharded` reads the model itself. ``None`` too before any Accelerator exists.
    """
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    if not AcceleratorState._shared_state:  # no Accelerator yet: nothing runs sharded
        return None
    kind = AcceleratorState._shared_state.get("distributed_type")
    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(kind)


def _wraps_shards(module: nn.Module) -> bool:
    """``module`` is one of :data:`WRAPPERS`; a ``DeepSpeedEngine`` only when it partitions the parameters (ZeRO-3):
    under ZeRO-1/2 every rank holds every parameter whole, a replica like DDP's."""
    names = {c.__name__ for c in type(module).__mro__}
    if not names & WRAPPERS:
        return False
    if names & WRAPPERS == {"DeepSpeedEngine"}:
        try:
            return bool(module.zero_optimization_partition_weights())
        except Exception:  # an engine without ZeRO's API: count it as sharding, as before
            return True
    return True


def is_sharded(model: nn.Module) -> bool:
    """True when this rank's ``model`` is wrapped by FSDP / DeepSpeed ZeRO-3 or holds shards (see :func:`is_shard`).

    A DeepSpeed ZeRO-1/2 engine is not sharding: its parameters are whole on every rank. Local knowledge: ranks may
    disagree (a model wrapped on some ranks only); a decision that leads to a collective must go through
    :func:`agreed_sharded`.
    """
    if any(_wraps_shards(m) for m in model.modules()):
        return True
    return any(is_shard(p) for p in model.parameters())


def replicated(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` (``model``'s parameters/buffers) that this rank holds whole: not shards, and none
    at all under FSDP1, whose plain-looking Parameters are views of the rank's flat shard (use_orig_params).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> list(replicated(lin, dict(lin.named_parameters())))
        ['weight', 'bias']
    """
    if any(c.__name__ == "FullyShardedDataParallel" for m in model.modules() for c in type(m).__mro__):
        return {}
    return {n: t for n, t in tensors.items() if not is_shard(t)}


def agreed_sharded(model: nn.Module, gather: Callable[[Any], list[Any]] | None = None, what: str = "") -> bool:
    """:func:`is_sharded`, the same on every rank: one all-gather of one bool per rank (none when single-process).

    Raises:
        TrainerGuardError: on every rank, naming the ranks, when some ranks hold shards and others whole
            tensors (the ranks wrapped the model differently); ``what`` names the check that needed to know.
    """
    gather = resolve_gather(gather)
    votes = [bool(v) for v in gather(is_sharded(model))]
    if all(votes) or not any(votes):
        return votes[0]
    shard = [r for r, v in enumerate(votes) if v]
    whole = [r for r, v in enumerate(votes) if not v]
    raise TrainerGuardError(
        f"{what + ': ' if what else ''}rank {', '.join(map(str, shard))} hold{'s' if len(shard) == 1 else ''} sharded "
        f"parameters (FSDP/DeepSpeed ZeRO-3) and rank {', '.join(map(str, whole))} whole ones: the ranks did not "
        f"wrap the model alike (every rank stops here, none is left waiting); build and prepare the model the same "
        f"way on every rank")


def resolve_gather(gather: Callable[[Any], list[Any]] | None) -> Callable[[Any], list[Any]]:
    """``gather``, or :func:`trainer_guard._dist.gather` (every rank's object, in rank order) when ``None``."""
    if gather is not None:
        return gather
    from .._dist import gather as dist_gather  # lazy: accelerate

    return dist_gather


@dataclass(frozen=True)
class RowLayout:
    """Where each rank's rows of a row-sharded tensor sit: ``counts[i]`` rows at ``starts[i]`` for mesh position
    ``i``; ``position`` is this rank's."""

    counts: tuple[int, ...]
    starts: tuple[int, ...]
    position: int


def is_row_sharded(t: Any) -> bool:
    """A DTensor split along dim 0 over a 1-D mesh of the whole world (FSDP2's layout)."""
    dt = _dtensor_cls()
    if not dt or not isinstance(t, dt) or t.device_mesh.ndim != 1 or len(t.placements) != 1:
        return False
    from torch.distributed.tensor import Shard

    pl = t.placements[0]
    return isinstance(pl, Shard) and pl.dim == 0 and t.device_mesh.size() == torch.distributed.get_world_size()


def row_layout(t: Any, gather: Callable[[Any], list[Any]] | None = None) -> RowLayout | None:
    """The :class:`RowLayout` of an FSDP2 ``Shard(0)`` DTensor (uneven and empty shards included), from one
    all-gather of each rank's row count; ``None`` (and no collective) for any other tensor or placement, which
    every rank sees alike."""
    if not is_row_sharded(t):
        return None
    gather = resolve_gather(gather)
    per_rank = [int(c) for c in gather(int(t.to_local().shape[0]))]
    order = [int(r) for r in t.device_mesh.mesh.flatten().tolist()]  # mesh position -> global rank
    counts = tuple(per_rank[r] for r in order)
    starts = tuple(sum(counts[:i]) for i in range(len(counts)))
    return RowLayout(counts, starts, t.device_mesh.get_local_rank())


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``t``: the local shard of a DTensor, else ``t`` itself (detached)."""
    return (t.to_local() if isinstance(t, _dtensor_cls()) else t).detach()


def gather_rows(local: torch.Tensor, t: Any, gather: Callable[[Any], list[Any]] | None = None) -> torch.Tensor:
    """The full vector of one value per row of ``t``, an FSDP2 ``Shard(0)`` DTensor, from ``local``, this rank's
    values for its own rows: one all-gather of ``t.shape[0]`` values in all, never of ``t``. Any other tensor:
    ``local`` as it is, no collective (a DTensor split another way is the caller's to handle).

    Example:
        >>> gather_rows(torch.tensor([1.0, 2.0]), torch.zeros(2, 3))  # not sharded: the local values are the rows
        tensor([1., 2.])
    """
    if not is_row_sharded(t):
        return local
    gather = resolve_gather(gather)
    parts = gather(local.detach().cpu())
    order = [int(r) for r in t.device_mesh.mesh.flatten().tolist()]  # mesh position -> global rank
    full = torch.cat([parts[r] for r in order])
    if full.shape[0] != t.shape[0]:  # every rank sees the same parts: the same error everywhere
        raise TrainerGuardError(f"the ranks' shards hold {full.shape[0]} rows of a tensor of {t.shape[0]}: not a "
                                f"row split of it")
    return full


def is_zero3(t: Any) -> bool:
    """A DeepSpeed ZeRO-3 parameter: ``ds_id`` and its local partition ``ds_tensor`` (the parameter's own data is
    empty outside forward/backward)."""
    return hasattr(t, "ds_id") and getattr(t, "ds_tensor", None) is not None


def full_shape(t: Any) -> torch.Size:
    """The shape of the whole tensor: ``ds_shape`` for a ZeRO-3 parameter, else ``t.shape`` (a DTensor's is whole).

    Example:
        >>> full_shape(torch.zeros(3, 2))
        torch.Size([3, 2])
    """
    return torch.Size(t.ds_shape) if is_zero3(t) else t.shape


def full_numel(t: Any) -> int:
    """The number of values of the whole tensor: ``ds_numel`` for a ZeRO-3 parameter (its ``numel()`` is 0 outside
    forward/backward), else ``t.numel()`` (a DTensor's is the whole tensor's).

    Example:
        >>> full_numel(torch.zeros(3, 2))
        6
    """
    return int(t.ds_numel) if is_zero3(t) else int(t.numel())


def zero3_span(t: Any) -> tuple[torch.Tensor, int] | None:
    """``(values, first)`` for a DeepSpeed ZeRO-3 parameter: this rank's elements of the flattened full tensor (a
    view of its partition, the padding of the last one cut off) and the index of the first of them. Rank ``r`` of
    the parameter's partition group holds elements ``[r*P, (r+1)*P)``, ``P`` the partition size. ``None`` (no
    collective) for any other tensor."""
    if not is_zero3(t):
        return None
    part = t.ds_tensor.detach().view(-1)
    group = getattr(t, "ds_process_group", None)
    pos = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    first = pos * part.numel()
    n = max(0, min(part.numel(), int(t.ds_numel) - first))
    return part[:n], first


def local_grad(p: Any) -> torch.Tensor | None:
    """This rank's part of ``p``'s gradient, read after the optimizer step (no collective): a DTensor's local shard of
    ``p.grad``; for a DeepSpeed ZeRO-3 parameter, whose ``.grad`` is always ``None``, the gradient partition its
    optimizer keeps until the next backward overwrites it (``deepspeed.utils.safe_get_local_grad``); else ``p.grad``.
    ``None`` when there is none (DeepSpeed ZeRO-1/2 free theirs in the step).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2)); (w * 3).sum().backward()
        >>> local_grad(w)
        tensor([3., 3.])
    """
    if is_zero3(p):
        if not getattr(p, "requires_grad", False) or getattr(p, "_z3_optimizer", None) is None:
            return None
        from deepspeed.utils import safe_get_local_grad  # lazy: only ZeRO-3 parameters get here

        try:
            return safe_get_local_grad(p)
        except KeyError:  # trainable, yet in none of the optimizer's groups: it keeps no partition for it
            return None
    g = p.grad
    if g is None:
        return None
    return (g.to_local() if hasattr(g, "to_local") else g).detach()


def zero_optimizer(optimizer: Any) -> Any | None:
    """DeepSpeed's ZeRO optimizer (stage 1/2 ``DeepSpeedZeroOptimizer``, ``BF16_Optimizer``, stage 3
    ``DeepSpeedZeroOptimizer_Stage3``) that ``optimizer`` is or wraps (accelerate's ``DeepSpeedOptimizerWrapper``
    holds it as ``.optimizer``), else ``None``.

    Example:
        >>> zero_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None
        True
    """
    seen = 0
    while optimizer is not None and seen < 4:  # a wrapper of a wrapper at most; never a loop
        if any(hasattr(optimizer, a) for a in ("fp16_groups", "bit16_groups", "bf16_groups")) and hasattr(
                optimizer, "param_groups"):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def zero_param_groups(optimizer: Any) -> list[tuple[int, list[torch.nn.Parameter]]] | None:
    """``(param group index, model parameters)`` per group a DeepSpeed ZeRO optimizer steps (ZeRO-3 splits a group
    into sub-groups: each is listed with its group's index), or ``None`` when ``optimizer`` is not one
    (:func:`zero_optimizer`): its ``param_groups`` then hold the parameters themselves.

    Example:
        >>> zero_param_groups(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None
        True
    """
    ds = zero_optimizer(optimizer)
    if ds is None:
        return None
    if hasattr(ds, "fp16_groups") and hasattr(ds, "sub_group_to_group_id"):  # ZeRO-3
        return [(int(ds.sub_group_to_group_id[i]), list(g)) for i, g in enumerate(ds.fp16_groups)]
    groups = getattr(ds, "bit16_groups", None) or getattr(ds, "bf16_groups", None) or getattr(ds, "fp16_groups", [])
    return [(i, list(g)) for i, g in enumerate(groups)]


def optimizer_param_groups(optimizer: Any) -> list[dict[str, Any]]:
    """``optimizer``'s param groups (shallow copies) with the model parameters each trains as ``"params"``: for a
    DeepSpeed ZeRO optimizer (:func:`zero_param_groups`) its groups' settings with the parameters DeepSpeed steps
    in them (ZeRO-3 sub-groups joined in order) instead of its flat fp32 partitions, which differ per rank; for any
    other optimizer its own groups.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> [(len(g["params"]), g["lr"]) for g in optimizer_param_groups(torch.optim.SGD([w], lr=0.1))]
        [(1, 0.1)]
    """
    groups = getattr(zero_optimizer(optimizer) or optimizer, "param_groups", None) or []
    members = zero_param_groups(optimizer)
    if members is None:
        return [dict(g, params=list(g["params"])) for g in groups]
    joined: dict[int, list[torch.nn.Parameter]] = {}
    for gi, params in members:
        joined.setdefault(gi, []).extend(params)
    return [dict(g, params=joined.get(i, [])) for i, g in enumerate(groups)]
