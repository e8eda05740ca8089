"""``trainer-guard demo``: fine-tune a tiny model on CPU with the default config, checkpoint, resume, reload.

Offline and quick (about 10 s on 2 cores): the model is built from a config (``--model``, default a Llama tied by
hand, field report R1b; see :mod:`trainer_guard.tiny` for the kinds), the data is random token ids. ``--config``
replaces the packaged default config. Prints what each guard did in the first run and in the resumed one, and
whether the resumed and reloaded weights match the trained ones bit for bit; exit code 0 when they all do.

``--output-dir`` must be new or empty: checkpoints of an earlier run would mix with this one's (the resume step
reads ``checkpoint-N``). ``--overwrite`` first removes what an earlier demo wrote there (``checkpoint-N/`` and
``final/``); a directory holding anything else is refused either way, and nothing is deleted then.

Example:
    $ trainer-guard demo
    $ trainer-guard demo --model plain-gpt --config configs/default.yaml --output-dir out/demo
    $ trainer-guard demo --output-dir out/demo --overwrite
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
from typing import Any

from .errors import UsageError
from .files import MODEL_WEIGHTS, checkpoint_dir, checkpoint_name

__all__ = ["configure", "run", "default_config_path"]

_DEMO_OUTPUT = re.compile(r"checkpoint-\d+|final")  # the directories a demo run writes into --output-dir
_SAVE_EVENT = re.compile(r"(checkpoint-\d+|final): ")  # a guard's report line about one save


def __getattr__(name: str) -> Any:
    """``default_config_path`` is re-exported lazily: ``trainer_guard.config`` imports transformers."""
    if name == "default_config_path":
        from .config import default_config_path

        return default_config_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def configure(parser: argparse.ArgumentParser) -> None:
    from .tiny import KINDS

    parser.add_argument("--model", choices=KINDS, default="llama-manual-tie", metavar="KIND",
                        help=f"tiny model kind: {', '.join(KINDS)} (default: llama-manual-tie, a Llama tied by "
                             "hand, field report R1b)")
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="YAML config (default: the packaged default.yaml)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where checkpoints go: a new or empty directory (default: a temporary one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="first remove an earlier demo's checkpoint-N/ and final/ from --output-dir "
                             "(anything else there still refuses the run)")
    parser.add_argument("--steps", type=int, default=6, metavar="N",
                        help="training steps, at least 2 (default 6; a checkpoint every N//2 steps, the resume "
                             "starts from the first)")


def _trainer(model, out, steps, callbacks, ds):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    import trainer_guard

    args = TrainingArguments(output_dir=out, max_steps=steps, save_steps=max(1, steps // 2), per_device_train_batch_size=4,
                             use_cpu=True, report_to=[], logging_steps=1, learning_rate=1e-2, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    wire = getattr(trainer_guard, "guard", None)
    return wire(trainer) if callable(wire) else trainer


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
    earlier = [e for e in entries if _DEMO_OUTPUT.fullmatch(e) and os.path.isdir(os.path.join(path, e))
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


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from .callbacks import GUARDS
    from .config import callbacks_from_yaml, default_config_path
    from .core.ties import find_tied_groups
    from .tiny import tiny_dataset, tiny_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("trainer_guard").setLevel(logging.ERROR)  # the report below says it all
    cfg = args.config or default_config_path()
    callbacks = callbacks_from_yaml(cfg)
    if args.steps < 2:
        raise UsageError(f"--steps {args.steps}: the demo needs at least 2 steps (it resumes from the middle one)")
    if args.output_dir:
        _prepare_output_dir(args.output_dir, overwrite=getattr(args, "overwrite", False))
    out = args.output_dir or tempfile.mkdtemp(prefix="trainer-guard-demo-")
    steps = args.steps
    half = max(1, steps // 2)
    ds = tiny_dataset(n=32, seq_len=16)
    print(f"trainer-guard demo: model={args.model} config={cfg} output={out}")

    print(f"guards: {', '.join(type(c).__name__ for c in callbacks) or '(none enabled)'}")
    off = [cls.__name__ for cls in GUARDS.values() if not any(type(c) is cls for c in callbacks)]
    if off:
        print(f"off in this config: {', '.join(off)}")
    model = tiny_model(args.model)
    groups = find_tied_groups(model)
    print(f"tie groups found by identity: {groups or 'none'}")
    first = _trainer(model, out, steps, callbacks, ds)
    first.train()
    trained = {n: p.detach().clone() for n, p in first.model.named_parameters(remove_duplicate=False)}
    losses = [round(h["loss"], 3) for h in first.state.log_history if "loss" in h]
    print(f"1. trained {steps} steps on random tokens (losses {losses}), "
          f"checkpoints: {sorted(d for d in os.listdir(out) if d.startswith('checkpoint-'))}")

    resumed_cbs = callbacks_from_yaml(cfg)
    second = _trainer(tiny_model(args.model, seed=99), out, steps, resumed_cbs, ds)
    second.train(resume_from_checkpoint=checkpoint_dir(out, half))
    same_resume = all(torch.equal(p, trained[n]) for n, p in second.model.named_parameters(remove_duplicate=False))
    print(f"2. resumed from {checkpoint_name(half)} on a fresh model (other random init): final weights identical to the "
          f"first run: {'yes' if same_resume else 'NO'}")

    final = os.path.join(out, "final")
    second.save_model(final)
    reloaded = _reload(args.model, final)
    got = dict(reloaded.named_parameters(remove_duplicate=False))
    same_reload = got.keys() == trained.keys() and all(torch.equal(got[n], trained[n]) for n in trained)
    tied_ok = find_tied_groups(reloaded) == find_tied_groups(second.model)
    ties = ("yes" if tied_ok else "NO") if groups else ("none to restore" if tied_ok else "NO (reloaded model is tied)")
    print(f"3. saved with save_model() to final/ and reloaded: bit-identical: {'yes' if same_reload else 'NO'}, "
          f"ties restored: {ties}")

    reported = set()
    for title, cbs in (("run 1 (train, checkpoints)", callbacks),
                       (f"run 2 (resume from {checkpoint_name(half)}, train, save_model; other lines as in run 1 not repeated)",
                        resumed_cbs)):
        print(f"what the guards did in {title}:")
        said = False
        for cb in cbs:
            for line in cb.report() if hasattr(cb, "report") else []:
                if (type(cb), line) in reported and not _SAVE_EVENT.match(line):  # a save is news in each run
                    continue
                reported.add((type(cb), line))
                said = True
                head, *rest = line.splitlines() or [""]
                print(f"  [{type(cb).__name__}] {head}")
                for more in rest:
                    print(f"      {more}")
        if not said:
            print("  (nothing new)")
    quiet = [type(cb).__name__ for cb in callbacks if not any(t is type(cb) for t, _ in reported)]
    if quiet:
        print(f"silent (checked and found nothing, or nothing to do in this run): {', '.join(quiet)}")
    ok = same_resume and same_reload and tied_ok
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1
