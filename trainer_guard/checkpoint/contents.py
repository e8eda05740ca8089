"""Every file a checkpoint holds: listed (size, checksum of its bytes) when a save is committed, checked before a
resume and by ``trainer-guard doctor``. The manifest, written last and atomically, is the checkpoint's commit mark.

A manifest of version 2 (:func:`commit`) lists every file of its directory, recursively (adapter sub-directories, FSDP's
``pytorch_model_fsdp_0/`` and ``optimizer_0/`` with their ``.metadata``, DeepSpeed's ``global_step<N>/``, shard index, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``, ``trainer_state.json``,
``training_args.bin``, configs, trainer_guard's own records), except itself, hidden files other than a DCP
``.metadata`` (temp files of writes in progress) and ``README.md`` (a model card, never loaded). A ``.safetensors`` file whose tensors the manifest
records is listed with the checksum of its header (its data is covered by the per-tensor checksums: the tensors
tile the data area); every other file with the checksum of all its bytes
(:func:`trainer_guard.checksum.disk.bytes_checksums`, every core). A ``"digest"`` of the manifest's own content
says whether it was edited. Version 1 manifests (tensors only) are read and checked as before.

A model directory (``trainer.save_model(dir)``: no ``trainer_state.json``, not named ``checkpoint-N``) lists its own
files and its PEFT adapter sub-directories only (an ``output_dir`` also holds the checkpoints and logs).

Pure functions: no Trainer, no ranks.

Example:
    >>> import tempfile, os, torch
    >>> from trainer_guard.checkpoint.manifest import build_manifest
    >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "optimizer.pt"), "wb").write(b"state")
    >>> m = commit(d, build_manifest({"w": torch.ones(2)}, global_step=None, tie_groups=[]))
    >>> m["version"], sorted(m["files"]), check_files(d, m)
    (2, ['optimizer.pt'], [])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..checksum.disk import bytes_checksums, file_checksums
from ..errors import ChecksumError, SafetensorsFormatError, UsageError
from ..files import (MANIFEST_FILE, TRAINER_STATE, adapter_subdirs, checkpoint_name, checkpoint_step, checkpoints_in,
                     is_checkpoint_name)
from ..formats.dcp import DCP_METADATA
from ..formats.safetensors import file_problem, read_header
from ..text import human_bytes
from .manifest import WHOLE_VERSION, compare, entries, index_entries, read_manifest

__all__ = [
    "NOT_LISTED",
    "FileProblem",
    "is_checkpoint",
    "listing",
    "describe_files",
    "digest",
    "commit",
    "is_whole",
    "check_files",
    "snapshot",
    "stale_files",
    "uncommit",
    "remove_stale",
    "interrupted_save",
    "committed_sibling",
]

NOT_LISTED = ("README.md",)
"""File names never listed: a model card is written and rewritten after saves (push_to_hub) and never loaded."""


class FileProblem(NamedTuple):
    """One file of a checkpoint that is not what its manifest lists: ``file`` (relative path), ``kind``
    (``missing``, ``size``, ``changed``, ``extra``, ``unreadable``, ``step``) and a ``message`` that names the file
    and what changed."""

    file: str
    kind: str
    message: str





def is_checkpoint(directory: str | os.PathLike) -> bool:
    """A ``Trainer`` checkpoint (named ``checkpoint-N`` or holding a ``trainer_state.json``), not a model directory."""
    directory = os.fspath(directory)
    return is_checkpoint_name(os.path.basename(os.path.normpath(directory))) or os.path.isfile(
        os.path.join(directory, TRAINER_STATE))


def _hidden(name: str) -> bool:
    """Temp files of writes in progress, editor and OS files; never a DCP directory's ``.metadata`` (its index)."""
    return name.startswith(".") and name != DCP_METADATA


def listing(directory: str | os.PathLike) -> list[str]:
    """The files a manifest of ``directory`` lists (``/``-separated paths relative to it, sorted): every file,
    recursively for a checkpoint; for a model directory its own files and its PEFT adapter sub-directories. Never
    the directory's own manifest, hidden files, ``README.md``, nor ``checkpoint-N`` sub-directories."""
    directory = os.fspath(directory)
    whole = is_checkpoint(directory)
    adapters = set(adapter_subdirs(directory))
    out = []
    for root, dirs, files in os.walk(directory):
        rel_root = os.path.relpath(root, directory)
        top = rel_root == "."
        dirs[:] = sorted(d for d in dirs if not _hidden(d) and not is_checkpoint_name(d)
                         and (not top or whole or d in adapters))
        for f in files:
            if _hidden(f) or f in NOT_LISTED or (top and f == MANIFEST_FILE):
                continue
            if not os.path.isfile(os.path.join(root, f)):  # a link that cannot be followed: named by the checks
                continue
            out.append(f if top else f"{rel_root}/{f}".replace(os.sep, "/"))
    return sorted(out)


