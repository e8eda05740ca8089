"""A save's files against the model that wrote them, and a loaded model against a manifest.

:func:`reconcile` matches the tensors a save should have written with the files' headers; :func:`checkpoint_manifest`
checks a weight directory after a save and builds its manifest; :func:`model_problems` compares live tensors with a
manifest (the resume check); :func:`dcp_manifest` and :func:`files_manifest` build the manifests of sharded
checkpoints (:mod:`trainer_guard.checkpoint.sharded`). Pure functions, no Trainer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..checksum.disk import file_checksums
from ..checksum.spec import CHECKSUM_ALGO
from ..checksum.tensors import checksums
from ..errors import ChecksumError, IntegrityError, UsageError
from ..formats.safetensors import TensorInfo, safetensors_files
from .manifest import build_manifest, compare, dtype_name, entries, index_entries, tensor_entries
from .sharded import sharded_index, sharded_sums
from .stored import read_index

__all__ = ["Reconciled", "reconcile", "Checked", "checkpoint_manifest", "model_problems", "dcp_manifest",
           "files_manifest"]


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
    sums: Mapping[str, int] | None = None,
) -> Checked:
    """Check what ``directory`` stores against ``expected`` (see :func:`saved_tensors`) and build its manifest.

    ``verify``: ``"manifest"`` compares the files' headers with the tensors (names, dtypes, shapes) and takes the
    checksums from memory; ``"readback"`` also checksums the files and compares; ``"off"`` turns problems into
    warnings and records what the files hold. With problems (and ``verify != "off"``) no manifest is built.
    """
    if not safetensors_files(directory):
        return Checked(None, [], [f"no *.safetensors file in {os.fspath(directory)} (weights saved another way?): "
                                  f"not verified, no manifest written"])
    try:
        index = read_index(directory)
    except (IntegrityError, UsageError) as e:
        return Checked(None, [str(e)], [])
    rec = reconcile(expected, tie_groups, index)
    problems, warnings = list(rec.problems), list(rec.warnings)
    sums = ({k: sums[k] for k in rec.from_model} if sums is not None else checksums(rec.from_model, backend=backend))
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
    live: Mapping[str, torch.Tensor], manifest: Mapping[str, Any], backend: str = "auto",
    sums: Mapping[str, int] | None = None,
) -> tuple[list[str], list[str]]:
    """``(problems, warnings)``: how the ``live`` tensors (stored names) differ from a checkpoint's manifest.

    Every manifest tensor checksummed from the model at save time must be live with the same dtype, shape and
    checksum; a tie alias (stored once) must equal the stored member. Live tensors absent from the manifest are
    not reported (a resumed model may hold more than its checkpoint). ``sums``: the live tensors' checksums, already
    computed (a sharded model's, combined from the ranks' shards; ``live`` then only gives names, dtypes, shapes).
    """
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
    if not same_algo:
        sums = {}
    elif sums is not None:
        sums = {k: sums[k] for k in comparable if k in sums}
    else:
        sums = checksums(comparable, backend=backend)
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


def dcp_manifest(directory: str | os.PathLike, live: Mapping[str, Any], sums: Mapping[str, int], *,
                 global_step: int | None, tie_groups: list[list[str]], verify: str = "manifest") -> Checked:
    """Check the DCP model directories of ``directory`` against the ``live`` tensors (state-dict name -> tensor or
    anything with ``dtype`` and ``shape``: DTensors give their global ones) and build the manifest, taking the
    checksums from ``sums`` (the full tensors', combined from the shards). A stored tensor of ``live`` with no entry
    in ``sums`` (a PEFT adapter, stored under ``get_peft_model_state_dict``'s names) is read back from the files and
    recorded with ``source: file``.

    ``verify``: ``"manifest"`` compares names, dtypes and shapes with ``.metadata``; ``"readback"`` also reads every
    tensor back from the ``.distcp`` files and compares checksums; ``"off"`` turns problems into warnings.
    """
    directory = os.fspath(directory)
    try:
        index = sharded_index(directory)
    except IntegrityError as e:
        return Checked(None, [str(e)], [])
    problems: list[str] = []
    stored: dict[str, TensorInfo] = {}
    for name, info in index.items():
        t = live.get(name)
        if t is None:
            problems.append(f"{info.file}/: holds {name}, which the model does not have")
            continue
        now = (dtype_name(t.dtype), tuple(int(s) for s in t.shape))
        if now != (info.dtype, info.shape):
            problems.append(f"{info.file}/: {name} is stored as {info.dtype} {list(info.shape)}, the model holds "
                            f"{now[0]} {list(now[1])}")
        stored[name] = info
    aliases = {n for g in tie_groups for n in g[1:]}
    for name in sorted(set(live) - set(index) - aliases):
        problems.append(f"{name}: not saved (no DCP model directory holds it)")
    from_file = sorted(k for k in stored if k not in sums)
    back: dict[str, int] = {}
    if verify == "readback" or from_file:
        try:
            back = sharded_sums(directory)
        except ChecksumError as e:
            return Checked(None, problems + [str(e)], [])
    if verify == "readback":
        mine = {k: i for k, i in stored.items() if k in sums}
        problems += [m.message for m in compare(
            index_entries(mine, {k: sums[k] for k in mine}), index_entries(mine, back),
            expected_label="model", actual_label="files", check_extra=False)]
    if problems and verify != "off":
        return Checked(None, problems, [])
    manifest = build_manifest(stored, global_step=global_step, tie_groups=tie_groups,
                              files={k: i.file for k, i in stored.items()},
                              sums={k: sums[k] if k in sums else back[k] for k in stored},
                              sources={k: "file" for k in from_file})
    return Checked(manifest, [], problems)


def files_manifest(directory: str | os.PathLike, *, global_step: int | None,
                   tie_groups: list[list[str]]) -> Checked:
    """The manifest of a checkpoint whose tensors the ranks hold as partitions no rank can checksum alone (DeepSpeed
    ZeRO-3): every file by its bytes (added at commit), and the tensors of its ``.safetensors`` files, if any (a ZeRO-3
    save with ``stage3_gather_16bit_weights_on_model_save``), read back from the files (``source: file``)."""
    directory = os.fspath(directory)
    if not safetensors_files(directory):
        return Checked(build_manifest({}, global_step=global_step, tie_groups=[]), [], [])
    try:
        index = read_index(directory)
        sums = file_checksums(directory)
    except (IntegrityError, ChecksumError) as e:
        return Checked(None, [str(e)], [])
    manifest = build_manifest(index, global_step=global_step, tie_groups=tie_groups,
                              files={k: i.file for k, i in index.items()}, sums=sums,
                              sources={k: "file" for k in index}, directory=directory)
    return Checked(manifest, [], [])
