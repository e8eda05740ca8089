"""Checkpoint manifests: per-tensor checksum, dtype and shape of what a save wrote, and how to compare them.

Pure functions, no Trainer. A manifest is a small JSON file (:data:`MANIFEST_FILE`) written into a checkpoint
directory; it describes the tensors *as stored on disk* (for a PEFT model the adapter, for a Hugging Face model the
state dict after tie dedupe), the tie groups (an alias stored once under its kept name), the global step, the
checksum algorithm and library versions. Checksums are unsigned 64-bit integers from
:mod:`trainer_guard.core.checksum`, stored as 16 hex digits (JSON numbers lose precision beyond 2**53).

Layout (``format`` = :data:`MANIFEST_FORMAT`, ``version`` = :data:`MANIFEST_VERSION`)::

    {"format": "trainer_guard.manifest", "version": 1, "algo": "...", "global_step": 4,
     "tensors": {"model.embed_tokens.weight": {"checksum": "9f0c...", "dtype": "float32", "shape": [128, 32],
                                               "file": "model.safetensors", "source": "model"}},
     "tie_groups": [["model.embed_tokens.weight", "lm_head.weight"]],
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"},
     "files": {"model.safetensors": {"size": 41312, "tensors": 12}},
     "fingerprint": "...", "versions": {"torch": "...", ...}}

``source`` is ``"model"`` when the checksum was taken from the live tensor of the same name, ``"file"`` when the
file held a tensor under a name the model does not have (weight conversion on save) and it was read back instead.

Example:
    >>> import torch, tempfile
    >>> from trainer_guard.core.manifest import build_manifest, write_manifest, read_manifest, compare, entries
    >>> m = build_manifest({"w": torch.ones(2, 3)}, global_step=2, tie_groups=[])
    >>> d = tempfile.mkdtemp(); _ = write_manifest(d, m)
    >>> compare(entries(read_manifest(d)), entries(m))
    []
"""

from __future__ import annotations

import functools
import json
import os
import re
import reprlib
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..errors import IntegrityError, UsageError
from .checksum import safetensors_files, safetensors_paths, stored_twice  # noqa: F401  (safetensors_files re-exported)
from ..files import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, MANIFEST_FILE, MODEL_WEIGHTS, TRAINER_STATE
from .io import atomic_write_json, read_json

__all__ = [
    "ForeignManifestError",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "TensorInfo",
    "Mismatch",
    "dtype_name",
    "safetensors_files",
    "file_problem",
    "read_index",
    "build_manifest",
    "write_manifest",
    "read_manifest",
    "files_changed",
    "MalformedManifestError",
    "entries",
    "index_entries",
    "tensor_entries",
    "saved_tensors",
    "saved_layout",
    "stored_groups",
    "converted_names",
    "adapter_subdirs",
    "reconcile",
    "checkpoint_manifest",
    "ManifestWriter",
    "model_problems",
    "compare",
    "foreign_reason",
    "library_versions",
]

MANIFEST_FORMAT = "trainer_guard.manifest"
MANIFEST_VERSION = 1

# safetensors header dtype codes -> torch dtype names (only those this torch knows).
_ST_CODES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64", "C128": "complex128",
}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]


class Mismatch(NamedTuple):
    """One difference found by :func:`compare`: tensor ``name``, ``kind`` and a full sentence ``message``.

    ``kind`` is one of ``missing``, ``extra``, ``dtype``, ``shape``, ``checksum``, ``swapped``.
    """

    name: str
    kind: str
    message: str


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"BF16"`` / ``"bfloat16"`` -> ``"bfloat16"`` (the name stored in manifests)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return _ST_CODES.get(dtype, dtype)


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable safetensors file (truncated, padded, foreign), or ``None`` when it is.

    Reads only the header: 8-byte little-endian length, then JSON with each tensor's byte range.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size < 8:
        return f"{name}: {size} bytes, too short to be a safetensors file (truncated?)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _HEADER_LIMIT or 8 + n > size:
            return (f"{name}: not a safetensors file or truncated (header length {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an int of > 4300 digits, nested too deep
            deep = " (nested too deeply)" if isinstance(e, RecursionError) else ""
            return f"{name}: header is not valid JSON{deep}; not a safetensors file, or corrupted"
    if not isinstance(header, dict):
        return f"{name}: header is not a JSON object; not a safetensors file"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(_uint(o) for o in offs) and offs[0] <= offs[1]):
            return f"{name}: tensor {key!r} has no valid data_offsets; corrupted header"
        end = max(end, offs[1])
    expected = 8 + n + end
    if size < expected:
        return f"{name}: truncated: {size} bytes on disk, the header needs {expected} (last {expected - size} missing)"
    if size > expected:
        return f"{name}: {size - expected} unexpected bytes after the last tensor (padded or overwritten)"
    return None


