"""``trainer-guard diff A B``: which tensors changed between two checkpoint or model directories (issue 8).

Per tensor: same / changed / only in A / only in B (a dtype or shape change counts as changed and is named),
summarised by module with layer indices folded: ``model.embed_tokens: unchanged over 1000 steps`` is the line that
shows a module that silently never trained. Checksums come from each directory's ``trainer_guard_manifest.json``
when both have one with the same checksum algorithm (instant), else from the ``*.safetensors`` files
(:func:`~trainer_guard.checksum.disk.file_checksums`, sharded models included) or an FSDP checkpoint's DCP
``.distcp`` files (consolidated tensors: a sharded checkpoint and its ``model.safetensors`` export compare equal);
a malformed or stale manifest is
passed over for the files, with a note saying why. Exit code 0: identical, 1: different, 2: unusable input
(missing path, no safetensors, a file without tensors, a symbolic link that cannot be followed, corrupted file, foreign
manifest; with ``--source manifest``, a malformed or stale one).

Example:
    $ trainer-guard diff out/checkpoint-1000 out/checkpoint-2000
    $ trainer-guard diff base_model/ out/checkpoint-2000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from .core.audit import CHANGED, ONLY_A, ONLY_B, SAME, classify, module_summary
from .checkpoint.manifest import MANIFEST_FILE, entries, read_manifest
from .checkpoint.sharded import dcp_dirs, sharded_index, sharded_sums
from .checkpoint.verify import broken_links, files_changed, snapshots_in
from .checksum.disk import file_checksums
from .checksum.spec import CHECKSUM_ALGO, fingerprint
from .errors import ChecksumError, IntegrityError, MalformedManifestError, SafetensorsFormatError, UsageError
from .files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_subdirs, checkpoint_step, checkpoints_in,
                    deepspeed_step_dirs, state_file)
from .formats.safetensors import read_header, safetensors_files, torch_name
from .names import module_of

__all__ = ["run", "load_side", "diff", "change_sizes", "format_text"]


def _manifest(path: str) -> dict | None:
    return read_manifest(path) if os.path.isdir(path) else None


def _usable(path: str, manifest: dict | None = None) -> tuple[dict | None, str | None]:
    """For ``--source auto``: ``(manifest, None)`` when ``path``'s manifest (or the one given) can stand for its files,
    else ``(None, why not)``; ``(None, None)`` when it has none. Malformed and stale manifests are passed over."""
    if manifest is None:
        try:
            manifest = _manifest(path)
        except MalformedManifestError as e:
            return None, f"{e.path}: malformed manifest ({e.what})"
        if manifest is None:
            return None, None
    stale = _stale(path, manifest)
    return (None, f"{os.path.join(path, MANIFEST_FILE)} does not describe the files here ({stale})") if stale \
        else (manifest, None)


def _note(why: str) -> str:
    return f"{why}: compared the files instead"


def _state_step(path: str) -> int | None:
    """``global_step`` of the directory's ``trainer_state.json`` (see :func:`~trainer_guard.files.state_file`),
    ``None`` when it has no readable one."""
    state = state_file(path)
    if state is None:
        return None
    try:
        with open(state, encoding="utf-8") as f:
            step = json.load(f)["global_step"]
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _step_of(path: str) -> int | None:
    step = _state_step(path)
    if step is not None:
        return step
    return checkpoint_step(path)


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(path, f) for f in safetensors_files(path)]


def load_side(path: str | os.PathLike, source: str = "auto", manifest: Mapping | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Describe one side: ``{"path", "source", "global_step", "algo", "tensors": {name: {checksum, dtype, shape}},
    "notes"}``.

    ``source="manifest"`` reads ``manifest`` (or the directory's manifest), ``"files"`` checksums the safetensors
    files, ``"auto"`` uses the manifest when its algorithm is this version's, else the files; a malformed or stale
    manifest is passed over for the files, and ``notes`` says why. ``progress`` shows a progress bar over the bytes
    read.

    Raises:
        UsageError: missing path, no manifest where one is required (or a malformed or stale one), nothing to
            compare (no safetensors file), a foreign manifest.
        ChecksumError: a corrupted or foreign safetensors file (named).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(_missing(path))
    _check_links(path)
    passed_over = None
    if source == "files":
        manifest = None
    elif source == "auto":  # never call two directories identical from a manifest whose files changed
        manifest, passed_over = _usable(path, manifest)
    elif manifest is None:
        manifest = _manifest(path)  # a malformed one raises: it names the file and what is wrong
    if source == "manifest" and manifest is None:
        raise UsageError(f"{path}: no trainer_guard_manifest.json; drop --source manifest to compare the files")
    step = _step_of(path)
    stale = _stale(path, manifest) if source == "manifest" else None
    if stale:
        raise UsageError(f"{path}: the manifest does not describe the files here ({stale}); run `trainer-guard "
                         f"doctor {path}`, or drop --source manifest to compare the files")
    if manifest is not None and (source == "manifest" or manifest.get("algo") == CHECKSUM_ALGO):
        ms = manifest.get("global_step")
        return {"path": path, "source": "manifest", "global_step": ms if isinstance(ms, int) else step,
                "algo": manifest.get("algo"),
                "tensors": {n: {"checksum": e["checksum"], "dtype": e["dtype"], "shape": list(e["shape"])}
                            for n, e in entries(manifest).items()}, "notes": []}
    files = _files(path)
    if not files and os.path.isdir(path) and dcp_dirs(path):  # FSDP SHARDED_STATE_DICT: tensors from the .distcp files
        try:
            index = sharded_index(path)
        except IntegrityError as e:
            raise ChecksumError(str(e)) from None
        sums = sharded_sums(path)
        tensors = {n: {"checksum": sums[n], "dtype": i.dtype, "shape": list(i.shape)} for n, i in index.items()}
        return {"path": path, "source": "files", "global_step": step, "algo": CHECKSUM_ALGO, "tensors": tensors,
                "notes": [_note(passed_over)] if passed_over else []}
    subdirs = adapter_subdirs(path)
    if not files and subdirs:
        raise UsageError(f"{path}: holds PEFT adapters in sub-directories ({', '.join(d + '/' for d in subdirs)}), "
                         f"nothing at the top level; diff() compares those, load_side() one directory")
    if not files and passed_over:
        raise UsageError(f"{path}: no *.safetensors file, and {passed_over}; nothing to compare")
    if not files:
        hint = (f"(it holds {', '.join(checkpoints_in(path))}: pass one of those)" if checkpoints_in(path) else
                f"(a Hugging Face cache entry: pass one of its snapshots, {', '.join(snapshots_in(path))})"
                if snapshots_in(path) else
                "(a DeepSpeed ZeRO checkpoint: its global_step*/ rank files are pickles that only unsafe unpickling "
                "could read; save with stage3_gather_16bit_weights_on_model_save to get a model.safetensors, or run "
                "DeepSpeed's zero_to_fp32.py on a copy you trust)" if deepspeed_step_dirs(path) else
                "(a checkpoint saved with save_safetensors=False holds only .bin files)")
        manifest_too = "" if os.path.isfile(os.path.join(path, MANIFEST_FILE)) else f" and no {MANIFEST_FILE}"
        raise UsageError(f"{path}: no *.safetensors file{manifest_too}; nothing to compare {hint}")
    meta = {}
    for f in files:  # headers first: a foreign file is named before any data is read (ChecksumError naming it)
        try:
            meta.update(read_header(f).tensors)
        except SafetensorsFormatError as e:
            if f != path or f.endswith(".safetensors"):
                raise ChecksumError(str(e)) from None
            raise UsageError(f"{path}: not a safetensors file; diff compares checkpoint or model directories, or "
                             f".safetensors files: pass the directory that holds it "
                             f"({os.path.dirname(path) or '.'})") from None
    sums = file_checksums(path, progress=progress)
    tensors = {n: {"checksum": s, "dtype": torch_name(meta[n].dtype),
                   "shape": list(meta[n].shape)} for n, s in sums.items()}
    return {"path": path, "source": "files", "global_step": step, "algo": CHECKSUM_ALGO, "tensors": tensors,
            "notes": [_note(passed_over)] if passed_over else []}


def _missing(path: str) -> str:
    from .doctor import missing_why

    return f"{path}: {missing_why(path)}; pass a checkpoint or model directory" if path else missing_why(path)


def _check_links(path: str) -> None:
    """A weight file, shard index or manifest of directory ``path`` that is a symbolic link which cannot be followed
    (a Hugging Face cache snapshot copied without its blobs) is named, instead of being taken for absent."""
    if not os.path.isdir(path):
        return
    broken = [m for name, m in broken_links(path).items()
              if name.endswith((".safetensors", ".safetensors.index.json")) or name == MANIFEST_FILE]
    if broken:
        raise UsageError(f"{path}: " + "; ".join(broken))


def _stale(path: str, manifest: dict[str, Any]) -> str | None:
    """Why ``manifest`` cannot stand for the files of ``path`` (a file missing, resized or newer), or None."""
    files = manifest.get("files") or {}
    if not files:
        return "it lists no files"
    unlisted = sorted(set(safetensors_files(path) if os.path.isdir(path) else []) - set(files))
    if unlisted:
        return f"{unlisted[0]} is not in the manifest"
    changed = files_changed(path, manifest)
    if changed:
        return next(iter(changed.values()))
    step, state_step = manifest.get("global_step"), _state_step(path)
    if step is not None and state_step is not None and step != state_step:
        return f"it is for step {step} but trainer_state.json says step {state_step}: copied from another checkpoint"
    if manifest.get("algo") == CHECKSUM_ALGO:  # the checks doctor makes: an edited manifest never answers for files
        try:
            intact = int(manifest.get("fingerprint", "0"), 16) == fingerprint(
                {k: e["checksum"] for k, e in entries(manifest).items()})
        except (ChecksumError, ValueError, TypeError):
            intact = False
        if not intact:
            return "its fingerprint does not match its own tensor entries: it was edited or corrupted"
    return None


def _pair(a: str, b: str, source: str, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both sides of one directory level: from the manifests when both have one (same algorithm, not stale) or
    ``source`` says so, else from the files."""
    ma = mb = None
    why: tuple[str | None, str | None] = (None, None)
    if source == "auto":  # manifests only when both sides have one with the same algorithm (malformed, stale: none)
        (ma, wa), (mb, wb) = _usable(a), _usable(b)
        why = (wa, wb)
        if not (ma and mb and ma.get("algo") == mb.get("algo")):
            source, ma, mb = "files", None, None  # a manifest whose files changed never answers for them
        else:
            source = "manifest"
    sa, sb = load_side(a, source, ma, progress), load_side(b, source, mb, progress)
    for side, w in zip((sa, sb), why):
        if w:
            side["notes"].insert(0, _note(w))
    if source == "manifest" and sa["algo"] != sb["algo"]:
        raise UsageError(f"the manifests use different checksum algorithms ({sa['algo']} in A, {sb['algo']} in B); "
                         f"compare the files with --source files")
    return sa, sb


