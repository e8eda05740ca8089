"""``trainer-guard demo``: each pitfall on a tiny model without and with its guard, then a guarded run.

Offline, on CPU: 17 s on a quiet 2-core machine, 25 s on a loaded one (a few of them importing torch,
transformers and peft); a progress line is printed before each part. First, five pitfalls side by side, each run twice on a fresh tiny model (the second time with the
one guard that answers it), one line each, e.g. ``reloaded head == trained head: without the guard False, with it
True``:

1. a Llama whose head is tied by hand while its config says untied: the saved model reloads a random head;
2. a plain ``nn.Module`` with a tied head: the first checkpoint crashes ("Some tensors share memory");
3. a new fp32 head on a bf16 model: step 1 crashes (dtype mismatch);
4. a LoRA run continued without the ``modules_to_save`` it was trained with: a bare "parameter group doesn't match"
   from the optimizer load;
5. a resume from a checkpoint with one flipped bit: training goes on with the corrupted weight.

Then the guarded run: the model of ``--model`` (default a Llama tied by hand; see :mod:`trainer_guard.tiny` for the
kinds) with every guard the default config (or ``--config``) enables, ``--steps`` steps on random token ids,
checkpoints every N//2 steps, a resume from the first one on a fresh model, ``save_model()`` and a reload; it prints
whether the resumed and reloaded weights match the trained ones bit for bit and what each guard did, and ends with
the commands to try next (``trainer-guard doctor DIR/checkpoint-N``, ``trainer-guard diff``). Exit code 0 when every
guarded result is right. ``--no-compare`` skips the side-by-side part.

``--output-dir`` (default: a new temporary directory, kept for those next commands) must be new or empty:
checkpoints of an earlier run would mix with this one's. ``--overwrite`` first removes what an earlier demo wrote
there (``checkpoint-N/`` and ``final/``); a directory holding anything else is refused either way, and nothing is
deleted then. The side-by-side runs write only to temporary directories that are removed when they end.

Example:
    $ trainer-guard demo
    $ trainer-guard demo --model plain-gpt --config configs/default.yaml --output-dir out/demo --no-compare
    $ trainer-guard demo --output-dir out/demo --overwrite
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

from .errors import TrainerGuardError, UsageError
from .files import MODEL_WEIGHTS, checkpoint_dir, checkpoint_name, checkpoints_in, is_checkpoint_name
from .formats.safetensors import read_header

__all__ = ["run", "default_config_path"]

_FINAL = "final"  # where the guarded run's save_model() writes, next to its checkpoint-N directories


def __getattr__(name: str) -> Any:
    """``default_config_path`` is re-exported lazily: ``trainer_guard.config`` imports transformers."""
    if name == "default_config_path":
        from .config import default_config_path

        return default_config_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_save_event(line: str) -> bool:
    """Whether a guard's report line is about one save (it starts with ``checkpoint-N: `` or ``final: ``)."""
    head, sep, _ = line.partition(": ")
    return bool(sep) and (is_checkpoint_name(head) or head == _FINAL)


def _demo_output(name: str) -> bool:
    """Whether a directory entry is one a demo run writes into ``--output-dir``."""
    return is_checkpoint_name(name) or name == _FINAL


def _say(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)  # flushed: a progress line shows before the work it announces


