"""``trainer-guard doctor PATH``: check a checkpoint or model directory on CPU, without loading a model.

Checks (field reports R1-R5):

- every stored tensor against ``trainer_guard_manifest.json`` (flipped bits, swapped or missing tensors, dtype and
  shape changes, a manifest that belongs to another checkpoint), files listed by the manifest or a shard index;
- tied and missing keys: a tie stored once while ``config.json`` says ``tie_word_embeddings=false`` reloads a random
  head (R1b); ``trainer_guard_ties.json`` / the manifest list the aliases;
- a ``*ForCausalLM`` config whose files hold no output head and declare no tie (R5);
- an adapter's size split by module, full copies of embeddings / head called out (R3, R4);
- the dtype mix of the stored floating tensors (R2).

PEFT adapters not named ``"default"`` live in ``PATH/<name>/`` (``PeftModel.save_pretrained``'s layout): each such
sub-directory is checked the same way, its findings prefixed ``<name>/:``.

Exit code: 0 healthy, 1 problems found (shards without their index included), 2 unusable input (missing directory,
truncated or foreign file, a file without tensors, a symbolic link that cannot be followed, e.g. in a copied Hugging
Face cache snapshot; foreign, malformed or missing manifest; the checks that need none still run). ``--json`` prints
one JSON object; progress bars go to stderr for files over 256 MB. User errors never print a traceback.

Example:
    $ trainer-guard doctor out/checkpoint-500
    $ trainer-guard doctor out/checkpoint-500 --json | jq .status
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .core.manifest import (
    MANIFEST_FILE,
    ForeignManifestError,
    MalformedManifestError,
    TensorInfo,
    adapter_subdirs,
    compare,
    entries,
    file_problem,
    foreign_reason,
    index_entries,
    read_index,
    read_manifest,
    safetensors_files,
)
from .errors import ChecksumError, IntegrityError, UsageError
from .files import ADAPTER_CONFIG, CONFIG, TIES_FILE, TRAINER_STATE, checkpoints_in, state_file
from .files import ADAPTER_WEIGHTS as ADAPTER_FILE

__all__ = ["configure", "run", "Finding", "Report", "diagnose", "adapter_breakdown", "format_text"]

PROGRESS_BYTES = 256 * 1024 * 1024
_FLOAT = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu",
          "float8_e4m3fnuz", "float8_e5m2fnuz")
_TOKENS = re.compile(r"\.token_adapter\.trainable_tokens_delta$")  # PEFT trainable_token_indices: rows, not a copy
_LORA = re.compile(r"\.(lora_[A-Za-z_]+|hada_w\d_[ab]|lokr_w\d.*|ia3_l|oft_r)(\.[^.]+)?\.weight$|\.lora_magnitude_vector")


@dataclass
class Finding:
    """One result line: ``check`` (which check), ``message`` (a full sentence naming the tensor/file)."""

    check: str
    message: str


@dataclass
class Report:
    """Everything :func:`diagnose` found; ``exit_code`` 0 healthy, 1 problems, 2 unusable input."""

    path: str
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    unusable: list[Finding] = field(default_factory=list)
    passed: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 2 if self.unusable else 1 if self.problems else 0

    @property
    def status(self) -> str:
        return ("healthy", "problems", "unusable")[self.exit_code]

    def to_json(self) -> dict[str, Any]:
        out = {"path": self.path, "status": self.status, "exit_code": self.exit_code}
        for key in ("problems", "warnings", "unusable", "passed"):
            out[key] = [asdict(f) for f in getattr(self, key)]
        out["summary"] = self.summary
        return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint or model directory (holding *.safetensors files)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-manifest-ok", action="store_true",
                        help="a directory without trainer_guard_manifest.json (e.g. a downloaded model) is not "
                             "unusable input: exit 0/1 from the other checks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, even for big files")


def run(args: argparse.Namespace) -> int:
    """Run the doctor on ``args.path``; print the report; return the exit code."""
    from .cli import emit

    report = diagnose(args.path, progress=not args.no_progress and not args.json, no_manifest_ok=args.no_manifest_ok)
    emit(json.dumps(report.to_json(), indent=2) if args.json else format_text(report))
    return report.exit_code


# --------------------------------------------------------------------------------------------- diagnosis
def _read_json(path: str, report: Report, what: str) -> dict | None:
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


def diagnose(path: str | os.PathLike, *, progress: bool = False, no_manifest_ok: bool = False) -> Report:
    """Check the directory ``path``; never raises for bad input (it becomes an ``unusable`` finding).

    Example:
        >>> from trainer_guard.doctor import diagnose
        >>> diagnose("/no/such/dir").exit_code
        2
    """
    path = os.fspath(path)
    report = Report(path)
    if not os.path.isdir(path):
        why = "is a file; pass the directory that holds it" if os.path.isfile(path) else missing_why(path, "directory")
        report.unusable.append(Finding("input", f"{path}: {why}" if path else why))
        return report
    try:
        subdirs = adapter_subdirs(path)
        if not subdirs or safetensors_files(path):  # named PEFT adapters alone leave no weights at the top level
            _diagnose_dir(path, report, progress, no_manifest_ok)
        for sub in subdirs:  # PEFT saves every adapter not named "default" into <path>/<name>/
            _merge(report, _diagnose_dir(os.path.join(path, sub), Report(os.path.join(path, sub)), progress,
                                         no_manifest_ok), sub)
    except OSError as e:  # whatever the checks above did not expect to be unreadable: still a report
        report.unusable.append(Finding("input", f"{e.filename or path}: unreadable ({e.strerror or e})"))
    return report


def _diagnose_dir(path: str, report: Report, progress: bool, no_manifest_ok: bool) -> Report:
    index, sizes = _check_files(path, report)
    config = _read_json(os.path.join(path, CONFIG), report, "input")
    manifest = _check_manifest(path, index, report, progress, no_manifest_ok)
    _check_ties(path, index, config, manifest, report)
    if config is None and os.path.isfile(os.path.join(path, CONFIG)):
        report.summary["head_check"] = "skipped (config.json unreadable)"  # already named as unusable input
    else:
        _check_head(path, report)
    _check_adapter(path, index, report)
    _check_dtypes(index, report, config)
    report.summary.update({"files": sizes, "tensors": len(index)})
    return report


def _merge(report: Report, sub: Report, name: str) -> None:
    """Add the findings of adapter sub-directory ``name`` to ``report`` (messages prefixed ``name/:``)."""
    for key in ("problems", "warnings", "unusable", "passed"):
        getattr(report, key).extend(Finding(f.check, f"{name}/: {f.message}") for f in getattr(sub, key))
    report.summary.setdefault("adapters", {})[name] = sub.summary


def missing_why(path: str, what: str = "file or directory") -> str:
    """Why ``path`` (which does not exist) was not found: ``no such <what>``, with a hint for an empty path and for a
    ``~`` the shell did not expand (a quoted ``"~/ckpt"``, a path from a config file)."""
    if not path:
        return "the path is empty; pass a checkpoint or model directory"
    expanded = os.path.expanduser(path)
    if path.startswith("~") and expanded != path and os.path.exists(expanded):
        return f"no such {what} ('~' is not expanded here: did you mean {expanded}?)"
    return f"no such {what}"


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


def _check_files(path: str, report: Report) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    files = safetensors_files(path)
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in files}
    broken = broken_links(path)
    report.unusable.extend(Finding("files", msg) for msg in broken.values())
    if not files and not any(b.endswith(".safetensors") for b in broken):  # else the link is the finding
        other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")) and "model" in f]
        hint = f" (found {', '.join(sorted(other))}: the doctor reads safetensors only)" if other else ""
        if not hint and checkpoints_in(path):
            hint = f" (it holds {', '.join(checkpoints_in(path))}: pass one of those)"
        elif not hint and snapshots_in(path):
            hint = (f" (a Hugging Face cache entry: pass one of its snapshots, {', '.join(snapshots_in(path))})")
        report.unusable.append(Finding("files", f"{path}: no *.safetensors weights in this directory{hint}"))
    unusable_before = len(report.unusable)
    index: dict[str, TensorInfo] = {}
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
    for idx in sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json")):
        data = _read_json(os.path.join(path, idx), report, "files") or {}
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


def _report_unindexed_shards(path: str, sizes: dict[str, int], report: Report) -> None:
    """Shards of a sharded save (``model-00001-of-00003.safetensors``) with neither their index nor the single file:
    ``from_pretrained`` and the Trainer's resume look for ``model.safetensors`` or ``model.safetensors.index.json``
    and find no weights at all."""
    groups: dict[str, list[str]] = {}
    for f in sizes:
        m = _SHARD.fullmatch(f)
        if m:
            groups.setdefault(m.group(1), []).append(f)
    for prefix, shards in sorted(groups.items()):
        idx, single = f"{prefix}.safetensors.index.json", f"{prefix}.safetensors"
        if os.path.lexists(os.path.join(path, idx)) or single in sizes:
            continue
        total = int(_SHARD.fullmatch(shards[0]).group(3))
        report.problems.append(Finding("files", (
            f"{idx}: missing, but {len(shards)} shard(s) of {total} are here ({', '.join(sorted(shards)[:3])}"
            f"{', ...' if len(shards) > 3 else ''}): from_pretrained and a resume find no weights without it; copy "
            f"the index from where the shards came from, or save the model again")))


def _report_twice(path: str, twice: dict[tuple[str, str], list[str]], sizes: dict[str, int],
                  report: Report) -> None:
    """One finding per stale copy: tensors stored in two files (an earlier save's file left next to a newer one)."""
    from .core.checksum import duplicate_hint

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


def snapshots_in(path: str) -> list[str]:
    """``snapshots/<revision>`` of a Hugging Face cache entry (``models--org--name/``): what holds its files."""
    snaps = os.path.join(path, "snapshots")
    if not os.path.isdir(snaps) or not os.path.isdir(os.path.join(path, "blobs")):
        return []
    return sorted(os.path.join("snapshots", d) for d in os.listdir(snaps) if os.path.isdir(os.path.join(snaps, d)))


def _check_manifest(path: str, index: dict[str, TensorInfo], report: Report, progress: bool,
                    no_manifest_ok: bool) -> dict | None:
    from .core.checksum import CHECKSUM_ALGO, file_checksums, fingerprint

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
    if manifest is None and not index:  # no weights read: that finding is already there, and says what to pass
        return None
    if manifest is None:
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):  # a Trainer checkpoint: on_save writes one
            how = "train with IntegrityGuard in the Trainer's callbacks to get one"
        else:  # a final trainer.save_model()/save_pretrained output: no callback event fires for it
            how = ("for a trainer.save_model() output, wire the Trainer with trainer = trainer_guard.guard(trainer) "
                   "next to IntegrityGuard to get one")
        rest = "" if no_manifest_ok else "; --no-manifest-ok checks the rest of a directory saved without it"
        msg = f"{MANIFEST_FILE}: missing, so the tensors could not be verified ({how}{rest})"
        (report.warnings if no_manifest_ok else report.unusable).append(Finding("manifest", msg))
        return None
    recorded = entries(manifest)
    report.summary["manifest"] = {"global_step": manifest.get("global_step"), "tensors": len(recorded),
                                  "algo": manifest.get("algo"), "versions": manifest.get("versions", {})}
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
    state_path = state_file(path)  # its own, or checkpoint-N/<adapter>/'s checkpoint's
    state = _read_json(state_path, report, "manifest") if state_path else None
    step = manifest.get("global_step")
    if state and step is not None and state.get("global_step") not in (None, step):
        report.unusable.append(Finding("manifest", f"foreign manifest: {MANIFEST_FILE} is for step {step} but "
                                                   f"{os.path.relpath(state_path, path)} says step "
                                                   f"{state['global_step']}: it was "
                                                   f"copied from another checkpoint"))
        return manifest
    usable = {i.file for i in index.values()}
    listed = sorted(manifest.get("files", {}))
    if listed and usable and not any(os.path.isfile(os.path.join(path, f)) for f in listed):
        report.unusable.append(Finding("manifest", f"foreign manifest: it describes {', '.join(listed)}, none of which "
                                                   f"is here (this directory holds {', '.join(sorted(usable))})"))
        return manifest
    skip_files = set()
    for fname, info in sorted(manifest.get("files", {}).items()):
        fp = os.path.join(path, fname)
        n = info.get("tensors", "?")
        if not os.path.isfile(fp):
            report.problems.append(Finding("manifest", f"{fname}: listed in the manifest ({n} tensors) but missing"))
            skip_files.add(fname)
            continue
        if "size" in info and os.path.getsize(fp) != info["size"]:
            report.problems.append(Finding("manifest", f"{fname}: {os.path.getsize(fp)} bytes, the manifest recorded "
                                                       f"{info['size']}"))
        if fname not in usable:
            skip_files.add(fname)  # unreadable: already reported as unusable
    expected = {k: e for k, e in recorded.items() if manifest["tensors"][k].get("file") not in skip_files}
    sums: dict[str, int] = {}
    for fname in sorted(usable):
        fp = os.path.join(path, fname)
        try:
            sums.update(file_checksums(fp, progress=progress and os.path.getsize(fp) >= PROGRESS_BYTES))
        except ChecksumError as e:
            report.unusable.append(Finding("files", str(e)))
    actual = index_entries({k: i for k, i in index.items() if k in sums}, sums)
    mismatches = compare(expected, actual)
    foreign = foreign_reason(manifest, mismatches, len(actual))
    if foreign:
        report.unusable.append(Finding("manifest", f"foreign manifest: {foreign}"))
    else:
        report.problems.extend(Finding("tensors", m.message) for m in mismatches)
    if not mismatches and actual:  # nothing readable to compare is no pass (the unusable findings say why)
        report.passed.append(Finding("tensors", f"{len(actual)} tensors match the manifest (step {step})"))
    return manifest