def _is_adapter(path: str) -> bool:
    """Whether ``path`` holds a PEFT adapter (``adapter_config.json``, or only per-adapter sub-directories)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
                                    or (bool(adapter_subdirs(path)) and not _files(path)))


def _parts(path: str) -> list[str]:
    """The weight directories of ``path``: ``""`` (itself, when it holds weights) and PEFT's per-adapter
    sub-directories (those with ``adapter_model.safetensors``: the only format compared)."""
    subs = [d for d in adapter_subdirs(path) if os.path.isfile(os.path.join(path, d, ADAPTER_WEIGHTS))]
    return ([""] if not subs or _files(path) else []) + subs


def _sides(a: str, b: str, source: str, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both sides, every weight directory compared with its counterpart; tensors of an adapter directory are
    named ``<adapter>/<tensor>``. An adapter only one side has counts as only in A / only in B."""
    parts_a, parts_b = _parts(a), _parts(b)
    if parts_a == parts_b == [""]:
        return _pair(a, b, source, progress)
    out: list[dict[str, Any]] = [{"path": a, "global_step": _step_of(a)}, {"path": b, "global_step": _step_of(b)}]
    for side in out:
        side.update({"tensors": {}, "sources": set(), "algo": None, "notes": []})
    for part in sorted(set(parts_a) | set(parts_b), key=lambda p: (p != "", p)):
        pa, pb = (os.path.join(a, part) if part else a), (os.path.join(b, part) if part else b)
        if part in parts_a and part in parts_b:
            pair = _pair(pa, pb, source, progress)
        else:
            one = load_side(pa if part in parts_a else pb, source, None, progress)
            pair = (one, None) if part in parts_a else (None, one)
        for side, got in zip(out, pair):
            if got is not None:
                side["tensors"].update({(f"{part}/{n}" if part else n): e for n, e in got["tensors"].items()})
                side["sources"].add(got["source"])
                side["notes"].extend(got["notes"])
                side["algo"] = side["algo"] or got["algo"]
                if side["global_step"] is None:
                    side["global_step"] = got["global_step"]
    for side in out:
        sources = side.pop("sources")
        side["source"] = sources.pop() if len(sources) == 1 else "manifest and files"
    return out[0], out[1]