def _trainer(model, out, steps, callbacks, ds, save_steps=None):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    import trainer_guard

    args = TrainingArguments(output_dir=out, max_steps=steps, save_steps=save_steps or max(1, steps // 2),
                             per_device_train_batch_size=4, use_cpu=True, report_to=[], logging_steps=1,
                             learning_rate=1e-2, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer_guard.guard(trainer)


def _reload(kind: str, path: str):
    import safetensors.torch as st

    from .tiny import tiny_model

    if kind == "plain-gpt":
        model = tiny_model(kind, seed=123)
        model.load_state_dict(st.load_file(os.path.join(path, MODEL_WEIGHTS)), strict=False)
        return model
    return type(tiny_model(kind)).from_pretrained(path)  # the class it was saved from (LLaVA is no causal-LM auto class)


def _prepare_output_dir(path: str, overwrite: bool) -> None:
    """Make ``path`` an empty directory for this run, or raise :class:`UsageError` saying why it cannot be one.

    With ``overwrite`` an earlier demo's ``checkpoint-N/`` and ``final/`` are removed, but only when nothing else is
    there: a refused run deletes nothing.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output-dir {path}: is a file; pass a directory (new or empty)")
    try:
        os.makedirs(path, exist_ok=True)
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise UsageError(f"--output-dir {path}: cannot create or read it ({e.strerror or e})") from None
    earlier = [e for e in entries if _demo_output(e) and os.path.isdir(os.path.join(path, e))
               and not os.path.islink(os.path.join(path, e))]
    refused = [e for e in entries if e not in earlier] if overwrite else entries
    if refused:
        shown = ", ".join(refused[:5]) + (", ..." if len(refused) > 5 else "")
        hint = ", or add --overwrite to remove them first" if refused == earlier else ""  # all from an earlier demo
        raise UsageError(f"--output-dir {path}: not empty ({shown}); pass an empty or new directory{hint}")
    for name in earlier:  # only with overwrite: else they were refused above
        try:
            shutil.rmtree(os.path.join(path, name))
        except OSError as e:
            raise UsageError(f"--output-dir {path}: cannot remove {name} of an earlier run ({e.strerror or e})") \
                from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {path}: not writable; pass a directory you can write to")


def run(args: argparse.Namespace) -> int:
    """Run the demo; transformers' verbosity/progress bars and trainer_guard's log level are restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    level = logging.getLogger("trainer_guard").level
    try:
        return _run(args)
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        logging.getLogger("trainer_guard").setLevel(level)


def _short(e: BaseException | str, limit: int = 110) -> str:
    """``Type: first line`` of an exception, the first ``  - `` item of a guard's list when it has one; a note as
    it is."""
    if isinstance(e, str):
        return e
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    item = next((ln[2:] for ln in lines if ln.startswith("- ")), None)
    text = item or (lines[0] if lines else "")
    return f"{type(e).__name__}: {text[:limit] + ' ...' if len(text) > limit else text}"


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``(fn(), None)``, or ``(None, the exception)`` for what a pitfall raises (the demo shows it, not a traceback)."""
    try:
        return fn(), None
    except (RuntimeError, ValueError, KeyError, TrainerGuardError) as e:  # what the Trainer, torch, the guards raise
        return None, e


def _flip_one_bit(path: str, tensor: str) -> None:
    """Flip one bit in the middle of ``tensor``'s bytes in the safetensors file ``path`` (header left intact)."""
    entry = read_header(path).tensors[tensor]  # absolute offsets of the tensor's bytes
    with open(path, "r+b") as f:
        f.seek((entry.begin + entry.end) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def _pitfall_hand_tied_head(tmp, ds):
    import torch
    from transformers import AutoModelForCausalLM

    from .callbacks import TiedWeightsGuard
    from .tiny import tiny_model

    def run(cbs):
        out = tempfile.mkdtemp(dir=tmp)
        trainer = _trainer(tiny_model("llama-manual-tie"), out, 2, cbs, ds)
        trainer.train()
        trainer.save_model(os.path.join(out, _FINAL))
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, _FINAL))
        same = torch.equal(reloaded.lm_head.weight, trainer.model.lm_head.weight)
        return same, None if same else "the save left out lm_head.weight: from_pretrained gave a random head"

    return "train, save_model(), reload: reloaded head == trained head", run([]), run([TiedWeightsGuard()])


def _pitfall_plain_module(tmp, ds):
    from .callbacks import TiedWeightsGuard
    from .tiny import tiny_model

    def run(cbs):
        out = tempfile.mkdtemp(dir=tmp)
        _, err = _attempt(lambda: _trainer(tiny_model("plain-gpt"), out, 2, cbs, ds, save_steps=1).train())
        return err is None and os.path.isdir(checkpoint_dir(out, 1)), err

    return "first checkpoint saved", run([]), run([TiedWeightsGuard()])


def _pitfall_fp32_head(tmp, ds):
    import torch

    from .callbacks import DtypeGuard
    from .tiny import tiny_model

    def run(cbs):
        model = tiny_model("llama-untied").to(torch.bfloat16)
        model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)  # fp32
        trainer, err = _attempt(lambda: _trainer(model, tempfile.mkdtemp(dir=tmp), 2, cbs, ds))
        if err is None:
            _, err = _attempt(trainer.train)
        return err is None, err

    return "training runs", run([]), run([DtypeGuard()])


