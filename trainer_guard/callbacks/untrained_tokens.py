"""UntrainedTokensGuard: report (or fix) never-trained embedding rows that the training data uses.

Answers field report R4: base models whose special-token rows were never trained give "Untrained tokens found" /
NaN losses when fine-tuning text (or a chat template) contains those tokens, the more so when embed_tokens and
lm_head are left out of a LoRA's trainable modules.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .._dist import agree, gather, world_size
from ..core.sharding import full_shape
from ..core.tokens import count_token_ids, set_rows_to_trained_mean, template_token_ids, untrained_rows
from ..errors import UntrainedTokensError
from .base import Guard

__all__ = ["UntrainedTokensGuard"]


def _token_rows(layer: Any) -> tuple[list[int], Any] | None:
    """``(ids, rows)``: the values PEFT trainable tokens use for their rows (the base rows stay as they were)."""
    ids, rows = [], []
    deltas = getattr(layer, "trainable_tokens_delta", None) or {}
    for a in layer.active_adapters:
        idx, delta = layer.token_indices.get(a, []), deltas[a] if a in deltas else None
        if idx and delta is not None and delta.shape[0] == len(idx):
            ids.extend(idx)
            rows.append(delta)
    return (ids, torch.cat([r.detach() for r in rows])) if ids else None


def _adapter_trains(module: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA on the embedding or head) with a trainable adapter: every row can change."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, BaseTunerLayer) and any(
        p.requires_grad for name in getattr(module, "adapter_layer_names", ()) if isinstance(
            getattr(module, name, None), nn.Module) for p in getattr(module, name).parameters())


def _tables(model: nn.Module) -> list[tuple[str, nn.Module, Any, set[int] | None, bool, Any]]:
    """``(label, module, weight to write, trainable ids or None, all rows trainable, (ids, rows) the model uses
    instead of the weight's or None)`` for the input embedding and an untied output head, seen through PEFT
    wrappers."""
    out, seen = [], set()
    for label, getter in (("input embedding", "get_input_embeddings"), ("output head", "get_output_embeddings")):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is None:
            continue
        kind = type(module).__name__
        if kind == "ModulesToSaveWrapper":  # PEFT modules_to_save: a trainable full copy is what runs
            weight = module.modules_to_save[module.active_adapters[0]].weight
            out_t = (label, module, weight, None, weight.requires_grad, None)
        elif kind == "TrainableTokensWrapper":  # PEFT trainable_token_indices: only those rows train
            layer = module.token_adapter
            ids = {i for a in layer.active_adapters for i in layer.token_indices.get(a, [])}
            # the trained values of those rows live in the adapter (loaded by a resume), not in the base rows
            out_t = (label, module, layer.base_layer.weight, ids, False, _token_rows(layer))
        else:
            weight = getattr(module, "weight", None)
            if weight is None:
                continue
            out_t = (label, module, weight, None, weight.requires_grad or _adapter_trains(module), None)
        if id(out_t[2]) in seen:  # tied head: one table
            continue
        seen.add(id(out_t[2]))
        out.append(out_t)
    return out


class UntrainedTokensGuard(Guard):
    """At train begin, find never-trained rows (~0) of the input embedding and output head, scan the training
    data (streaming, bounded) and the tokenizer's chat template for their ids, and report which occur, how often.

    Also names a tokenizer with more tokens than the input embedding has rows (tokens added without
    ``model.resize_token_embeddings(len(tokenizer))``); then the data is scanned for token ids past the embedding,
    a certain "index out of range" at the first batch holding one, which stops the run before step 1 in ``"raise"``
    and ``"fix"`` modes (the fix, a resize, must come before the Trainer is built). A dataset of raw text (TRL's
    prompt datasets, tokenized as the trainer goes) is recognised and not scanned.

    Args:
        mode: ``"report"`` (default) logs, changes nothing; ``"fix"`` sets the rows used by the data or template
            to the mean of the trained rows (logged); ``"raise"`` raises
            :class:`~trainer_guard.errors.UntrainedTokensError` when any is used.
        fix_unused: in ``"fix"`` mode, also fix untrained rows the scan did not see.
        rtol: a row is untrained when its max ``|w|`` <= ``rtol`` x the median row's.
        column: the dataset field holding token ids.
        max_tokens: scan budget in tokens (``0`` = no limit).
        max_seconds: scan budget in seconds (``0`` = no limit); an ``IterableDataset`` is iterated afresh.
        check_template: also render the tokenizer's chat template (``processing_class``).

    Raises:
        UntrainedTokensError: in ``"raise"`` mode, naming the ids, their counts and what to enable; also for a
            tokenizer larger than the embedding, or data ids past it (other modes warn).

    Example:
        >>> from trainer_guard import UntrainedTokensGuard
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
        ...                   callbacks=[UntrainedTokensGuard(mode="fix")])  # doctest: +SKIP
    """

    name = "untrained_tokens"

    def __init__(
        self,
        mode: Literal["report", "fix", "raise"] = "report",
        fix_unused: bool = False,
        rtol: float = 1e-3,
        column: str = "input_ids",
        max_tokens: int = 2_000_000,
        max_seconds: float = 30.0,
        check_template: bool = True,
    ) -> None:
        super().__init__(mode=mode, fix_unused=fix_unused, rtol=rtol, column=column, max_tokens=max_tokens,
                         max_seconds=max_seconds, check_template=check_template)
        self.found: dict[str, Any] = {}

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> list[str]:
        out = [f"{k}: got {options[k]!r}; must be >= 0 (0 = no limit)" for k in ("max_tokens", "max_seconds")
               if options[k] < 0]
        if not 0 < options["rtol"] < 1:
            out.append(f"rtol: got {options['rtol']!r}; must be between 0 and 1, e.g. 1e-3")
        return out

    def check(self, model: nn.Module, dataset: Any = None, tokenizer: Any = None) -> list[str]:
        """Find, scan, report and act per ``mode``; return the report lines."""
        o = self.options
        tables = _tables(model)
        # the padding row is zero by design (nn.Embedding(padding_idx=...)) and masked out of the loss
        rows = {label: [i for i in untrained_rows(w, o["rtol"], overrides=used_rows)
                        if i != getattr(module, "padding_idx", None)]
                for label, module, w, _, _, used_rows in tables}
        ids = sorted({i for r in rows.values() for i in r})
        self.found = {"untrained": rows, "data": {}, "template": {}}
        n_rows = next((full_shape(w)[0] for label, _, w, _, _, _ in tables if label == "input embedding"), None)
        overflow = _tokenizer_overflow(tokenizer, n_rows)
        if o["mode"] == "raise":  # every rank (the same tokenizer and model): none is left in a gather
            agree([overflow] if overflow else [], UntrainedTokensError)
        elif overflow:
            self.note(overflow, "warning")
        # tokens added without a resize: ids past the embedding in the data are a certain crash at their first batch
        past = 0
        if overflow and dataset is not None:
            past = count_token_ids(dataset, [], column=o["column"], vocab_size=n_rows,
                                   max_tokens=o["max_tokens"] or None, max_seconds=o["max_seconds"] or None).out_of_range
        certain = _certain_crash(past, n_rows, tokenizer) if past else None
        if o["mode"] in ("raise", "fix"):  # every rank; fix cannot resize now: the optimizer holds the embedding
            agree([certain] if certain else [], UntrainedTokensError)
        elif certain:
            self.note(certain, "warning")
        if not ids:
            if world_size() > 1:  # another rank may have found rows: take part in its gather and verdict below
                gather([])
                if o["mode"] == "raise":
                    agree([], UntrainedTokensError)
            return [overflow] if overflow else []
        lines = [f"{label}: {len(r)} row(s) look never trained (~0): ids {_short(r)}" for label, r in rows.items()
                 if r]
        data: dict[int, int] = {}
        unscanned, out_of_range = False, 0
        if dataset is not None:
            scan = count_token_ids(dataset, ids, column=o["column"], max_tokens=o["max_tokens"] or None,
                                   max_seconds=o["max_seconds"] or None, vocab_size=n_rows)
            data = scan.counts
            extent = "all" if scan.complete else f"the first (stopped by {scan.stopped})"
            text = _text_fields(dataset) if scan.examples and scan.no_ids == scan.examples else None
            if text:  # prompt datasets (TRL GRPO/DPO) hold text by design: tokenized as the trainer goes
                lines.append(f"training data not scanned: it holds text ({', '.join(map(repr, text))}) that the "
                             f"trainer tokenizes as it trains")
            elif scan.examples and scan.no_ids == scan.examples:
                unscanned = True
                lines.append(f"training data not scanned: its examples have no token ids in {o['column']!r} "
                             f"(tokenized by the collator, or another field?); set {self.advise(column=...)} "
                             f"or tokenize the dataset before training")
            else:
                lines.append(f"training data ({extent} {scan.examples} examples, {scan.tokens} tokens) uses: "
                             + (_counts(data, tokenizer) or "none of them"))
                out_of_range = scan.out_of_range
                if out_of_range:
                    lines.append(f"training data holds {scan.out_of_range} token id(s) outside the input embedding's "
                                 f"{n_rows} rows: the first batch holding one fails with 'index out of range' (on CUDA "
                                 f"'device-side assert triggered'); tokenize with this model's tokenizer, or call "
                                 f"model.resize_token_embeddings(len(tokenizer)) before training")
        template = template_token_ids(tokenizer, ids) if (o["check_template"] and tokenizer is not None) else {}
        if template:
            lines.append("the chat template uses: " + _counts(template, tokenizer))
        per_rank = gather(sorted(set(data) | set(template)))  # every rank acts on the same ids
        used = sorted({i for r in per_rank for i in r})
        self.found.update(data=data, template=template, used=used)
        lines.extend(_cannot_train(tables, rows, used))
        if o["mode"] == "raise":
            msg = ("Training would use never-trained embedding rows (NaN/garbage losses):\n  - " + "\n  - ".join(lines)
                   + f"\nUse {self.advise(mode='fix')} to set them to the mean of the trained rows, or remove "
                     "those tokens from the data/template.")
            agree([msg] if used or out_of_range else [], UntrainedTokensError)
        if o["mode"] == "fix":
            for label, module, w, _, _, used_rows in tables:
                todo = sorted(set(rows[label]) if o["fix_unused"] else set(rows[label]) & set(used))
                if todo:  # base rows the model does not use (trainable tokens' stale copies) stay out of the mean
                    n = set_rows_to_trained_mean(w, todo, [*rows[label], *(used_rows[0] if used_rows else ())])
                    _sync_trainable_tokens(module, todo)
                    lines.append(f"fixed: {label} rows {_short(todo)} set to the mean of {n} trained rows")
        for line in lines:
            self.note(line, "warning" if used or unscanned or out_of_range else "info")
        return ([overflow] if overflow else []) + lines  # (overflow was logged above)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs: Any):
        if model is None:
            return
        dataset = getattr(train_dataloader, "dataset", None) if train_dataloader is not None else None
        self.check(model, dataset, processing_class)


def _tokenizer_overflow(tokenizer: Any, n_rows: int | None) -> str | None:
    """Why a tokenizer with more tokens than the input embedding has rows fails (tokens added without
    ``resize_token_embeddings``), or ``None``."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    try:
        n_tok = len(tok)
    except TypeError:  # no tokenizer, or one without a length
        return None
    if n_rows is None or not isinstance(n_tok, int) or n_tok <= n_rows:
        return None
    extra = list(range(n_rows, n_tok))
    try:
        names = [str(t) for t in tok.convert_ids_to_tokens(extra[:5])]
    except Exception:
        names = []
    shown = f" ({', '.join(map(repr, names))}{', ...' if len(extra) > 5 else ''})" if names else ""
    return (f"the tokenizer has {n_tok} tokens but the input embedding has {n_rows} rows: ids {n_rows}-{n_tok - 1}"
            f"{shown} index past it, and the first batch holding one fails with 'index out of range' (on CUDA "
            f"'device-side assert triggered'); call model.resize_token_embeddings(len(tokenizer)) before building the "
            f"Trainer, and let the new rows train (with PEFT: trainable_token_indices or modules_to_save)")


