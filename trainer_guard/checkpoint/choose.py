"""Which checkpoint a resume may load: the whole checkpoint checked before anything loads, and, for
``resume_from_checkpoint=True``, the newest complete, verified one.

A checkpoint is complete when its manifest (the commit mark, written last) is there and every file is what it lists
(:func:`~trainer_guard.checkpoint.contents.check_files`: sizes, checksums of every byte, no file it does not list,
``trainer_state.json`` at its step). A checkpoint saved without IntegrityGuard (no manifest beside it either) gets
the checks that need none: its ``trainer_state.json`` and JSON records parse, its weights' headers read. Problems
are sentences that begin with the file they name. Pure functions: no Trainer, no ranks.

Example:
    >>> import tempfile
    >>> newest_complete(tempfile.mkdtemp())
    Choice(path=None, skipped=[], problems=[])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from ..errors import DamagedFileError, IntegrityError, UsageError
from ..files import (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, MANIFEST_FILE, TRAINER_STATE, adapter_subdirs,
                     checkpoints_in)
from ..core.io import read_json
from ..formats.dcp import dcp_problems, read_dcp_index
from ..formats.safetensors import file_problem, safetensors_files
from .contents import check_files, digest, interrupted_save, is_whole, listing
from .manifest import read_manifest
from .sharded import dcp_dirs
from .verify import file_changes

__all__ = ["Choice", "Picked", "resume_problems", "newest_complete", "resume_error", "any_committed",
           "candidate", "pick_checkpoint"]


class Choice(NamedTuple):
    """What :func:`newest_complete` found: ``path`` (``None``: none is complete, or there is none), ``skipped``
    (``(checkpoint, why)`` of each newer one passed over) and, with no ``path``, each checkpoint's ``problems``."""

    path: str | None
    skipped: list[tuple[str, str]]
    problems: list[tuple[str, list[str]]]


def any_committed(output_dir: str | os.PathLike) -> bool:
    """Whether any ``checkpoint-N`` of ``output_dir`` has a manifest (the run saved with IntegrityGuard)."""
    output_dir = os.fspath(output_dir)
    return any(os.path.isfile(os.path.join(output_dir, d, MANIFEST_FILE)) for d in checkpoints_in(output_dir))


def _weights_in(ckpt: str) -> bool:
    names = set(os.listdir(ckpt))
    return bool(safetensors_files(ckpt) or names & {ADAPTER_WEIGHTS_BIN, "pytorch_model.bin",
                                                     "pytorch_model.bin.index.json"} or adapter_subdirs(ckpt)
                or any(n.startswith("pytorch_model_fsdp") for n in names))


def _readable(ckpt: str) -> list[str]:
    """The checks that need no manifest: ``trainer_state.json`` is there, every JSON file parses, every
    ``.safetensors`` header reads, an FSDP checkpoint's DCP metadata reads and its chunks lie in their files, there
    are weights."""
    out = []
    if not os.path.isfile(os.path.join(ckpt, TRAINER_STATE)):
        out.append(f"{TRAINER_STATE} is missing (the Trainer writes it last: the save did not finish)")
    if not _weights_in(ckpt):
        out.append(f"the model weights are missing: no model.safetensors, {ADAPTER_WEIGHTS} or shard of them")
    for d in dcp_dirs(ckpt):  # FSDP SHARDED_STATE_DICT: its .metadata reads (safely) and every chunk is in its file
        try:
            out += [f"{d}/{p}" for p in dcp_problems(os.path.join(ckpt, d), read_dcp_index(os.path.join(ckpt, d)))]
        except IntegrityError as e:
            out.append(str(e).replace(ckpt + os.sep, ""))
    for rel in listing(ckpt):
        path = os.path.join(ckpt, *rel.split("/"))
        if rel.endswith(".safetensors"):
            problem = file_problem(path)
            if problem:
                out.append(f"{rel} is damaged: {problem.removeprefix(path + ': ').removeprefix(rel + ': ')}")
        elif rel.endswith(".json"):
            try:
                read_json(path)
            except DamagedFileError as e:
                out.append(f"{rel} is damaged: not valid JSON ({e.reason})")
            except OSError as e:
                out.append(f"{rel} is unreadable ({e.strerror or e})")
    return out