def _check_ties(path: str, index: dict[str, TensorInfo], config: dict | None, manifest: dict | None,
                report: Report) -> None:
    aliases = dict((manifest or {}).get("aliases", {}))
    ties = _read_json(os.path.join(path, TIES_FILE), report, "ties")
    if ties:
        recorded = ties.get("stored_aliases", ties.get("aliases", {})) if isinstance(ties, dict) else None
        if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
            report.unusable.append(Finding("ties", f"{TIES_FILE}: malformed ('aliases' must map alias to kept name); "
                                                   f"delete it or re-save the checkpoint"))
            return
        aliases.update(recorded)  # under the names the files use
    if not index:
        return
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):  # ties of the base model: not in an adapter
        aliases = {a: k for a, k in aliases.items() if a in index or k in index}
    cfgs = [c for c in (config, (config or {}).get("text_config")) if isinstance(c, dict)]
    untied = any(c.get("tie_word_embeddings") is False for c in cfgs)
    bad = 0
    for alias, kept in sorted(aliases.items()):
        if alias in index:
            continue
        if kept not in index:
            bad += 1
            report.problems.append(Finding("ties", f"{alias}: stored as a tie of {kept}, but {kept} is not stored "
                                                   f"either: both will load uninitialised"))
        elif config is not None and untied:
            bad += 1
            report.problems.append(Finding("ties", f"{alias}: stored only as a tie of {kept}, but config.json says "
                                                   f"tie_word_embeddings=false: from_pretrained will initialise it at "
                                                   f"random (R1b). Set tie_word_embeddings: true in config.json, or "
                                                   f"save with TiedWeightsGuard"))
        elif config is None and not os.path.lexists(os.path.join(path, CONFIG)):  # unreadable: named already
            report.warnings.append(Finding("ties", f"{alias}: stored once as {kept}; load with strict=False and re-tie "
                                                   f"(TiedWeightsGuard does both)"))
    if aliases and not bad and (config is not None or not os.path.lexists(os.path.join(path, CONFIG))):
        report.passed.append(Finding("ties", f"{len(aliases)} tie alias(es) stored once and restorable: "
                                             + ", ".join(f"{a} -> {k}" for a, k in sorted(aliases.items()))))