def diff(a: str | os.PathLike, b: str | os.PathLike, source: str = "auto", progress: bool = False,
         magnitudes: bool = True) -> dict[str, Any]:
    """Compare two checkpoint/model directories; return the JSON-able report ``trainer-guard diff --json`` prints.

    Keys: ``a``/``b`` (path, source, global_step, tensor count, ``notes``: why a manifest was passed over for the
    files), ``steps`` (B's step minus A's, or None), ``identical``, ``counts`` (same/changed/only_a/only_b),
    ``modules`` (see :func:`trainer_guard.core.audit.module_summary`; with ``magnitudes``, each module with changed
    floating-point tensors also gets ``change``: see :func:`change_sizes`), ``tensors`` (name -> status), ``retyped``
    (name -> what changed in dtype/shape). PEFT adapters saved in per-name sub-directories are compared too, their
    tensors named ``<adapter>/<tensor>``.

    Example:
        >>> report = diff("out/checkpoint-2", "out/checkpoint-4")  # doctest: +SKIP
        >>> [m["module"] for m in report["modules"] if m["status"] == "unchanged"]  # doctest: +SKIP
        ['model.embed_tokens']
    """
    a, b = os.fspath(a), os.fspath(b)
    missing = [p for p in (a, b) if not os.path.exists(p)]
    if len(missing) == 2:  # name both: fixing A alone would only lead to the same error for B
        from .doctor import missing_why

        raise UsageError("; ".join(dict.fromkeys(f"{p}: {missing_why(p)}" if p else missing_why(p) for p in missing))
                         + "; pass two checkpoint or model directories")
    sa, sb = _sides(a, b, source, progress)
    ta, tb = sa.pop("tensors"), sb.pop("tensors")
    empty = [s["path"] for s, t in ((sa, ta), (sb, tb)) if not t]
    if empty:  # two empty files are not "identical" checkpoints
        raise UsageError(f"{' and '.join(empty)}: no tensors stored (a safetensors header only, or a manifest that "
                         f"lists none): nothing to compare; save the model again")
    status = classify({n: e["checksum"] for n, e in ta.items()}, {n: e["checksum"] for n, e in tb.items()})
    retyped = {}
    for n, st in status.items():
        if st == CHANGED:
            what = [f"{k} {ta[n][k]} -> {tb[n][k]}" for k in ("dtype", "shape") if ta[n][k] != tb[n][k]]
            if what:
                retyped[n] = "; ".join(what)
    counts = {k: sum(1 for s in status.values() if s == k) for k in (SAME, CHANGED, ONLY_A, ONLY_B)}
    adapters = [p for p in (sa["path"], sb["path"]) if _is_adapter(p)]
    if ta and tb and not counts[SAME] and not counts[CHANGED] and len(adapters) == 1:
        full = sb["path"] if adapters[0] == sa["path"] else sa["path"]
        raise UsageError(f"{adapters[0]} is a PEFT adapter and {full} a full model: their "
                         f"tensors cannot be compared (no name in common). Compare two adapters, or merge this one "
                         f"into its base model (PeftModel.from_pretrained(base, adapter).merge_and_unload()"
                         f".save_pretrained(dir)) and compare that directory with {full}")
    sa["tensors"], sb["tensors"] = len(ta), len(tb)
    steps = (sb["global_step"] - sa["global_step"]) if None not in (sa["global_step"], sb["global_step"]) else None
    modules = module_summary(status)
    if magnitudes:
        _add_change_sizes(modules, change_sizes(a, b, [n for n, st in status.items() if st == CHANGED
                                                       and n not in retyped]))
    return {"a": sa, "b": sb, "steps": steps, "identical": counts[SAME] == len(status), "counts": counts,
            "modules": modules, "tensors": status, "retyped": retyped}


