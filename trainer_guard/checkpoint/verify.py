"""One weight directory checked on disk, without a model: its ``.safetensors`` files, shard indexes and manifest.

:func:`verify_directory` is what ``trainer-guard doctor`` reports (doctor adds the model-free checks of ties, heads,
adapters and dtypes, and owns the formatting and exit codes); :func:`file_changes` is the one test of whether the
files a manifest lists are still what it described, used by :func:`verify_directory` and by the resume check
(:func:`trainer_guard.core.checkpoint.rewritten_since`). Findings are sentences naming the file or tensor, sorted
into ``problems`` (the checkpoint is damaged), ``warnings``, ``unusable`` (input that cannot be checked) and
``passed``.

Example:
    >>> import tempfile
    >>> verify_directory(tempfile.mkdtemp()).findings.unusable[0].message.endswith("no *.safetensors weights in this directory")
    True
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..checksum.disk import dcp_checksums, file_checksums
from ..checksum.spec import CHECKSUM_ALGO, fingerprint
from ..errors import ChecksumError, ForeignManifestError, IntegrityError, MalformedManifestError, UsageError
from ..files import (MANIFEST_FILE, TRAINER_STATE, checkpoints_in, duplicate_hint, fsdp_model_dirs,
                     is_checkpoint_name, state_file)
from ..formats.safetensors import INDEX_SUFFIX, TensorInfo, file_problem, index_files, is_uint, safetensors_files
from .contents import check_files, committed_sibling, digest, interrupted_save, is_whole
from ..formats.dcp import read_dcp_index, dcp_problems
from .manifest import compare, entries, foreign_reason, index_entries, read_manifest
from .sharded import dcp_dirs, sharded_layout, tensor_infos
from .stored import read_index

__all__ = [
    "Finding",
    "Findings",
    "Verification",
    "FileChange",
    "verify_directory",
    "file_changes",
    "files_changed",
    "broken_links",
    "snapshots_in",
    "read_json_finding",
    "adapter_config_problems",
    "verify_checkpoint",
    "PROGRESS_BYTES",
]

PROGRESS_BYTES = 256 * 1024 * 1024
"""Files at least this big get a progress bar while they are checksummed."""


@dataclass
class Finding:
    """One result line: ``check`` (which check), ``message`` (a full sentence naming the tensor/file)."""

    check: str
    message: str


@dataclass
class Findings:
    """Every finding about directory ``path``, by kind, and a ``summary`` of what was read."""

    path: str
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    unusable: list[Finding] = field(default_factory=list)
    passed: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Verification(NamedTuple):
    """What :func:`verify_directory` found: the ``findings``, the files' tensor ``index`` (headers), file ``sizes``
    and the ``manifest`` (``None`` when there is none or it is unreadable)."""

    findings: Findings
    index: dict[str, TensorInfo]
    sizes: dict[str, int]
    manifest: dict[str, Any] | None


class FileChange(NamedTuple):
    """A file a manifest lists that is no longer what it described: ``kind`` ``"missing"``, ``"size"`` (``size``
    bytes now, ``recorded`` in the manifest) or ``"newer"`` (written after the manifest file)."""

    file: str
    kind: str
    size: int | None = None
    recorded: int | None = None

    @property
    def message(self) -> str:
        if self.kind == "missing":
            return f"{self.file} is missing"
        if self.kind == "size":
            return f"{self.file} is {self.size:,} bytes, the manifest recorded {self.recorded:,}"
        return f"{self.file} was written after the manifest"


def file_changes(directory: str | os.PathLike, manifest: dict[str, Any]) -> list[FileChange]:
    """Each weight file ``manifest`` lists that is missing, of another size, or written after the manifest file in
    ``directory`` (in the manifest's order; empty when none). The other files of a manifest of the whole directory
    are :func:`~trainer_guard.checkpoint.contents.check_files`'s."""
    directory = os.fspath(directory)
    mpath = os.path.join(directory, MANIFEST_FILE)
    written = os.path.getmtime(mpath) if os.path.isfile(mpath) else None
    whole = is_whole(manifest)
    out = []
    for fname, info in (manifest.get("files") or {}).items():
        if whole and isinstance(info, dict) and "tensors" not in info:  # not a weight file: check_files' job
            continue
        try:
            st = os.stat(os.path.join(directory, fname))
        except OSError:
            out.append(FileChange(fname, "missing"))
            continue
        if isinstance(info, dict) and info.get("size") not in (None, st.st_size):
            out.append(FileChange(fname, "size", st.st_size, info["size"]))
        elif written is not None and st.st_mtime > written:
            out.append(FileChange(fname, "newer", st.st_size))
    return out


def files_changed(directory: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, str]:
    """File name -> why, for each of :func:`file_changes` (in the manifest's order; empty when none).

    Example:
        >>> import tempfile
        >>> files_changed(tempfile.mkdtemp(), {"files": {"model.safetensors": {"size": 8}}})
        {'model.safetensors': 'model.safetensors is missing'}
    """
    return {c.file: c.message for c in file_changes(directory, manifest)}


def verify_directory(path: str | os.PathLike, findings: Findings | None = None, *, progress: bool = False,
                     no_manifest_ok: bool = False, files: bool = True) -> Verification:
    """Check the weight directory ``path`` on disk: every ``.safetensors`` header, tensors stored twice, shard
    indexes, then every stored tensor against the manifest (checksums read from the files), and, for a manifest of
    the whole directory (version 2), every other file it lists (size, checksum), files it does not list, its own
    digest and its step. A ``checkpoint-N`` directory without a manifest whose save was interrupted says so
    (:func:`~trainer_guard.checkpoint.contents.interrupted_save`). Never raises for bad input: it becomes an
    ``unusable`` finding. Findings are added to ``findings`` when given.

    ``no_manifest_ok``: a directory without a manifest is a warning, not unusable input. ``files``: check the files
    other than the weights (``False`` for an adapter sub-directory whose checkpoint's manifest lists them).
    """
    path = os.fspath(path)
    findings = Findings(path) if findings is None else findings
    interrupted = interrupted_save(path) if is_checkpoint_name(os.path.basename(os.path.normpath(path))) else None
    if interrupted:
        findings.problems.append(Finding("manifest", interrupted))
    unusable = len(findings.unusable)
    index, sizes = _check_files(path, findings)
    if interrupted:  # "no weights here" is what an interrupted save leaves: said above
        findings.unusable[unusable:] = [f for f in findings.unusable[unusable:] if "no *.safetensors" not in f.message]
        return Verification(findings, index, sizes, None)
    manifest = _check_manifest(path, index, findings, progress, no_manifest_ok, files)
    return Verification(findings, index, sizes, manifest)


def read_json_finding(path: str, report: Findings, what: str) -> dict | None:
    """The JSON object in ``path``; ``None`` when there is none, or (with an ``unusable`` finding of check ``what``
    added to ``report``) when it is unreadable or not an object."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = (e.strerror or e) if isinstance(e, OSError) else e
        report.unusable.append(Finding(what, f"{os.path.basename(path)}: unreadable ({why})"))
        return None
    except RecursionError:
        report.unusable.append(Finding(what, f"{os.path.basename(path)}: unreadable (JSON nested too deeply)"))
        return None


def snapshots_in(path: str) -> list[str]:
    """``snapshots/<revision>`` of a Hugging Face cache entry (``models--org--name/``): what holds its files."""
    snaps = os.path.join(path, "snapshots")
    if not os.path.isdir(snaps) or not os.path.isdir(os.path.join(path, "blobs")):
        return []
    return sorted(os.path.join("snapshots", d) for d in os.listdir(snaps) if os.path.isdir(os.path.join(snaps, d)))


_LINK_SUFFIXES = (".safetensors", ".json")  # the files doctor and diff read


def broken_links(path: str) -> dict[str, str]:
    """Name -> message for each symbolic link among the weight and JSON files of directory ``path`` that cannot be
    followed: a Hugging Face cache snapshot (``snapshots/<sha>/`` links into ``../../blobs/``) copied without its
    blobs, a blob removed from the cache, a link loop."""
    out = {}
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return out
    for name in names:
        fp = os.path.join(path, name)
        if not name.endswith(_LINK_SUFFIXES) or not os.path.islink(fp):
            continue
        try:
            os.stat(fp)
        except OSError as e:
            try:
                target = os.readlink(fp)
            except OSError:  # pragma: no cover - removed meanwhile
                target = "?"
            out[name] = (f"{name}: a symbolic link to {target} that cannot be followed ({e.strerror or e}): a copy of "
                         f"a Hugging Face cache snapshot without the blobs its links point to (copy with `cp -rL`), "
                         f"or an interrupted download; copy or download it again")
    return out


_SHARD = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.safetensors")


def _check_sharded(path: str, report: Findings) -> dict[str, TensorInfo]:
    """The tensors of an FSDP checkpoint's DCP model directories (``.metadata`` read safely), and what is wrong with
    their files (a data file missing, a chunk past its end); a DeepSpeed ZeRO checkpoint's rank files are checked
    by the manifest, by their bytes."""
    indexes = {}
    for d in dcp_dirs(path):
        try:
            indexes[d] = read_dcp_index(os.path.join(path, d))
        except IntegrityError as e:
            report.problems.append(Finding("files", str(e).replace(path + os.sep, "")))
            continue
        report.problems.extend(Finding("files", f"{d}/{p}") for p in dcp_problems(os.path.join(path, d), indexes[d]))
    if len(indexes) < len(fsdp_model_dirs(path)):  # a damaged or missing .metadata: no index to trust
        return {}
    try:
        return tensor_infos(indexes)
    except IntegrityError:  # one name in two directories: no index to trust
        return {}


def _check_files(path: str, report: Findings) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    files = safetensors_files(path)
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in files}
    broken = broken_links(path)
    report.unusable.extend(Finding("files", msg) for msg in broken.values())
    sharded = sharded_layout(path)
    if sharded:
        report.summary["sharded"] = sharded
    if not files and not sharded and not any(b.endswith(".safetensors") for b in broken):  # else the link is it
        other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")) and "model" in f]
        hint = f" (found {', '.join(sorted(other))}: the doctor reads safetensors only)" if other else ""
        if not hint and checkpoints_in(path):
            hint = f" (it holds {', '.join(checkpoints_in(path))}: pass one of those)"
        elif not hint and snapshots_in(path):
            hint = (f" (a Hugging Face cache entry: pass one of its snapshots, {', '.join(snapshots_in(path))})")
        report.unusable.append(Finding("files", f"{path}: no *.safetensors weights in this directory{hint}"))
    unusable_before = len(report.unusable)
    index: dict[str, TensorInfo] = _check_sharded(path, report) if sharded == "fsdp" else {}
    twice: dict[tuple[str, str], list[str]] = {}  # (earlier file, later file) -> the tensors both hold
    for f in files:
        try:
            problem = file_problem(os.path.join(path, f))
        except OSError as e:  # permissions, a vanished file, an I/O error
            problem = f"{f}: unreadable ({e.strerror or e})"
        if problem is None:
            try:
                for k, info in read_index(os.path.join(path, f)).items():
                    if k in index:
                        twice.setdefault((index[k].file, f), []).append(k)
                    index[k] = info
                continue
            except IntegrityError as e:
                problem = str(e)
        report.unusable.append(Finding("files", problem))
    if files and not index and len(report.unusable) == unusable_before:  # every file read, none holds a tensor
        report.unusable.append(Finding("files", (
            f"{', '.join(files)}: no tensors stored (a safetensors header only): there are no weights to check or "
            f"load; save the model again")))
    _report_twice(path, twice, sizes, report)
    _report_unindexed_shards(path, sizes, report)
    for idx in index_files(path):
        data = read_json_finding(os.path.join(path, idx), report, "files") or {}
        by_file: dict[str, list[str]] = {}
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if "weight_map" in data and (not isinstance(weight_map, dict)
                                     or not all(isinstance(v, str) for v in weight_map.values())):
            report.unusable.append(Finding("files", f"{idx}: 'weight_map' is not a mapping of tensor names to files"))
            continue
        single = idx.removesuffix(".index.json")
        if single in sizes:  # from_pretrained loads model.safetensors and never reads its index
            listed = sorted(set((weight_map or {}).values()))
            if listed and not any(s in sizes for s in listed):  # with its shards present, _report_twice named them
                report.warnings.append(Finding("files", (
                    f"{idx}: left over from an earlier sharded save (its {len(listed)} shard(s) are gone; "
                    f"save_pretrained removes old shards but not their index): from_pretrained loads {single} and "
                    f"ignores it, but other loaders may read the index first; delete it")))
            continue
        for name, shard in (weight_map or {}).items():
            by_file.setdefault(shard, []).append(name)
        read_files = {i.file for i in index.values()}  # once, not once per shard (shards x tensors)
        for shard, names in sorted(by_file.items()):
            if shard in broken:  # named as a link that cannot be followed
                continue
            if shard not in sizes:
                report.problems.append(Finding("files", f"{shard}: listed in {idx} ({len(names)} tensors, e.g. "
                                                        f"{sorted(names)[0]}) but missing"))
            elif shard in read_files:
                for name in sorted(n for n in names if n not in index):
                    report.problems.append(Finding("files", f"{name}: {idx} puts it in {shard}, which lacks it"))
    return index, sizes


def _report_unindexed_shards(path: str, sizes: dict[str, int], report: Findings) -> None:
    """Shards of a sharded save (``model-00001-of-00003.safetensors``) with neither their index nor the single file:
    ``from_pretrained`` and the Trainer's resume look for ``model.safetensors`` or ``model.safetensors.index.json``
    and find no weights at all."""
    groups: dict[str, list[str]] = {}
    for f in sizes:
        m = _SHARD.fullmatch(f)
        if m:
            groups.setdefault(m.group(1), []).append(f)
    for prefix, shards in sorted(groups.items()):
        idx, single = f"{prefix}{INDEX_SUFFIX}", f"{prefix}.safetensors"
        if os.path.lexists(os.path.join(path, idx)) or single in sizes:
            continue
        total = int(_SHARD.fullmatch(shards[0]).group(3))
        report.problems.append(Finding("files", (
            f"{idx}: missing, but {len(shards)} shard(s) of {total} are here ({', '.join(sorted(shards)[:3])}"
            f"{', ...' if len(shards) > 3 else ''}): from_pretrained and a resume find no weights without it; copy "
            f"the index from where the shards came from, or save the model again")))


def _report_twice(path: str, twice: dict[tuple[str, str], list[str]], sizes: dict[str, int],
                  report: Findings) -> None:
    """One finding per stale copy: tensors stored in two files (an earlier save's file left next to a newer one)."""
    grouped: dict[tuple[str, str | None], list[tuple[str, list[str]]]] = {}
    for (a, b), names in twice.items():
        hint = duplicate_hint(path, a, b)
        if hint is None:
            report.problems.extend(Finding("files", f"{k}: stored twice, in {a} and {b}") for k in names)
            continue
        kept, idx, _ = hint
        other = b if kept == a else a
        grouped.setdefault((kept, idx or other), []).append((other, names))
    for (kept, key), parts in sorted(grouped.items()):
        names = sorted(n for _, ns in parts for n in ns)
        others = sorted(o for o, _ in parts)
        if key in others:  # a file no index lists
            report.problems.append(Finding("files", (
                f"{key}: holds {len(names)} tensor(s) that {kept} holds too (e.g. {names[0]}), and no shard index "
                f"lists it: from_pretrained loads {kept} only and ignores it. Left over from an earlier save? "
                f"Delete it")))
            continue
        mtime = os.path.getmtime
        newer = ", which were written after it" if max(mtime(os.path.join(path, o)) for o in others) > mtime(
            os.path.join(path, kept)) else ""
        report.problems.append(Finding("files", (
            f"{kept} and the shard(s) of {key} ({', '.join(others)}) both hold {len(names)} tensors (e.g. "
            f"{names[0]}): from_pretrained loads {kept} and ignores the shards{newer}. save_pretrained with "
            f"max_shard_size leaves an earlier {kept} in place: if the shards are the latest save, delete {kept}; "
            f"otherwise delete {key} and its shards")))


def _check_manifest(path: str, index: dict[str, TensorInfo], report: Findings, progress: bool,
                    no_manifest_ok: bool, files: bool = True) -> dict | None:

    try:
        manifest = read_manifest(path)
    except MalformedManifestError as e:  # corrupted or hand-edited: no tensor can be checked against it
        report.unusable.append(Finding("manifest", e.named(MANIFEST_FILE, e.what)))
        return None
    except ForeignManifestError as e:  # another tool's file under our name
        report.unusable.append(Finding("manifest", f"foreign manifest: {e}"))
        return None
    except UsageError as e:  # a newer version, unreadable: the message names the file and the fix
        report.unusable.append(Finding("manifest", str(e)))
        return None
    if manifest is None and not index and not sharded_layout(path):  # no weights read: already said, with what to pass
        return None
    if manifest is None:
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):  # a Trainer checkpoint: on_save writes one
            how = "train with IntegrityGuard in the Trainer's callbacks to get one"
        else:  # a final trainer.save_model()/save_pretrained output: no callback event fires for it
            how = ("for a trainer.save_model() output, wire the Trainer with trainer = trainer_guard.guard(trainer) "
                   "next to IntegrityGuard to get one")
        rest = "" if no_manifest_ok else "; --no-manifest-ok checks the rest of a directory saved without it"
        sibling = committed_sibling(path) if is_checkpoint_name(os.path.basename(os.path.normpath(path))) else None
        if sibling:  # the run saved with IntegrityGuard: this one lost its commit mark
            how = (f"no commit mark, though {sibling} beside it has one: its manifest was deleted, or the save "
                   f"stopped just before writing it; nothing vouches for its files")
        msg = f"{MANIFEST_FILE}: missing, so the tensors could not be verified ({how}{rest})"
        (report.warnings if no_manifest_ok else report.unusable).append(Finding("manifest", msg))
        return None
    recorded = entries(manifest)
    report.summary["manifest"] = {"global_step": manifest.get("global_step"), "tensors": len(recorded),
                                  "algo": manifest.get("algo"), "versions": manifest.get("versions", {})}
    if manifest.get("partitions"):  # ZeRO-3 without gathered weights: recorded from the live partitions
        report.summary["manifest"]["partitions"] = len(manifest["partitions"])
    if manifest.get("algo") != CHECKSUM_ALGO:
        report.unusable.append(Finding("manifest", f"{MANIFEST_FILE}: checksum {manifest.get('algo')!r} is not this "
                                                   f"version's {CHECKSUM_ALGO!r}; upgrade trainer_guard to verify it"))
        return manifest
    intact = int(manifest.get("fingerprint", "0"), 16) == fingerprint(  # read_manifest checked both are 64-bit
        {k: e["checksum"] for k, e in recorded.items()})
    if not intact:
        report.unusable.append(Finding("manifest", f"{MANIFEST_FILE}: its fingerprint does not match its own tensor "
                                                   f"entries: the manifest was edited or corrupted"))
        return manifest
    if is_whole(manifest) and digest(manifest) != manifest["digest"].lower().zfill(16):
        report.unusable.append(Finding("manifest", f"{MANIFEST_FILE}: does not match its own digest: the manifest was "
                                                   f"edited or corrupted after the save, so it cannot vouch for the "
                                                   f"files; re-save the checkpoint, or resume from an earlier one"))
        return manifest
    state_path = state_file(path)  # its own, or checkpoint-N/<adapter>/'s checkpoint's
    state = read_json_finding(state_path, report, "manifest") if state_path else None
    step = manifest.get("global_step")
    if state and step is not None and state.get("global_step") not in (None, step):
        report.unusable.append(Finding("manifest", f"foreign manifest: {MANIFEST_FILE} is for step {step} but "
                                                   f"{os.path.relpath(state_path, path)} says step "
                                                   f"{state['global_step']}: it was "
                                                   f"copied from another checkpoint"))
        return manifest
    usable = {i.file for i in index.values()}
    listed = sorted(f for f, info in manifest.get("files", {}).items() if "tensors" in info)
    if listed and usable and not any(os.path.isfile(os.path.join(path, f)) for f in listed):
        report.unusable.append(Finding("manifest", f"foreign manifest: it describes {', '.join(listed)}, none of which "
                                                   f"is here (this directory holds {', '.join(sorted(usable))})"))
        return manifest
    skip_files = {f for f, i in manifest.get("files", {}).items() if "tensors" in i and f not in usable}  # unreadable
    changed: set[str] = set()  # files of the recorded size whose bytes changed since the save: damaged in place
    if is_whole(manifest):
        weights = {f for f, i in manifest["files"].items() if "tensors" in i}
        for p in check_files(path, manifest, data=False, extras=files):
            if p.kind == "changed":
                changed.add(p.file)
            if p.file in weights and p.kind in ("missing", "size"):
                continue  # said below, as for a manifest of the weights only
            if files or p.file in weights or p.kind == "step":
                report.problems.append(Finding("files", p.message))
    for change in sorted(file_changes(path, manifest)):  # a later write alone is no finding: the checksums decide
        if change.kind == "missing":
            n = manifest["files"][change.file].get("tensors", "?")
            report.problems.append(Finding("manifest", f"{change.file}: listed in the manifest ({n} tensors) but "
                                                       f"missing"))
        elif change.kind == "size":
            report.problems.append(Finding("manifest", f"{change.file}: {change.size} bytes, the manifest recorded "
                                                       f"{change.recorded}"))
    expected = {k: e for k, e in recorded.items() if manifest["tensors"][k].get("file") not in skip_files}
    sums: dict[str, int] = {}
    for fname in sorted(usable):
        fp = os.path.join(path, fname)
        if os.path.isdir(fp):  # an FSDP DCP directory: tensors assembled from their chunks, one at a time
            try:
                sums.update(dcp_checksums(fp))
            except ChecksumError as e:  # its metadata read: a chunk that does not load is damage, not foreign input
                report.problems.append(Finding("tensors", str(e).replace(path + os.sep, "")))
            continue
        try:
            sums.update(file_checksums(fp, progress=progress and os.path.getsize(fp) >= PROGRESS_BYTES))
        except ChecksumError as e:
            report.unusable.append(Finding("files", str(e)))
    actual = index_entries({k: i for k, i in index.items() if k in sums}, sums)
    mismatches = compare(expected, actual)
    foreign = foreign_reason(manifest, mismatches, len(actual))
    damaged = sorted(f for f in changed if any(f == u or f.startswith(u + "/") for u in usable))
    if foreign and damaged:  # names read from a file damaged in place (a flipped bit): not another model's manifest
        report.problems.append(Finding("tensors", f"the tensors could not be compared with the manifest: their names "
                                                  f"are read from {', '.join(damaged)}, which changed since the "
                                                  f"checkpoint was saved; restore it from a copy, or resume from an "
                                                  f"earlier checkpoint"))
    elif foreign:
        report.unusable.append(Finding("manifest", f"foreign manifest: {foreign}"))
    else:
        report.problems.extend(Finding("tensors", m.message) for m in mismatches)
    if not mismatches and actual:  # nothing readable to compare is no pass (the unusable findings say why)
        report.passed.append(Finding("tensors", f"{len(actual)} tensors match the manifest (step {step})"))
    return manifest


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")
_PEFT_PREFIX = "base_model.model."


def _pattern_rank(module: str, pattern: dict[str, Any], default: Any) -> Any:
    """PEFT's rank for ``module``: the ``rank_pattern`` entry whose pattern ends the module's name, else ``default``."""
    for p, r in pattern.items():
        try:
            if re.match(rf"(.*\.)?({p})$", module):
                return r
        except re.error:
            continue
    return default


def _targeted(module: str, targets: Any) -> bool:
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return True  # not ours to judge: PEFT will say
    return any(module == t or module.endswith("." + t) for t in targets)


def adapter_config_problems(path: str | os.PathLike, index: dict[str, TensorInfo]) -> list[str]:
    """What the LoRA ``adapter_config.json`` of ``path`` says that its weights (``index``: the file headers)
    contradict: a rank ``r`` (or ``rank_pattern`` entry) that is not the stored ``lora_A``/``lora_B`` shapes'
    (``PeftModel.from_pretrained`` then fails with a size mismatch), a module with stored LoRA weights that
    ``target_modules`` does not name (it would load without them), a listed target with no stored weights (it would
    load a fresh, untrained adapter there). Empty for other PEFT methods or without a config.

    Example:
        >>> import json, os, tempfile
        >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "adapter_config.json"), "w").write(json.dumps(
        ...     {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
        >>> i = {"base_model.model.l.q_proj.lora_A.weight": TensorInfo("adapter_model.safetensors", "float32", (8, 16))}
        >>> adapter_config_problems(d, i)[0].startswith("adapter_config.json: r = 4, but adapter_model.safetensors")
        True
    """
    from ..files import ADAPTER_CONFIG

    cfg_path = os.path.join(os.fspath(path), ADAPTER_CONFIG)
    report = Findings(os.fspath(path))
    cfg = read_json_finding(cfg_path, report, "adapter") if os.path.isfile(cfg_path) else None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA" or not is_uint(cfg.get("r")):
        return []
    pattern = cfg.get("rank_pattern") if isinstance(cfg.get("rank_pattern"), dict) else {}
    ranks: dict[str, tuple[int, str, TensorInfo]] = {}  # module -> (stored rank, tensor, info), first seen
    out = []
    for name, info in sorted(index.items()):
        m = _LORA_KEY.match(name)
        if not m or len(info.shape) < 2:
            continue
        module = m.group("module").removeprefix(_PEFT_PREFIX)
        which = m.group("which")
        rank = info.shape[0] if which in ("A", "embedding_A") else info.shape[1]
        ranks.setdefault(module, (rank, name, info))
    bad = []
    for module, (rank, name, info) in sorted(ranks.items()):
        want = _pattern_rank(module, pattern, cfg["r"])
        if is_uint(want) and rank != want:
            bad.append((module, rank, want, name, info))
    if bad:
        module, rank, want, name, info = bad[0]
        more = f" (and {len(bad) - 1} more module(s))" if len(bad) > 1 else ""
        out.append(f"{ADAPTER_CONFIG}: r = {want}, but {info.file} stores rank {rank} for {module} ({name} "
                   f"{list(info.shape)}){more}: PeftModel.from_pretrained fails with a size mismatch. Set r (or its "
                   f"rank_pattern entry) back to {rank}, or use the adapter_config.json saved with these weights")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, str)) and targets and targets != "all-linear" and ranks:
        untargeted = sorted(m for m in ranks if not _targeted(m, targets))
        if untargeted:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in untargeted})
            out.append(f"{ADAPTER_CONFIG}: target_modules does not name {', '.join(leaves)}, whose LoRA weights the "
                       f"adapter stores ({len(untargeted)} module(s), e.g. {untargeted[0]}): from_pretrained loads "
                       f"the adapter without them. Add them back to target_modules")
        if isinstance(targets, list):
            unused = sorted(t for t in targets if isinstance(t, str) and not any(_targeted(m, [t]) for m in ranks))
            if unused:
                out.append(f"{ADAPTER_CONFIG}: target_modules lists {', '.join(unused)}, but the adapter stores no "
                           f"LoRA weights for it: from_pretrained adds a fresh, untrained adapter there. Remove it "
                           f"from target_modules, or use the adapter_config.json saved with these weights")
    return out