def _check_head(path: str, report: Report) -> None:
    try:
        from .core.head import missing_head_problems
    except ImportError:
        report.summary["head_check"] = "unavailable (trainer_guard.core.head not installed)"
        return
    if any(f.check == "files" for f in report.unusable):
        report.summary["head_check"] = "skipped (unreadable weight files)"
        return
    if any(f.check == "ties" for f in report.problems):
        report.summary["head_check"] = "skipped (the tie check already named the head)"
        return
    try:
        found = missing_head_problems(path)
    except Exception as e:  # a user's file must never end in a traceback
        report.unusable.append(Finding("head", f"head check could not run: {e}"))
        return
    report.problems.extend(Finding("head", p) for p in found)
    report.summary["head_check"] = "ran"


def adapter_breakdown(index: dict[str, TensorInfo], nbytes: dict[str, int]) -> list[dict[str, Any]]:
    """Adapter bytes grouped by module kind (``q_proj`` LoRA, ``embed_tokens`` full copy, ...), largest first.

    Example:
        >>> from trainer_guard.core.manifest import TensorInfo
        >>> i = {"m.layers.0.q_proj.lora_A.weight": TensorInfo("a", "float32", (4, 32))}
        >>> adapter_breakdown(i, {"m.layers.0.q_proj.lora_A.weight": 512})[0]["module"]
        'q_proj'
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for name in index:
        m = _LORA.search(name) or _TOKENS.search(name)
        kind = ("trainable tokens" if m.re is _TOKENS else "lora") if m else "full copy"
        module = (name[: m.start()] if m else name.rsplit(".", 1)[0]).rsplit(".", 1)[-1]
        g = groups.setdefault((module, kind), {"module": module, "kind": kind, "tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += nbytes[name]
    total = sum(g["bytes"] for g in groups.values()) or 1
    for g in groups.values():
        g["share"] = round(g["bytes"] / total, 4)
    return sorted(groups.values(), key=lambda g: (-g["bytes"], g["module"]))


def _nbytes(info: TensorInfo) -> int:
    import torch

    n = 1
    for s in info.shape:
        n *= s
    dtype = getattr(torch, info.dtype, None)
    return n * (torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1)


def _check_adapter(path: str, index: dict[str, TensorInfo], report: Report) -> None:
    stored = {k: i for k, i in index.items() if i.file == ADAPTER_FILE}
    if not stored:
        return
    nbytes = {k: _nbytes(i) for k, i in stored.items()}
    rows = adapter_breakdown(stored, nbytes)
    total = sum(nbytes.values())
    report.summary["adapter"] = {"bytes": total, "modules": rows}
    full = [r for r in rows if r["kind"] == "full copy"]
    full_share = sum(r["share"] for r in full)
    if full and full_share > 0.5:
        names = ", ".join(sorted({r["module"] for r in full}))
        report.warnings.append(Finding("adapter", f"{ADAPTER_FILE}: full copies of {names} are {full_share:.0%} of "
                                                  f"its {_human(total)} (R4); train LoRA on q,k,v,o,gate,up,down and "
                                                  f"add embeddings only if new tokens need them, at ~1/10 the LR"))
    cfg = _read_json(os.path.join(path, ADAPTER_CONFIG), report, "adapter") or {}
    to_save = cfg.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(m, str) for m in to_save):
        report.unusable.append(Finding("adapter", f"adapter_config.json: 'modules_to_save' is {to_save!r}, expected a "
                                                  f"list of module names (or null); fix or re-save the adapter"))
        return
    def copied(module: str) -> bool:
        return any(r["module"] == module.rsplit(".", 1)[-1] and r["kind"] == "full copy" for r in rows)

    heads = {"classifier", "score"}  # PEFT's SEQ_CLS/TOKEN_CLS tasks list both; a model has one of them
    if cfg.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and heads <= set(to_save) and any(map(copied, heads)):
        to_save = [m for m in to_save if m not in heads]
    for module in to_save:
        if not copied(module):
            report.problems.append(Finding("adapter", f"{module}: adapter_config.json lists it in modules_to_save but "
                                                      f"{ADAPTER_FILE} stores no copy of it: it will load untrained"))


def _kept_in_fp32(config: dict | None) -> list[str]:
    """The module/parameter patterns the class named by ``config.json`` keeps in float32 when loaded in bf16/fp16
    (``_keep_in_fp32_modules(_strict)``: T5's ``wo``, attention sinks); ``[]`` for an unknown class."""
    from .core.head import _class

    pats: set[str] = set()
    for arch in (config or {}).get("architectures") or []:
        cls = _class(arch) if isinstance(arch, str) else None
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            keep = getattr(cls, attr, None)
            if isinstance(keep, (list, tuple, set)):
                pats.update(p for p in keep if isinstance(p, str))
    return sorted(pats)


def _check_dtypes(index: dict[str, TensorInfo], report: Report, config: dict | None = None) -> None:
    by_dtype: dict[str, int] = {}
    nbytes = {k: _nbytes(i) for k, i in index.items()}
    for k, i in index.items():
        by_dtype[i.dtype] = by_dtype.get(i.dtype, 0) + nbytes[k]
    report.summary["dtypes"] = by_dtype
    floats = {d: b for d, b in by_dtype.items() if d in _FLOAT}
    if len(floats) < 2:
        return
    main = max(floats, key=floats.get)
    kept = _kept_in_fp32(config) if main in ("bfloat16", "float16") else []
    from .core.dtype import _param_matches

    odd = sorted(k for k, i in index.items() if i.dtype in floats and i.dtype != main and len(i.shape) >= 2
                 and not (i.dtype == "float32" and kept and _param_matches(k, kept)))
    if odd:
        shown = ", ".join(f"{k} ({index[k].dtype})" for k in odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5
                                                                          else "")
        report.warnings.append(Finding("dtypes", f"dtype mix: most weights are {main} but {shown}; a matrix in another "
                                                 f"dtype fails with 'mat1 and mat2 must have the same dtype' (R2) "
                                                 f"unless the model casts it on purpose"))


# ------------------------------------------------------------------------------------------------ output
def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def format_text(report: Report) -> str:
    """The human report: what was checked, each finding on its own line, then the verdict."""
    lines = [f"trainer-guard doctor: {report.path}"]
    s = report.summary
    if s.get("files"):
        lines.append("  files:    " + ", ".join(f"{f} ({_human(n)})" for f, n in s["files"].items())
                     + f"; {s.get('tensors', 0)} tensors")
    if s.get("manifest"):
        m = s["manifest"]
        lines.append(f"  manifest: step {m['global_step']}, {m['tensors']} tensors, {m['algo']}")
    if s.get("dtypes"):
        lines.append("  dtypes:   " + ", ".join(f"{d} {_human(b)}" for d, b in sorted(s["dtypes"].items(),
                                                                                       key=lambda x: -x[1])))
    if s.get("adapter"):
        a = s["adapter"]
        lines.append(f"  adapter:  {_human(a['bytes'])}: " + ", ".join(
            f"{r['module']} ({r['kind']}) {r['share']:.0%}" for r in a["modules"][:6]))
    for name, a in s.get("adapters", {}).items():
        m = a.get("manifest")
        lines.append(f"  {name}/:" + " " * max(1, 8 - len(name)) + f"{a.get('tensors', 0)} tensors"
                     + (f", manifest of step {m['global_step']}" if m else "")
                     + (f", adapter {_human(a['adapter']['bytes'])}" if a.get("adapter") else ""))
    for title, items, mark in (("ok", report.passed, "ok "), ("unusable input", report.unusable, "!! "),
                               ("problems", report.problems, "XX "), ("warnings", report.warnings, "?? ")):
        for f in items:
            lines.append(f"  {mark}[{f.check}] {f.message}")
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    verdict = {0: f"HEALTHY{warned}", 1: f"{len(report.problems)} PROBLEM(S) FOUND",
               2: "UNUSABLE INPUT (checks that need none still ran)"}[report.exit_code]
    lines.append(f"verdict: {verdict} (exit {report.exit_code})")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="trainer-guard doctor")
    configure(p)
    sys.exit(run(p.parse_args()))
