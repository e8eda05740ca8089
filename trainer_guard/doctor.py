"""``trainer-guard doctor PATH``: check a checkpoint or model directory on CPU, without loading a model.

Checks (field reports R1-R5):

- every stored tensor against ``trainer_guard_manifest.json`` (flipped bits, swapped or missing tensors, dtype and
  shape changes, a manifest that belongs to another checkpoint), files listed by the manifest or a shard index;
- every other file the manifest lists (``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``, records, configs,
  adapter sub-directories): missing, truncated or changed since the save (a copy from a sibling ``checkpoint-M``
  named as such), files it does not list, a manifest that does not match its own digest (edited); a
  ``checkpoint-N`` without a manifest whose save was interrupted (``interrupted save (no commit mark; optimizer.pt
  0.17 MB of 0.35 MB as in checkpoint-2; no trainer_state.json)``);
- a LoRA ``adapter_config.json`` against its weights (rank ``r`` vs the ``lora_A``/``lora_B`` shapes, target modules);
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
from dataclasses import asdict, dataclass
from typing import Any

from .checkpoint.contents import is_whole
from .checkpoint.manifest import read_manifest
from .checkpoint.verify import (PROGRESS_BYTES, Finding, Findings, adapter_config_problems, broken_links,
                                snapshots_in, verify_directory)
from .errors import UsageError
from .text import human_bytes
from .checkpoint.verify import read_json_finding as _read_json
from .names import param_matches
from .files import ADAPTER_CONFIG, CONFIG, TIES_FILE, adapter_subdirs, checkpoints_in
from .files import ADAPTER_WEIGHTS as ADAPTER_FILE
from .formats.safetensors import FLOAT_NAMES as _FLOAT
from .formats.safetensors import TensorInfo, nbytes, safetensors_files

__all__ = ["run", "Finding", "Report", "diagnose", "adapter_breakdown", "format_text"]

_TOKENS = re.compile(r"\.token_adapter\.trainable_tokens_delta$")  # PEFT trainable_token_indices: rows, not a copy
_LORA = re.compile(r"\.(lora_[A-Za-z_]+|hada_w\d_[ab]|lokr_w\d.*|ia3_l|oft_r)(\.[^.]+)?\.weight$|\.lora_magnitude_vector")


@dataclass
class Report(Findings):
    """Everything :func:`diagnose` found (:class:`~trainer_guard.checkpoint.verify.Findings`); ``exit_code`` 0
    healthy, 1 problems, 2 unusable input."""

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


def run(args: argparse.Namespace) -> int:
    """Run the doctor on ``args.path``; print the report; return the exit code."""
    from .cli import emit

    report = diagnose(args.path, progress=not args.no_progress and not args.json, no_manifest_ok=args.no_manifest_ok)
    emit(json.dumps(report.to_json(), indent=2) if args.json else format_text(report))
    return report.exit_code


# --------------------------------------------------------------------------------------------- diagnosis

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
        whole = _lists_every_file(path)  # then its manifest checked the sub-directories' files already
        for sub in subdirs:  # PEFT saves every adapter not named "default" into <path>/<name>/
            _merge(report, _diagnose_dir(os.path.join(path, sub), Report(os.path.join(path, sub)), progress,
                                         no_manifest_ok, files=not whole), sub)
    except OSError as e:  # whatever the checks above did not expect to be unreadable: still a report
        report.unusable.append(Finding("input", f"{e.filename or path}: unreadable ({e.strerror or e})"))
    return report


def _lists_every_file(path: str) -> bool:
    """Whether ``path``'s manifest lists every file below it (version 2), sub-directories included."""
    try:
        return is_whole(read_manifest(path))
    except UsageError:  # named by the directory's own check
        return False


def _diagnose_dir(path: str, report: Report, progress: bool, no_manifest_ok: bool, files: bool = True) -> Report:
    _, index, sizes, manifest = verify_directory(path, report, progress=progress, no_manifest_ok=no_manifest_ok,
                                                 files=files)
    report.problems.extend(Finding("adapter", p) for p in adapter_config_problems(path, index))
    config = _read_json(os.path.join(path, CONFIG), report, "input")
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
        >>> from trainer_guard.formats.safetensors import TensorInfo
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
    return nbytes(info.dtype, info.shape)


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
                                                  f"its {human_bytes(total)} (R4); train LoRA on q,k,v,o,gate,up,down and "
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
    from .core.head import model_class  # lazy: imports transformers

    pats: set[str] = set()
    for arch in (config or {}).get("architectures") or []:
        cls = model_class(arch) if isinstance(arch, str) else None
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

    odd = sorted(k for k, i in index.items() if i.dtype in floats and i.dtype != main and len(i.shape) >= 2
                 and not (i.dtype == "float32" and kept and param_matches(k, kept)))
    if odd:
        shown = ", ".join(f"{k} ({index[k].dtype})" for k in odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5
                                                                          else "")
        report.warnings.append(Finding("dtypes", f"dtype mix: most weights are {main} but {shown}; a matrix in another "
                                                 f"dtype fails with 'mat1 and mat2 must have the same dtype' (R2) "
                                                 f"unless the model casts it on purpose"))


# ------------------------------------------------------------------------------------------------ output



def format_text(report: Report) -> str:
    """The human report: what was checked, each finding on its own line, then the verdict."""
    lines = [f"trainer-guard doctor: {report.path}"]
    s = report.summary
    if s.get("files"):
        lines.append("  files:    " + ", ".join(f"{f} ({human_bytes(n)})" for f, n in s["files"].items())
                     + f"; {s.get('tensors', 0)} tensors")
    if s.get("manifest"):
        m = s["manifest"]
        lines.append(f"  manifest: step {m['global_step']}, {m['tensors']} tensors, {m['algo']}")
        if m.get("partitions"):
            lines.append(f"  partitions: {m['partitions']} parameter checksums combined from DeepSpeed ZeRO-3 "
                         f"partitions at the save (compared at resume; the rank files are checked by their bytes)")
    if s.get("dtypes"):
        lines.append("  dtypes:   " + ", ".join(f"{d} {human_bytes(b)}" for d, b in sorted(s["dtypes"].items(),
                                                                                       key=lambda x: -x[1])))
    if s.get("adapter"):
        a = s["adapter"]
        lines.append(f"  adapter:  {human_bytes(a['bytes'])}: " + ", ".join(
            f"{r['module']} ({r['kind']}) {r['share']:.0%}" for r in a["modules"][:6]))
    for name, a in s.get("adapters", {}).items():
        m = a.get("manifest")
        lines.append(f"  {name}/:" + " " * max(1, 8 - len(name)) + f"{a.get('tensors', 0)} tensors"
                     + (f", manifest of step {m['global_step']}" if m else "")
                     + (f", adapter {human_bytes(a['adapter']['bytes'])}" if a.get("adapter") else ""))
    for title, items, mark in (("ok", report.passed, "ok "), ("unusable input", report.unusable, "!! "),
                               ("problems", report.problems, "XX "), ("warnings", report.warnings, "?? ")):
        for f in items:
            lines.append(f"  {mark}[{f.check}] {f.message}")
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    verdict = {0: f"HEALTHY{warned}", 1: f"{len(report.problems)} PROBLEM(S) FOUND",
               2: "UNUSABLE INPUT (checks that need none still ran)"}[report.exit_code]
    lines.append(f"verdict: {verdict} (exit {report.exit_code})")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - the arguments are defined once, in cli.py
    from .cli import main

    sys.exit(main(["doctor", *sys.argv[1:]]))
