"""UpdateAuditGuard (issue 8): planted update failures in tiny models are reported, healthy runs report nothing.

Each planted failure trains to completion without the guard and leaves the tensors silently unchanged (or a frozen
weight silently drifted); with the guard it is reported by module with its cause.
"""

import os

import pytest
import torch
from conftest import make_args
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState

from trainer_guard import ConfigError, UpdateAuditError, UpdateAuditGuard, callbacks_from_dict
from trainer_guard.core.audit import (CAUSES, Finding, ParamFacts, UpdateAudit, audit, classify, module_summary,
                                      summarize)
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

DEFAULT_YAML = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "default.yaml")


def train(model, tmp_path, guard=None, optimizers=(None, None), callbacks=(), **kw):
    kw.setdefault("max_steps", 4)
    kw.setdefault("save_strategy", "no")
    args = make_args(tmp_path, **kw)
    cbs = ([guard] if guard else []) + list(callbacks)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(16), callbacks=cbs, optimizers=optimizers)
    trainer.train()
    return trainer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(before, model):
    return sorted(n for n, p in model.named_parameters() if torch.equal(before[n], p.detach()))


# -- healthy runs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-tied", "lora"])
def test_healthy_run_reports_nothing(kind, tmp_path):
    model = tiny_lora(tiny_model("llama-tied")) if kind == "lora" else tiny_model(kind)
    guard = UpdateAuditGuard(every=1)  # every step: LoRA A has a zero gradient on step 1 (B starts at 0)
    train(model, tmp_path, guard)
    assert guard.findings == [] and guard.report() == []


def test_warmup_from_zero_and_gradient_accumulation_report_nothing(tmp_path):
    guard = UpdateAuditGuard(every=2)
    trainer = train(tiny_model("llama-untied"), tmp_path, guard, warmup_steps=2, gradient_accumulation_steps=2)
    assert trainer.state.log_history[0]["learning_rate"] == 0.0  # step 1 ran at LR 0: nothing could change
    assert guard.findings == []


def test_lr_held_at_zero_defers_without_rechecking_every_step(tmp_path, monkeypatch):
    """A schedule that holds LR 0 for 3 steps: nothing is judged (or re-checksummed) until a step runs at LR > 0."""
    model = tiny_model("llama-untied")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step < 3 else 1.0)
    guard = UpdateAuditGuard(every=100)
    checked = []
    sums = UpdateAudit.checksums
    monkeypatch.setattr(UpdateAudit, "checksums", lambda self, names: checked.append(len(list(names))) or
                        sums(self, names))
    train(model, tmp_path, guard, optimizers=(opt, sched), max_steps=5)
    n = len(list(model.parameters()))
    assert checked == [n, n, n]  # baseline, step 1 (all pending: LR 0), step 4 (first step at LR > 0)
    assert guard.findings == []


