"""Parameters whose dtype differs from the rest of the model (field report R2), and casting them.

Pure functions, no Trainer. A bf16 model whose output head was replaced by a float32 ``nn.Linear`` fails at the
first matmul ("mat1 and mat2 must have the same dtype"). :func:`find_dtype_mismatches` finds such parameters by
comparing each one with the model's *dominant* floating dtype (the one holding the most elements), and sorts out
the ones that are different on purpose:

- quantised weights (found by dtype and module/tensor type: integer or float8 storage, bitsandbytes/HQQ/GPTQ/AWQ/
  torchao/quanto modules, tensor subclasses) are never reported and never touched;
- PEFT adapter weights (LoRA ``lora_A``/``lora_B`` ... inside a PEFT tuner layer, found by module type) that PEFT
  keeps in float32 on purpose;
- modules a Hugging Face model keeps in fp32 itself (``_keep_in_fp32_modules``);
- modules the caller lists in ``keep_fp32`` (name patterns, e.g. ``"*norm*"``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from trainer_guard.core.dtype import find_dtype_mismatches, cast_mismatches
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch.bfloat16)
    >>> model[1] = nn.Linear(8, 2)  # new head created in float32
    >>> report = find_dtype_mismatches(model)
    >>> report.dominant, [i.name for i in report.mismatched]
    (torch.bfloat16, ['1.weight', '1.bias'])
    >>> cast_mismatches(model, report)
    ['cast 1.weight (Linear, torch.float32, 16 elements) to torch.bfloat16', 'cast 1.bias (Linear, torch.float32, 2 elements) to torch.bfloat16']
    >>> model[1].weight.dtype
    torch.bfloat16
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..names import dotted_prefixes, param_matches
from .sharding import full_numel

__all__ = ["DtypeIssue", "DtypeReport", "is_quantized", "find_dtype_mismatches", "cast_mismatches", "autocast_safe"]

# Top-level packages whose modules hold quantised weights (matched on the module's *type*, not its name).
_QUANT_PACKAGES = frozenset({
    "bitsandbytes", "hqq", "auto_gptq", "gptqmodel", "awq", "torchao", "quanto", "optimum", "fbgemm_gpu",
    "compressed_tensors", "eetq", "aqlm", "vptq", "fp_quant", "spqr",
})
_QUANT_TENSOR_TYPES = frozenset({"Params4bit", "Int8Params", "QBitsTensor", "QTensor", "AffineQuantizedTensor"})
_FLOAT8 = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                                 "float8_e8m0fnu") if hasattr(torch, n))


@dataclass(frozen=True)
class DtypeIssue:
    """One parameter and why it was reported or kept."""

    name: str
    module: str
    module_type: str
    dtype: torch.dtype
    numel: int
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.module_type}, {self.dtype}, {self.numel:,} elements)"


@dataclass
class DtypeReport:
    """Result of :func:`find_dtype_mismatches`.

    Attributes:
        dominant: the floating dtype holding most elements (``None`` for a model without float parameters).
        mismatched: parameters to cast (or report).
        kept: parameters with another dtype on purpose, each with its ``reason``.
        quantized: number of quantised parameters skipped.
    """

    dominant: torch.dtype | None
    mismatched: list[DtypeIssue] = field(default_factory=list)
    kept: list[DtypeIssue] = field(default_factory=list)
    quantized: int = 0


def is_quantized(module: nn.Module, param: torch.Tensor) -> bool:
    """Whether ``param`` (owned by ``module``) is a quantised weight, judged by dtype and type, never by name."""
    if not param.dtype.is_floating_point or param.dtype in _FLOAT8:
        return True
    if type(param).__name__ in _QUANT_TENSOR_TYPES or hasattr(param, "quant_state"):
        return True
    data = param.data if isinstance(param, nn.Parameter) else param
    if type(data) is not torch.Tensor and not isinstance(data, nn.Parameter):  # tensor subclass (torchao, ...)
        return True
    return type(module).__module__.split(".")[0] in _QUANT_PACKAGES


def _matches(module_name: str, patterns: Sequence[str]) -> str | None:
    parts = module_name.split(".")
    for pat in patterns:
        if fnmatch.fnmatchcase(module_name, pat) or pat in parts or fnmatch.fnmatchcase(parts[-1], pat):
            return pat
    return None


def _model_fp32_patterns(model: nn.Module) -> list[str]:
    pats: set[str] = set()
    for m in model.modules():
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            pats.update(getattr(m, attr, None) or ())
    return sorted(pats)


def _peft_adapter_modules(model: nn.Module) -> set[str]:
    """Names of modules holding PEFT adapter weights (found through PEFT's tuner-layer type)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return set()
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            for attr in getattr(m, "adapter_layer_names", ()):
                out.add(f"{name}.{attr}" if name else attr)
    return out


def find_dtype_mismatches(
    model: nn.Module,
    keep_fp32: Sequence[str] = (),
    respect_model_fp32: bool = True,
    allow_peft_adapters: bool = True,
) -> DtypeReport:
    """Find parameters whose floating dtype differs from the model's dominant floating dtype.

    Args:
        model: any ``nn.Module`` (Hugging Face, PEFT-wrapped or plain).
        keep_fp32: module-name patterns (``fnmatch`` on the full name, or a name segment such as ``"norm"``) whose
            parameters are left as they are.
        respect_model_fp32: also keep modules the model's class keeps in fp32 (``_keep_in_fp32_modules``).
        allow_peft_adapters: keep PEFT adapter weights (LoRA A/B, ...), which PEFT stores in fp32 on purpose.

    Returns:
        A :class:`DtypeReport`; tied parameters appear once.
    """
    modules = dict(model.named_modules())
    fp32_pats = list(keep_fp32)
    model_pats = _model_fp32_patterns(model) if respect_model_fp32 else []
    adapters = _peft_adapter_modules(model) if allow_peft_adapters else set()

    entries = []
    totals: dict[torch.dtype, int] = {}
    quantized = 0
    for name, p in model.named_parameters():
        mod_name = name.rpartition(".")[0]
        module = modules.get(mod_name, model)
        if is_quantized(module, p):
            quantized += 1
            continue
        totals[p.dtype] = totals.get(p.dtype, 0) + full_numel(p)  # a ZeRO-3 parameter's numel() is 0
        entries.append((name, mod_name, module, p))
    report = DtypeReport(dominant=max(totals, key=totals.__getitem__) if totals else None, quantized=quantized)
    for name, mod_name, module, p in entries:
        if p.dtype == report.dominant:
            continue
        reason = ""
        if adapters and not adapters.isdisjoint(dotted_prefixes(mod_name)):  # mod_name is, or is inside, one
            reason = "PEFT adapter weight"
        elif (pat := _matches(mod_name, fp32_pats)) is not None:
            reason = f"keep_fp32 pattern {pat!r}"
        elif (pat := _matches(mod_name, model_pats) or param_matches(name, model_pats)) is not None:
            reason = f"model keeps {pat!r} in fp32 (_keep_in_fp32_modules)"
        issue = DtypeIssue(name, mod_name, type(module).__name__, p.dtype, full_numel(p), reason)
        (report.kept if reason else report.mismatched).append(issue)
    return report


def cast_mismatches(model: nn.Module, report: DtypeReport, optimizer: Any = None) -> list[str]:
    """Cast every ``report.mismatched`` parameter of ``model`` to ``report.dominant``, in place.

    The ``nn.Parameter`` objects stay the same (``param.data`` is replaced), so an optimizer built over them keeps
    working; their gradients and any optimizer state already created for them are cast too.

    Returns:
        One message per parameter cast.
    """
    if report.dominant is None or not report.mismatched:
        return []
    params = dict(model.named_parameters())
    todo = [(issue, params[issue.name]) for issue in report.mismatched]  # KeyError here = a stale report
    out = []
    with torch.no_grad():
        for issue, p in todo:
            p.data = p.data.to(report.dominant)
            if p.grad is not None:
                p.grad = p.grad.to(report.dominant)
            state = getattr(optimizer, "state", {}).get(p, {}) if optimizer is not None else {}
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape:
                    state[k] = v.to(report.dominant)
            out.append(f"cast {issue} to {report.dominant}")
    return out


def autocast_safe(report: DtypeReport) -> list[DtypeIssue]:
    """The mismatches a mixed-precision autocast (the Trainer's ``bf16=True`` / ``fp16=True``) already handles:
    floating parameters *wider* than the dominant dtype, e.g. a float32 head on a bfloat16 model (R2). Under
    autocast the matmul runs in the low dtype on both operands, so they train as they are and keep their precision.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch.bfloat16)
        >>> model[1] = nn.Linear(8, 2)
        >>> [i.name for i in autocast_safe(find_dtype_mismatches(model))]
        ['1.weight', '1.bias']
    """
    if report.dominant is None or not report.dominant.is_floating_point:
        return []
    width = torch.finfo(report.dominant).bits
    return [i for i in report.mismatched if i.dtype.is_floating_point and torch.finfo(i.dtype).bits > width]

