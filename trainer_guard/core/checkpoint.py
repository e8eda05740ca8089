"""A model against a whole checkpoint directory: every place a ``Trainer`` save puts its tensors.

A checkpoint may hold several weight directories: PEFT saves the adapter ``"default"`` in the checkpoint itself and
every other adapter in ``<checkpoint>/<name>/`` (:func:`~trainer_guard.checkpoint.saved.saved_layout`). These
functions build the manifests of all of them at a save (all or nothing) and compare a loaded model with all of
them; they know nothing of the ``Trainer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..checkpoint.manifest import dtype_name, read_manifest
from ..checkpoint.reconcile import checkpoint_manifest, dcp_manifest, files_manifest, model_problems
from ..checkpoint.saved import converted_names, peft_adapter_names, saved_layout, saved_tensors
from ..checkpoint.sharded import dcp_dirs
from ..checkpoint.verify import file_changes
from ..errors import UsageError
from ..files import MANIFEST_FILE
from ..formats.safetensors import safetensors_files
from .divergence import sharded_checksums
from .sharding import full_shape, resolve_gather
from .ties import find_tied_groups

__all__ = ["Planned", "Verified", "plan_manifests", "verify_against", "conversion_hint", "rewritten_since",
           "sharded_state", "sharded_model_sums", "plan_sharded_manifest", "plan_files_manifest",
           "verify_sharded", "zero3_model_sums", "zero3_entries", "verify_zero3"]


class Planned(NamedTuple):
    """What :func:`plan_manifests` found: ``writes`` (``(directory, manifest)`` pairs; empty when ``problems``),
    ``problems``, ``warnings`` (each naming its directory), ``nbytes`` (the bytes checksummed from memory)."""

    writes: list[tuple[str, dict[str, Any]]]
    problems: list[str]
    warnings: list[str]
    nbytes: int


class Verified(NamedTuple):
    """What :func:`verify_against` found: ``problems``, ``warnings``, ``checked`` (the manifest files compared)."""

    problems: list[str]
    warnings: list[str]
    checked: list[str]


def _where(directory: str, sub: str) -> str:
    return os.path.join(directory, sub) if sub else directory


def plan_manifests(model: torch.nn.Module, directory: str | os.PathLike, *, global_step: int | None,
                   verify: str = "manifest", backend: str = "auto") -> Planned:
    """Check every weight directory a save of ``model`` wrote into ``directory`` and build its manifest.

    All or nothing: with a problem in any adapter directory, no manifest is planned for any.

    Example:
        >>> import tempfile
        >>> from trainer_guard.tiny import tiny_model
        >>> model, d = tiny_model("llama-tied"), tempfile.mkdtemp()
        >>> model.save_pretrained(d)
        >>> plan = plan_manifests(model, d, global_step=None)
        >>> len(plan.writes), plan.problems
        (1, [])
    """
    directory = os.fspath(directory)
    problems, warnings, writes, nbytes = [], [], [], 0
    for sub, (expected, groups) in saved_layout(model).items():
        where, prefix = _where(directory, sub), (f"{sub}/" if sub else "")
        if not os.path.isdir(where):
            problems.append(f"PEFT adapter {sub!r}: not saved ({where} does not exist)")
            continue
        result = checkpoint_manifest(expected, groups, where, global_step=global_step, verify=verify,
                                     backend=backend)
        label = os.path.join(os.path.basename(directory), sub) if sub else os.path.basename(directory)
        warnings += [f"{label}: {w}" for w in result.warnings]
        problems += [f"{prefix}{p}" for p in result.problems]
        if result.manifest is not None:
            writes.append((where, result.manifest))
            nbytes += sum(t.numel() * t.element_size() for t in expected.values())
    return Planned([] if problems else writes, problems, warnings, nbytes)


def verify_against(model: torch.nn.Module, directory: str | os.PathLike, *, backend: str = "auto") -> Verified:
    """Compare the live ``model`` with the manifest of every weight directory of the checkpoint ``directory``.

    A directory without a manifest is a warning (nothing to compare with), an unreadable manifest a problem.
    Problems of an adapter directory are prefixed ``<name>/``.
    """
    directory = os.fspath(directory)
    problems, warnings, checked = [], [], []
    for sub, (live, _) in saved_layout(model).items():
        where = _where(directory, sub)
        try:
            manifest = read_manifest(where) if os.path.isdir(where) else None
        except UsageError as e:
            problems.append(str(e))
            continue
        if manifest is None:
            warnings.append(f"{where} has no {MANIFEST_FILE}; the loaded weights were not verified")
            continue
        tensors = manifest.get("tensors") or {}
        if tensors and not any(e.get("source", "model") == "model" for e in tensors.values()):
            warnings.append(f"{os.path.join(where, MANIFEST_FILE)}: none of its {len(tensors)} tensors is stored under "
                            f"a name of the model (the save wrote them under other names: a _save override that "
                            f"saves a submodule, or a save-time weight conversion), so the loaded weights were not "
                            f"compared, and the Trainer's load may not have restored them either")
            continue
        found, said = model_problems(live, manifest, backend=backend)
        warnings += said
        problems += [f"{sub}/{p}" if sub else p for p in found]
        rewritten = rewritten_since(where, manifest) if found else []
        if rewritten:
            problems.append(f"{', '.join(rewritten)} in {where} changed after its {MANIFEST_FILE} was written: if a "
                            f"later run (without IntegrityGuard) saved into this same checkpoint directory, the "
                            f"manifest is that earlier save's; delete it and resume again. Otherwise the files were "
                            f"modified after the save: check them with `trainer-guard doctor {where}`")
        checked.append(os.path.join(where, MANIFEST_FILE))
    return Verified(problems, warnings, checked)


def sharded_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """A sharded (FSDP2) model's state-dict tensors as the save sees them (DTensors: global dtype and shape), every
    name of a tie included (DCP stores each), and its tie groups."""
    keys = set(model.state_dict())
    live = {n: p for n, p in model.named_parameters(remove_duplicate=False) if n in keys}
    live.update({n: b for n, b in model.named_buffers(remove_duplicate=False) if n in keys})
    return live, find_tied_groups(model)


def sharded_model_sums(model: torch.nn.Module, gather: Any) -> dict[str, int]:
    """Checksums of the full tensors of a sharded model's state dict (:func:`sharded_state`), combined from every
    rank's shards without gathering a tensor (:func:`~trainer_guard.core.divergence.sharded_checksums`). A collective:
    every rank calls it at the same point. Tied names share one computation."""
    live, _ = sharded_state(model)
    first: dict[int, str] = {}
    for n, t in live.items():
        first.setdefault(id(t), n)
    unique = {n: live[n] for n in first.values()}
    sums = sharded_checksums(unique, gather)
    return {n: sums[first[id(t)]] for n, t in live.items()}


def plan_sharded_manifest(model: torch.nn.Module, directory: str | os.PathLike, sums: dict[str, int], *,
                          global_step: int | None, verify: str = "manifest") -> Planned:
    """:func:`plan_manifests` for a sharded (FSDP2) model whose full-tensor checksums ``sums`` were combined from the
    shards: DCP model directories (``SHARDED_STATE_DICT``) against their ``.metadata``; a ``model.safetensors``
    written from the gathered state dict (``FULL_STATE_DICT``) against its header, as for any model. A PEFT model's
    adapter (what accelerate saves of it) is checked by name, dtype and shape and checksummed from the files
    (``sums`` is not needed)."""
    directory = os.fspath(directory)
    live, groups = sharded_state(model)
    if peft_adapter_names(model):  # the adapter only, under get_peft_model_state_dict's names: read from the files
        if dcp_dirs(directory):  # accelerate's adapter_only=True DCP save
            adapter, _ = saved_tensors(model)
            result = dcp_manifest(directory, adapter, {}, global_step=global_step, tie_groups=[], verify=verify)
        else:
            result = files_manifest(directory, global_step=global_step, tie_groups=[])
    elif dcp_dirs(directory):
        result = dcp_manifest(directory, live, sums, global_step=global_step, tie_groups=groups, verify=verify)
    elif safetensors_files(directory):
        expected, stored_groups = saved_tensors(model)
        result = checkpoint_manifest(expected, stored_groups, directory, global_step=global_step, verify=verify,
                                     sums=sums)
    else:
        result = files_manifest(directory, global_step=global_step, tie_groups=groups)
    unique = {id(t): t for t in live.values()}.values()  # the bytes checksummed, over all ranks (ties once)
    return _planned(directory, result, sum(t.numel() * t.element_size() for t in unique))


def plan_files_manifest(directory: str | os.PathLike, *, global_step: int | None,
                        partitions: dict[str, dict[str, Any]] | None = None) -> Planned:
    """The plan for a checkpoint of partitioned parameters no rank holds whole (DeepSpeed ZeRO-3): every file by its
    bytes, and the tensors of any ``.safetensors`` file read back (:func:`~trainer_guard.checkpoint.reconcile.files_manifest`).
    Where no such file holds a tensor (ZeRO-3 saved without ``stage3_gather_16bit_weights_on_model_save``), the
    ``partitions`` entries (:func:`zero3_entries`) are recorded under the manifest's ``"partitions"`` key, for the
    resume to compare the loaded model with (:func:`verify_zero3`)."""
    directory = os.fspath(directory)
    result = files_manifest(directory, global_step=global_step, tie_groups=[])
    if result.manifest is not None and not result.manifest.get("tensors") and partitions:
        result = result._replace(manifest={**result.manifest, "partitions": partitions})
    return _planned(directory, result, 0)


def zero3_entries(model: torch.nn.Module, sums: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Manifest entries (dtype, full shape, checksum) of ``model``'s parameters whose checksums ``sums`` holds
    (:func:`zero3_model_sums`: combined from the ranks' ZeRO-3 partitions), every name of a tie included.

    Example:
        >>> zero3_entries(torch.nn.Linear(2, 1, bias=False), {"weight": 255})
        {'weight': {'dtype': 'float32', 'shape': [1, 2], 'checksum': '00000000000000ff'}}
    """
    return {n: {"dtype": dtype_name(p.dtype), "shape": list(full_shape(p)), "checksum": f"{sums[n]:016x}"}
            for n, p in model.named_parameters(remove_duplicate=False) if n in sums}