_CHUNK = 1 << 22  # elements compared at a time (32 MiB of float64 per side)


def _locations(path: str) -> dict[str, tuple[str, str]]:
    """Where each tensor of ``path`` (a directory, its PEFT adapter sub-directories, or one .safetensors file) is
    stored: report name (``<adapter>/<tensor>`` for a sub-directory) -> (file, name in that file)."""
    parts = [""] if os.path.isfile(path) else _parts(path)
    out: dict[str, tuple[str, str]] = {}
    for part in parts:
        for f in _files(os.path.join(path, part) if part else path):
            out.update({(f"{part}/{k}" if part else k): (f, k) for k in read_header(f).tensors})
    return out


def change_sizes(a: str | os.PathLike, b: str | os.PathLike, names: list[str]) -> dict[str, dict[str, float]]:
    """How much each tensor in ``names`` changed from ``a`` to ``b``, read from the safetensors files.

    Per tensor: ``diff_sq`` (sum of squared differences), ``a_sq`` (sum of squares of A's values) and ``max_abs``
    (largest absolute difference), computed in float64 a chunk at a time from the mapped files with numpy (no
    torch). Tensors that are not float64/32/16 or bfloat16 (float8, integers), whose shape differs, or that one
    side's files do not hold (a manifest-only alias) are left out.

    Example:
        >>> sizes = change_sizes("out/checkpoint-2", "out/checkpoint-4", ["lm_head.weight"])  # doctest: +SKIP
        >>> (sizes["lm_head.weight"]["diff_sq"] / sizes["lm_head.weight"]["a_sq"]) ** 0.5  # doctest: +SKIP
        0.0031
    """
    a, b = os.fspath(a), os.fspath(b)
    if not names:
        return {}
    la, lb = _locations(a), _locations(b)
    headers: dict[str, Any] = {}
    out: dict[str, dict[str, float]] = {}
    for n in names:
        if n not in la or n not in lb:
            continue
        (fa, ka), (fb, kb) = la[n], lb[n]
        ea = (headers.get(fa) or headers.setdefault(fa, read_header(fa))).tensors[ka]
        eb = (headers.get(fb) or headers.setdefault(fb, read_header(fb))).tensors[kb]
        if ea.shape != eb.shape or torch_name(ea.dtype) not in _FLOATS or torch_name(eb.dtype) not in _FLOATS:
            continue
        xa, xb = _values(fa, ea), _values(fb, eb)
        diff_sq = a_sq = max_abs = 0.0
        for i in range(0, xa.size, _CHUNK):
            x, y = _float64(xa[i:i + _CHUNK], ea.dtype), _float64(xb[i:i + _CHUNK], eb.dtype)
            d = y - x
            diff_sq += float(np.dot(d, d))
            a_sq += float(np.dot(x, x))
            max_abs = max(max_abs, float(np.abs(d).max()) if d.size else 0.0)
        out[n] = {"diff_sq": diff_sq, "a_sq": a_sq, "max_abs": max_abs}
    return out