def _pitfall_lora_resume(tmp, ds):
    from .callbacks import ResumeGuard
    from .tiny import tiny_lora, tiny_model

    out = tempfile.mkdtemp(dir=tmp)
    first = tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"])
    _trainer(first, out, 2, [ResumeGuard()], ds, save_steps=1).train()

    def run(cbs):
        trainer = _trainer(tiny_lora(tiny_model("llama-untied")), out, 2, cbs, ds)  # the default LoRA config
        _, err = _attempt(lambda: trainer.train(resume_from_checkpoint=checkpoint_dir(out, 1)))
        return (err is not None and trainer.state.global_step <= 1 and "doesn't match" not in str(err)), err

    return "stopped before any step, naming what changed", run([]), run([ResumeGuard()])


def _pitfall_bit_flip(tmp, ds):
    from .callbacks import IntegrityGuard
    from .tiny import tiny_model

    out = tempfile.mkdtemp(dir=tmp)
    _trainer(tiny_model("llama-tied"), out, 2, [IntegrityGuard()], ds, save_steps=1).train()
    _flip_one_bit(os.path.join(checkpoint_dir(out, 1), MODEL_WEIGHTS), "model.embed_tokens.weight")

    def run(cbs):
        trainer = _trainer(tiny_model("llama-tied", seed=1), out, 2, cbs, ds)
        _, err = _attempt(lambda: trainer.train(resume_from_checkpoint=checkpoint_dir(out, 1)))
        stopped = err is not None and trainer.state.global_step <= 1
        return stopped, err if err is not None else f"trained on to step {trainer.state.global_step}, nothing said"

    return "resume stopped before training on", run([]), run([IntegrityGuard()])


# (what goes wrong, the guard that answers it, the run): each run returns (question, without guard, with guard),
# each side (answer, exception or None)
_PITFALLS = (
    ("a Llama whose head is tied by hand while its config says untied", "TiedWeightsGuard", _pitfall_hand_tied_head),
    ("a plain nn.Module whose output head is tied to its embedding", "TiedWeightsGuard", _pitfall_plain_module),
    ("a bf16 model given a new nn.Linear head (fp32 by default)", "DtypeGuard", _pitfall_fp32_head),
    ("a LoRA run with embed_tokens/lm_head in modules_to_save, continued with the default LoRA config", "ResumeGuard",
     _pitfall_lora_resume),
    ("a resume from a checkpoint with one flipped bit in model.embed_tokens.weight", "IntegrityGuard",
     _pitfall_bit_flip),
)