def _certain_crash(past: int, n_rows: int | None, tokenizer: Any) -> str:
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    return (f"the training data holds {past} token id(s) past the input embedding's {n_rows} rows (the tokenizer has "
            f"{len(tok)} tokens: tokens were added without resizing the model), so the first batch holding one fails "
            f"with 'index out of range' (on CUDA 'device-side assert triggered'); stopped before step 1. Call "
            f"model.resize_token_embeddings(len(tokenizer)) before building the Trainer (mode='fix' cannot do it "
            f"now: the optimizer already holds the embedding)")


def _text_fields(dataset: Any) -> list[str] | None:
    """The fields of a map-style dataset's first example that hold text (strings, or chat messages) when it is a
    prompt dataset (a ``prompt`` field of text: TRL's GRPO/RLOO/online DPO/KTO formats, tokenized as the trainer
    goes), or ``None``."""
    try:
        example = dataset[0] if hasattr(dataset, "__getitem__") and len(dataset) else None
    except Exception:
        return None
    if not isinstance(example, dict):
        return None

    def is_text(v: Any) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(
            isinstance(m, dict) and "content" in m for m in v))

    fields = [k for k, v in example.items() if is_text(v)]
    return fields if "prompt" in fields else None


def _short(ids: list[int], n: int = 12) -> str:
    return str(ids) if len(ids) <= n else f"[{', '.join(map(str, ids[:n]))}, ... {len(ids) - n} more]"