def verify_checkpoint(path: str | os.PathLike, *, progress: bool = False) -> Findings:
    """Check a checkpoint or model directory on disk, without a model: everything
    :func:`verify_directory` checks (the whole checkpoint against its manifest: every file, every tensor), for the
    directory and each PEFT adapter sub-directory, plus a LoRA ``adapter_config.json`` against its weights. Never
    raises for bad input. Verify a PEFT adapter or a checkpoint before ``from_pretrained`` or a resume.

    Returns:
        :class:`Findings`: ``problems`` (damaged), ``warnings``, ``unusable`` (cannot be checked), ``passed``; a
        sub-directory's messages start with ``<name>/:``.

    Example:
        >>> import tempfile
        >>> f = verify_checkpoint(tempfile.mkdtemp())
        >>> f.problems, len(f.unusable)
        ([], 1)
    """
    from ..files import adapter_subdirs

    path = os.fspath(path)
    out = Findings(path)
    if not os.path.isdir(path):
        out.unusable.append(Finding("input", f"{path}: no such directory"))
        return out
    subs = adapter_subdirs(path)
    try:
        whole = is_whole(read_manifest(path))
    except UsageError:
        whole = False
    if not subs or safetensors_files(path):
        _, index, _, _ = verify_directory(path, out, progress=progress)
        out.problems.extend(Finding("adapter", p) for p in adapter_config_problems(path, index))
    for sub in subs:
        where = os.path.join(path, sub)
        f = Findings(where)
        _, index, _, _ = verify_directory(where, f, progress=progress, files=not whole)
        f.problems.extend(Finding("adapter", p) for p in adapter_config_problems(where, index))
        for key in ("problems", "warnings", "unusable", "passed"):
            getattr(out, key).extend(Finding(x.check, f"{sub}/: {x.message}") for x in getattr(f, key))
    return out
