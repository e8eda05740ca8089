"""Fault campaign of issue 16 ("How it is checked"): faults injected into fresh copies of real Trainer checkpoints of
several model kinds, each resumed with the default guards and checked with ``trainer-guard doctor``.

A run per model kind (:func:`train`, 4 steps, a checkpoint every 2) gives ``checkpoint-2`` (the one damaged and
resumed from) and ``checkpoint-4`` (the "other checkpoint" whose copy of a file is swapped in, and the reference:
the weights an uninterrupted run ends with). :func:`faults_for` lists every fault for the files a kind's checkpoint
holds; :func:`run_fault` applies one to a copy and says how the resume ended (:class:`Outcome`).
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

import trainer_guard
from trainer_guard.errors import TrainerGuardError
from trainer_guard.files import MANIFEST_FILE

KINDS = ("llama-tied", "qwen2-bf16-untied", "lora-mts", "llama-3-shard")
DAMAGED = "checkpoint-2"
OTHER = "checkpoint-4"
SHARD_SIZE = "40KB"  # the tiny Llama (~0.1 MB in fp32) saved in 3 shards


def build_model(kind: str):
    """A fresh model of ``kind`` (fixed seed)."""
    import transformers as tf

    from trainer_guard.tiny import tiny_lora, tiny_model

    if kind == "llama-tied":
        return tiny_model("llama-tied")
    if kind == "qwen2-bf16-untied":
        torch.manual_seed(0)
        cfg = tf.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             tie_word_embeddings=False)
        return tf.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    if kind == "lora-mts":
        return tiny_lora(tiny_model("llama-untied"), modules_to_save=["embed_tokens", "lm_head"])
    if kind == "llama-3-shard":
        model = tiny_model("llama-untied")
        save = type(model).save_pretrained

        def save_sharded(*args, **kw):  # the Trainer passes no max_shard_size: the same call, in 3 shards
            kw["max_shard_size"] = SHARD_SIZE
            return save(model, *args, **kw)

        model.save_pretrained = save_sharded
        return model
    raise ValueError(kind)


def args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, use_cpu=True,
                report_to=[], logging_steps=1, learning_rate=1e-2, seed=0, save_strategy="steps", disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def train(out, kind: str, resume=None, **kw):
    """Train ``kind`` for 4 steps (a checkpoint every 2) with the default guards; return the Trainer."""
    from transformers import Trainer

    from trainer_guard.tiny import tiny_dataset

    trainer = Trainer(model=build_model(kind), args=args(out, **kw), train_dataset=tiny_dataset(16, 16, 128),
                      callbacks=trainer_guard.callbacks_from_yaml())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------- faults

def _delete(path, other):
    os.remove(path)


def _truncate(path, other):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path, other):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _swap(path, other):
    shutil.copyfile(other, path)


BASIC = {"delete": _delete, "truncate": _truncate, "flip": _flip, "swap": _swap}


def _edit_json(fn: Callable[[dict], None]):
    def apply(path, other):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        fn(data)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    return apply


def _step(d):
    d["global_step"] = 4


def _rank(d):
    d["r"] = d["r"] * 2


def _drop_target(d):
    d["target_modules"] = sorted(d["target_modules"])[1:]


def _manifest_value(d):
    d["files"]["optimizer.pt"]["size"] += 1


@dataclass(frozen=True)
class Fault:
    """``how`` (delete, truncate, flip, swap, or an edit) applied to ``file`` (relative to the checkpoint)."""

    file: str
    how: str
    apply: Callable

    @property
    def name(self) -> str:
        return f"{self.how}:{self.file}"


def _same_bytes(a: str, b: str) -> bool:
    return os.path.isfile(b) and filecmp.cmp(a, b, shallow=False)


def faults_for(ckpt: str, other: str) -> list[Fault]:
    """Every fault for the files checkpoint ``ckpt`` holds (the interrupted save is :func:`run_interrupted`). A swap
    with ``other``'s copy is a fault only where the bytes differ (``rng_state.pth``, ``training_args.bin``, configs
    and the shard index are the same at every step of these runs: swapping them changes nothing)."""
    names = sorted(os.listdir(ckpt))
    targets = [n for n in names if n in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin",
                                         "adapter_config.json", MANIFEST_FILE)
               or n.startswith("rng_state") or n.endswith((".safetensors", ".index.json"))
               or (n.startswith("trainer_guard_") and n.endswith(".json"))]
    shards = [n for n in targets if re.fullmatch(r".+-\d{5}-of-\d{5}\.safetensors", n)]
    targets = [n for n in targets if n not in shards[:1] + shards[2:]]  # one shard of a sharded model: the middle
    out = []
    for n in targets:
        if n.startswith("trainer_guard_") and n != MANIFEST_FILE:
            out.append(Fault(n, "truncate", _truncate))  # the guard's own records
            continue
        out += [Fault(n, how, fn) for how, fn in BASIC.items()
                if how != "swap" or not _same_bytes(os.path.join(ckpt, n), os.path.join(other, n))]
        if n == "trainer_state.json":
            out.append(Fault(n, "edit-global_step", _edit_json(_step)))
        if n == "adapter_config.json":
            out += [Fault(n, "edit-r", _edit_json(_rank)), Fault(n, "drop-target", _edit_json(_drop_target))]
        if n == MANIFEST_FILE:
            out.append(Fault(n, "edit-value", _edit_json(_manifest_value)))
    return out


# ----------------------------------------------------------------------------------------------------- outcomes

@dataclass
class Outcome:
    """How one fault ended: ``ending`` is ``stopped`` (a TrainerGuardError naming the file on its first line),
    ``unnamed`` (a TrainerGuardError whose first line does not name it), ``raw`` (any other exception),
    ``identical`` (trained on into the reference weights), ``diverged`` (trained on into other weights) or
    ``fallback`` (resumed from the previous complete checkpoint, said in a warning); ``doctor`` its exit code."""

    kind: str
    fault: str
    ending: str
    doctor: int
    message: str = ""

    def __str__(self) -> str:
        first = self.message.split("\n", 1)[0][:300]
        return f"{self.kind} {self.fault}: {self.ending}, doctor {self.doctor}" + (f" ({first})" if first else "")


def doctor(path) -> int:
    """``trainer-guard doctor <path>`` in process; its exit code."""
    from trainer_guard.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main(["doctor", str(path)])
        except SystemExit as e:
            return int(e.code or 0)


def _resume(out, kind, resume, reference, file_named: str | None) -> tuple[str, str]:
    try:
        trainer = train(out, kind, resume=resume, save_strategy="no")
    except TrainerGuardError as e:
        first = str(e).split("\n", 1)[0]
        return ("stopped" if file_named is None or file_named in first else "unnamed"), str(e)
    except Exception as e:  # noqa: BLE001 - what the campaign looks for
        return "raw", f"{type(e).__module__}.{type(e).__name__}: {e}"
    return ("identical" if same_weights(weights(trainer.model), reference) else "diverged"), ""


def run_fault(base, kind: str, fault: Fault, work, reference) -> Outcome:
    """Apply ``fault`` to ``checkpoint-2`` of a copy of ``base`` (in ``work``), resume from it, run the doctor."""
    out = shutil.copytree(base, work)
    ckpt = os.path.join(out, DAMAGED)
    fault.apply(os.path.join(ckpt, fault.file), os.path.join(out, OTHER, fault.file))
    rc = doctor(ckpt)
    ending, message = _resume(out, kind, ckpt, reference, fault.file)
    return Outcome(kind, fault.name, ending, rc, message)


def interrupt(ckpt: str, keep: int) -> None:
    """What a kill -9 in the middle of the Trainer's save leaves in ``ckpt``: no manifest, and of the files the
    Trainer writes in place (in its order) the first ``keep``, the last of them half written."""
    os.remove(os.path.join(ckpt, MANIFEST_FILE))
    order = ["optimizer.pt", "scheduler.pt"] + sorted(f for f in os.listdir(ckpt) if f.startswith("rng_state")) + [
        "trainer_state.json"]
    order += sorted(f for f in os.listdir(ckpt) if f.startswith("trainer_guard_"))
    for i, name in enumerate(order):
        path = os.path.join(ckpt, name)
        if not os.path.exists(path):
            continue
        if i >= keep:
            os.remove(path)
        elif i == keep - 1:
            _truncate(path, None)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_interrupted(base, kind: str, work, reference, keep: int) -> Outcome:
    """``checkpoint-4`` half written (:func:`interrupt`, no manifest); ``resume_from_checkpoint=True`` must fall back
    to checkpoint-2 with a WARNING naming checkpoint-4, and train into the reference weights."""
    out = shutil.copytree(base, work)
    newest = os.path.join(out, OTHER)
    interrupt(newest, keep=keep)
    rc = doctor(newest)
    handler, logger = _Warnings(), logging.getLogger("trainer_guard")
    logger.addHandler(handler)
    try:
        ending, message = _resume(out, kind, True, reference, None)
    finally:
        logger.removeHandler(handler)
    warned = [w for w in handler.lines if w.split("] ", 1)[-1].startswith(f"{newest} skipped: ")]
    if ending == "identical" and warned:
        ending, message = "fallback", warned[0]
    elif ending == "identical":
        ending = "identical, no warning"
    return Outcome(kind, f"interrupted-after-{keep}-files:{OTHER}", ending, rc, message)


class Campaign:
    """The campaign's runs, each made once and shared: :meth:`trained` (a kind's run: its output dir and final
    weights) and :meth:`outcomes` (every fault of a kind, :func:`faults_for` and the interrupted saves of ``keeps``)."""

    def __init__(self, root, keeps=(0, 2, 4)):
        self.root = os.fspath(root)
        self.keeps = keeps
        self._trained: dict[str, tuple[str, dict]] = {}
        self._outcomes: dict[str, list[Outcome]] = {}

    def trained(self, kind: str) -> tuple[str, dict[str, torch.Tensor]]:
        if kind not in self._trained:
            base = os.path.join(self.root, kind, "out")
            self._trained[kind] = (base, weights(train(base, kind).model))
        return self._trained[kind]

    def outcomes(self, kind: str) -> list[Outcome]:
        if kind not in self._outcomes:
            base, reference = self.trained(kind)
            work = os.path.join(self.root, kind, "faults")
            faults = faults_for(os.path.join(base, DAMAGED), os.path.join(base, OTHER))
            done = [run_fault(base, kind, f, os.path.join(work, str(i)), reference) for i, f in enumerate(faults)]
            done += [run_interrupted(base, kind, os.path.join(work, f"i{k}"), reference, k) for k in self.keeps]
            for i in range(len(faults)):  # the copies are done with
                shutil.rmtree(os.path.join(work, str(i)), ignore_errors=True)
            self._outcomes[kind] = done
        return self._outcomes[kind]