def read_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor in a ``.safetensors`` file or a directory of them (headers only).

    Raises:
        UsageError: the path does not exist or holds no safetensors file.
        IntegrityError: a file is truncated or not safetensors (names the file), or two files hold the same name.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    files = safetensors_paths(path, UsageError)
    out: dict[str, TensorInfo] = {}
    for fp in files:
        problem = file_problem(fp)
        if problem:
            raise IntegrityError(problem)
        fname = os.path.basename(fp)
        try:
            with safe_open(fp, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    if key in out:
                        raise IntegrityError(stored_twice(key, os.path.join(os.path.dirname(fp), out[key].file),
                                                          fp))
                    out[key] = TensorInfo(fname, dtype_name(sl.get_dtype()), tuple(int(s) for s in sl.get_shape()))
        except IntegrityError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError on bad files
            raise IntegrityError(f"{fname}: unreadable safetensors file ({e})") from None
    return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint (recorded in each manifest)."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("trainer_guard", "torch", "transformers", "peft", "safetensors", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _hex(x: int) -> str:
    return f"{int(x) & 0xFFFFFFFFFFFFFFFF:016x}"


def build_manifest(
    tensors: Mapping[str, torch.Tensor | TensorInfo],
    *,
    global_step: int | None,
    tie_groups: list[list[str]],
    files: Mapping[str, str] | None = None,
    sums: Mapping[str, int] | None = None,
    sources: Mapping[str, str] | None = None,
    directory: str | os.PathLike | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """The manifest describing ``tensors`` (names as stored on disk).

    Args:
        tensors: name -> tensor, exactly what the files hold (any device; checksums are device-independent), or
            its :class:`TensorInfo` (a file header entry: nothing is read) when ``sums`` holds its checksum.
        global_step: the optimizer step of the checkpoint (``None`` for a model directory).
        tie_groups: groups of names sharing one storage; members absent from ``tensors`` become aliases of the
            member that is present.
        files: name -> file it was written to (``model.safetensors`` when omitted).
        sums: precomputed checksums (skip recomputing); others are computed with ``backend``.
        sources: name -> ``"model"`` / ``"file"`` (where the checksum came from; default ``"model"``).
        directory: when given, the size of each file named in ``files`` is recorded (detects truncation early).

    Raises:
        ChecksumError: a tensor cannot be checksummed, or is given as a :class:`TensorInfo` with no checksum in
            ``sums``.
    """
    from .checksum import CHECKSUM_ALGO, checksums, fingerprint

    sums = dict(sums or {})
    todo = {k: v for k, v in tensors.items() if k not in sums}
    headers_only = sorted(k for k, v in todo.items() if not isinstance(v, torch.Tensor))
    if headers_only:
        from ..errors import ChecksumError

        raise ChecksumError(f"build_manifest: {headers_only[0]!r} is given by its header only (a TensorInfo), with no "
                            f"checksum in `sums`; pass its checksum in `sums` (file_checksums of its file) or the "
                            f"tensor itself")
    if todo:
        sums.update(checksums(todo, backend=backend))
    files = dict(files or {})
    out_tensors = {}
    for name in sorted(tensors):
        t = tensors[name]
        out_tensors[name] = {
            "checksum": _hex(sums[name]), "dtype": dtype_name(t.dtype), "shape": [int(s) for s in t.shape],
            "file": files.get(name, MODEL_WEIGHTS), "source": (sources or {}).get(name, "model"),
        }
    aliases = {}
    for group in tie_groups:
        kept = [n for n in group if n in tensors]
        if kept:
            aliases.update({n: kept[0] for n in group if n not in tensors})
    file_info: dict[str, dict[str, int]] = {}
    for name, entry in out_tensors.items():
        file_info.setdefault(entry["file"], {"tensors": 0})["tensors"] += 1
    if directory is not None:
        for fname, info in file_info.items():
            fp = os.path.join(directory, fname)
            if os.path.isfile(fp):
                info["size"] = os.path.getsize(fp)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "algo": CHECKSUM_ALGO,
        "global_step": global_step,
        "tensors": out_tensors,
        "tie_groups": [list(g) for g in tie_groups],
        "aliases": aliases,
        "files": file_info,
        "fingerprint": _hex(fingerprint({k: sums[k] for k in tensors})),
        "versions": library_versions(),
    }


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> str | None:
    """Atomically write ``manifest`` into ``directory`` on the main process; return its path (``None`` elsewhere).

    Temp file + fsync + rename: a crash mid-write leaves the previous manifest or none, never a torn one.
    """
    from .._dist import is_main_process

    if not is_main_process():
        return None
    path = os.path.join(os.fspath(directory), MANIFEST_FILE)
    atomic_write_json(path, dict(manifest))
    return path


class MalformedManifestError(UsageError):
    """A manifest file that is unreadable as one (corrupted, hand-edited, not JSON): ``path``, and ``what`` is wrong.

    Not raised for a manifest of another format (:class:`ForeignManifestError`) or a newer version.
    """

    def __init__(self, path: str, what: str) -> None:
        super().__init__(self.named(path, what))
        self.path, self.what = path, what

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable with its two arguments
        return type(self), (self.path, self.what)

    @staticmethod
    def named(name: str, what: str) -> str:
        """The message, naming the manifest as ``name`` (a full path, or just the file name in a report)."""
        return f"{name}: malformed manifest ({what}); delete it or re-save the checkpoint"


class ForeignManifestError(UsageError):
    """A ``trainer_guard_manifest.json`` that is JSON but not a trainer_guard manifest (another tool's file)."""


def files_changed(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[str, str]:
    """File name -> why, for each file ``manifest`` lists that is no longer what it described: missing, of another
    size, or written after the manifest file in ``directory`` (in the manifest's order; empty when none).

    Example:
        >>> import tempfile
        >>> files_changed(tempfile.mkdtemp(), {"files": {"model.safetensors": {"size": 8}}})
        {'model.safetensors': 'model.safetensors is missing'}
    """
    directory = os.fspath(directory)
    mpath = os.path.join(directory, MANIFEST_FILE)
    written = os.path.getmtime(mpath) if os.path.isfile(mpath) else None
    out = {}
    for fname, info in (manifest.get("files") or {}).items():
        try:
            st = os.stat(os.path.join(directory, fname))
        except OSError:
            out[fname] = f"{fname} is missing"
            continue
        if isinstance(info, dict) and info.get("size") not in (None, st.st_size):
            out[fname] = f"{fname} is {st.st_size:,} bytes, the manifest recorded {info['size']:,}"
        elif written is not None and st.st_mtime > written:
            out[fname] = f"{fname} was written after the manifest"
    return out


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest in ``directory``, or ``None`` when it has none.

    Raises:
        MalformedManifestError: the file is not valid JSON (nested too deeply included) or holds malformed entries
            (a shape of 1e400 or 2.5, a checksum or fingerprint that is not 1 to 16 hex digits, ...).
        ForeignManifestError: the file is another tool's (another ``format``).
        UsageError: the file is unreadable or of a newer version. Each message names the file
            and what is wrong.
    """
    path = os.path.join(os.fspath(directory), MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        m = read_json(path)
    except ValueError as e:  # bad UTF-8 or JSON, an int of > 4300 digits
        raise MalformedManifestError(path, f"not valid JSON: {e}") from None
    except RecursionError:
        raise MalformedManifestError(path, "JSON nested too deeply") from None
    except OSError as e:
        raise UsageError(f"{path}: unreadable ({e.strerror or e}); check its permissions") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ForeignManifestError(f"{path}: not a trainer_guard manifest (format {got!r}, expected "
                                   f"{MANIFEST_FORMAT!r})")
    if type(m.get("version")) is not int:  # noqa: E721  (True == 1 and 1.0 == 1: not a version number)
        raise MalformedManifestError(path, f"version is {reprlib.repr(m.get('version'))}, expected an integer")
    if m.get("version") != MANIFEST_VERSION:
        raise UsageError(f"{path}: manifest version {m.get('version')!r} is not supported (this trainer_guard reads "
                         f"version {MANIFEST_VERSION}); upgrade trainer_guard")
    shapes = {"tensors": dict, "files": dict, "aliases": dict, "fingerprint": str, "tie_groups": list}
    bad = [f"{k!r} is a {type(m[k]).__name__}, expected a {t.__name__}" for k, t in shapes.items()
           if k in m and not isinstance(m[k], t)]
    if bad or "tensors" not in m:
        raise MalformedManifestError(path, "; ".join(bad) or "no tensors entry")
    bad = _malformed_values(m)
    if bad:
        raise MalformedManifestError(path, bad)
    try:  # _malformed_values checked what these read; kept as a net for anything it missed
        entries(m)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
        raise MalformedManifestError(path, f"entry {e!r}") from None
    return m


def _uint(v: Any) -> bool:
    """``v`` is an ``int`` (not a ``bool``: JSON ``true`` parses as one) in ``[0, 2**63)``."""
    return type(v) is int and 0 <= v < 1 << 63  # noqa: E721


def _hex64(v: Any) -> bool:
    """``v`` is a checksum as manifests store it: 1 to 16 hex digits (an unsigned 64-bit int)."""
    return isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{1,16}", v) is not None


def _malformed_values(m: Mapping[str, Any]) -> str | None:
    """What is wrong inside a manifest whose top-level keys have the right types (hand edits), or ``None``."""
    step = m.get("global_step")
    if step is not None and not _uint(step):
        return f"global_step is {reprlib.repr(step)}, expected a step number or null"
    if "fingerprint" in m and not _hex64(m["fingerprint"]):
        return f"fingerprint is {reprlib.repr(m['fingerprint'])}, expected 1 to 16 hex digits"
    for name, e in m["tensors"].items():
        if not isinstance(e, dict) or not isinstance(e.get("file", ""), str) or not isinstance(
                e.get("source", "model"), str):
            return f"tensor entry {name!r} needs a 'file' and a 'source' that are strings"
        if not _hex64(e.get("checksum")):
            return (f"tensor {name!r}: checksum {reprlib.repr(e.get('checksum'))} is not 1 to 16 hex digits "
                    f"(0 to 2**64-1)")
        if not isinstance(e.get("dtype"), str):
            return f"tensor {name!r}: dtype {reprlib.repr(e.get('dtype'))} is not a dtype name"
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(_uint(s) for s in shape):
            return f"tensor {name!r}: shape {reprlib.repr(shape)} is not a list of sizes (integers 0 to 2**63-1)"
    for fname, info in m.get("files", {}).items():
        if not isinstance(info, dict) or not all(_uint(info[k]) for k in ("size", "tensors") if k in info):
            return f"files entry {fname!r} is {reprlib.repr(info)}, expected {{'size': bytes, 'tensors': count}}"
        if os.path.basename(fname) != fname:
            return f"files entry {fname!r} is not a file name in the checkpoint directory"
    for alias, kept in m.get("aliases", {}).items():
        if not isinstance(kept, str):
            return f"alias {alias!r} maps to {reprlib.repr(kept)}, expected a tensor name"
    return None


def entries(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> ``{"checksum": int, "dtype": str, "shape": tuple}`` of a manifest's tensors (for :func:`compare`)."""
    out = {}
    for name, e in manifest["tensors"].items():
        out[name] = {"checksum": int(e["checksum"], 16), "dtype": str(e["dtype"]),
                     "shape": tuple(int(s) for s in e["shape"])}
    return out


def index_entries(index: Mapping[str, TensorInfo], sums: Mapping[str, int] | None = None) -> dict[str, dict]:
    """:func:`compare` entries from a file index plus optional checksums (``None`` = not compared)."""
    sums = sums or {}
    return {k: {"checksum": sums.get(k), "dtype": i.dtype, "shape": tuple(i.shape)} for k, i in index.items()}


def tensor_entries(tensors: Mapping[str, torch.Tensor], sums: Mapping[str, int] | None = None) -> dict[str, dict]:
    """:func:`compare` entries from live tensors plus optional checksums."""
    sums = sums or {}
    return {k: {"checksum": sums.get(k), "dtype": dtype_name(t.dtype), "shape": tuple(t.shape)}
            for k, t in tensors.items()}


def compare(
    expected: Mapping[str, Mapping[str, Any]],
    actual: Mapping[str, Mapping[str, Any]],
    *,
    expected_label: str = "manifest",
    actual_label: str = "files",
    check_extra: bool = True,
) -> list[Mismatch]:
    """Every difference between two ``name -> {checksum, dtype, shape}`` maps, sorted by tensor name.

    A checksum of ``None`` on either side is not compared. Two tensors whose contents are each other's are
    reported once as ``swapped``; a tensor holding another one's data says whose.
    """
    out: list[Mismatch] = []
    bad_sum: dict[str, tuple[int, int]] = {}
    for name in sorted(expected):
        e = expected[name]
        a = actual.get(name)
        if a is None:
            out.append(Mismatch(name, "missing", f"{name}: in the {expected_label} but missing from the {actual_label}"))
        elif a["dtype"] != e["dtype"]:
            out.append(Mismatch(name, "dtype", f"{name}: dtype is {a['dtype']} in the {actual_label} but "
                                               f"{e['dtype']} in the {expected_label}"))
        elif tuple(a["shape"]) != tuple(e["shape"]):
            out.append(Mismatch(name, "shape", f"{name}: shape is {list(a['shape'])} in the {actual_label} but "
                                               f"{list(e['shape'])} in the {expected_label}"))
        elif e["checksum"] is not None and a["checksum"] is not None and e["checksum"] != a["checksum"]:
            bad_sum[name] = (e["checksum"], a["checksum"])
    if check_extra:
        for name in sorted(set(actual) - set(expected)):
            out.append(Mismatch(name, "extra", f"{name}: in the {actual_label} but not in the {expected_label}"))
    owner = {es: n for n, (es, _) in bad_sum.items()}
    done: set[str] = set()
    for name, (es, got) in bad_sum.items():
        if name in done:
            continue
        other = owner.get(got)
        if other and other != name and bad_sum[other][1] == es:
            done.update((name, other))
            out.append(Mismatch(name, "swapped", f"{name} and {other}: contents swapped in the {actual_label} "
                                                 f"(each holds the data the {expected_label} records for the other)"))
        elif other and other != name:
            out.append(Mismatch(name, "checksum", f"{name}: holds the data of {other} in the {actual_label} "
                                                  f"(checksum {got:016x}, {expected_label} {es:016x})"))
        else:
            out.append(Mismatch(name, "checksum", f"{name}: checksum {got:016x} in the {actual_label} differs from "
                                                  f"{es:016x} in the {expected_label} (data changed)"))
    return sorted(out, key=lambda m: m.name)


def foreign_reason(manifest: Mapping[str, Any], mismatches: Sequence[Mismatch], n_actual: int) -> str | None:
    """Why ``manifest`` looks like it belongs to another checkpoint or model, or ``None``.

    Foreign means: none of its tensor names is present, or two or more tensors compared and none matched.
    """
    n = len(manifest["tensors"])
    by_kind: dict[str, int] = {}
    for m in mismatches:
        by_kind[m.kind] = by_kind.get(m.kind, 0) + 1
    missing = by_kind.get("missing", 0)
    if n and missing == n and n_actual:
        return f"none of the manifest's {n} tensor names is in the files: it describes another model"
    bad = sum(by_kind.get(k, 0) for k in ("dtype", "shape", "checksum")) + 2 * by_kind.get("swapped", 0)
    if n - missing >= 2 and bad == n - missing:
        return (f"not one of the {n - missing} tensors matches the manifest: it belongs to another checkpoint "
                f"(or every tensor was overwritten)")
    return None


def saved_layout(model: torch.nn.Module) -> dict[str, tuple[dict[str, torch.Tensor], list[list[str]]]]:
    """Where a ``Trainer`` save of ``model`` puts its tensors: sub-directory -> :func:`saved_tensors` of it.

    ``""`` is the checkpoint directory itself. A PEFT model's adapters are saved as ``PeftModel.save_pretrained``
    lays them out: ``"default"`` in the directory, every other adapter name in ``<directory>/<name>/`` (this is
    where ``Trainer`` looks for them on resume). Any other model: ``{"": saved_tensors(model)}``.

    Example:
        >>> from trainer_guard.tiny import tiny_model
        >>> list(saved_layout(tiny_model("llama-tied")))
        ['']
    """
    names = _peft_adapter_names(model)
    if not names:
        return {"": saved_tensors(model)}
    return {("" if n == "default" else n): saved_tensors(model, adapter_name=n) for n in names}


def adapter_subdirs(directory: str | os.PathLike) -> list[str]:
    """Sub-directories of ``directory`` that hold a PEFT adapter (``adapter_model.safetensors``/``.bin``), sorted.

    ``PeftModel.save_pretrained`` puts every adapter not named ``"default"`` there; ``Trainer`` resumes them from
    there too.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(d for d in os.listdir(directory) if any(
        os.path.isfile(os.path.join(directory, d, f)) for f in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN))
        and not os.path.isfile(os.path.join(directory, d, TRAINER_STATE)))  # a checkpoint-N of a PEFT run


def _peft_adapter_names(model: Any) -> list[str]:
    """The adapter names a ``PeftModel`` saves (all of ``peft_config``); ``[]`` for any other model."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return []
    return sorted(model.peft_config) if isinstance(model, PeftModel) else []


def saved_tensors(
    model: torch.nn.Module, adapter_name: str | None = None
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """The tensors a ``Trainer`` save of ``model`` writes, keyed by their stored names, and its tie groups.

    - PEFT model: the state dict of adapter ``adapter_name`` (default: the active one) as
      ``PeftModel.save_pretrained`` writes it (``get_peft_model_state_dict``, embedding layers ``"auto"``), no tie
      groups. Several adapters are saved into several directories: see :func:`saved_layout`.
    - Hugging Face model: ``state_dict()`` minus ``_keys_to_ignore_on_save``, under the names ``save_pretrained``
      writes (load-time weight conversions such as fused MoE experts reverted); tie groups found by identity (the
      save keeps one member per group).
    - Any other module: ``state_dict()`` (a guard's state-dict hook may already have dropped tie aliases).
    """
    from .ties import find_tied_groups

    try:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError:  # pragma: no cover
        PeftModel = None
    if PeftModel is not None and isinstance(model, PeftModel):
        from transformers.utils import logging as hf_logging

        adapter = adapter_name or (model.active_adapter if isinstance(model.active_adapter, str)
                                   else model.active_adapters[0])
        verbosity = hf_logging.get_verbosity()
        try:
            sd = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers="auto")
        finally:
            hf_logging.set_verbosity(verbosity)
        return dict(sd), []
    sd = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        sd.pop(key, None)
    return _as_saved(model, dict(sd)), stored_groups(model, find_tied_groups(model), sd)


def stored_groups(model: torch.nn.Module, groups: list[list[str]],
                  sd: Mapping[str, torch.Tensor] | None = None) -> list[list[str]]:
    """Tie ``groups`` under the names ``save_pretrained`` stores (a vision-language model's ``lm_head.weight`` is
    ``language_model.lm_head.weight`` on disk); names it stores unchanged stay as they are."""
    sd = model.state_dict() if sd is None else sd
    return [[_saved_name(model, n, sd.get(n)) for n in g] for g in groups]


def _saved_name(model: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> str:
    """The name ``save_pretrained`` stores ``name`` under when it only renames it (a vision-language model's
    ``lm_head.weight`` -> ``language_model.lm_head.weight``); ``name`` itself otherwise."""
    if tensor is None:
        return name
    out = stored_names(model, name, tensor)
    return next(iter(out)) if len(out) == 1 else name


def stored_names(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> set[str]:
    """The names ``save_pretrained`` stores the live tensor ``name`` under (``{name}`` when unchanged), decided on a
    meta tensor of its shape: nothing is allocated or copied."""
    return set(_as_saved(model, {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")}))


def converted_names(model: torch.nn.Module) -> set[str]:
    """Stored names that exist only in the layout ``save_pretrained`` writes, not in ``model.state_dict()``
    (transformers' load-time weight conversions, e.g. per-expert MoE tensors). ``Trainer``'s resume loads weights
    with ``load_state_dict(strict=False)``, which skips every one of them."""
    if _peft_adapter_names(model):
        return set()
    sd = model.state_dict()
    return {k for n, t in sd.items() for k in stored_names(model, n, t)} - set(sd)


def _as_saved(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` under the names and layout ``save_pretrained`` writes: transformers reverts its load-time weight
    conversions on save (e.g. Mixtral's fused ``mlp.experts.gate_up_proj`` becomes per-expert
    ``block_sparse_moe.experts.N.w1/w3.weight``). Uses transformers' own ``revert_weight_conversion``; models it
    does not convert come back unchanged. Where it is unavailable or fails, the names stay as they are and the
    renamed tensors are checksummed from the files (:func:`reconcile`)."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - transformers < 5
        return sd
    if not isinstance(model, PreTrainedModel):
        return sd
    try:
        return dict(revert_weight_conversion(model, sd))
    except Exception:  # pragma: no cover - a conversion this version cannot revert: files answer for it
        return sd


class Reconciled(NamedTuple):
    """What :func:`reconcile` found.

    ``from_model``: stored name -> live tensor of the same name, dtype and shape (checksummed from memory);
    ``from_file``: stored names with no such live tensor (checksummed from the files); ``problems`` / ``warnings``.
    """

    from_model: dict[str, torch.Tensor]
    from_file: list[str]
    problems: list[str]
    warnings: list[str]


def reconcile(
    expected: Mapping[str, torch.Tensor], tie_groups: list[list[str]], index: Mapping[str, TensorInfo]
) -> Reconciled:
    """Match the tensors a save should have written with the files' headers (names, dtypes, shapes).

    Problems: a model tensor the files lack (and that is no alias of a stored tie member), a tensor stored with
    another dtype or shape. Files holding names the model lacks while every model tensor is accounted for are a
    warning (weight conversion on save renames tensors); those are checksummed from the files.
    """
    problems, warnings, mismatched = [], [], []
    from_model: dict[str, torch.Tensor] = {}
    for name in sorted(set(expected) & set(index)):
        t, info = expected[name], index[name]
        if dtype_name(t.dtype) != info.dtype:
            problems.append(f"{name}: stored as {info.dtype} in {info.file} but the model holds {dtype_name(t.dtype)}")
        elif tuple(t.shape) != info.shape:
            problems.append(f"{name}: stored with shape {list(info.shape)} in {info.file} but the model's is "
                            f"{list(t.shape)}")
        else:
            from_model[name] = t
            continue
        mismatched.append(name)
    covered = set(index)
    for group in tie_groups:
        if any(n in index for n in group):
            covered.update(group)
    unsaved = sorted(set(expected) - covered)
    extra = sorted(set(index) - set(expected))
    if unsaved and extra:
        warnings.append(f"{len(extra)} stored tensors have names the model lacks and {len(unsaved)} model tensors "
                        f"were stored under other names (weight conversion on save?), e.g. {extra[0]} / "
                        f"{unsaved[0]}; the stored ones are checksummed from the files, not compared on resume")
    else:
        problems.extend(f"{n}: in the model but not saved in the checkpoint files; it will not be restored"
                        for n in unsaved)
        if extra:
            warnings.append(f"{len(extra)} stored tensors have names the model lacks (e.g. {extra[0]}); "
                            f"checksummed from the files")
    return Reconciled(from_model, sorted(extra + mismatched), problems, warnings)


class Checked(NamedTuple):
    """Result of :func:`checkpoint_manifest`: the manifest (``None`` when problems block it), problems, warnings."""

    manifest: dict[str, Any] | None
    problems: list[str]
    warnings: list[str]


def checkpoint_manifest(
    expected: Mapping[str, torch.Tensor],
    tie_groups: list[list[str]],
    directory: str | os.PathLike,
    *,
    global_step: int | None,
    verify: str = "manifest",
    backend: str = "auto",
) -> Checked:
    """Check what ``directory`` stores against ``expected`` (see :func:`saved_tensors`) and build its manifest.

    ``verify``: ``"manifest"`` compares the files' headers with the tensors (names, dtypes, shapes) and takes the
    checksums from memory; ``"readback"`` also checksums the files and compares; ``"off"`` turns problems into
    warnings and records what the files hold. With problems (and ``verify != "off"``) no manifest is built.
    """
    from .checksum import checksums, file_checksums
    from ..errors import ChecksumError

    if not safetensors_files(directory):
        return Checked(None, [], [f"no *.safetensors file in {os.fspath(directory)} (weights saved another way?): "
                                  f"not verified, no manifest written"])
    try:
        index = read_index(directory)
    except (IntegrityError, UsageError) as e:
        return Checked(None, [str(e)], [])
    rec = reconcile(expected, tie_groups, index)
    problems, warnings = list(rec.problems), list(rec.warnings)
    sums = checksums(rec.from_model, backend=backend)
    file_sums: dict[str, int] = {}
    if verify == "readback" or rec.from_file:
        try:
            file_sums = file_checksums(directory)
        except ChecksumError as e:
            return Checked(None, problems + [str(e)], warnings)
    if verify == "readback":
        problems += [m.message for m in compare(
            tensor_entries(rec.from_model, sums), index_entries(index, file_sums),
            expected_label="model", actual_label="files", check_extra=False)]
    if problems and verify != "off":
        return Checked(None, problems, warnings)
    sums.update({k: file_sums[k] for k in rec.from_file})
    stored = {**rec.from_model, **{k: index[k] for k in rec.from_file}}  # headers only: nothing is read back
    manifest = build_manifest(
        stored, global_step=global_step, tie_groups=tie_groups, files={k: i.file for k, i in index.items()},
        sums=sums, sources={k: "file" for k in rec.from_file}, directory=directory)
    return Checked(manifest, [], warnings + problems)


def model_problems(
    live: Mapping[str, torch.Tensor], manifest: Mapping[str, Any], backend: str = "auto"
) -> tuple[list[str], list[str]]:
    """``(problems, warnings)``: how the ``live`` tensors (stored names) differ from a checkpoint's manifest.

    Every manifest tensor checksummed from the model at save time must be live with the same dtype, shape and
    checksum; a tie alias (stored once) must equal the stored member. Live tensors absent from the manifest are
    not reported (a resumed model may hold more than its checkpoint).
    """
    from .checksum import CHECKSUM_ALGO, checksums

    recorded = {k: e for k, e in entries(manifest).items() if manifest["tensors"][k].get("source", "model") == "model"}
    aliases = {a: k for a, k in manifest.get("aliases", {}).items() if k in recorded and a in live}
    expected = {**recorded, **{a: recorded[k] for a, k in aliases.items()}}
    warnings = []
    same_algo = manifest.get("algo") == CHECKSUM_ALGO
    if not same_algo:
        warnings.append(f"the manifest uses checksum {manifest.get('algo')!r}, this version {CHECKSUM_ALGO!r}: "
                        f"only names, dtypes and shapes were compared")
    present = {k: live[k] for k in expected if k in live}
    comparable = {k: t for k, t in present.items()
                  if tuple(t.shape) == expected[k]["shape"] and dtype_name(t.dtype) == expected[k]["dtype"]}
    sums = checksums(comparable, backend=backend) if same_algo else {}
    problems = []
    for m in compare(expected, tensor_entries(present, sums), expected_label="checkpoint manifest",
                     actual_label="resumed model", check_extra=False):
        msg = m.message.replace("(data changed)", "(not restored from the checkpoint: the load skipped it, or it "
                                                  "was re-initialised or changed after the load)")
        if m.name in aliases:
            msg += (f" (stored once as a tie of {aliases[m.name]} and the tie was not restored, so it was "
                    f"initialised at random: declare the tie, e.g. config.tie_word_embeddings=True, TiedWeightsGuard)")
        problems.append(msg)
    return problems, warnings


class ManifestWriter:
    """Writes manifests (atomic, fsynced: :func:`write_manifest`) on one background thread, one at a time.

    Everything a manifest says is computed before :meth:`submit`; only the file write and fsync run on the thread
    (started once, reused). :meth:`join` waits for the pending write and raises its failure, so a manifest that
    could not be written is never silent.

    Example:
        >>> import tempfile, torch
        >>> w = ManifestWriter()
        >>> w.submit(tempfile.mkdtemp(), build_manifest({"w": torch.ones(2)}, global_step=1, tie_groups=[]))
        >>> w.join()
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._pending: Any = None
        self._error: tuple[str, Exception] | None = None
        self.last_seconds: float | None = None

    def _run(self, items: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        t0 = time.perf_counter()
        for directory, manifest in items:
            try:
                write_manifest(directory, manifest)
            except Exception as e:  # re-raised by join() in the caller's thread
                self._error = (directory, e)
                break
        self.last_seconds = time.perf_counter() - t0

    def submit(self, directory: str | os.PathLike, manifest: Mapping[str, Any], background: bool = True) -> None:
        """Write ``manifest`` into ``directory`` (after the previous write finished); inline when not ``background``."""
        self.submit_many([(directory, manifest)], background=background)

    def submit_many(self, items: Sequence[tuple[str | os.PathLike, Mapping[str, Any]]],
                    background: bool = True) -> None:
        """Write several ``(directory, manifest)`` pairs in order (one save of several PEFT adapters)."""
        self.join()
        items = [(os.fspath(d), m) for d, m in items]
        if background:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer_guard-manifest")
            self._pending = self._pool.submit(self._run, items)
        else:
            self._run(items)
            self.join()

    def join(self) -> None:
        """Wait for the pending write; raise :class:`IntegrityError` (naming the file) if it failed."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._error is not None:
            (directory, e), self._error = self._error, None
            if not os.path.isdir(directory):  # the checkpoint itself was deleted meanwhile (rotation, best-model
                return                        # cleanup at train end): nothing is left that a manifest could lie about
            raise IntegrityError(f"{os.path.join(directory, MANIFEST_FILE)} could not be written ({e}); that "
                                 f"checkpoint has no manifest. Check free disk space and permissions.") from e