def _compare(ds) -> bool:
    """Run each pitfall without and with its guard; print one verdict line each. True when every guarded run did
    the right thing (what the unguarded run does depends on the transformers version, and is only shown)."""
    _say("pitfalls, each run twice on a fresh tiny model: without and with the one guard that answers it")
    ok = True
    with tempfile.TemporaryDirectory(prefix="trainer-guard-demo-pitfalls-") as tmp:
        for i, (title, guard, pitfall) in enumerate(_PITFALLS, 1):
            started = time.perf_counter()
            _say(f"[{i}/{len(_PITFALLS)}] {title} ({guard}) ...", end="")
            question, (without, err_without), (with_, err_with) = pitfall(tmp, ds)
            _say(f" {time.perf_counter() - started:.1f} s")
            _say(f"      {question}: without the guard {without}, with it {with_}")
            for who, err in (("without", err_without), ("with", err_with)):
                if err is not None:
                    _say(f"        {who + ':':8s} {_short(err)}")
            ok = ok and with_
    return ok


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.steps < 2:
        raise UsageError(f"--steps {args.steps}: the demo needs at least 2 steps (it resumes from the middle one)")
    if args.output_dir:
        _prepare_output_dir(args.output_dir, overwrite=getattr(args, "overwrite", False))
    compare = not getattr(args, "no_compare", False)
    _say("trainer-guard demo: tiny models on CPU, offline"
         + (": each pitfall without and with its guard, then a guarded run" if compare else ""))
    started = time.perf_counter()
    _say("loading torch, transformers and peft ...", end="")
    import torch
    from transformers.utils import logging as hf_logging

    from .callbacks import GUARDS
    from .config import callbacks_from_yaml, default_config_path
    from .core.ties import find_tied_groups
    from .tiny import tiny_dataset, tiny_model

    if compare:
        import peft  # noqa: F401  (loaded here, so that the progress line says where the time goes)
    _say(f" {time.perf_counter() - started:.1f} s")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("trainer_guard").setLevel(logging.ERROR)  # the report below says it all
    cfg = args.config or default_config_path()
    callbacks = callbacks_from_yaml(cfg)
    ds = tiny_dataset(n=32, seq_len=16)
    ok = True
    if compare:
        with warnings.catch_warnings():  # the libraries' deprecation notices are not what this demo shows
            warnings.simplefilter("ignore")
            ok = _compare(ds)
        _say()
    out = args.output_dir or tempfile.mkdtemp(prefix="trainer-guard-demo-")
    steps = args.steps
    half = max(1, steps // 2)
    _say(f"guarded run: model={args.model} config={cfg} output={out}")
    _say(f"guards: {', '.join(type(c).__name__ for c in callbacks) or '(none enabled)'}")
    off = [cls.__name__ for cls in GUARDS.values() if not any(type(c) is cls for c in callbacks)]
    if off:
        _say(f"off in this config: {', '.join(off)}")
    model = tiny_model(args.model)
    groups = find_tied_groups(model)
    _say(f"tie groups found by identity: {groups or 'none'}")
    _say(f"1. training {steps} steps on random tokens ...", end="")
    first = _trainer(model, out, steps, callbacks, ds)
    first.train()
    trained = {n: p.detach().clone() for n, p in first.model.named_parameters(remove_duplicate=False)}
    losses = [round(h["loss"], 3) for h in first.state.log_history if "loss" in h]
    checkpoints = checkpoints_in(out)
    _say(f" losses {losses}, checkpoints: {checkpoints}")

    _say(f"2. resuming from {checkpoint_name(half)} on a fresh model (other random init) ...", end="")
    resumed_cbs = callbacks_from_yaml(cfg)
    second = _trainer(tiny_model(args.model, seed=99), out, steps, resumed_cbs, ds)
    second.train(resume_from_checkpoint=checkpoint_dir(out, half))
    same_resume = all(torch.equal(p, trained[n]) for n, p in second.model.named_parameters(remove_duplicate=False))
    _say(f" final weights identical to the first run: {'yes' if same_resume else 'NO'}")

    _say("3. saving with save_model() to final/ and reloading ...", end="")
    final = os.path.join(out, _FINAL)
    second.save_model(final)
    reloaded = _reload(args.model, final)
    got = dict(reloaded.named_parameters(remove_duplicate=False))
    same_reload = got.keys() == trained.keys() and all(torch.equal(got[n], trained[n]) for n in trained)
    tied_ok = find_tied_groups(reloaded) == find_tied_groups(second.model)
    ties = ("yes" if tied_ok else "NO") if groups else ("none to restore" if tied_ok else "NO (reloaded model is tied)")
    _say(f" bit-identical: {'yes' if same_reload else 'NO'}, ties restored: {ties}")

    reported = set()
    for title, cbs in (("run 1 (train, checkpoints)", callbacks),
                       (f"run 2 (resume from {checkpoint_name(half)}, train, save_model; other lines as in run 1 not repeated)",
                        resumed_cbs)):
        _say(f"what the guards did in {title}:")
        said = False
        for cb in cbs:
            for line in cb.report() if hasattr(cb, "report") else []:
                if (type(cb), line) in reported and not _is_save_event(line):  # a save is news in each run
                    continue
                reported.add((type(cb), line))
                said = True
                head, *rest = line.splitlines() or [""]
                _say(f"  [{type(cb).__name__}] {head}")
                for more in rest:
                    _say(f"      {more}")
        if not said:
            _say("  (nothing new)")
    quiet = [type(cb).__name__ for cb in callbacks if not any(t is type(cb) for t, _ in reported)]
    if quiet:
        _say(f"silent (checked and found nothing, or nothing to do in this run): {', '.join(quiet)}")
    ok = ok and same_resume and same_reload and tied_ok
    _say(f"demo: {'OK' if ok else 'FAILED'} ({time.perf_counter() - started:.0f} s)")
    last = os.path.join(out, checkpoints[-1]) if checkpoints else out
    _say("next, check a checkpoint and see what changed between two:")
    _say(f"  trainer-guard doctor {last}")
    if len(checkpoints) > 1:
        _say(f"  trainer-guard diff {os.path.join(out, checkpoints[0])} {last}")
    if not args.output_dir:
        _say(f"  (remove {out} when done)")
    return 0 if ok else 1