def _planned(directory: str, result: Any, nbytes: int) -> Planned:
    """One directory's :class:`~trainer_guard.checkpoint.reconcile.Checked` as a :class:`Planned` (its warnings
    prefixed with the directory's name)."""
    warnings = [f"{os.path.basename(directory)}: {w}" for w in result.warnings]
    if result.problems or result.manifest is None:
        return Planned([], list(result.problems), warnings, 0)
    return Planned([(directory, result.manifest)], [], warnings, nbytes)


def verify_sharded(model: torch.nn.Module, directory: str | os.PathLike, sums: dict[str, int]) -> Verified:
    """:func:`verify_against` for a sharded (FSDP2) model whose full-tensor checksums ``sums`` were combined from the
    shards (:func:`sharded_model_sums`): the loaded model against the checkpoint's manifest."""
    directory = os.fspath(directory)
    try:
        manifest = read_manifest(directory)
    except UsageError as e:
        return Verified([str(e)], [], [])
    if manifest is None:
        return Verified([], [f"{directory} has no {MANIFEST_FILE}; the loaded weights were not verified"], [])
    if not any(e.get("source", "model") == "model" for e in (manifest.get("tensors") or {}).values()):
        return Verified([], [], [])  # files only, or a PEFT adapter read from them: checked before the load
    live, _ = sharded_state(model)
    found, said = model_problems(live, manifest, sums=sums)
    return Verified(found, said, [os.path.join(directory, MANIFEST_FILE)])