#: float dtypes (torch names) -> the numpy dtype their bytes are read as (bfloat16 as its 16 raw bits).
_FLOATS = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def _values(path: str, entry: Any) -> np.ndarray:
    """The flat values of one tensor, mapped from the file (no copy, no torch)."""
    dtype = _FLOATS[torch_name(entry.dtype)]
    if not entry.nbytes:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=entry.begin, shape=(entry.nbytes // np.dtype(dtype).itemsize,))


def _float64(x: np.ndarray, code: str) -> np.ndarray:
    """A chunk of :func:`_values` as float64 (bfloat16: its 16 bits are the top half of a float32)."""
    if torch_name(code) == "bfloat16":
        x = (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float64)


def _add_change_sizes(modules: list[dict[str, Any]], sizes: Mapping[str, Mapping[str, float]]) -> None:
    """Sum :func:`change_sizes` per module entry of :func:`~trainer_guard.core.audit.module_summary` (a folded
    ``model.layers.*.mlp`` entry covers every layer's tensors) and store it as the entry's ``change``:
    ``relative`` (``||B - A|| / ||A||`` over the module's changed tensors; ``None`` when A is all zeros, e.g. a
    LoRA B matrix before training), ``norm`` (``||B - A||``) and ``max_abs``."""

    exact = {m["module"]: m for m in modules}
    folded = [(re.compile(re.escape(m["module"]).replace(r"\*", r"\d+")), m) for m in modules if "*" in m["module"]]
    sums: dict[int, list[float]] = {}
    for name, size in sizes.items():
        mod = module_of(name)
        entry = exact.get(mod) or next((m for rx, m in folded if rx.fullmatch(mod)), None)
        if entry is None:
            continue
        acc = sums.setdefault(id(entry), [0.0, 0.0, 0.0])
        acc[0] += size["diff_sq"]
        acc[1] += size["a_sq"]
        acc[2] = max(acc[2], size["max_abs"])
    for m in modules:
        if id(m) in sums:
            diff_sq, a_sq, max_abs = sums[id(m)]
            m["change"] = {"relative": (diff_sq / a_sq) ** 0.5 if a_sq > 0 else None, "norm": diff_sq ** 0.5,
                           "max_abs": max_abs}


def _change_text(change: Mapping[str, Any] | None) -> str:
    """``by 0.31% (max |B-A| 4.1e-04)``: how much a module changed, for :func:`format_text`."""
    if not change:
        return ""
    rel = change["relative"]
    if rel is None:
        size = f"from all zeros to norm {change['norm']:.2e}"
    else:
        size = f"by {rel:.2%}" if rel >= 1e-4 or rel == 0 else f"by {rel * 100:.1e}%"
    return f" {size} (max |B-A| {change['max_abs']:.1e})"


def format_text(report: Mapping[str, Any], list_tensors: bool = False) -> str:
    """The human summary of a :func:`diff` report, one line per module (layer indices folded)."""
    a, b, c = report["a"], report["b"], report["counts"]

    def side(s):
        step = f"step {s['global_step']}, " if s["global_step"] is not None else ""
        return f"{s['path']} ({step}{s['tensors']} tensors, from {s['source']})"

    over = f" over {report['steps']} steps" if (report["steps"] or 0) > 0 else ""  # B before A: no "over -3 steps"
    lines = [f"A: {side(a)}", f"B: {side(b)}",
             f"{sum(c.values())} tensors: {c[SAME]} same, {c[CHANGED]} changed, {c[ONLY_A]} only in A, "
             f"{c[ONLY_B]} only in B"]
    lines[2:2] = [f"note: {n}" for n in (*a.get("notes", ()), *b.get("notes", ()))]
    if any(m.get("change") for m in report["modules"]):
        lines.append("changed by: ||B - A|| / ||A|| over the module's changed tensors; max |B-A|: largest change of one "
                     "value")
    if not c[SAME] and not c[CHANGED] and (c[ONLY_A] or c[ONLY_B]):
        lines.append("no tensor name in common: an adapter against a full model, or two different models?")
    for m in report["modules"]:
        n, counts = m["tensors"], m["counts"]
        detail = f" ({n} tensors)" if n > 1 else ""
        if m["status"] in ("partly changed", "mixed"):
            detail = " (" + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()) + ")"
        timed = over if m["status"] in ("unchanged", "changed", "partly changed") else ""
        lines.append(f"  {m['module']}: {m['status']}{timed}{_change_text(m.get('change'))}{detail}")
    by_change: dict[str, list[str]] = {}
    for name, what in report["retyped"].items():
        by_change.setdefault(what, []).append(name)
    for what, names in by_change.items():  # a whole-model cast is one line, not one per tensor
        if len(names) == 1 or list_tensors:
            lines += [f"  ! {name}: {what}" for name in names]
        else:
            lines.append(f"  ! {len(names)} tensors: {what} ({names[0]}, ...; --tensors lists them)")
    if list_tensors:
        lines += [f"  {st:8s} {name}" for name, st in report["tensors"].items() if st != SAME]
    lines.append("identical" if report["identical"] else "different")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = diff(args.a, args.b, source=args.source, progress=sys.stderr.isatty(),
                  magnitudes=not getattr(args, "checksums_only", False))
    from .cli import emit

    emit(json.dumps(report, indent=2) if args.json else format_text(report, list_tensors=args.tensors))
    return 0 if report["identical"] else 1