def describe_files(directory: str | os.PathLike, manifest: Mapping[str, Any], *,
                   threads: int | None = None,
                   known: Mapping[str, tuple[int, int]] | None = None) -> dict[str, dict[str, Any]]:
    """``files`` of a version 2 manifest for ``directory``: each file of :func:`listing` with its ``size`` and
    ``checksum`` (all its bytes), or, for a ``.safetensors`` file whose tensors ``manifest`` records, ``tensors``
    (their count) and ``header`` (the checksum of its header: the tensors' own checksums cover the data).
    ``known``: relative path -> ``(size, checksum)`` already computed (each rank's own shard files, checksummed by
    that rank), taken as they are when the file still has that size.

    Raises:
        ChecksumError: a file vanished or is unreadable while it was read (naming it).
    """
    directory = os.fspath(directory)
    counts: dict[str, int] = {}
    for e in manifest.get("tensors", {}).values():
        counts[e.get("file")] = counts.get(e.get("file"), 0) + 1
    out: dict[str, dict[str, Any]] = {}
    lengths: dict[str, int] = {}
    paths: dict[str, str] = {}
    known = known or {}
    for rel in listing(directory):
        path = os.path.join(directory, *rel.split("/"))
        try:
            out[rel] = {"size": os.path.getsize(path)}
            if rel in counts:
                lengths[path] = read_header(path).data_start
                out[rel]["tensors"] = counts[rel]
        except (OSError, SafetensorsFormatError) as e:
            raise ChecksumError(f"{path}: unreadable while the manifest was written ({e})") from None
        if rel not in counts and rel in known and known[rel][0] == out[rel]["size"]:
            out[rel]["checksum"] = f"{known[rel][1]:016x}"
            continue
        paths[rel] = path
    sums = bytes_checksums(list(paths.values()), lengths=lengths, threads=threads)
    for rel, path in paths.items():
        out[rel]["header" if path in lengths else "checksum"] = f"{sums[path]:016x}"
    return out


