"""Embedding rows that were never trained, and whether the training data uses them (field report R4).

Pure functions, no Trainer. Base models carry rows of the input embedding / output head that pre-training never
touched (all ~0: Llama 3's reserved special tokens). Fine-tuning on text containing those ids - often through a
chat template's special tokens - gives NaN losses or garbage ("Untrained tokens found").

- :func:`untrained_rows`: rows whose largest magnitude is ~0 relative to the typical row (row-blocked, no full copy).
- :func:`count_token_ids`: stream a dataset (``datasets`` map-style or iterable, torch datasets, lists) under a
  token/example/time budget and count how often given ids occur.
- :func:`template_token_ids`: which given ids a tokenizer's chat template produces.
- :func:`set_rows_to_trained_mean`: the opt-in fix, rows := mean of the trained rows.

Example:
    >>> import torch
    >>> from trainer_guard.core.tokens import untrained_rows, count_token_ids, set_rows_to_trained_mean
    >>> w = torch.randn(6, 4); w[[2, 5]] = 0
    >>> untrained_rows(w)
    [2, 5]
    >>> scan = count_token_ids([{"input_ids": [1, 2, 2]}, {"input_ids": [5, 0]}], [2, 5])
    >>> scan.counts, scan.tokens, scan.complete
    ({2: 2, 5: 1}, 5, True)
    >>> _ = set_rows_to_trained_mean(w, [2, 5]); bool(w[2].abs().sum() > 0)
    True
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TrainerGuardError
from .sharding import (full_shape, gather_rows, is_row_sharded, is_shard, local_part, resolve_gather, row_layout,
                       zero3_span)

__all__ = ["untrained_rows", "TokenScan", "count_token_ids", "template_token_ids", "set_rows_to_trained_mean"]

_ROW_BLOCK = 4096


@torch.no_grad()
def untrained_rows(weight: torch.Tensor, rtol: float = 1e-3, atol: float = 0.0,
                   overrides: tuple[Sequence[int], torch.Tensor] | None = None,
                   gather: Callable[[Any], list[Any]] | None = None) -> list[int]:
    """Indices of rows whose max ``|w|`` is at most ``max(atol, rtol * median row max |w|)``.

    Computed in blocks of rows, so a 128K x 4K matrix never needs a second full-size temporary. ``overrides``:
    ``(ids, rows)``, the rows the model really uses for ``ids`` instead of ``weight``'s (PEFT trainable tokens keep
    the trained values of their rows in a separate tensor and leave the base rows as they were).

    Sharded weights (FSDP2 ``Shard(0)`` DTensor): each rank takes the peaks of its own rows and the ranks exchange
    them (one all-gather of one float per row, through ``gather``, default :func:`trainer_guard._dist.gather`), so
    every rank returns the same rows; every rank must call this at the same point. A DTensor split another way is
    gathered whole first. DeepSpeed ZeRO-3 parameters: each rank takes the peaks of the (whole or partial) rows of
    its flat partition and the ranks exchange them (one all-gather of about ``rows / N + 1`` floats per rank), so
    every rank returns the same rows without gathering the table.

    Example:
        >>> w = torch.randn(6, 4); w[[2, 5]] = 0
        >>> untrained_rows(w, overrides=([5], torch.ones(1, 4)))
        [2]
    """
    shape = full_shape(weight)
    if len(shape) != 2 or shape[0] == 0 or weight.device.type == "meta":
        return []
    span = zero3_span(weight)
    if span is not None:  # DeepSpeed ZeRO-3: rows of a flat partition
        peaks = _zero3_row_peaks(*span, shape, gather)
    else:
        if is_shard(weight) and not is_row_sharded(weight):
            if not hasattr(weight, "full_tensor"):  # FSDP1 flat parameters: no rows here
                return []
            weight = weight.full_tensor()  # a placement other than FSDP2's (same on every rank): the whole table
        peaks = gather_rows(_row_peaks(local_part(weight)), weight, gather)
    if overrides is not None and len(overrides[0]):
        ids, rows = overrides
        rows = rows.full_tensor() if hasattr(rows, "full_tensor") else rows
        peaks[torch.as_tensor(list(ids), dtype=torch.long)] = rows.detach().abs().amax(dim=1).float().cpu()
    threshold = max(atol, rtol * float(peaks.median()))
    return torch.nonzero(peaks <= threshold).flatten().tolist()


def _zero3_row_peaks(values: torch.Tensor, first: int, shape: torch.Size,
                     gather: Callable[[Any], list[Any]] | None) -> torch.Tensor:
    """Max ``|w|`` of every row of a ZeRO-3 parameter of ``shape`` from each rank's flat elements ``values``
    starting at element ``first``: each rank sends ``(first row, peaks of the rows it touches)``, a row split
    between two ranks takes the larger of their peaks."""
    n_rows, n_cols = int(shape[0]), int(shape[1])
    mine: tuple[int, torch.Tensor] = (0, torch.zeros(0))
    if values.numel():
        row0, last = first // n_cols, (first + values.numel() - 1) // n_cols
        peaks = torch.zeros(last - row0 + 1)
        head = min((-first) % n_cols, values.numel())  # the end of a row begun on the rank before
        if head:
            peaks[0] = values[:head].abs().max().float().cpu()
        whole = (values.numel() - head) // n_cols
        if whole:
            at = 1 if head else 0
            peaks[at:at + whole] = _row_peaks(values[head:head + whole * n_cols].view(whole, n_cols))
        tail = values[head + whole * n_cols:]  # the start of a row the next rank ends
        if tail.numel():
            peaks[-1] = torch.maximum(peaks[-1], tail.abs().max().float().cpu())
        mine = (row0, peaks)
    full = torch.zeros(n_rows)
    for row0, peaks in resolve_gather(gather)(mine):
        full[row0:row0 + len(peaks)] = torch.maximum(full[row0:row0 + len(peaks)], peaks)
    return full


def _row_peaks(weight: torch.Tensor) -> torch.Tensor:
    """Max ``|w|`` of each row (fp32, on the CPU), in blocks of rows."""
    if weight.shape[0] == 0:  # an empty shard (more ranks than rows)
        return torch.zeros(0)
    return torch.cat([weight[a:a + _ROW_BLOCK].abs().amax(dim=1).float().cpu()
                      for a in range(0, weight.shape[0], _ROW_BLOCK)])


@dataclass
class TokenScan:
    """What :func:`count_token_ids` saw.

    Attributes:
        counts: ``{id: occurrences}`` for the ids asked about that occurred.
        examples: examples scanned.
        tokens: tokens scanned.
        complete: the whole dataset was scanned (else a budget stopped it: see ``stopped``).
        stopped: which budget stopped the scan (``""`` when complete).
        out_of_range: ids below 0 or at/above ``vocab_size`` (when given).
        no_ids: examples without token ids in ``column`` (raw text tokenized later by a collator, another field).
    """

    counts: dict[int, int] = field(default_factory=dict)
    examples: int = 0
    tokens: int = 0
    complete: bool = True
    stopped: str = ""
    out_of_range: int = 0
    no_ids: int = 0


def _examples(dataset: Any, column: str, mask_column: str | None = None) -> Iterable[Any]:
    """Iterate ``dataset``'s ``column`` (and ``mask_column``) without touching other columns where the library
    allows it."""
    names = getattr(dataset, "column_names", None)
    if hasattr(dataset, "select_columns") and isinstance(names, list) and column in names:
        keep = [column] + ([mask_column] if mask_column and mask_column in names and mask_column != column else [])
        dataset = dataset.select_columns(keep)  # datasets: no copy, skips decoding the other columns
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and not hasattr(dataset, "__iter__"):
        return (dataset[i] for i in range(len(dataset)))
    return iter(dataset)


def _ids_of(example: Any, column: str) -> torch.Tensor | None:
    if isinstance(example, dict) or hasattr(example, "keys"):
        example = example.get(column) if hasattr(example, "get") else None
    if example is None or isinstance(example, (str, bytes)):
        return None
    try:
        t = torch.as_tensor(example)
    except (TypeError, ValueError, RuntimeError):  # ragged nested lists (packed/batched rows)
        if not isinstance(example, (list, tuple)):
            return None
        parts = [p for p in (_ids_of(e, column) for e in example) if p is not None]
        return torch.cat(parts) if parts else None
    if t.dtype.is_floating_point or t.dtype == torch.bool or not t.numel():
        return None
    return t.reshape(-1).long()


def _attended(example: Any, mask_column: str | None, n: int) -> torch.Tensor | None:
    """Boolean mask of the positions the model attends to (``mask_column`` != 0), when the example has one of
    ``n`` values; ``None`` otherwise (every position counts)."""
    if not mask_column or not (isinstance(example, dict) or hasattr(example, "keys")) or not hasattr(example, "get"):
        return None
    m = _ids_of(example, mask_column)
    if m is None:
        try:
            m = torch.as_tensor(example.get(mask_column)).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            return None
    return m.ne(0) if m.numel() == n else None


@contextlib.contextmanager
def _rng_kept():
    """Leave the global RNGs (Python, NumPy, torch CPU and initialised CUDA devices) as they were: a dataset that
    draws from them while it is iterated (random crops, masking, a shuffle) must not see different numbers in
    training because it was scanned first."""
    py = random.getstate()
    try:
        import numpy as np

        npstate = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, npstate = None, None
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        if np is not None:
            np.random.set_state(npstate)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def count_token_ids(
    dataset: Any,
    ids: Sequence[int],
    *,
    column: str = "input_ids",
    mask_column: str | None = "attention_mask",
    vocab_size: int | None = None,
    max_tokens: int | None = 2_000_000,
    max_examples: int | None = None,
    max_seconds: float | None = 30.0,
) -> TokenScan:
    """Count how often each of ``ids`` occurs in ``dataset[column]``, streaming, within a budget.

    Args:
        dataset: a ``datasets.Dataset`` / ``IterableDataset``, a torch ``Dataset`` / ``IterableDataset``, or any
            iterable of examples (dicts with ``column``, or id sequences/tensors).
        ids: token ids to count.
        column: the field holding token ids.
        mask_column: the field holding the attention mask: ids at positions where it is 0 (padding) are not
            counted (``None``: count every position).
        vocab_size: also count ids outside ``[0, vocab_size)`` (``out_of_range``).
        max_tokens / max_examples / max_seconds: stop after this many tokens / examples / seconds
            (``None`` = no limit); the result says whether the scan was complete.

    Returns:
        A :class:`TokenScan`.

    The global random number generators are restored afterwards, so the scan does not change what a dataset
    that draws random numbers while iterated yields in training.
    """
    with _rng_kept():
        return _count_token_ids(dataset, ids, column, mask_column, vocab_size, max_tokens, max_examples, max_seconds)


def _count_token_ids(dataset, ids, column, mask_column, vocab_size, max_tokens, max_examples, max_seconds):
    ids = sorted({int(i) for i in ids})
    bound = max([*ids, (vocab_size or 0) - 1, -1]) + 1
    mask = torch.zeros(bound, dtype=torch.bool)
    if ids:
        mask[torch.tensor(ids)] = True
    scan = TokenScan()
    counts = torch.zeros(bound, dtype=torch.long)
    start = time.monotonic()
    for example in _examples(dataset, column, mask_column):
        if max_examples is not None and scan.examples >= max_examples:
            scan.complete, scan.stopped = False, f"max_examples={max_examples}"
            break
        if max_tokens is not None and scan.tokens >= max_tokens:
            scan.complete, scan.stopped = False, f"max_tokens={max_tokens}"
            break
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            scan.complete, scan.stopped = False, f"max_seconds={max_seconds}"
            break
        t = _ids_of(example, column)
        scan.examples += 1
        if t is None:
            scan.no_ids += 1
            continue
        scan.tokens += t.numel()
        inside = (t >= 0) & (t < (vocab_size if vocab_size else bound))
        if vocab_size:
            scan.out_of_range += int((~inside).sum())
        keep = inside & (t < bound)
        attended = _attended(example, mask_column, t.numel())
        if attended is not None:  # padding (attention_mask 0) never reaches the loss
            keep &= attended
        t = t[keep]
        hit = t[mask[t]]
        if hit.numel():  # O(hits): a bincount of `bound` (the vocabulary) per example dominated the scan
            counts.index_add_(0, hit, torch.ones_like(hit))
    tally = counts.tolist()  # one conversion, not two tensor indexings per id
    scan.counts = {i: tally[i] for i in ids if tally[i] > 0}
    return scan


def template_token_ids(tokenizer: Any, ids: Sequence[int]) -> dict[int, int]:
    """Which of ``ids`` the tokenizer's chat template emits: ``{id: occurrences}`` in a rendered sample chat,
    plus ids whose token text appears literally in the template (counted 1 if not rendered). ``{}`` without
    a template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return {}
    wanted = {int(i) for i in ids}
    found: dict[int, int] = {}
    chats = [
        [{"role": "system", "content": "You help."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    for chat in chats:
        try:
            out = tokenizer.apply_chat_template(chat, tokenize=True)
        except Exception:  # templates may reject a role order, or need extra variables
            continue
        rendered = out.get("input_ids", []) if hasattr(out, "get") else out
        for i in torch.as_tensor(rendered).reshape(-1).tolist():
            if i in wanted:
                found[i] = found.get(i, 0) + 1
        break
    text = template if isinstance(template, str) else " ".join(str(v) for v in dict(template).values())
    try:
        tokens = tokenizer.convert_ids_to_tokens(sorted(wanted))
    except Exception:
        tokens = []
    for i, tok in zip(sorted(wanted), tokens):
        if tok and len(tok) > 1 and tok in text:
            found.setdefault(i, 1)
    return dict(sorted(found.items()))


@torch.no_grad()
def set_rows_to_trained_mean(weight: torch.Tensor, rows: Sequence[int], untrained: Sequence[int] = (),
                             gather: Callable[[Any], list[Any]] | None = None) -> int:
    """Set ``weight[rows]`` to the mean of the rows not in ``rows`` or ``untrained`` (computed in fp32, row
    blocks); return how many rows the mean was taken over.

    Sharded weights (FSDP2 ``Shard(0)`` DTensor): each rank sums its own trained rows, the ranks exchange the sums
    (one all-gather of a row-sized vector and the row counts, through ``gather``) and each rank writes the rows it
    holds; every rank must call this at the same point with the same rows.

    DeepSpeed: a ZeRO-3 parameter's rows are written where each rank's flat partition holds them (the trained
    rows' sums combined like FSDP2's, one all-gather of a row-sized vector); the optimizer's fp32 copy (ZeRO-1/2's
    fragment of a whole parameter, ZeRO-3's partition) gets the same rows, else the optimizer's next step would
    write the old rows back.

    Raises:
        TrainerGuardError: a sharded weight split another way than FSDP2's rows (nothing written).
    """
    span = zero3_span(weight)
    if span is not None:
        return _zero3_set_rows(weight, *span, rows, untrained, gather)
    layout = None
    if is_shard(weight):
        layout = row_layout(weight, gather)
        if layout is None:
            raise TrainerGuardError(f"cannot set rows of a {type(weight).__name__} sharded another way than FSDP2's "
                                    f"row split (placements {getattr(weight, 'placements', None)})")
    local = local_part(weight)
    start = layout.starts[layout.position] if layout else 0
    n_local = local.shape[0]
    skip = torch.zeros(weight.shape[0], dtype=torch.bool)
    idx = sorted({int(r) for r in rows})
    skip[idx] = True
    skip[list(untrained)] = True
    skip = skip[start:start + n_local]
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=local.device)
    n = 0
    for a in range(0, n_local, _ROW_BLOCK):
        keep = ~skip[a:a + _ROW_BLOCK]
        if keep.any():
            total += local[a:a + _ROW_BLOCK][keep.to(local.device)].float().sum(dim=0)
            n += int(keep.sum())
    if layout is not None:
        parts = resolve_gather(gather)((total.cpu(), n))
        total = sum((t for t, _ in parts), torch.zeros_like(total.cpu())).to(local.device)
        n = sum(c for _, c in parts)
    mine = [r - start for r in idx if start <= r < start + n_local]
    if n and mine:
        local[torch.tensor(mine, device=local.device)] = (total / n).to(local.dtype)
    mapping = getattr(weight, "_hp_mapping", None)
    if n and idx and mapping is not None:  # DeepSpeed ZeRO-1/2: this rank's fragment of the optimizer's fp32 copy
        _write_rows(mapping.get_hp_fragment().view(-1), mapping.lp_fragment_address.start, weight.shape[1], idx,
                    total.cpu() / n)
    return n


def _write_rows(flat: torch.Tensor, first: int, n_cols: int, rows: Sequence[int], value: torch.Tensor) -> None:
    """Set the elements of ``rows`` (of a row-major table with ``n_cols`` columns) that the flat range ``flat``,
    starting at element ``first``, holds to the matching columns of ``value``."""
    end = first + flat.numel()
    for r in rows:
        a, b = max(r * n_cols, first), min((r + 1) * n_cols, end)
        if a < b:
            flat[a - first:b - first] = value[a - r * n_cols:b - r * n_cols].to(flat.device, flat.dtype)


def _zero3_set_rows(weight: Any, values: torch.Tensor, first: int, rows: Sequence[int], untrained: Sequence[int],
                    gather: Callable[[Any], list[Any]] | None) -> int:
    """:func:`set_rows_to_trained_mean` for a DeepSpeed ZeRO-3 parameter (``values``: this rank's flat elements
    from element ``first``)."""
    n_rows, n_cols = (int(d) for d in weight.ds_shape)
    idx = sorted({int(r) for r in rows})
    skip = torch.zeros(n_rows, dtype=torch.bool)
    skip[idx] = True
    skip[list(untrained)] = True
    total = torch.zeros(n_cols, dtype=torch.float32)
    block = _ROW_BLOCK * n_cols
    for a in range(0, values.numel(), block):
        elems = torch.arange(first + a, first + min(a + block, values.numel()))
        keep = ~skip[elems // n_cols]
        total.index_add_(0, (elems % n_cols)[keep], values[a:a + block].float().cpu()[keep])
    # keyed by the partition's first element: ranks holding the same partition (ZeRO-3 partition groups smaller
    # than the world, MiCS/hpZ replicas) count it once
    total = sum(dict(resolve_gather(gather)((first, total))).values(), torch.zeros(n_cols))
    n = int((~skip).sum())
    if n and idx:
        mean = total / n
        _write_rows(values, first, n_cols, idx, mean)
        optimizer = getattr(weight, "_z3_optimizer", None)
        if optimizer is not None and weight.requires_grad:  # the fp32 partition the optimizer steps
            hp = optimizer.get_local_fp32_param(weight)
            if hp is not None:
                hp = hp.detach().clone().view(-1)
                _write_rows(hp[:values.numel()], first, n_cols, idx, mean)
                optimizer.set_local_hp_param(hp, weight)
    return n