def zero3_model_sums(model: torch.nn.Module, gather: Callable[[Any], list[Any]] | None = None) -> dict[str, int]:
    """Checksums of the full parameters of a DeepSpeed ZeRO-3 model, combined from the ranks' partitions
    (:func:`~trainer_guard.core.divergence.sharded_checksums`: no parameter gathered, except one whose partition is
    not a whole number of 8-byte words). A collective: every rank calls it at the same point. Tied names share one
    checksum; parameters that are not partitioned are checksummed as they are."""
    named = list(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    for n, p in named:
        first.setdefault(id(p), n)
    sums = sharded_checksums({n: p for n, p in named if first[id(p)] == n}, resolve_gather(gather))
    return {n: sums[first[id(p)]] for n, p in named}


class _Shape(NamedTuple):
    dtype: torch.dtype
    shape: torch.Size


def verify_zero3(model: torch.nn.Module, directory: str | os.PathLike, sums: dict[str, int]) -> Verified:
    """The loaded DeepSpeed ZeRO-3 model (full-parameter checksums ``sums``, :func:`zero3_model_sums`) against the
    tensors the checkpoint's manifest records from its gathered ``model.safetensors`` (a save with
    ``stage3_gather_16bit_weights_on_model_save``), or else against the ``"partitions"`` entries recorded from the
    model's partitions at the save (:func:`plan_files_manifest`); nothing to compare without either (its files were
    checked before the load)."""
    directory = os.fspath(directory)
    try:
        manifest = read_manifest(directory)
    except UsageError as e:
        return Verified([str(e)], [], [])
    live = {n: _Shape(p.dtype, full_shape(p)) for n, p in model.named_parameters(remove_duplicate=False)}
    if manifest is None:
        return Verified([], [], [])
    recorded = manifest.get("tensors") or {}  # from the gathered file at the save
    if not any(k in live for k in recorded):
        recorded = manifest.get("partitions") or {}  # else combined from the partitions at the save
        if not isinstance(recorded, dict) or not any(k in live for k in recorded):
            return Verified([], [], [])
    # the loaded parameters must hold exactly what was recorded
    as_model = {**manifest, "tensors": {k: {**e, "source": "model"} for k, e in recorded.items()}}
    found, said = model_problems(live, as_model, sums=sums)
    return Verified(found, said, [os.path.join(directory, MANIFEST_FILE)])


def rewritten_since(directory: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """The files ``manifest`` lists that are missing, of another size, or newer than the manifest file in
    ``directory``: signs that they were written again after the save the manifest describes.

    Example:
        >>> import tempfile
        >>> rewritten_since(tempfile.mkdtemp(), {"files": {"model.safetensors": {"size": 8}}})  # gone since
        ['model.safetensors']
    """
    return sorted(c.file for c in file_changes(directory, manifest))


def conversion_hint(model: torch.nn.Module, problems: list[str], fix: str) -> str | None:
    """The line explaining ``problems`` about tensors stored in transformers' converted layout, or ``None``.

    transformers reverts its load-time weight conversions on save (per-expert MoE weights, the original key names of
    vision-language models), but ``Trainer`` loads
    checkpoints (resume, ``load_best_model_at_end``) with ``load_state_dict(strict=False)``, which skips every
    such tensor (transformers issue #48805). ``fix`` says what to do instead.
    """
    converted = sorted(n for n in converted_names(model) if any(p.startswith(f"{n}:") for p in problems))
    if not converted:
        return None
    return (f"{len(converted)} of these ({converted[0]}, ...) are stored in the layout transformers saves (its weight "
            f"conversion reverted: per-expert MoE weights, a vision-language model's original names); the Trainer "
            f"loads checkpoints with load_state_dict(strict=False), which skips them (transformers issues #48805, "
            f"#43701). To fix: {fix}")
