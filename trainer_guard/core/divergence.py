"""Replica divergence: per-tensor checksums of a model, one fingerprint per replica, and who disagrees.

Pure functions, no Trainer and no process group: the caller gathers the values across ranks (see
:class:`trainer_guard.callbacks.divergence.ReplicaDivergenceGuard`). Checksums come from
:mod:`trainer_guard.checksum` (the Triton kernel on CUDA, the CPU loop elsewhere): every rank computes the same
values for the same bytes.

Example:
    >>> from trainer_guard.tiny import tiny_model
    >>> from trainer_guard.core.divergence import model_checksums, model_fingerprint, divergent_ranks
    >>> sums = model_checksums(tiny_model("llama-tied"))
    >>> "lm_head.weight" in sums  # a tie is checksummed once, under its first name
    False
    >>> fp = model_fingerprint(sums)
    >>> divergent_ranks([fp, fp, fp ^ 1])
    (0, [2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..checksum.spec import CHECKSUM_ALGO, MASK64, finalize, fingerprint
from ..checksum.tensors import checksums, dtype_name, partial_sums
from .sharding import is_row_sharded, is_sharded, replicated, zero3_span

__all__ = [
    "model_tensors",
    "model_checksums",
    "model_fingerprint",
    "checksum_algo",
    "is_sharded",  # re-exported from trainer_guard.core.sharding, which owns the decision
    "divergent_ranks",
    "first_differences",
    "divergence_message",
    "sharded_checksums",
]

def checksum_algo() -> str:
    """The id of the checksum algorithm the fingerprints use (:data:`trainer_guard.checksum.spec.CHECKSUM_ALGO`)."""
    return CHECKSUM_ALGO


def model_tensors(model: nn.Module, include_buffers: bool = False) -> dict[str, torch.Tensor]:
    """The tensors every data-parallel rank holds whole: the model's parameters (each shared storage once, under
    its first name), optionally its buffers, without shards (:func:`trainer_guard.core.sharding.replicated`: an
    FSDP2 run's DTensors, ZeRO-3 partitions; nothing under FSDP1, whose Parameters are views of a flat shard).
    Shards are checksummed by :func:`sharded_checksums`."""
    out = {name: p for name, p in model.named_parameters()}
    if include_buffers:
        out.update((name, b) for name, b in model.named_buffers() if name not in out)
    return replicated(model, out)


def model_checksums(
    model: nn.Module, include_buffers: bool = False, backend: Literal["auto", "triton", "cpu"] = "auto"
) -> dict[str, int]:
    """``{tensor name: unsigned 64-bit checksum}`` of the model's replicated parameters (and buffers), in model
    order (:func:`model_tensors`).

    Raises:
        ChecksumError: a tensor cannot be checksummed (meta device, unsupported layout or dtype).
    """
    tensors = model_tensors(model, include_buffers)
    sums = checksums(tensors, backend=backend)
    return {name: int(sums[name]) for name in tensors}


def model_fingerprint(sums: Mapping[str, int]) -> int:
    """One order-independent unsigned 64-bit value for name -> checksum pairs (:func:`trainer_guard.checksum.fingerprint`)."""
    return int(fingerprint(sums))


def divergent_ranks(fingerprints: Sequence[int]) -> tuple[int, list[int]]:
    """``(reference_rank, ranks that differ from it)`` for one fingerprint per rank.

    The reference is the lowest rank of the largest group of equal fingerprints (a tie goes to the group
    holding the lowest rank), so one bad replica among many is named, not the majority.
    """
    if not fingerprints:
        return 0, []
    groups: dict[int, list[int]] = {}
    for r, fp in enumerate(fingerprints):
        groups.setdefault(int(fp), []).append(r)
    best = max(groups.values(), key=lambda ranks: (len(ranks), -ranks[0]))
    ref = best[0]
    return ref, [r for r, fp in enumerate(fingerprints) if fp != fingerprints[ref]]


def first_differences(reference: Mapping[str, int], other: Mapping[str, int], limit: int = 5) -> list[str]:
    """Names (in ``reference`` order, then extras) whose checksums differ or that only one side has."""
    out = []
    for name, value in reference.items():
        if other.get(name) != value:
            out.append(name if name in other else f"{name} (missing)")
            if len(out) >= limit:
                return out
    for name in other:
        if name not in reference:
            out.append(f"{name} (extra)")
            if len(out) >= limit:
                break
    return out


def divergence_message(
    step: int | None,
    fingerprints: Sequence[int],
    per_rank_sums: Sequence[Mapping[str, int]] | None = None,
    limit: int = 5,
) -> str:
    """The error text for diverged replicas: which ranks, their fingerprints, the first differing tensors, the fix.

    Returns ``""`` when every rank agrees.
    """
    ref, bad = divergent_ranks(fingerprints)
    if not bad:
        return ""
    at = f" at step {step}" if step is not None else ""
    lines = [f"Data-parallel replicas hold different weights{at}: rank {', '.join(map(str, bad))} "
             f"differ{'s' if len(bad) == 1 else ''} from rank {ref} (fingerprint {int(fingerprints[ref]):016x})."]
    for r in bad:
        line = f"  - rank {r}: fingerprint {int(fingerprints[r]):016x}"
        if per_rank_sums is not None:
            diffs = first_differences(per_rank_sums[ref], per_rank_sums[r], limit)
            n_all = len(first_differences(per_rank_sums[ref], per_rank_sums[r], limit=1 << 30))
            more = f" (+{n_all - len(diffs)} more)" if n_all > len(diffs) else ""
            line += f"; first differing tensors: {', '.join(diffs)}{more}"
        lines.append(line)
    lines.append("A replica skipped or repeated an update, ran a non-deterministic kernel, or has faulty hardware. "
                 "Stop and resume from the last checkpoint saved before this step; if it recurs on the same rank, "
                 "exclude that device.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- sharded tensors (FSDP2)
def sharded_checksums(tensors: Mapping[str, torch.Tensor], gather: Callable[[Any], list[Any]]) -> dict[str, int]:
    """Checksums of the FULL tensors of a sharded model, equal to :func:`trainer_guard.checksum.checksums` of the
    unsharded tensors, computed from each rank's local shard without gathering any tensor.

    The checksum is a sum over 64-bit words keyed by their position, so a shard that is a contiguous,
    8-byte-aligned byte range of the full tensor contributes a partial sum at its word offset, and the partial
    sums add up (mod 2^64) to the full one. Each rank: (1) reports its local row count per FSDP2 tensor; (2) computes
    its partial sums at the offsets that follow; (3) the partials are summed and finalised with the full dtype,
    shape and size. A DeepSpeed ZeRO-3 parameter's partition is the same kind of range (rank ``r`` holds elements
    ``[r*P, (r+1)*P)``, :func:`~trainer_guard.core.sharding.zero3_span`): no count to exchange. Tensors split any
    other way (2-D meshes, other dims, offsets not a multiple of 8 bytes) are materialised (``full_tensor()``, or
    ``deepspeed.zero.GatheredParameters`` for a ZeRO-3 partition size that is not) and checksummed whole (correct,
    but costs an all-gather of that tensor). Plain tensors are taken as replicated.

    Every rank must call this with the same names in the same order (it runs collectives through ``gather``,
    e.g. :func:`trainer_guard._dist.gather`).

    Raises:
        ChecksumError: a tensor's dtype cannot be checksummed (named).
    """
    names = list(tensors)
    sharded = [n for n in names if is_row_sharded(tensors[n])]
    rows = gather({n: int(tensors[n].to_local().shape[0]) for n in sharded})
    out: dict[str, int] = {}
    local: dict[str, torch.Tensor] = {}
    first: dict[str, int] = {}
    exact: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for n in names:
        t = tensors[n]
        span = zero3_span(t)
        if span is not None:
            values, start = span
            group = getattr(t, "ds_process_group", None)
            if ((t.ds_tensor.numel() * t.ds_tensor.element_size()) % 8  # the same partition size on every rank
                    or torch.distributed.get_world_size(group) != torch.distributed.get_world_size()):  # replicas
                out[n] = _gathered_zero3_checksum(n, t)
                continue
            local[n], first[n] = values, start * values.element_size() // 8
            exact[n] = (t.ds_tensor.dtype, tuple(t.ds_shape))
            continue
        if n not in sharded:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[n] = int(checksums({n: full}, backend="cpu")[n])
            continue
        order = [int(r) for r in t.device_mesh.mesh.flatten().tolist()]  # mesh position -> global rank
        counts = [rows[r][n] for r in order]
        row_bytes = t.element_size() * math.prod(t.shape[1:])
        offsets = [sum(counts[:i]) * row_bytes for i in range(len(counts))]
        if any(o % 8 for o, c in zip(offsets, counts) if c) or sum(counts) != t.shape[0]:
            out[n] = int(checksums({n: t.full_tensor()}, backend="cpu")[n])
            continue
        pos = order.index(torch.distributed.get_rank())
        local[n], first[n] = t.to_local(), offsets[pos] // 8
        exact[n] = (t.dtype, tuple(t.shape))
    mine = partial_sums(local, first)  # every local shard at once: the kernel on CUDA, every core on the host
    partials = gather(mine)
    for n in names:
        if n in exact:
            dtype, shape = exact[n]
            s = sum(p.get(n, 0) for p in partials) & MASK64
            esize = torch.empty((), dtype=dtype).element_size()
            out[n] = finalize(s, dtype_name(dtype, n), shape, math.prod(shape) * esize)
    return {n: out[n] for n in names}


def _gathered_zero3_checksum(name: str, t: torch.Tensor) -> int:
    """One ZeRO-3 parameter gathered whole (read-only, a collective) and checksummed."""
    import deepspeed  # lazy: only ZeRO-3 parameters get here

    with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
        return int(checksums({name: t.data}, backend="cpu")[name])