def test_resumed_run_baselines_after_the_load_and_reports_nothing(tmp_path):
    from safetensors.torch import load_file

    from trainer_guard import checksums

    def model():
        return tiny_lora(tiny_model("llama-untied"), modules_to_save=["lm_head"])

    train(model(), tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    key = "base_model.model.lm_head.modules_to_save.default.weight"
    guard, seen = UpdateAuditGuard(every=1), {}

    class Spy(TrainerCallback):  # runs after the guard's on_step_begin: the baseline it just took
        def on_step_begin(self, args, state, control, **kw):
            seen.setdefault("baseline", guard.audit._base[key])

    fresh = model()
    init = checksums({key: fresh.get_parameter(key).detach()})[key]
    trainer = Trainer(model=fresh, args=make_args(tmp_path, max_steps=4, save_strategy="no"),
                      train_dataset=tiny_dataset(16), callbacks=[guard, Spy()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    saved = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    loaded = saved["base_model.model.lm_head.weight"]  # PEFT stores the modules_to_save copy under this name
    assert seen["baseline"] == checksums({"w": loaded})["w"] != init  # checkpoint-2's head, not the fresh init
    assert trainer.state.global_step == 4 and guard.audit.steps == 2 and guard.findings == []


# -- planted failures -----------------------------------------------------------------------------------------
def test_parameter_missing_from_optimizer(tmp_path):
    model = tiny_model("llama-untied")
    params = lambda m: [p for n, p in m.named_parameters() if n != "lm_head.weight"]  # noqa: E731
    before = snapshot(model)
    train(model, tmp_path, optimizers=(torch.optim.AdamW(params(model), lr=1e-2), None))
    assert unchanged(before, model) == ["lm_head.weight"]  # silent: trains to the end, head never moves

    model = tiny_model("llama-untied")
    with pytest.raises(UpdateAuditError) as e:
        train(model, tmp_path, UpdateAuditGuard(), optimizers=(torch.optim.AdamW(params(model), lr=1e-2), None))
    assert str(e.value) == (
        "UpdateAuditGuard at optimizer step 1: parameters that should train did not, or frozen ones changed\n"
        "  - trainable but unchanged: 1 tensor (4,096 values) in lm_head - " + CAUSES["not_in_optimizer"])


def test_group_with_lr_zero(tmp_path):
    def opt(m):
        norms = [p for n, p in m.named_parameters() if "norm" in n]
        rest = [p for n, p in m.named_parameters() if "norm" not in n]
        return torch.optim.AdamW([{"params": rest}, {"params": norms, "lr": 0.0}], lr=1e-2)

    model = tiny_model("llama-untied")
    before = snapshot(model)
    train(model, tmp_path, optimizers=(opt(model), None))
    assert all("norm" in n for n in unchanged(before, model)) and len(unchanged(before, model)) == 5

    model = tiny_model("llama-untied")
    with pytest.raises(UpdateAuditError, match=r"step 1:.*\n  - trainable but unchanged: 5 tensors \(160 values\) in "
                       r"model\.layers\.\*\.input_layernorm x2, model\.layers\.\*\.post_attention_layernorm x2, "
                       r"model\.norm - its optimizer group 1 has LR 0 \(initial_lr 0\)"):
        train(model, tmp_path, UpdateAuditGuard(), optimizers=(opt(model), None))


def detach_mlp(model):
    model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out.detach())
    return model


def test_detached_branch(tmp_path):
    model = detach_mlp(tiny_model("llama-untied"))
    before = snapshot(model)
    train(model, tmp_path)
    assert unchanged(before, model) == [f"model.layers.1.{m}.weight" for m in
                                        ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "post_attention_layernorm")]

    guard = UpdateAuditGuard(mode="warn")
    train(detach_mlp(tiny_model("llama-untied")), tmp_path, guard)  # warn: trains on, reports once
    assert {(f.name, f.cause) for f in guard.findings} == {(n, "grad_none") for n in unchanged(before, model)}
    [line] = guard.report()
    assert line.startswith("UpdateAuditGuard at optimizer step 2: ")  # gradient verdicts need 2 effective steps
    assert ("4 tensors (6,176 values) in model.layers.1.mlp.down_proj, model.layers.1.mlp.gate_proj, "
            "model.layers.1.mlp.up_proj, model.layers.1.post_attention_layernorm - no gradient reached it "
            "(.grad is None)") in line


def drift_frozen(model, from_step=0):
    """Freeze o_proj of layer 0 and let a buggy forward pre-hook scale it in place (from the n-th call on)."""
    mod = model.model.layers[0].self_attn.o_proj
    mod.weight.requires_grad_(False)
    calls = [0]

    def hook(m, args):
        calls[0] += 1
        if m.training and calls[0] > from_step:
            with torch.no_grad():
                m.weight.mul_(0.99)

    mod.register_forward_pre_hook(hook)
    return model


def test_frozen_weight_modified_in_place(tmp_path):
    model = drift_frozen(tiny_model("llama-untied"))
    w0 = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    train(model, tmp_path)
    assert not torch.equal(w0, model.model.layers[0].self_attn.o_proj.weight)  # silent drift

    with pytest.raises(UpdateAuditError, match=r"step 1:.*\n  - frozen but changed: 1 tensor \(1,024 values\) in "
                       r"model\.layers\.0\.self_attn\.o_proj - frozen and in no optimizer group: modified outside"):
        train(drift_frozen(tiny_model("llama-untied")), tmp_path, UpdateAuditGuard())


def test_late_fault_caught_by_every_n(tmp_path):
    # batch 4, 16 samples: the hook runs once per step; drift starts at step 3, the check at step 4 sees it
    guard = UpdateAuditGuard(mode="warn", every=2)
    train(drift_frozen(tiny_model("llama-untied"), from_step=2), tmp_path, guard)
    [line] = guard.report()
    assert line.startswith("UpdateAuditGuard at optimizer step 4: ") and "model.layers.0.self_attn.o_proj" in line


def test_bf16_weights_too_coarse_for_the_update(tmp_path):
    """Pure-bf16 training at LR 1e-5: RMSNorm weights (1.0, bf16 spacing 2**-7) get gradients but never move."""
    model = tiny_model("llama-untied").to(torch.bfloat16)
    before = snapshot(model)
    guard = UpdateAuditGuard(mode="warn")
    train(model, tmp_path, guard, max_steps=3, learning_rate=1e-5)
    assert all("norm" in n for n in unchanged(before, model)) and len(unchanged(before, model)) == 5
    assert {f.cause for f in guard.findings} == {"stalled"} and len(guard.findings) == 5
    assert guard.report()[0].endswith(
        "trainable but unchanged: 5 tensors (160 values) in model.layers.*.input_layernorm x2, "
        "model.layers.*.post_attention_layernorm x2, model.norm - it had a non-zero gradient and LR 1e-05, yet no "
        "value changed: updates too small for bfloat16, or the optimizer skips it; raise the LR or keep these "
        "weights in float32")


class DecayEverything(torch.optim.Optimizer):
    """A hand-written SGD with decoupled weight decay that decays every parameter of its groups, grad or not."""

    def __init__(self, params, lr=1e-2, weight_decay=0.1):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_weight_decay_applied_to_frozen_weights(tmp_path):
    def frozen_model():
        model = tiny_model("llama-untied")
        model.model.embed_tokens.weight.requires_grad_(False)
        return model

    model = frozen_model()
    w0 = model.model.embed_tokens.weight.detach().clone()
    train(model, tmp_path, optimizers=(DecayEverything(model.parameters()), None))
    assert not torch.equal(w0, model.model.embed_tokens.weight)  # silent: the "frozen" embeddings shrank

    model = frozen_model()
    with pytest.raises(UpdateAuditError, match=r"frozen but changed: 1 tensor \(4,096 values\) in model\.embed_tokens "
                       r"- frozen, yet in optimizer group 0 \(weight_decay 0\.1\) which updated it"):
        train(model, tmp_path, UpdateAuditGuard(), optimizers=(DecayEverything(model.parameters()), None))


class Unfreeze(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kw):
        model.model.embed_tokens.weight.requires_grad_(True)


def test_wrapper_that_unfreezes(tmp_path):
    model = tiny_model("llama-untied")
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen weight handed to the optimizer anyway
    with pytest.raises(UpdateAuditError, match=r"frozen but changed: 1 tensor \(4,096 values\) in model\.embed_tokens "
                       r"- frozen at the baseline but requires_grad=True now"):
        train(model, tmp_path, UpdateAuditGuard(), optimizers=(opt, None), callbacks=[Unfreeze()])


def test_skipped_steps_with_grad_scaler_do_not_count():
    """A step skipped by the grad scaler (inf loss) changes nothing and must not be read as 'stalled'."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = tiny_model("llama-untied")
    scaler = torch.amp.GradScaler("cpu")
    opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), device_placement=False, scaler=scaler)
    guard, state, control = UpdateAuditGuard(every=1), TrainerState(), TrainerControl()
    guard.on_train_begin(None, state, control, model=model, optimizer=opt)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    skipped = []
    for step in range(3):
        guard.on_step_begin(None, state, control, model=model)
        loss = model(input_ids=ids, labels=ids).loss * (float("inf") if step == 0 else 1.0)
        scaler.scale(loss).backward()
        opt.step()
        skipped.append(opt.step_was_skipped)
        guard.on_optimizer_step(None, state, control, optimizer=opt)
        opt.zero_grad()
        state.global_step += 1
    assert skipped == [True, False, False] and guard.findings == [] and guard.audit.steps == 3


# -- options and config ---------------------------------------------------------------------------------------
def test_options_are_validated():
    with pytest.raises(ConfigError) as e:
        UpdateAuditGuard(every=0, mode="loud")
    assert str(e.value) == ("Invalid options:\n  - UpdateAuditGuard.mode: got 'loud'; expected one of 'raise', 'warn'\n"
                            "  - UpdateAuditGuard.every: must be >= 1, got 0; pass a positive number of optimizer "
                            "steps")
    with pytest.raises(ConfigError) as e:
        UpdateAuditGuard(every=0)
    assert str(e.value) == ("Invalid options:\n  - UpdateAuditGuard.every: must be >= 1, got 0; pass a positive "
                            "number of optimizer steps")


def test_built_from_default_yaml():
    from trainer_guard import callbacks_from_yaml

    [guard] = [c for c in callbacks_from_yaml(DEFAULT_YAML) if isinstance(c, UpdateAuditGuard)]
    assert guard.options["mode"] == "raise" and guard.options["every"] == 100
    [guard] = callbacks_from_dict({"update_audit": {"mode": "warn", "ignore": ["*.experts.*"]}})
    assert guard.options["ignore"] == ["*.experts.*"]


def test_ignore_skips_tensors(tmp_path):
    guard = UpdateAuditGuard(ignore=["model.layers.1.*"])
    train(detach_mlp(tiny_model("llama-untied")), tmp_path, guard, max_steps=3)
    assert guard.findings == []


# -- core -----------------------------------------------------------------------------------------------------
def test_core_causes_and_pending():
    status = classify({k: 1 for k in "abcdefgh"}, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1, "f": 2, "g": 2, "h": 1})
    facts = {
        "a": ParamFacts(True, group=0, lr=0.0, initial_lr=1e-3, effective_steps=0),  # warmup: wait
        "b": ParamFacts(True, group=0, lr=1e-3, initial_lr=1e-3, effective_steps=1, grad="zero"),  # LoRA A: wait
        "c": ParamFacts(True, group=0, lr=1e-3, initial_lr=1e-3, effective_steps=2, grad="zero"),
        "d": ParamFacts(True, group=0, lr=1e-3, initial_lr=1e-3, effective_steps=1, grad="nonzero", dtype="bfloat16"),
        "e": ParamFacts(False),  # frozen, unchanged: fine
        "f": ParamFacts(False, group=1, weight_decay=0.1),
        "g": ParamFacts(True, group=0, lr=1e-3, effective_steps=1),  # trainable and changed: fine
        "h": ParamFacts(True, group=0, lr=1e-3, initial_lr=1e-3, effective_steps=3, grad="none"),
    }
    findings, pending = audit(status, facts)
    assert pending == ["a", "b"]
    assert [(f.name, f.cause) for f in findings] == [("c", "grad_zero"), ("d", "stalled"),
                                                     ("f", "frozen_in_optimizer"), ("h", "grad_none")]
    assert "LR 0.001, yet no value changed: updates too small for bfloat16" in findings[1].detail
    assert "in optimizer group 1 (weight_decay 0.1)" in findings[2].detail


def test_summarize_folds_layers_and_caps_modules():
    f = [Finding(f"m.layers.{i}.{p}.weight", "unchanged", "grad_none", "why", 2) for i in range(3) for p in "ab"]
    f += [Finding(f"x{i}.w", "changed", "modified_in_place", "how", 1) for i in range(10)]
    lines = summarize(f, max_modules=3)
    assert lines == ["trainable but unchanged: 6 tensors (12 values) in m.layers.*.a x3, m.layers.*.b x3 - why",
                     "frozen but changed: 10 tensors (10 values) in x0, x1, x2, ... (7 more) - how"]


def test_module_summary():
    a = {"m.emb.weight": 1, "m.layers.0.q.weight": 1, "m.layers.1.q.weight": 1, "m.layers.0.k.weight": 1,
         "m.layers.1.k.weight": 1, "m.head.weight": 1}
    b = {"m.emb.weight": 1, "m.layers.0.q.weight": 2, "m.layers.1.q.weight": 3, "m.layers.0.k.weight": 4,
         "m.layers.1.k.weight": 1, "m.extra.weight": 1}
    got = [(m["module"], m["status"], m["tensors"]) for m in module_summary(classify(a, b))]
    assert got == [("m.emb", "unchanged", 1), ("m.extra", "only in B", 1), ("m.head", "only in A", 1),
                   ("m.layers.0.k", "changed", 1), ("m.layers.1.k", "unchanged", 1), ("m.layers.*.q", "changed", 2)]


# -- two processes --------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_fault_on_one_rank_raises_the_same_error_on_every_rank(tmp_path):
    from test_distributed import dirs, launch

    out, res = dirs(tmp_path)
    r0, r1 = launch("update_audit.py", out, res, tmp_path=tmp_path)
    assert r0["healthy"] == r1["healthy"] == {"error": None, "message": None, "step": 3, "findings": []}
    d0, d1 = r0["rank1_drift"], r1["rank1_drift"]
    assert d0["findings"] == [] and d1["findings"] == [["model.layers.0.self_attn.o_proj.weight", "modified_in_place"]]
    assert d0["error"] == d1["error"] == "UpdateAuditError" and d0["message"] == d1["message"]
    assert d0["step"] == d1["step"] == 0  # stopped inside optimizer step 1, on both ranks
    assert d0["message"].startswith("UpdateAuditGuard at optimizer step 1: ")
    assert d0["message"].endswith(CAUSES["modified_in_place"].format(where="in no optimizer group") + " (rank 1)")


def test_stalled_bf16_updates_warn_but_do_not_stop_raise_mode(tmp_path):
    """Precision stalls are reported without stopping a run in the default raise mode; wiring bugs still raise."""
    model = tiny_model("llama-untied").to(torch.bfloat16)
    guard = UpdateAuditGuard(mode="raise")
    trainer = train(model, tmp_path, guard, max_steps=3, learning_rate=1e-5)
    assert trainer.state.global_step == 3
    assert {f.cause for f in guard.findings} == {"stalled"}
    assert any("(warning only)" in line and "model.norm" in line for line in guard.report())


def test_lora_on_multihead_attention_out_proj_never_trains(tmp_path):
    """A real-world silent failure: nn.MultiheadAttention uses out_proj.weight directly in its functional
    forward, so PEFT LoRA adapters put on `out_proj` get no gradient at all. Without the guard the run trains
    'fine'; with it the dead adapters are named with the cause."""
    model = tiny_lora(tiny_model("plain-gpt"), target_modules=["out_proj", "linear1"])
    before = snapshot(model)
    train(model, tmp_path / "silent")  # no guard: no error
    dead = [n for n in unchanged(before, model) if "lora" in n]
    assert dead and all("out_proj" in n for n in dead)

    model = tiny_lora(tiny_model("plain-gpt"), target_modules=["out_proj", "linear1"])
    with pytest.raises(UpdateAuditError) as e:
        train(model, tmp_path / "guarded", UpdateAuditGuard())
    assert "self_attn.out_proj.lora_A.default" in str(e.value) and "no gradient reached it" in str(e.value)
    assert "linear1" not in str(e.value)


# -- DeepSpeed's optimizers, as the audit reads them (the real ones: tests/test_deepspeed.py) ------------------
class _ZeroLike:
    """What the audit reads of a DeepSpeed ZeRO optimizer: ``param_groups`` hold flat fp32 partitions (not the model's
    parameters); the model's parameters per group are in ``bit16_groups`` (ZeRO-1/2) or in ``fp16_groups`` sub-groups
    mapped to their group by ``sub_group_to_group_id`` (ZeRO-3); ``_global_grad_norm`` is the step's gradient norm.
    The step is SGD on the flat copies, written back, like DeepSpeed's, and it frees every ``.grad`` as ZeRO-1/2 do."""

    def __init__(self, groups, lrs, stage3=False):
        self.flat = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in g])) for g in groups]
        self.param_groups = [{"params": [f], "lr": lr, "weight_decay": 0.0} for f, lr in zip(self.flat, lrs)]
        if stage3:  # one sub-group per parameter, mapped back to its group
            self.fp16_groups = [[p] for g in groups for p in g]
            self.sub_group_to_group_id = {i: gi for i, (gi, _) in enumerate((gi, p) for gi, g in enumerate(groups)
                                                                              for p in g)}
        else:
            self.bit16_groups = [list(g) for g in groups]
        self.groups, self._global_grad_norm = groups, None

    def step(self):
        grads = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in g])
                 for g in self.groups]
        self._global_grad_norm = float(torch.cat(grads).norm())
        for g, flat, grad, pg in zip(self.groups, self.flat, grads, self.param_groups):
            with torch.no_grad():
                flat -= pg["lr"] * grad
                offset = 0
                for p in g:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
                    p.grad = None


