"""Process-group helpers so that every rank agrees: one writer, one verdict.

Built on accelerate's ``PartialState`` and ``gather_object``; a single process (no launcher) is rank 0 of 1.

Example:
    >>> from trainer_guard._dist import is_main_process, agree
    >>> is_main_process()
    True
    >>> agree([])  # no problems on any rank -> no error
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object

from .errors import TrainerGuardError

__all__ = ["state", "is_main_process", "world_size", "rank", "gather", "agree", "agreed_call", "barrier"]


def state() -> PartialState:
    """The accelerate process state (created on first use; CPU-only hosts ask for the CPU backend so a
    torchrun-launched CPU job sees every rank)."""
    import torch

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True on the one process that writes files."""
    return state().is_main_process


def world_size() -> int:
    return state().num_processes


def rank() -> int:
    return state().process_index


def barrier() -> None:
    if world_size() > 1:
        state().wait_for_everyone()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when single-process)."""
    if world_size() == 1:
        return [obj]
    return gather_object([obj])


def agree(problems: list[str], error: type[TrainerGuardError] = TrainerGuardError, header: str = "") -> None:
    """Raise the same ``error`` on every rank when any rank reported problems.

    Each rank passes its own list; the message names the ranks that saw each problem, so no rank hangs waiting
    for one that has already raised.
    """
    per_rank = gather(list(problems))
    if not any(per_rank):
        return
    lines: dict[str, list[int]] = {}
    for r, probs in enumerate(per_rank):
        for p in probs:
            lines.setdefault(p, []).append(r)
    n = len(per_rank)
    body = []
    for p, ranks in lines.items():
        suffix = "" if n == 1 else (" (all ranks)" if len(ranks) == n else f" (rank {', '.join(map(str, ranks))})")
        body.append(p + suffix)
    msg = (header + "\n  - " if header else "") + ("\n  - ".join(body) if header else "\n".join(body))
    raise error(msg)


def agreed_call(run: bool, fn: Callable[[], Any], error: type[TrainerGuardError] = TrainerGuardError,
                header: str = "") -> Any:
    """Call ``fn()`` where ``run`` is true (e.g. ``args.should_save``: the ranks that write), then :func:`agree` on
    the outcome: an exception there (a full disk, an unreadable file) becomes the same ``error`` on every rank,
    naming the rank, instead of one rank raising while the others wait in the next collective.

    Every rank must call this at the same point, whatever its ``run``. Returns ``fn()``'s result (``None`` where
    ``run`` is false).

    Example:
        >>> agreed_call(True, lambda: 42)
        42
    """
    result, problems = None, []
    if run:
        try:
            result = fn()
        except Exception as e:  # reported by every rank below; the original stays the __context__ on this rank
            problems = [f"{type(e).__name__}: {e}"]
    agree(problems, error, header)
    return result
