"""Adapter-size / memory preflight: what training the embeddings or the output head inside an adapter costs.

Field reports R3/R4: putting ``embed_tokens``/``lm_head`` in ``modules_to_save`` (or LoRA ``target_modules``) adds
two full ``vocab x hidden`` matrices to the trainable set, the adapter file and the optimizer state: for an 8B
Llama (vocab 128,256, hidden 4,096) that is 1,050,673,152 more trainable parameters, about 2 GiB more adapter in
bf16 and about 4 GiB more per fp32 copy (gradients, each Adam moment). Pure functions, no Trainer; works on a
model built on the ``meta`` device, so the numbers of a large model can be had without its memory.

Example:
    >>> from trainer_guard.tiny import tiny_model, tiny_lora
    >>> from trainer_guard.core.preflight import adapter_preflight
    >>> model = tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"])
    >>> report = adapter_preflight(model, optim="adamw_torch")
    >>> report.extra_trainable, report.extra_adapter_bytes, report.extra_optimizer_bytes
    (8192, 32768, 65536)
    >>> adapter_preflight(tiny_lora(tiny_model("llama-untied"))) is None
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from ..errors import UsageError
from ..text import human_bytes
from .lr_groups import embedding_modules
from .sharding import full_numel

__all__ = ["EmbeddingCost", "PreflightReport", "adapter_preflight", "optimizer_state_bytes"]


@dataclass
class EmbeddingCost:
    """One embedding/head module trained inside an adapter."""

    role: str  # "embeddings" or "lm_head"
    module: str  # qualified name in the model
    how: str  # "modules_to_save", "target_modules (LoRA)", "trainable tokens" or "requires_grad"
    shape: tuple[int, ...]  # the base weight's shape
    trainable: int  # trainable parameters inside the module (a tied one counted once overall)
    adapter_bytes: int  # bytes the module adds to the saved adapter


@dataclass
class PreflightReport:
    """Costs of the trained embedding/head modules; :meth:`message` says them in words with the advice."""

    optim: str
    total_trainable: int
    items: list[EmbeddingCost] = field(default_factory=list)
    extra_trainable: int = 0
    adapter_bytes: int = 0
    extra_adapter_bytes: int = 0
    extra_grad_bytes: int = 0
    extra_optimizer_bytes: int = 0

    def message(self) -> str:
        """A multi-line warning: the numbers, then what to do."""
        mods = "; ".join(f"{c.module} [{' x '.join(map(str, c.shape))}] via {c.how}: {c.trainable:,} trainable, "
                         f"{human_bytes(c.adapter_bytes, binary=True)} in the adapter" for c in self.items)
        share = 100.0 * self.extra_trainable / max(self.total_trainable, 1)
        lines = [
            f"the embeddings / output head are trained inside the adapter: +{self.extra_trainable:,} trainable "
            f"parameters ({share:.1f}% of {self.total_trainable:,}), "
            f"+{human_bytes(self.extra_adapter_bytes, binary=True)} of the {human_bytes(self.adapter_bytes, binary=True)} "
            f"adapter file, +{human_bytes(self.extra_grad_bytes, binary=True)} gradients "
            f"and +{human_bytes(self.extra_optimizer_bytes, binary=True)} optimizer state ({self.optim}).",
            f"  modules: {mods}.",
            "  What to do: leave embed_tokens/lm_head out of modules_to_save/target_modules if they need not change "
            "(default targets q,k,v,o,gate,up,down); to teach a few new tokens use PEFT trainable_token_indices "
            "instead of the whole matrix; if they must train, give them ~1/10 of the LR (EmbeddingLRGuard), and "
            "after reloading the adapter check the trainable count (load with is_trainable=True).",
        ]
        return "\n".join(lines)


def optimizer_state_bytes(param: nn.Parameter, optim: str, module: nn.Module | None = None) -> int:
    """Bytes of optimizer state the Trainer's ``optim`` keeps for ``param`` (state is lazily created at step 1).

    Adam-like: two moments in the parameter's dtype; Adafactor (the Trainer's, ``beta1=None``): one row and one
    column vector for a matrix; plain SGD: none; bitsandbytes 8-bit: two 1-byte moments, except ``nn.Embedding``
    weights, which the Trainer keeps at 32 bits.
    """
    n, size = full_numel(param), param.element_size()
    name = optim.lower()
    if "sgd" in name:
        return 0
    if "adafactor" in name:
        return (param.shape[0] + param.shape[-1]) * size if param.dim() >= 2 else n * size
    if "8bit" in name:
        return 8 * n if isinstance(module, nn.Embedding) else 2 * n
    return 2 * n * size


def _how(module: nn.Module) -> str:
    kinds = {type(m).__name__ for m in module.modules()}
    if "ModulesToSaveWrapper" in kinds:
        return "modules_to_save"
    if "TrainableTokensWrapper" in kinds or "TrainableTokensLayer" in kinds:
        return "trainable tokens"
    if any(hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A") for m in module.modules()):
        return "target_modules (LoRA)"
    return "requires_grad"


def adapter_preflight(model: nn.Module, optim: str = "adamw_torch") -> PreflightReport | None:
    """What training the embedding / output-head modules inside a PEFT adapter costs.

    Args:
        model: a ``PeftModel`` (other models return ``None``: a full fine-tune has no adapter to balloon).
        optim: the Trainer's ``args.optim`` value, for the optimizer-state estimate.

    Returns:
        ``None`` when no trainable parameter sits in the input embedding or output head (PEFT trainable tokens,
        the cheap alternative, are not reported), else the report.
        Adapter bytes follow PEFT's ``get_peft_model_state_dict`` (with ``save_embedding_layers`` resolved as
        ``"auto"`` does, without asking the Hub): LoRA on an embedding also saves that base embedding.
    """
    if not isinstance(optim, str):
        raise UsageError(f"adapter_preflight(): `optim` must be the Trainer's args.optim string (e.g. 'adamw_torch'), "
                         f"got {optim!r}")
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        return None
    modules = embedding_modules(model)
    names = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)
    seen: set[int] = set()
    items, grad_b, opt_b = [], 0, 0
    for role, module in modules.items():
        trainable = [p for p in module.parameters() if p.requires_grad]
        how = _how(module)
        if not trainable or how == "trainable tokens":  # the cheap way the advice recommends
            continue
        count = 0
        for p in trainable:
            if id(p) in seen:
                continue
            seen.add(id(p))
            count += full_numel(p)  # a ZeRO-3 parameter's numel() is 0 outside forward
            grad_b += full_numel(p) * p.element_size()
            owner = next((m for m in module.modules() if any(q is p for q in m.parameters(recurse=False))), None)
            opt_b += optimizer_state_bytes(p, optim, owner)
        base_w = getattr(getattr(module, "base_layer", module), "weight", None)
        if base_w is None:
            base_w = next((p for p in module.parameters()), None)
        items.append(EmbeddingCost(role, names.get(id(module), role), how,
                                   tuple(base_w.shape) if base_w is not None else (), count, 0))
    if not items:
        return None
    from peft.utils import get_peft_model_state_dict

    adapter = getattr(model, "active_adapter", "default")  # the adapter the Trainer trains, whatever its name
    cfg = model.peft_config.get(adapter) if isinstance(getattr(model, "peft_config", None), dict) else None
    lora_on_emb = any(c.how == "target_modules (LoRA)" for c in items)
    tokens = getattr(cfg, "trainable_token_indices", None) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # keep_vars: the parameters themselves, so a ZeRO-3 partition still tells its full size
        sd = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True), adapter_name=adapter,
                                       save_embedding_layers=lora_on_emb and not tokens)
    sizes = {k: full_numel(v) * v.element_size() for k, v in sd.items()}
    for c in items:
        c.adapter_bytes = sum(b for k, b in sizes.items() if k.startswith(c.module + "."))
    total = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return PreflightReport(
        optim=optim, total_trainable=total, items=items, extra_trainable=sum(c.trainable for c in items),
        adapter_bytes=sum(sizes.values()), extra_adapter_bytes=sum(c.adapter_bytes for c in items),
        extra_grad_bytes=grad_b, extra_optimizer_bytes=opt_b,
    )