class _Wrapped:
    """accelerate's DeepSpeedOptimizerWrapper: the ZeRO optimizer as ``.optimizer``, its param_groups passed through."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


@pytest.mark.parametrize("stage3", [False, True], ids=["zero12", "zero3"])
def test_group_index_reads_deepspeed_zero_groups_through_accelerate_wrapper(stage3):
    from trainer_guard.core.audit import group_index

    lin = torch.nn.Linear(3, 2)
    ds = _ZeroLike([[lin.weight], [lin.bias]], lrs=[0.1, 0.0], stage3=stage3)
    index = group_index(_Wrapped(ds))
    assert index[id(lin.weight)].index == 0 and index[id(lin.weight)].lr == 0.1
    assert index[id(lin.bias)].index == 1 and index[id(lin.bias)].lr == 0.0
    assert all(id(f) not in index for f in ds.flat)  # the flat fp32 copies are not model parameters


def _zero_run(model, ds, steps, loss_scale=1.0, every=1):
    run = UpdateAudit(dict(model.named_parameters()), every=every)
    run.baseline()
    found = []
    for _ in range(steps):
        (model(torch.ones(4, 3)).sum() * loss_scale).backward()
        ds.step()
        found += run.step(_Wrapped(ds))
    return run, found


def test_deepspeed_steps_without_signal_are_not_effective():
    """DeepSpeed ZeRO-1/2 free every .grad in their step: a zero global gradient norm (loss times 0: RL rewards all
    zero) is what says the step had no signal. Was: 2 tensors 'not in any optimizer group' at step 1."""
    model = torch.nn.Linear(3, 2)
    ds = _ZeroLike([[model.weight, model.bias]], lrs=[0.1])
    run, found = _zero_run(model, ds, steps=3, loss_scale=0.0)
    assert found == [] and run.silent_steps == 3


def test_deepspeed_zero12_membership_and_unknown_gradient():
    """A ZeRO-1/2 optimizer missing the bias: 'not_in_optimizer' at once. A tensor in a group that does not change
    while the step had signal: its gradient is gone, so the cause is 'no_update' (never 'grad_none': .grad is None
    for every tensor after a ZeRO-1/2 step), after min_grad_steps effective steps."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].weight.register_hook(lambda g: torch.zeros_like(g))  # this one never gets a gradient that moves it
    ds = _ZeroLike([[model[0].weight, model[0].bias, model[1].weight]], lrs=[0.1])
    run, found = _zero_run(model, ds, steps=3)
    causes = [(f.name, f.cause) for f in found]
    assert causes == [("1.bias", "not_in_optimizer"), ("1.weight", "no_update")], causes
    assert "keeps no per-tensor gradient after its step (DeepSpeed ZeRO-1/2)" in found[1].detail