def digest(manifest: Mapping[str, Any]) -> str:
    """The manifest's own checksum: 64-bit BLAKE2b of its canonical JSON without the ``digest`` key (16 hex)."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(body.encode("utf-8"), digest_size=8).hexdigest()


def commit(directory: str | os.PathLike, manifest: Mapping[str, Any], *, threads: int | None = None,
           known: Mapping[str, tuple[int, int]] | None = None) -> dict:
    """``manifest`` (tensors, ties, step: :func:`~trainer_guard.checkpoint.manifest.build_manifest`) made a version 2
    manifest of the whole of ``directory`` as it is now: every file listed (:func:`describe_files`; ``known``: the
    checksums of files already computed, e.g. by the ranks that wrote them), and its ``digest``. Call it when
    everything else of the save is written; write the result last."""
    m = dict(manifest)
    m["version"] = WHOLE_VERSION
    m["files"] = describe_files(directory, manifest, threads=threads, known=known)
    m["digest"] = digest(m)
    return m


def is_whole(manifest: Mapping[str, Any] | None) -> bool:
    """Whether ``manifest`` lists every file of its directory (version 2), not the weights only (version 1)."""
    return bool(manifest) and manifest.get("version", 1) >= WHOLE_VERSION


def _read_step(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        return state.get("global_step") if isinstance(state, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def _copied_from(directory: str, rel: str, info: Mapping[str, Any], size: int, checksum: int | None,
                 tensor_sums: Mapping[str, int] | None) -> str | None:
    """The sibling ``checkpoint-M`` whose manifest records this same file content under ``rel``, else ``None``."""
    if not is_checkpoint_name(os.path.basename(os.path.normpath(directory))):
        return None
    for other, m in _committed_siblings(directory):
        e = m.get("files", {}).get(rel)
        if not isinstance(e, dict) or e.get("size") != size:
            continue
        if checksum is not None and e.get("checksum") == f"{checksum:016x}":
            return other
        if tensor_sums and "header" in e:
            theirs = {k: int(t["checksum"], 16) for k, t in m["tensors"].items() if t.get("file") == rel}
            if theirs and theirs == dict(tensor_sums):
                return other
    return None


def _sub_tensors(directory: str, rel: str, threads: int | None) -> str:
    """``": tensor data of <names>"`` for a ``.safetensors`` file of a sub-directory whose own manifest records its
    tensors (a PEFT adapter's), else ``""``."""
    sub, name = os.path.split(rel)
    if not sub or not name.endswith(".safetensors"):
        return ""
    try:
        m = read_manifest(os.path.join(directory, sub))
        got = file_checksums(os.path.join(directory, *rel.split("/")), threads=threads)
    except (UsageError, ChecksumError):
        return ""
    bad = sorted(k for k, e in (m or {}).get("tensors", {}).items() if e.get("file") == name
                 and got.get(k) != int(e["checksum"], 16))
    if not bad:
        return ""
    return ": tensor data of " + ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def _tensors_gone(path: str, rel: str, manifest: Mapping[str, Any]) -> str:
    """``"; no longer holds <tensor>, ..."`` for a safetensors file whose header still reads, else ``""``."""
    try:
        now = set(read_header(path).tensors)
    except (OSError, SafetensorsFormatError):
        return ""
    gone = sorted(k for k, e in manifest.get("tensors", {}).items() if e.get("file") == rel and k not in now)
    if not gone:
        return ""
    return "; no longer holds " + ", ".join(gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")


def _changed(rel: str, why: str, copied: str | None) -> str:
    src = f"; it is {copied}'s copy of it" if copied else ""
    return f"{rel} changed since the checkpoint was saved ({why}{src})"


def check_files(directory: str | os.PathLike, manifest: Mapping[str, Any], *, data: bool = True,
                extras: bool = True, threads: int | None = None,
                known: Mapping[str, tuple[int, int]] | None = None) -> list[FileProblem]:
    """Every file of ``directory`` that is not what the version 2 ``manifest`` lists: missing, another size, other
    bytes (a safetensors file: its header, and with ``data`` its tensors against the manifest's checksums), and with
    ``extras`` a file the manifest does not list (written after the save, or copied in). A changed file that a
    sibling ``checkpoint-M`` records is named as its copy. ``trainer_state.json`` must be at the manifest's step.
    ``known``: relative path -> ``(size, checksum)`` of files already read elsewhere (each rank its own shard
    files), used as they are when the file still has that size. Empty for a version 1 manifest (weights only:
    :func:`~trainer_guard.checkpoint.verify.file_changes`)."""
    if not is_whole(manifest):
        return []
    directory = os.fspath(directory)
    files: dict[str, dict[str, Any]] = manifest.get("files", {})
    out: list[FileProblem] = []
    whole_todo: dict[str, str] = {}
    header_todo: dict[str, str] = {}
    lengths: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for rel, info in files.items():
        path = os.path.join(directory, *rel.split("/"))
        try:
            size = os.path.getsize(path)
        except OSError:
            out.append(FileProblem(rel, "missing", f"{rel} is missing (the save wrote {info.get('size', 0):,} "
                                                   f"bytes)"))
            continue
        sizes[rel] = size
        if "size" in info and size != info["size"]:
            how = "emptied: " if size == 0 else "truncated: " if size < info["size"] else ""
            what = _tensors_gone(path, rel, manifest) if "header" in info else ""
            step = _read_step(path) if rel == TRAINER_STATE else None
            if step is not None and step != manifest.get("global_step"):
                how = f"global_step {manifest.get('global_step')} -> {step}; " + how
            out.append(FileProblem(rel, "size", _changed(rel, f"{how}size {info['size']:,} -> {size:,} bytes{what}",
                                                         None)))
            continue
        if "checksum" in info:
            whole_todo[rel] = path
        elif "header" in info:
            header_todo[rel] = path
            try:
                lengths[path] = read_header(path).data_start
            except (OSError, SafetensorsFormatError) as e:
                out.append(FileProblem(rel, "changed", _changed(rel, f"its header is damaged: "
                                                                     f"{getattr(e, 'brief', e)}", None)))
                header_todo.pop(rel)
    done = {path: known[rel][1] for rel, path in whole_todo.items()
            if known and rel in known and known[rel][0] == sizes[rel]}
    todo = [p for p in {**whole_todo, **header_todo}.values() if p not in done]
    try:
        sums = {**bytes_checksums(todo, lengths=lengths, threads=threads), **done}
    except ChecksumError as e:
        return out + [FileProblem("?", "unreadable", str(e))]
    for rel, path in whole_todo.items():
        if sums[path] != int(files[rel]["checksum"], 16):
            copied = _copied_from(directory, rel, files[rel], sizes[rel], sums[path], None)
            why = f"same size, {sizes[rel]:,} bytes, other bytes" + _sub_tensors(directory, rel, threads)
            if rel == TRAINER_STATE:
                step = _read_step(path)
                if step != manifest.get("global_step"):
                    why = f"global_step {manifest.get('global_step')} -> {step}"
            out.append(FileProblem(rel, "changed", _changed(rel, why, copied)))
    recorded = entries(manifest)
    for rel, path in header_todo.items():
        if sums[path] != int(files[rel]["header"], 16):
            out.append(FileProblem(rel, "changed", _changed(rel, "its header: tensor names, dtypes, shapes or "
                                                                 "offsets", None)))
            continue
        if not data:
            continue
        try:
            got = file_checksums(path, threads=threads)
        except ChecksumError as e:
            out.append(FileProblem(rel, "changed", _changed(rel, str(e), None)))
            continue
        expected = {k: e for k, e in recorded.items() if manifest["tensors"][k].get("file") == rel}
        bad = compare(expected, index_entries({k: _Info(e["dtype"], e["shape"]) for k, e in expected.items()
                                               if k in got}, got), actual_label="file")
        if bad:
            copied = _copied_from(directory, rel, files[rel], sizes[rel], None, got)
            names = ", ".join(m.name for m in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            out.append(FileProblem(rel, "changed", _changed(rel, f"tensor data of {names}", copied)))
    if extras:
        for rel in sorted(set(listing(directory)) - set(files)):
            out.append(FileProblem(rel, "extra", f"{rel} is not part of the checkpoint: its manifest does not list "
                                                 f"it (written after the save, or copied in)"))
    step = manifest.get("global_step")
    state = os.path.join(directory, TRAINER_STATE)
    if step is not None and TRAINER_STATE in files and not any(p.file == TRAINER_STATE for p in out):
        got = _read_step(state)
        if got is not None and got != step:  # a file identical to the save's own says another step: impossible
            out.append(FileProblem(TRAINER_STATE, "step", f"{TRAINER_STATE} says global_step {got}, the manifest "
                                                          f"step {step}"))
    named = checkpoint_step(directory)
    if step is not None and named is not None and named != step and is_checkpoint_name(os.path.basename(
            os.path.normpath(directory))):  # first: the other files are not to blame, the manifest is
        out.insert(0, FileProblem(MANIFEST_FILE, "step", f"{MANIFEST_FILE} is the manifest of step {step}, but this "
                                                         f"is {checkpoint_name(named)}: it was copied from another "
                                                         f"checkpoint (the files differ from it because of that)"))
    return out


class _Info(NamedTuple):
    dtype: str
    shape: tuple


def snapshot(directory: str | os.PathLike) -> dict[str, tuple[int, int, int]]:
    """``rel path -> (inode, mtime_ns, size)`` of every file :func:`listing` finds in ``directory`` (``{}`` when it
    does not exist): taken before a save writes into a directory that is already there."""
    directory = os.fspath(directory)
    out = {}
    if not os.path.isdir(directory):
        return out
    for rel in listing(directory):
        try:
            st = os.stat(os.path.join(directory, *rel.split("/")))
        except OSError:
            continue
        out[rel] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def stale_files(directory: str | os.PathLike, before: Mapping[str, tuple[int, int, int]]) -> list[str]:
    """The files of ``directory`` the save did not write: still exactly as the :func:`snapshot` ``before`` it saw
    them (same inode, modification time and size), left by an earlier (interrupted) save into the same directory."""
    now = snapshot(directory)
    return sorted(rel for rel, sig in before.items() if now.get(rel) == sig)


def uncommit(directory: str | os.PathLike) -> dict[str, tuple[int, int, int]]:
    """Before a save writes into ``directory`` again: remove its manifests (the commit mark of what is about to be
    overwritten; a save interrupted now must not look complete) and return the :func:`snapshot` of its files."""
    directory = os.fspath(directory)
    for where in [directory, *(os.path.join(directory, d) for d in adapter_subdirs(directory))]:
        try:
            os.remove(os.path.join(where, MANIFEST_FILE))
        except OSError:  # none there; or not removable, then the new one's write fails and says so
            pass
    return snapshot(directory)


def remove_stale(directory: str | os.PathLike, before: Mapping[str, tuple[int, int, int]]) -> list[str]:
    """Remove the :func:`stale_files` of ``directory`` (an earlier save's files the new save did not write, which a
    resume would load with it) and empty sub-directories they leave; return their names."""
    directory = os.fspath(directory)
    stale = stale_files(directory, before) if before else []
    for rel in stale:
        path = os.path.join(directory, *rel.split("/"))
        try:
            os.remove(path)
            parent = os.path.dirname(path)
            while parent != directory and not os.listdir(parent):
                os.rmdir(parent)
                parent = os.path.dirname(parent)
        except OSError:  # then the manifest lists it: named as not written by the save by every check
            continue
    return stale


def _committed_siblings(directory: str):
    """``(name, manifest)`` of the other ``checkpoint-M`` beside ``directory`` that hold a whole-checkpoint manifest,
    newest first (unreadable manifests passed over)."""
    parent, me = os.path.split(os.path.normpath(directory))
    for other in reversed(checkpoints_in(parent)):
        if other == me:
            continue
        try:
            m = read_manifest(os.path.join(parent, other))
        except UsageError:
            continue
        if is_whole(m):
            yield other, m


def _reference(directory: str) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """The newest other committed checkpoint beside ``directory`` and its file list (what a complete save writes)."""
    return next(((other, m["files"]) for other, m in _committed_siblings(directory)), None)


def committed_sibling(directory: str | os.PathLike) -> str | None:
    """The name of the newest other ``checkpoint-N`` beside ``directory`` with a manifest of the whole checkpoint
    (the run saved with IntegrityGuard), else ``None``."""
    ref = _reference(os.fspath(directory))
    return ref[0] if ref else None


def _whole_json(directory: str, rel: str) -> bool:
    """Whether ``rel`` is a JSON file that parses: written whole (its size follows the step, as
    ``trainer_state.json``'s log history does, so a smaller one than a later checkpoint's says nothing)."""
    if not rel.endswith(".json"):
        return False
    try:
        with open(os.path.join(directory, *rel.split("/")), encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, ValueError, RecursionError):
        return False


def interrupted_save(directory: str | os.PathLike) -> str | None:
    """For a ``checkpoint-N`` directory without a manifest: a sentence saying its save was interrupted and how far it
    got (``"interrupted save (no commit mark; optimizer.pt 0.17 MB of 0.35 MB as in checkpoint-2; no
    trainer_state.json)"``), or ``None`` when nothing says so (every file a committed sibling checkpoint lists is
    there, at least as big, or a JSON file that parses: ``trainer_state.json`` grows with the step; or, with no
    committed sibling, the ``trainer_state.json`` the ``Trainer`` writes last).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory) or os.path.isfile(os.path.join(directory, MANIFEST_FILE)):
        return None
    have = {rel: os.path.getsize(os.path.join(directory, *rel.split("/"))) for rel in listing(directory)}
    ref = _reference(directory)
    parts = []
    if ref is not None:
        other, files = ref
        for rel, info in files.items():
            if rel in have and have[rel] < info.get("size", 0) and not _whole_json(directory, rel):
                parts.append(f"{rel} {human_bytes(have[rel], digits=2)} of {human_bytes(info['size'], digits=2)} "
                             f"as in {other}")
        missing = [rel for rel in files if rel not in have and rel != MANIFEST_FILE and "/" not in rel]
        if missing:
            parts.append("no " + ", ".join(missing))
    elif TRAINER_STATE not in have:  # the Trainer writes it last
        parts.append(f"no {TRAINER_STATE}, which the Trainer writes last")
    else:
        return None
    broken = [rel for rel in have if rel.endswith(".safetensors")
              and file_problem(os.path.join(directory, *rel.split("/"))) is not None]
    parts += [f"{rel} unreadable" for rel in broken if not any(p.startswith(rel + " ") for p in parts)]
    if not parts:  # every file a complete save writes is there: maybe saved without IntegrityGuard
        return None
    return f"interrupted save (no commit mark {MANIFEST_FILE}; " + "; ".join(parts) + ")"