def resume_problems(ckpt: str | os.PathLike, *, committed: bool | None = None,
                    known: Mapping[str, tuple[int, int]] | None = None) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of checkpoint ``ckpt`` before a resume loads anything from it.

    ``committed``: whether the run saved its checkpoints with IntegrityGuard (default: whether any checkpoint beside
    ``ckpt`` has a manifest); a checkpoint without a manifest whose files say its save was interrupted is a problem
    either way, one without a manifest only a warning (its files are checked for readability). ``known``: files of
    ``ckpt`` already checksummed by the ranks that read them (:func:`~trainer_guard.checkpoint.contents.check_files`).
    """
    ckpt = os.fspath(ckpt)
    if not os.path.isdir(ckpt):
        return [f"{ckpt} does not exist"], []
    try:
        manifest = read_manifest(ckpt)
    except UsageError as e:
        return [f"{MANIFEST_FILE} is unusable: {e}"], []
    if manifest is None:
        why = interrupted_save(ckpt)
        if why:
            return [why], []
        found = _readable(ckpt)
        if found:
            return found, []
        if committed is None:
            committed = any_committed(os.path.dirname(os.path.normpath(ckpt)))
        if committed:
            return [f"no commit mark ({MANIFEST_FILE}): its save was interrupted before it was written, or it was "
                    f"saved without IntegrityGuard"], []
        return [], [f"{ckpt} has no {MANIFEST_FILE}: only checked that its files read"]
    if not is_whole(manifest):  # version 1: the weights' sizes now, their checksums after the load
        found = _readable(ckpt) + [c.message for c in file_changes(ckpt, manifest) if c.kind != "newer"]
        return found, []
    if digest(manifest) != manifest["digest"].lower().zfill(16):
        return [f"{MANIFEST_FILE} does not match its own digest: it was edited or corrupted after the save, so it "
                f"cannot vouch for the files"], []
    return [p.message for p in check_files(ckpt, manifest, known=known)], []


def newest_complete(output_dir: str | os.PathLike, *, fallback: bool = True,
                    known: Mapping[str, Mapping[str, tuple[int, int]]] | None = None) -> Choice:
    """The newest ``checkpoint-N`` of ``output_dir`` that :func:`resume_problems` finds nothing wrong with; each newer
    one is skipped, with why. With ``fallback=False`` the newest is the only candidate. ``Choice(None, [], [])``
    when there is no checkpoint at all (the Trainer says so itself). ``known``: checkpoint path -> its files already
    checksummed elsewhere."""
    output_dir = os.fspath(output_dir)
    names = list(reversed(checkpoints_in(output_dir)))
    committed = any(os.path.isfile(os.path.join(output_dir, d, MANIFEST_FILE)) for d in names)
    skipped: list[tuple[str, str]] = []
    tried: list[tuple[str, list[str]]] = []
    for name in names:
        ckpt = os.path.join(output_dir, name)
        problems, _ = resume_problems(ckpt, committed=committed, known=(known or {}).get(ckpt))
        if not problems:
            return Choice(ckpt, skipped, [])
        tried.append((ckpt, problems))
        if not fallback:
            break
        skipped.append((ckpt, problems[0]))
    return Choice(None, skipped, tried)


def _rewritten(ckpt: str, problems: list[str]) -> list[str]:
    """The named files changed since the save that were written after the manifest (a later save into the same
    directory, without IntegrityGuard)."""
    mpath = os.path.join(ckpt, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        return []
    written = os.path.getmtime(mpath)
    try:
        weights = {f for f, i in (read_manifest(ckpt) or {}).get("files", {}).items() if "tensors" in i}
    except UsageError:
        return []
    out = []
    for p in problems:
        rel = p.split(" ", 1)[0]
        fp = os.path.join(ckpt, *rel.split("/"))
        if rel in weights and " changed since " in p and os.path.isfile(fp) and os.path.getmtime(fp) > written:
            out.append(rel)
    return out


def resume_error(ckpt: str, problems: list[str], *, fallback_note: str = "") -> str:
    """One message for a checkpoint a resume must not load: the first line names the file (with the checkpoint's
    path) and what changed, then what to do, then any further problems."""
    first = problems[0]
    named = first.split(" ", 1)[0]
    head = (os.path.join(ckpt, first) if os.path.lexists(os.path.join(ckpt, named)) or " is missing" in first
            else f"{ckpt}: {first}")
    todo = (f"Stopped before loading anything from it. Resume from an earlier checkpoint{fallback_note}, or restore "
            f"the file(s) from a copy; `trainer-guard doctor {ckpt}` lists everything it finds.")
    lines = [f"{head}.", todo]
    rewritten = _rewritten(ckpt, problems)
    if rewritten:
        lines.append(f"{', '.join(rewritten)} in {ckpt} changed after its {MANIFEST_FILE} was written: if a later run "
                     f"(without IntegrityGuard) saved into this same checkpoint directory, the manifest is that "
                     f"earlier save's; delete it and resume again.")
    if len(problems) > 1:
        lines.append("Also:\n  - " + "\n  - ".join(problems[1:]))
    return "\n".join(lines)


class Picked(NamedTuple):
    """What :func:`pick_checkpoint` decided: ``path`` (``None``: keep what was asked), ``error`` (the one message to
    stop with, or ``None``) and ``warnings`` (each skipped checkpoint, named, and why)."""

    path: str | None
    error: str | None
    warnings: list[str]


def candidate(output_dir: str | os.PathLike, resume: object) -> str | None:
    """The checkpoint ``train(resume_from_checkpoint=resume)`` tries first: the path given, or for ``True`` the
    newest ``checkpoint-N`` of ``output_dir`` (``None``: there is none)."""
    if resume is True:
        names = checkpoints_in(output_dir)
        return os.path.join(os.fspath(output_dir), names[-1]) if names else None
    return os.fspath(resume)


def pick_checkpoint(output_dir: str | os.PathLike, resume: object, *, fallback: bool = True,
                    known: Mapping[str, tuple[int, int]] | None = None) -> Picked:
    """The checkpoint ``train(resume_from_checkpoint=resume)`` may load, checked before anything loads: for
    ``True`` the newest complete one of ``output_dir`` (:func:`newest_complete`), for a path that one. ``known``:
    files of the :func:`candidate` checkpoint already checksummed by the ranks that wrote them."""
    output_dir = os.fspath(output_dir)
    first = candidate(output_dir, resume)
    if resume is True:
        if not checkpoints_in(output_dir):
            return Picked(None, None, [])  # the Trainer's own "No valid checkpoint found"
        c = newest_complete(output_dir, fallback=fallback, known={first: known} if first and known else None)
        if c.path:
            note = " (IntegrityGuard(fallback=False) stops instead)"
            return Picked(c.path, None, [f"{ck} skipped: {why}; resuming from {c.path}, the newest complete, "
                                         f"verified checkpoint{note}" for ck, why in c.skipped])
        if not fallback:
            ckpt, problems = c.problems[0]
            return Picked(None, resume_error(ckpt, problems, fallback_note=" (IntegrityGuard(fallback=True) resumes "
                                             "from the newest complete one)"), [])
        lines = "\n  - ".join(f"{ck}: {probs[0]}" for ck, probs in c.problems)
        return Picked(None, f"No complete, verified checkpoint in {output_dir}; stopped before loading anything. Each "
                            f"one, newest first:\n  - {lines}\nRestore the damaged files from a copy, or start "
                            f"without resume_from_checkpoint; `trainer-guard doctor <checkpoint>` lists everything.",
                      [])
    ckpt = os.fspath(resume)
    problems, warnings = resume_problems(ckpt, committed=False, known=known)  # by name: a missing mark is no stop
    return Picked(None, resume_error(ckpt, problems) if problems else None, warnings)
