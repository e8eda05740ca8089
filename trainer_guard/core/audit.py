"""Which tensors changed between two checksum maps, and why a tensor that should have trained did not.

No Trainer here. :class:`UpdateAudit` is a whole run's audit (baseline, then one call per optimizer step) built on
pure functions: :func:`classify` compares two ``{name: checksum}`` maps (from
:func:`trainer_guard.checksum.checksums`, a manifest or :func:`~trainer_guard.checksum.file_checksums`);
:func:`audit` turns that plus a few :class:`ParamFacts` per tensor (trainable at the baseline? which optimizer
group, its LR, how many effective optimizer steps since the baseline, what its ``.grad`` looked like) into
:class:`Finding` s with a likely cause; :func:`summarize` groups findings by module, and :func:`module_summary`
groups a plain diff by module (``trainer-guard diff``).

Example:
    >>> from trainer_guard.core.audit import ParamFacts, audit, classify, summarize
    >>> status = classify({"emb.weight": 1, "fc.weight": 2}, {"emb.weight": 1, "fc.weight": 3})
    >>> status
    {'emb.weight': 'same', 'fc.weight': 'changed'}
    >>> facts = {"emb.weight": ParamFacts(trainable=True, group=None, effective_steps=1, grad="nonzero"),
    ...          "fc.weight": ParamFacts(trainable=True, group=0, lr=1e-3, effective_steps=1, grad="nonzero")}
    >>> findings, pending = audit(status, facts)
    >>> [(f.name, f.cause) for f in findings], pending
    ([('emb.weight', 'not_in_optimizer')], [])
    >>> summarize(findings)[0].split(";")[0]
    'trainable but unchanged: 1 tensor in emb - not in any optimizer group'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from ..names import module_of

if TYPE_CHECKING:  # torch loads with the first UpdateAudit: `trainer-guard diff` uses the pure part without it
    import torch

__all__ = [
    "SAME",
    "CHANGED",
    "ONLY_A",
    "ONLY_B",
    "CAUSES",
    "ParamFacts",
    "Finding",
    "classify",
    "audit",
    "summarize",
    "module_of",
    "expert_of",
    "module_summary",
    "GroupInfo",
    "group_index",
    "group_lr",
    "grad_state",
    "combine_grad_states",
    "auditable",
    "UpdateAudit",
]

SAME, CHANGED, ONLY_A, ONLY_B = "same", "changed", "only_a", "only_b"

GradState = Literal["none", "zero", "empty", "nonzero", "unknown"]

# cause code -> explanation (``{group}``, ``{lr}``, ``{wd}``, ``{dtype}``, ``{advice}`` are filled in per finding).
CAUSES: dict[str, str] = {
    "not_in_optimizer": "not in any optimizer group; build the optimizer after setting requires_grad, add the "
                        "tensors to a param group, or freeze them (requires_grad=False)",
    "lr_zero": "its optimizer group {group} has LR 0 (initial_lr 0); give the group a non-zero learning rate or "
               "freeze these tensors",
    "lr_zero_all": "every optimizer group has LR 0 (initial_lr 0), so nothing can train: set "
                   "TrainingArguments.learning_rate (or the LR of the optimizer you pass the Trainer) to a non-zero "
                   "value; if this run is not meant to train, switch UpdateAuditGuard off",
    "grad_none": "no gradient reached it (.grad is None): its output is detached, computed under no_grad or unused "
                 "by the loss; check forward hooks and .detach() calls, or freeze it; a module only some batches "
                 "use (a task head, a conditional branch): raise min_grad_steps or leave it out with "
                 "UpdateAuditGuard(ignore=[...])",
    "grad_zero": "no gradient reached it (.grad is all zero): its output is multiplied by zero or masked out of "
                 "the loss; check the forward pass, or freeze it",
    "grad_empty": "no gradient reached it (its gradient partition in DeepSpeed ZeRO-3's optimizer is all zero): its "
                  "output is detached, unused by the loss, multiplied by zero or masked out of it; check forward "
                  "hooks, .detach() calls and the loss, or freeze it",
    "unrouted": "a mixture-of-experts expert that no token was routed to in {steps} optimizer steps (no gradient) "
                "while other experts of its layer trained: a dead expert if it lasts; balance the router (e.g. "
                "output_router_logits=True with router_aux_loss_coef > 0), or stop auditing experts with "
                "UpdateAuditGuard(ignore=['*.experts.*'])",
    "stalled": "it had a non-zero gradient and {lr}, yet no value changed: updates too small for {dtype}, or the "
               "optimizer skips it; {advice}",
    "no_update": "its group ran {steps} effective optimizer steps at {lr}, yet no value changed; the optimizer keeps "
                 "no per-tensor gradient after its step (DeepSpeed ZeRO-1/2), so the guard cannot tell which of two "
                 "causes it is: no gradient reached it (its output detached or unused by the loss: fix the forward "
                 "pass or freeze it), or updates too small for {dtype} ({advice})",
    "unfrozen": "frozen at the baseline but requires_grad=True now: something un-froze it (a wrapper, a later "
                "requires_grad_ call); freeze it again after wrapping",
    "frozen_in_optimizer": "frozen, yet in optimizer group {group} (weight_decay {wd:g}) which updated it; build the "
                           "optimizer from trainable parameters only",
    "modified_in_place": "frozen and {where}: modified outside the optimizer (an in-place op in "
                         "forward, a hook or a callback); use out-of-place ops or clone the weight first; a copy "
                         "a callback updates on purpose (an EMA of the weights kept in the model): leave it out with "
                         "UpdateAuditGuard(ignore=[...])",
}

_KIND_TEXT = {"unchanged": "trainable but unchanged", "changed": "frozen but changed"}


@dataclass(frozen=True)
class ParamFacts:
    """What is known about one tensor over one audit window (baseline -> now).

    Args:
        trainable: ``requires_grad`` at the baseline.
        trainable_now: ``requires_grad`` now (``None``: same as ``trainable``).
        group: index of its optimizer param group, ``None`` when in no group.
        lr: the group's LR at the last step of the window (``None``: the optimizer sets its own step size).
        initial_lr: the group's scheduled base LR (``initial_lr``); 0 means the group never trains.
        weight_decay: the group's weight decay.
        effective_steps: optimizer steps in the window that were not skipped and ran with the group's LR > 0.
        grad: ``.grad`` at the last step: ``"none"``, ``"zero"`` (all zero), ``"nonzero"``, ``"empty"`` (a DeepSpeed
            ZeRO-3 gradient partition all zero: none reached it, or a zero one) or ``"unknown"`` (the optimizer keeps
            no per-tensor gradient: DeepSpeed ZeRO-1/2).
        dtype: the tensor's dtype, for messages.
        numel: number of values, for messages.
        expert: a numbered expert of a mixture-of-experts layer (see :func:`expert_of`) while another expert of the
            same layer trained: no gradient means the router sent it no token, not a wiring bug.
    """

    trainable: bool
    trainable_now: bool | None = None
    group: int | None = None
    lr: float | None = None
    initial_lr: float | None = None
    weight_decay: float = 0.0
    effective_steps: int = 0
    grad: GradState = "unknown"
    dtype: str = ""
    numel: int = 0
    expert: bool = False


@dataclass(frozen=True)
class Finding:
    """One tensor that trained when it should not have, or did not when it should.

    ``kind`` is ``"unchanged"`` (trainable, did not change) or ``"changed"`` (frozen, changed); ``cause`` is a key
    of :data:`CAUSES`; ``detail`` is the cause's explanation with this tensor's numbers filled in.
    """

    name: str
    kind: str
    cause: str
    detail: str
    numel: int = 0


def classify(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, str]:
    """Per tensor name: ``"same"``, ``"changed"``, ``"only_a"`` or ``"only_b"``; names sorted.

    Example:
        >>> classify({"x": 1, "y": 2}, {"y": 5, "z": 0})
        {'x': 'only_a', 'y': 'changed', 'z': 'only_b'}
    """
    out = {}
    for name in sorted(set(a) | set(b)):
        if name not in b:
            out[name] = ONLY_A
        elif name not in a:
            out[name] = ONLY_B
        else:
            out[name] = SAME if int(a[name]) == int(b[name]) else CHANGED
    return out


def _finding(name: str, kind: str, cause: str, f: ParamFacts) -> Finding:
    lr = f"LR {f.lr:g}" if f.lr is not None else "a step size the optimizer sets itself (relative_step)"
    raise_lr = "raise the LR" if f.lr is not None else "use a fixed LR (relative_step=False)"
    if f.dtype in ("float32", "float64"):  # already full precision: a tiny step (LR, or clipping) is the cause
        advice = f"{raise_lr}, or max_grad_norm if gradients are clipped to a tiny norm"
    else:
        advice = f"{raise_lr} or keep these weights in float32"
    detail = CAUSES[cause].format(group=f.group, lr=lr, wd=f.weight_decay, dtype=f.dtype or "its dtype",
                                  advice=advice, steps=f.effective_steps,
                                  where="in no optimizer group" if f.group is None else
                                  f"without gradient or weight decay in optimizer group {f.group}")
    return Finding(name, kind, cause, detail, f.numel)


def expert_of(name: str) -> str | None:
    """The expert container of a per-expert tensor name (a numbered entry of an ``experts`` module: Switch /
    NLLB-MoE ``experts.expert_3``, remote-code Mixtral/DeepSeek ``experts.3``), else ``None``. Fused expert tensors
    (transformers 5's ``experts.gate_up_proj``) hold every expert in one tensor and are not per-expert.

    Example:
        >>> expert_of("model.layers.0.mlp.experts.3.w1.weight"), expert_of("model.layers.0.mlp.experts.down_proj")
        ('model.layers.0.mlp.experts', None)
    """
    m = _EXPERT.match(name)
    return m.group(1) if m else None


_EXPERT = re.compile(r"^(.*\bexperts)\.(?:expert_)?\d+\.")


def audit(
    status: Mapping[str, str], facts: Mapping[str, ParamFacts], min_grad_steps: int = 2, *,
    min_expert_steps: int | None = None, all_lr_zero: bool = False,
) -> tuple[list[Finding], list[str]]:
    """Judge each tensor of ``status`` (from :func:`classify`, baseline -> now) with its ``facts``.

    - Frozen (at the baseline) and changed: a finding, cause ``unfrozen`` / ``frozen_in_optimizer`` (in a group,
      and it had a ``.grad`` or the group decays weights) / ``modified_in_place`` (in no group, or in one that had
      nothing to step it with: torch optimizers skip a tensor whose ``.grad`` is None).
    - Trainable and unchanged: ``not_in_optimizer`` and ``lr_zero`` (``initial_lr`` 0) at once; otherwise only
      once its group ran at least one effective step (LR warmup from 0 and skipped inf/nan steps do not count),
      and the gradient-based causes (``grad_none``, ``grad_zero``, ``stalled``; ``no_update`` when the gradient is
      ``"unknown"``) only after ``min_grad_steps`` effective steps, since e.g. a LoRA A matrix has a zero gradient on
      its first step (B starts at zero).
      ``all_lr_zero`` (every optimizer group has LR 0) turns ``lr_zero`` into ``lr_zero_all``.
    - A MoE expert without gradient while a sibling trained (``facts.expert``): ``unrouted``, only after
      ``min_expert_steps`` effective steps (default ``min_grad_steps``): the router may simply not have picked it.
    - Trainable at the baseline but frozen now (``trainable_now`` False): frozen on purpose mid-run, not judged.

    Returns:
        ``(findings, pending)``: findings sorted by name, and the names that cannot be judged yet (keep their
        baseline and look again later). Tensors without facts, or only on one side, are ignored.
    """
    findings, pending = [], []
    for name, st in status.items():
        f = facts.get(name)
        if f is None or st not in (SAME, CHANGED):
            continue
        if not f.trainable:
            if st == CHANGED:
                if f.trainable_now:
                    cause = "unfrozen"
                elif f.group is not None and (f.grad != "none" or f.weight_decay):
                    cause = "frozen_in_optimizer"  # stepped with a (zero) gradient, or decayed without one
                else:
                    cause = "modified_in_place"
                findings.append(_finding(name, "changed", cause, f))
            continue
        if st == CHANGED or f.trainable_now is False:
            continue
        if f.group is None:
            findings.append(_finding(name, "unchanged", "not_in_optimizer", f))
        elif f.initial_lr is not None and f.initial_lr == 0 and not f.effective_steps:
            findings.append(_finding(name, "unchanged", "lr_zero_all" if all_lr_zero else "lr_zero", f))
        elif f.expert and f.grad in ("none", "zero", "empty", "unknown"):
            if f.effective_steps < max(min_grad_steps, min_expert_steps or 0):
                pending.append(name)
            else:
                findings.append(_finding(name, "unchanged", "unrouted", f))
        elif f.effective_steps < 1 or (f.effective_steps < min_grad_steps
                                       and f.grad in ("none", "zero", "empty", "unknown")):
            pending.append(name)
        else:
            cause = {"none": "grad_none", "zero": "grad_zero", "empty": "grad_empty",
                     "unknown": "no_update"}.get(f.grad, "stalled")
            findings.append(_finding(name, "unchanged", cause, f))
    return sorted(findings, key=lambda x: x.name), pending


def _pattern(module: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", module)


def _fmt_count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _fold(modules: Iterable[str]) -> list[str]:
    """Module names with layer indices folded to ``*`` where two or more modules share the pattern (``xN``)."""
    by_pattern: dict[str, list[str]] = {}
    for m in modules:
        by_pattern.setdefault(_pattern(m), []).append(m)
    out = []
    for pat, mods in by_pattern.items():
        uniq = sorted(set(mods))
        out.extend([f"{pat} x{len(uniq)}"] if len(uniq) > 1 else uniq)
    return out


def summarize(findings: Iterable[Finding], max_modules: int = 8) -> list[str]:
    """One line per (kind, cause, detail): ``"<kind>: <n> tensors (<values>) in <modules> - <detail>"``.

    Modules that differ only by layer index fold into one entry (``model.layers.* x32``).

    Example:
        >>> f = [Finding(f"model.layers.{i}.mlp.up_proj.weight", "unchanged", "grad_none", "no gradient", 8)
        ...      for i in range(3)] + [Finding("lm_head.weight", "unchanged", "grad_none", "no gradient", 8)]
        >>> summarize(f)
        ['trainable but unchanged: 4 tensors (32 values) in model.layers.*.mlp.up_proj x3, lm_head - no gradient']
    """
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for f in findings:  # by detail too: tensors of two groups must not be told one group's number or LR
        groups.setdefault((f.kind, f.cause, f.detail), []).append(f)
    lines = []
    for (kind, _, _), fs in groups.items():
        mods = _fold(module_of(f.name) for f in fs)
        shown = ", ".join(mods[:max_modules]) + (f", ... ({len(mods) - max_modules} more)" if len(mods) > max_modules
                                                  else "")
        numel = sum(f.numel for f in fs)
        size = f" ({_fmt_count(numel, 'value')})" if numel else ""
        lines.append(f"{_KIND_TEXT[kind]}: {_fmt_count(len(fs), 'tensor')}{size} in {shown} - {fs[0].detail}")
    return lines


def module_summary(status: Mapping[str, str]) -> list[dict]:
    """Group a :func:`classify` result by module, folding layer indices when every layer agrees.

    Each entry: ``{"module", "status", "tensors", "counts"}`` where ``status`` is ``"unchanged"``, ``"changed"``
    (every tensor changed), ``"partly changed"``, ``"only in A"``, ``"only in B"`` or ``"mixed"``, and
    ``counts`` maps each per-tensor status to its count. Modules keep first-seen order of sorted names.

    Example:
        >>> s = classify({"m.layers.0.w": 1, "m.layers.1.w": 1, "m.emb.w": 1},
        ...              {"m.layers.0.w": 2, "m.layers.1.w": 3, "m.emb.w": 1})
        >>> [(m["module"], m["status"]) for m in module_summary(s)]
        [('m.emb', 'unchanged'), ('m.layers.*', 'changed')]
    """
    per_module: dict[str, dict[str, int]] = {}
    for name, st in status.items():
        per_module.setdefault(module_of(name), {}).setdefault(st, 0)
        per_module[module_of(name)][st] += 1

    def verdict(counts: Mapping[str, int]) -> str:
        kinds = set(counts)
        if kinds == {SAME}:
            return "unchanged"
        if kinds == {CHANGED}:
            return "changed"
        if kinds == {SAME, CHANGED}:
            return "partly changed"
        if kinds == {ONLY_A}:
            return "only in A"
        if kinds == {ONLY_B}:
            return "only in B"
        return "mixed"

    folded: dict[str, list[str]] = {}
    for mod in per_module:
        folded.setdefault(_pattern(mod), []).append(mod)
    out = []
    for pat, mods in folded.items():
        verdicts = {verdict(per_module[m]) for m in mods}
        groups = [(pat, mods)] if len(mods) > 1 and len(verdicts) == 1 else [(m, [m]) for m in mods]
        for label, members in groups:
            counts: dict[str, int] = {}
            for m in members:
                for st, n in per_module[m].items():
                    counts[st] = counts.get(st, 0) + n
            out.append({"module": label, "status": verdict(counts), "tensors": sum(counts.values()),
                        "counts": dict(sorted(counts.items()))})
    return out


@dataclass(frozen=True)
class GroupInfo:
    """One optimizer param group as the audit sees it: index, current LR, scheduled base LR, weight decay.

    ``lr``/``initial_lr`` are ``None`` when the optimizer sets its own step size and ignores ``group["lr"]``.
    """

    index: int
    lr: float | None
    initial_lr: float | None
    weight_decay: float


def group_lr(group: Mapping[str, Any]) -> float | None:
    """The LR a param group steps with, or ``None`` when the optimizer computes its own step size and ignores
    ``group["lr"]``: Hugging Face ``Adafactor(relative_step=True, lr=None)``, whose ``AdafactorSchedule`` sets the
    group's LR to 0 for logging only. ``None`` counts as a non-zero LR.

    Example:
        >>> group_lr({"lr": 1e-3}), group_lr({"lr": 0.0, "relative_step": True}), group_lr({"lr": None})
        (0.001, None, None)
    """
    lr = group.get("lr", 0.0)
    if group.get("relative_step") or lr is None:
        return None
    return float(lr)


def group_index(optimizer: Any) -> dict[int, GroupInfo]:
    """Map ``id(parameter)`` -> :class:`GroupInfo` for every parameter in ``optimizer.param_groups``.

    Works for any torch optimizer and for wrappers that expose ``param_groups`` (accelerate's). A DeepSpeed ZeRO
    optimizer's groups hold flat fp32 partitions: its model parameters come from its own lists
    (:func:`trainer_guard.core.sharding.optimizer_param_groups`), the LRs from its ``param_groups``. ``initial_lr`` is the
    value an LR scheduler recorded (``group["initial_lr"]``), else the group's LR.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([{"params": [w], "lr": 0.0}], lr=0.1)
        >>> group_index(opt)[id(w)]
        GroupInfo(index=0, lr=0.0, initial_lr=0.0, weight_decay=0.0)
    """
    from .sharding import optimizer_param_groups  # lazy: torch

    out = {}
    for i, group in enumerate(optimizer_param_groups(optimizer)):
        lr = group_lr(group)
        initial = lr if lr is None or "initial_lr" not in group else float(group["initial_lr"])
        info = GroupInfo(i, lr, initial, float(group.get("weight_decay", 0.0) or 0.0))
        for p in group["params"]:
            out.setdefault(id(p), info)
    return out


def grad_state(p: torch.Tensor) -> GradState:
    """``"none"`` when ``p.grad`` is None, ``"zero"`` when it is all zero, else ``"nonzero"`` (one reduction).
    For a ``DTensor`` or a DeepSpeed ZeRO-3 partition, this rank's part of the gradient
    (:func:`trainer_guard.core.sharding.local_grad`; no collective: :class:`UpdateAudit` combines the ranks'
    answers). A ZeRO-3 partition all zero is ``"empty"``: DeepSpeed's buffer reads zero where no gradient was ever
    written, so "none" and "zero" look alike there."""
    from .sharding import is_zero3, local_grad  # lazy: torch

    g = local_grad(p)
    if g is None:
        return "none"
    if bool(g.ne(0).any()):
        return "nonzero"
    return "empty" if is_zero3(p) else "zero"


def combine_grad_states(states: Iterable[GradState]) -> GradState:
    """One tensor's gradient state from its shards' (one per rank): ``"nonzero"`` when any shard's is, else
    ``"zero"`` when any shard had a gradient, else ``"empty"`` (ZeRO-3 partitions all zero), else ``"none"``
    (``"unknown"`` wins over ``"none"``).

    Example:
        >>> combine_grad_states(["zero", "nonzero"]), combine_grad_states(["none", "zero"])
        ('nonzero', 'zero')
    """
    states = set(states)
    for s in ("nonzero", "zero", "empty", "unknown"):
        if s in states:
            return s  # type: ignore[return-value]
    return "none"


def auditable(p: torch.Tensor) -> bool:
    """True for a parameter the audit can read: whole on this rank, an FSDP2 ``DTensor`` or a DeepSpeed ZeRO-3
    partition (their checksums are combined from the ranks' parts); not an FSDP1 ``FlatParameter``, not on the meta
    device, not empty. Which tensors are shards is :mod:`trainer_guard.core.sharding`'s to say."""
    from .sharding import full_shape, is_dtensor, is_shard, is_zero3  # lazy: torch (``diff`` imports this module)

    return ((is_dtensor(p) or is_zero3(p) or not is_shard(p)) and p.device.type != "meta"
            and math.prod(full_shape(p)) > 0)


class UpdateAudit:
    """A whole run's audit, without a Trainer: :meth:`baseline` once, then :meth:`step` after every optimizer step.

    Keeps per tensor its baseline checksum and ``requires_grad``, per optimizer group a count of *effective* steps
    (not skipped, LR > 0, not every gradient exactly zero). :meth:`step` checks every tensor on the first step and every ``every`` steps, and in
    between only tensors left undecided whose group has since run the effective steps they need; judged tensors get
    a new baseline. Each (tensor, cause) is returned once. A tensor whose ``requires_grad`` flips after training
    ran with the old setting (gradual unfreezing or freezing by a schedule) starts a new window from the step that
    showed the flip, judged as what it is now (an un-frozen tensor the optimizer does not hold is reported at the
    next step); a flip before the first optimizer step is part of the setup and judged against the baseline. A MoE
    expert without gradient while another expert of its layer trained is judged only after ``every`` effective
    steps (the router may not have picked it yet).

    Args:
        params: name -> parameter (live objects; their values are read at each check).
        every: full check every this many steps (besides the first).
        min_grad_steps: see :func:`audit`.
        backend: checksum backend (:func:`trainer_guard.checksum.checksums`).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD([lin.weight], lr=0.1)  # the bias is left out of the optimizer
        >>> run = UpdateAudit(dict(lin.named_parameters()), every=10)
        >>> run.baseline()
        >>> lin(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> [(f.name, f.cause) for f in run.step(opt)]
        [('bias', 'not_in_optimizer')]
    """

    def __init__(self, params: Mapping[str, torch.Tensor], *, every: int = 100, min_grad_steps: int = 2,
                 backend: str = "auto", gather: Callable[[Any], list[Any]] | None = None) -> None:
        from .sharding import is_dtensor, is_zero3  # lazy: torch

        self.params = dict(params)
        # FSDP2 DTensors and DeepSpeed ZeRO-3 partitions: checksums and gradient states are combined across ranks,
        # through collectives that every rank runs at the same checks (the names checked are decided from combined
        # values, so they agree)
        self._parts = {n for n, p in self.params.items() if is_dtensor(p) or is_zero3(p)}
        self._gather = gather
        self._expert = {n: expert_of(n) for n in self.params}  # MoE expert container of each tensor, or None
        self._devices = {p.device for p in self.params.values()}
        self.every, self.min_grad_steps, self.backend = every, min_grad_steps, backend
        self.steps = 0
        self.silent_steps = 0  # steps whose gradients were all exactly zero (not effective)
        self._base: dict[str, int] = {}  # baseline checksum
        self._trainable: dict[str, bool] = {}  # requires_grad at the baseline
        self._since: dict[str, int] = {}  # baseline -> index into _snaps
        self._snaps: list[list[int]] = []  # cumulative effective steps per group, at each baseline
        self._effective: list[int] = []
        self._pending: dict[str, tuple[int | None, int]] = {}  # name -> (group, effective steps needed)
        self._reported: set[tuple[str, str]] = set()
        self._grad_flag: dict[str, bool] = {}  # requires_grad seen at the last step
        self._routed: set[str] = set()  # MoE expert containers with an expert seen trained
        self._plans: dict[Any, dict] = {}  # device -> the triton kernel's reusable launch table for it

    def checksums(self, names: Iterable[str]) -> dict[str, int]:
        """Checksums of ``names``, one call per device (a model split over GPUs by ``device_map``)."""
        from ..checksum.tensors import checksums  # lazy: imports torch (diff uses this module without it)

        names = list(names)
        shards = [n for n in names if n in self._parts]
        out: dict[str, int] = {}
        if shards:  # the full tensors' checksums from each rank's shard: one small all-gather, no tensor gathered
            from .divergence import sharded_checksums
            from .sharding import resolve_gather

            out.update(sharded_checksums({n: self.params[n] for n in shards}, resolve_gather(self._gather)))
            names = [n for n in names if n not in self._parts]
        by_device: dict[Any, dict[str, torch.Tensor]] = {}
        if len(self._devices) == 1:  # the usual case: one device, no grouping per tensor
            by_device[next(iter(self._devices))] = {n: self.params[n] for n in names}
        else:
            for n in names:
                by_device.setdefault(self.params[n].device, {})[n] = self.params[n]  # read only: no detach needed
        for device, tensors in by_device.items():
            if not tensors:
                continue
            out.update(checksums(tensors, backend=self.backend, cache=self._plans.setdefault(device, {})))
        return out

    def baseline(self) -> None:
        """Checksum every tensor: the state later steps are compared with."""
        self._rebase(self.checksums(self.params))

    def _rebase(self, sums: Mapping[str, int]) -> None:
        if not self._snaps or self._snaps[-1] != self._effective:
            self._snaps.append(list(self._effective))
        for n, s in sums.items():
            self._base[n], self._since[n] = s, len(self._snaps) - 1
            self._trainable[n] = self._grad_flag[n] = self.params[n].requires_grad

    def _eff(self, name: str, group: int | None) -> int:
        if group is None:
            return 0
        snap = self._snaps[self._since[name]]
        return self._effective[group] - (snap[group] if group < len(snap) else 0)

    def step(self, optimizer: Any, skipped: bool | None = None, no_signal: bool | None = None) -> list[Finding]:
        """Account one optimizer step (call after ``optimizer.step()``, before ``zero_grad``); return new findings.

        ``skipped`` defaults to ``optimizer.step_was_skipped`` (accelerate's flag for a grad-scaler inf/nan skip).
        ``no_signal`` (default: :meth:`no_signal`, every gradient exactly zero) marks a step without a learning signal,
        e.g. RL whose rewards are all zero: like a skipped step it is not effective, so it is evidence against no
        tensor; :attr:`silent_steps` counts them.
        """
        groups = optimizer.param_groups
        self._effective += [0] * (len(groups) - len(self._effective))
        if skipped is None:
            skipped = bool(getattr(optimizer, "step_was_skipped", False))
        if no_signal is None:
            no_signal = not skipped and self.no_signal(optimizer)
        self.silent_steps += bool(no_signal)
        if not skipped and not no_signal:
            for i, g in enumerate(groups):
                lr = group_lr(g)
                self._effective[i] += lr is None or lr > 0
        self.steps += 1
        if self.steps > 1:
            self._restart_flipped(optimizer)
        if self.steps == 1 or self.steps % self.every == 0:
            names = list(self.params)
        else:
            names = [n for n, (g, need) in self._pending.items() if self._eff(n, g) >= need]
        return self.check(names, optimizer) if names else []

    def no_signal(self, optimizer: Any = None) -> bool:
        """True when gradients exist and every one of them is exactly zero (one reduction per tensor until the first
        non-zero one; walked from the output end, where a step with any signal shows it first). No gradient at all
        (every ``.grad`` None) is not this: the backward pass reached nothing, which is evidence. Under a DeepSpeed
        ZeRO ``optimizer``, whose gradients live in its own partitions (ZeRO-1/2 free them in the step): its global
        gradient norm of the step is exactly 0 (already the same on every rank)."""
        from .sharding import local_grad, zero_optimizer  # lazy: torch

        norm = getattr(zero_optimizer(optimizer), "_global_grad_norm", None)
        if norm is not None:
            return float(norm) == 0.0
        seen = signal = False
        for p in reversed(self.params.values()):
            g = local_grad(p)  # a shard's gradient: this rank's part, no collective
            if g is None:
                continue
            seen = True
            if bool(g.ne(0).any()):
                signal = True
                break
        if self._parts:  # shards: the step had a signal when any rank's part had one (one small all-gather)
            from .sharding import resolve_gather

            votes = resolve_gather(self._gather)((seen, signal))
            seen, signal = any(v[0] for v in votes), any(v[1] for v in votes)
        return seen and not signal

    def _restart_flipped(self, optimizer: Any) -> None:
        """Tensors whose ``requires_grad`` changed since the last step (a schedule that un-freezes or freezes them
        once training ran): a new window from now, judged as what they are now; re-checked after their group's
        next effective step (at the next step when no group holds them)."""
        flipped = [n for n, p in self.params.items() if p.requires_grad != self._grad_flag.get(n, p.requires_grad)]
        if not flipped:
            return
        self._rebase(self.checksums(flipped))
        index = group_index(optimizer)
        for n in flipped:
            g = index.get(id(self.params[n]))
            self._pending[n] = (g.index, 1) if g else (None, 0)

    def check(self, names: list[str], optimizer: Any) -> list[Finding]:
        """Compare ``names`` with their baselines now; rebase the judged ones; return new findings."""
        from .sharding import full_shape, is_zero3, zero_optimizer  # lazy: torch

        now = self.checksums(names)
        base = self._base
        status = {n: SAME if base[n] == now[n] else CHANGED for n in names}  # classify() of two full sets
        self._routed.update(e for n in names if status[n] == CHANGED and self._trainable[n]
                            for e in [self._expert[n]] if e)
        # Only a trainable tensor that did not change, or a frozen one that did, can be a finding or wait for a
        # verdict (audit() passes over the rest): the per-tensor facts are gathered for those alone, which keeps a
        # healthy check at the cost of its checksums (an 8B model: 291 tensors, every step when every=1).
        doubtful = [n for n in names if (status[n] == SAME) == self._trainable[n]]
        index = group_index(optimizer) if doubtful else {}
        infos = {g.index: g for g in index.values()}
        all_lr_zero = bool(infos) and all(g.initial_lr == 0 for g in infos.values())
        # DeepSpeed ZeRO-1/2 free every gradient in their step and keep none per tensor: "unknown", never "none"
        grads_gone = bool(doubtful) and zero_optimizer(optimizer) is not None
        facts = {}
        for n in doubtful:
            p, g = self.params[n], index.get(id(self.params[n]))
            gi = g.index if g else None
            facts[n] = ParamFacts(
                trainable=self._trainable[n], trainable_now=p.requires_grad, group=gi, lr=g.lr if g else None,
                initial_lr=g.initial_lr if g else None, weight_decay=g.weight_decay if g else 0.0,
                effective_steps=self._eff(n, gi),
                grad="unknown" if grads_gone and n not in self._parts else grad_state(p),
                dtype=str(p.dtype).removeprefix("torch."), numel=math.prod(full_shape(p)),
                expert=self._expert[n] in self._routed)
        shards = [n for n in doubtful if n in self._parts]
        if shards:  # a shard's gradient is one rank's part: the tensor's is what the ranks' parts say together
            from .sharding import resolve_gather

            per_rank = resolve_gather(self._gather)({n: facts[n].grad for n in shards})
            for n in shards:
                facts[n] = replace(facts[n], grad=combine_grad_states(r[n] for r in per_rank))
        for n in doubtful:  # AdaLoRA's rank allocator zeroes pruned singular values (lora_E) after each step: a fully
            # pruned lora_E stays all zero by design, not for want of a gradient or LR (still judged when in no group)
            if (status[n] == SAME and self._trainable[n] and ".lora_E." in f".{n}." and facts[n].group is not None
                    and not is_zero3(self.params[n]) and not bool(self.params[n].detach().any())):
                status[n] = "pruned"  # audit() judges only SAME/CHANGED
        expert_steps = max(self.min_grad_steps, self.every)
        found, pending = audit(status, facts, self.min_grad_steps, min_expert_steps=expert_steps,
                               all_lr_zero=all_lr_zero)
        new = [f for f in found if (f.name, f.cause) not in self._reported]
        self._reported.update((f.name, f.cause) for f in new)
        for n in names:
            self._pending.pop(n, None)
        for n in pending:  # wait for one effective step, or min_grad_steps (gradient verdicts), or every (experts)
            f = facts[n]
            self._pending[n] = (f.group, 1 if f.effective_steps < 1 else expert_steps if f.expert
                                else self.min_grad_steps)
        self._rebase({n: s for n, s in now.items() if n not in self._pending})
        return new
