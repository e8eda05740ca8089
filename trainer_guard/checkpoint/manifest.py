"""Checkpoint manifests: the schema of :data:`~trainer_guard.files.MANIFEST_FILE` (build, write, read, compare).

Pure functions, no Trainer, no ranks (the writer and the checks live beside this module in
:mod:`trainer_guard.checkpoint`). A manifest is a small JSON file written into a checkpoint
directory; it describes the tensors *as stored on disk* (for a PEFT model the adapter, for a Hugging Face model the
state dict after tie dedupe), the tie groups (an alias stored once under its kept name), the global step, the
checksum algorithm and library versions. Checksums are unsigned 64-bit integers from
:mod:`trainer_guard.checksum`, stored as 16 hex digits (JSON numbers lose precision beyond 2**53).

Versions: :func:`build_manifest` describes the tensors and their weight files (version 1, what trainer_guard wrote
before 0.2 and still reads); :func:`trainer_guard.checkpoint.contents.commit` makes it describe the whole directory
(version 2 = :data:`MANIFEST_VERSION`: every file with its size and checksum, and a ``digest`` of the manifest
itself) when the save is written, and that is what the writer writes, last: the checkpoint's commit mark.

Layout (``format`` = :data:`MANIFEST_FORMAT`, ``version`` 1 shown; version 2 adds a ``"checksum"`` or a
``"header"`` checksum to each ``files`` entry, lists every file, and adds ``"digest"``)::

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
    >>> from trainer_guard.checkpoint.manifest import build_manifest, write_manifest, read_manifest, compare, entries
    >>> m = build_manifest({"w": torch.ones(2, 3)}, global_step=2, tie_groups=[])
    >>> d = tempfile.mkdtemp(); _ = write_manifest(d, m)
    >>> compare(entries(read_manifest(d)), entries(m))
    []
"""

from __future__ import annotations

import functools
import os
import re
import reprlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..checksum.spec import CHECKSUM_ALGO, fingerprint
from ..core.io import TOO_DEEP, atomic_write_json, read_json
from ..errors import ChecksumError, ForeignManifestError, MalformedManifestError, UsageError
from ..files import MANIFEST_FILE, MODEL_WEIGHTS
from ..formats.safetensors import TensorInfo, is_uint, torch_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "ForeignManifestError",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "TENSORS_VERSION",
    "WHOLE_VERSION",
    "TensorInfo",
    "Mismatch",
    "dtype_name",
    "build_manifest",
    "write_manifest",
    "read_manifest",
    "MalformedManifestError",
    "entries",
    "index_entries",
    "tensor_entries",
    "compare",
    "foreign_reason",
    "library_versions",
]

MANIFEST_FORMAT = "trainer_guard.manifest"
TENSORS_VERSION = 1
"""A manifest of the tensors and their weight files only (:func:`build_manifest`; every manifest before 0.2)."""
WHOLE_VERSION = 2
"""A manifest of every file of its directory (:func:`trainer_guard.checkpoint.contents.commit`)."""
MANIFEST_VERSION = WHOLE_VERSION
"""The newest version this trainer_guard writes and reads (it reads every version from 1)."""


class Mismatch(NamedTuple):
    """One difference found by :func:`compare`: tensor ``name``, ``kind`` and a full sentence ``message``.

    ``kind`` is one of ``missing``, ``extra``, ``dtype``, ``shape``, ``checksum``, ``swapped``.
    """

    name: str
    kind: str
    message: str


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"BF16"`` / ``"bfloat16"`` -> ``"bfloat16"`` (the name stored in manifests; the table is
    :mod:`trainer_guard.formats.safetensors`'s)."""
    return torch_name(dtype)


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
    from ..checksum.tensors import checksums  # lazy: imports torch (doctor, diff need none)

    sums = dict(sums or {})
    todo = {k: v for k, v in tensors.items() if k not in sums}
    headers_only = sorted(k for k, v in todo.items() if isinstance(v, TensorInfo))
    if headers_only:
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
        "version": TENSORS_VERSION,
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
    from .._dist import is_main_process  # lazy: imports accelerate and torch (doctor, diff need neither)

    if not is_main_process():
        return None
    path = os.path.join(os.fspath(directory), MANIFEST_FILE)
    atomic_write_json(path, dict(manifest))
    return path


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
    except ValueError as e:  # bad UTF-8 or JSON, an int of > 4300 digits (DamagedFileError: .reason is the parser's)
        reason = getattr(e, "reason", str(e))
        raise MalformedManifestError(path, reason if reason == TOO_DEEP else f"not valid JSON: {reason}") from None
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
    if not TENSORS_VERSION <= m.get("version") <= MANIFEST_VERSION:
        raise UsageError(f"{path}: manifest version {m.get('version')!r} is not supported (this trainer_guard reads "
                         f"versions {TENSORS_VERSION} to {MANIFEST_VERSION}); upgrade trainer_guard")
    shapes = {"tensors": dict, "files": dict, "aliases": dict, "fingerprint": str, "tie_groups": list, "digest": str,
              "partitions": dict}
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


def _hex64(v: Any) -> bool:
    """``v`` is a checksum as manifests store it: 1 to 16 hex digits (an unsigned 64-bit int)."""
    return isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{1,16}", v) is not None


def _malformed_values(m: Mapping[str, Any]) -> str | None:
    """What is wrong inside a manifest whose top-level keys have the right types (hand edits), or ``None``."""
    step = m.get("global_step")
    if step is not None and not is_uint(step):
        return f"global_step is {reprlib.repr(step)}, expected a step number or null"
    if "fingerprint" in m and not _hex64(m["fingerprint"]):
        return f"fingerprint is {reprlib.repr(m['fingerprint'])}, expected 1 to 16 hex digits"
    for name, e in [*m["tensors"].items(), *m.get("partitions", {}).items()]:  # partitions: ZeRO-3's, no file
        if not isinstance(e, dict) or not isinstance(e.get("file", ""), str) or not isinstance(
                e.get("source", "model"), str):
            return f"tensor entry {name!r} needs a 'file' and a 'source' that are strings"
        if not _hex64(e.get("checksum")):
            return (f"tensor {name!r}: checksum {reprlib.repr(e.get('checksum'))} is not 1 to 16 hex digits "
                    f"(0 to 2**64-1)")
        if not isinstance(e.get("dtype"), str):
            return f"tensor {name!r}: dtype {reprlib.repr(e.get('dtype'))} is not a dtype name"
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(is_uint(s) for s in shape):
            return f"tensor {name!r}: shape {reprlib.repr(shape)} is not a list of sizes (integers 0 to 2**63-1)"
    whole = m.get("version") >= WHOLE_VERSION
    if whole and not _hex64(m.get("digest")):
        return f"digest is {reprlib.repr(m.get('digest'))}, expected 1 to 16 hex digits"
    for fname, info in m.get("files", {}).items():
        if not isinstance(info, dict) or not all(is_uint(info[k]) for k in ("size", "tensors") if k in info):
            return f"files entry {fname!r} is {reprlib.repr(info)}, expected {{'size': bytes, 'tensors': count}}"
        if not all(_hex64(info[k]) for k in ("checksum", "header") if k in info):
            return f"files entry {fname!r} is {reprlib.repr(info)}: its checksum is not 1 to 16 hex digits"
        parts = fname.split("/")
        if (os.path.basename(fname) != fname and not whole) or not all(
                p and p not in (".", "..") and os.path.basename(p) == p for p in parts):
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