def _counts(counts: dict[int, int], tokenizer: Any) -> str:
    def tok(i: int) -> str:
        try:
            return f" {tokenizer.convert_ids_to_tokens(i)!r}" if tokenizer is not None else ""
        except Exception:
            return ""

    return ", ".join(f"id {i}{tok(i)} x{c}" for i, c in sorted(counts.items()))


def _cannot_train(tables, rows, used) -> list[str]:
    out = []
    for label, module, w, trainable_ids, all_trainable, _ in tables:
        stuck = [i for i in rows[label] if i in used and not all_trainable
                 and not (trainable_ids is not None and i in trainable_ids)]
        if not stuck:
            continue
        target = "embed_tokens" if label == "input embedding" else "lm_head"
        out.append(
            f"{label} rows {_short(stuck)} cannot train (the weight is frozen): with PEFT add {target!r} to "
            f"LoraConfig(modules_to_save=[...]) or use LoraConfig(trainable_token_indices={{{target!r}: {stuck}}}); "
            f"without PEFT set requires_grad=True on the {label}'s weight (a fix of frozen rows lives only in the "
            f"base weights, which an adapter checkpoint does not store)"
        )
    return out


def _sync_trainable_tokens(module: nn.Module, ids: list[int]) -> None:
    """PEFT trainable_token_indices: the trainable delta of a fixed row starts from the fixed value."""
    if type(module).__name__ != "TrainableTokensWrapper":
        return
    layer = module.token_adapter
    for a in layer.active_adapters:
        idx = layer.token_indices.get(a, [])
        for j, i in enumerate(idx):
            if i in ids:
                layer.trainable_tokens_delta[a].data[j] = layer.base_layer.weight.data[i]
