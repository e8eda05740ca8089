"""The checkpoint's file contract: every file name a ``Trainer`` checkpoint holds that trainer_guard reads or writes,
how checkpoint directories are named, which ``trainer_state.json`` belongs to a path, where PEFT adapters live.

Every other module takes these names from here (like torchtune's ``training/checkpointing/_utils.py``), so a name
changes in one place. Pure ``os.path``: no torch, no transformers.

Example:
    >>> from trainer_guard.files import checkpoint_dir, checkpoint_step, MANIFEST_FILE
    >>> checkpoint_dir("out", 500), checkpoint_step("out/checkpoint-500"), MANIFEST_FILE
    ('out/checkpoint-500', 500, 'trainer_guard_manifest.json')
"""

from __future__ import annotations

import os
import re

from .formats.safetensors import INDEX_SUFFIX, read_weight_map

__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE",
    "OPTIMIZER",
    "SCHEDULER",
    "CONFIG",
    "MODEL_WEIGHTS",
    "ADAPTER_WEIGHTS",
    "ADAPTER_WEIGHTS_BIN",
    "ADAPTER_CONFIG",
    "SINGLE_WEIGHT_FILES",
    "MANIFEST_FILE",
    "TIES_FILE",
    "TRAINABLE_FILE",
    "SPLIT_FILE",
    "ADAPTER_SIZE_FILE",
    "checkpoint_name",
    "checkpoint_dir",
    "checkpoint_step",
    "is_checkpoint_name",
    "checkpoints_in",
    "state_file",
    "adapter_subdirs",
    "FSDP_MODEL_DIR",
    "DEEPSPEED_STEP_DIR",
    "ZERO_RANK_FILE",
    "fsdp_model_dirs",
    "deepspeed_step_dirs",
    "rank_files",
    "duplicate_hint",
    "stored_twice",
]

# --- written by the Trainer (transformers' trainer.py / PEFT) --------------------------------------------------
CHECKPOINT_PREFIX = "checkpoint"
"""``Trainer`` saves step ``N`` into ``<output_dir>/checkpoint-N`` (transformers' ``PREFIX_CHECKPOINT_DIR``)."""
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
SINGLE_WEIGHT_FILES = (MODEL_WEIGHTS, ADAPTER_WEIGHTS)
"""The single weight files ``from_pretrained`` reads in preference to any shard index (transformers, PEFT)."""
FSDP_MODEL_DIR = re.compile(r"pytorch_model_fsdp_\d+")
"""FSDP ``SHARDED_STATE_DICT``: accelerate's ``save_fsdp_model`` writes the model through torch.distributed.checkpoint
into ``pytorch_model_fsdp_<i>/`` (``.metadata`` + one ``__<rank>_0.distcp`` per rank), the optimizer into
``optimizer_<i>/``."""
DEEPSPEED_STEP_DIR = re.compile(r"global_step\d+")
"""DeepSpeed ZeRO: ``engine.save_checkpoint(checkpoint)`` writes ``global_step<N>/`` (and a ``latest`` file naming it)."""
ZERO_RANK_FILE = re.compile(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(model|optim)_states\.pt")
"""The per-rank files DeepSpeed ZeRO writes into ``global_step<N>/`` (pickles: only ``torch.load(weights_only=True)``
may read them)."""

# --- written by trainer_guard's guards into a checkpoint -------------------------------------------------------
MANIFEST_FILE = "trainer_guard_manifest.json"
"""IntegrityGuard: per-tensor checksums, dtypes, shapes of what the save wrote (:mod:`trainer_guard.checkpoint`)."""
TIES_FILE = "trainer_guard_ties.json"
"""TiedWeightsGuard: the tie groups and the aliases stored once."""
TRAINABLE_FILE = "trainer_guard_trainable.json"
"""ResumeGuard: what trained at the save (the trainable set)."""
SPLIT_FILE = "trainer_guard_embedding_lr.json"
"""EmbeddingLRGuard: the split of the optimizer's parameter groups."""
ADAPTER_SIZE_FILE = "trainer_guard_adapter_size.json"
"""AdapterSizeGuard: the size report the run already gave (a resume repeats it at INFO only)."""

_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}-(\d+)")


def checkpoint_name(step: int) -> str:
    """The directory name a ``Trainer`` gives the checkpoint of optimizer step ``step``: ``checkpoint-<step>``."""
    return f"checkpoint-{step}"


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> str:
    """Where a ``Trainer`` with ``output_dir`` saves the checkpoint of step ``step``."""
    return os.path.join(os.fspath(output_dir), checkpoint_name(step))


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` (a directory's base name) is one a ``Trainer`` gives its checkpoints (``checkpoint-500``)."""
    return _CHECKPOINT_NAME.fullmatch(name) is not None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in the name of checkpoint directory ``path`` (``out/checkpoint-500/`` -> 500), else ``None``."""
    m = _CHECKPOINT_NAME.fullmatch(os.path.basename(os.path.normpath(os.fspath(path))))
    return int(m.group(1)) if m else None


def checkpoints_in(path: str | os.PathLike) -> list[str]:
    """The ``checkpoint-N`` sub-directories of a Trainer's ``output_dir``, by step."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return []
    return sorted((d for d in os.listdir(path) if is_checkpoint_name(d) and os.path.isdir(os.path.join(path, d))),
                  key=lambda d: checkpoint_step(d) or 0)


def state_file(path: str | os.PathLike) -> str | None:
    """The ``trainer_state.json`` that says which step directory ``path`` holds: its own, or for a named PEFT adapter
    saved in ``checkpoint-N/<name>/`` (an adapter config and no state of its own), the checkpoint's; ``None`` when
    there is none."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    own = os.path.join(path, TRAINER_STATE)
    parent = os.path.dirname(os.path.abspath(path))
    if (not os.path.isfile(own) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
            and is_checkpoint_name(os.path.basename(parent))):
        own = os.path.join(parent, TRAINER_STATE)
    return own if os.path.isfile(own) else None


def adapter_subdirs(directory: str | os.PathLike) -> list[str]:
    """Sub-directories of ``directory`` that hold a PEFT adapter (``adapter_model.safetensors``/``.bin``), sorted.

    ``PeftModel.save_pretrained`` puts every adapter not named ``"default"`` there; ``Trainer`` resumes them from
    there too. A ``checkpoint-N`` of a PEFT run (it holds a ``trainer_state.json``) is no adapter directory.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(d for d in os.listdir(directory) if any(
        os.path.isfile(os.path.join(directory, d, f)) for f in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN))
        and not os.path.isfile(os.path.join(directory, d, TRAINER_STATE)))


def _subdirs(directory: str | os.PathLike, pattern: re.Pattern) -> list[str]:
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(d for d in names if pattern.fullmatch(d) and os.path.isdir(os.path.join(directory, d)))


def fsdp_model_dirs(directory: str | os.PathLike) -> list[str]:
    """The ``pytorch_model_fsdp_<i>`` sub-directories of a checkpoint (FSDP ``SHARDED_STATE_DICT``), sorted."""
    return _subdirs(directory, FSDP_MODEL_DIR)


def deepspeed_step_dirs(directory: str | os.PathLike) -> list[str]:
    """The ``global_step<N>`` sub-directories of a checkpoint that hold DeepSpeed ZeRO rank files, sorted."""
    directory = os.fspath(directory)
    return [d for d in _subdirs(directory, DEEPSPEED_STEP_DIR)
            if any(ZERO_RANK_FILE.fullmatch(f) for f in os.listdir(os.path.join(directory, d)))]


_FSDP_STATE_DIR = re.compile(r"(pytorch_model_fsdp|optimizer)_\d+")


def rank_files(directory: str | os.PathLike, rank: int) -> list[str]:
    """The files of checkpoint ``directory`` that process ``rank`` wrote itself (``/``-separated, relative): its DCP
    shards ``__<rank>_<n>.distcp`` (FSDP ``SHARDED_STATE_DICT``), its ZeRO ``zero_pp_rank_<rank>_*`` files, its
    ``rng_state_<rank>.pth``. Each rank can checksum its own files, so that no rank reads what all of them wrote."""
    directory = os.fspath(directory)
    out = []
    if os.path.isfile(os.path.join(directory, f"rng_state_{rank}.pth")):
        out.append(f"rng_state_{rank}.pth")
    for d in _subdirs(directory, _FSDP_STATE_DIR):
        out += [f"{d}/{f}" for f in sorted(os.listdir(os.path.join(directory, d)))
                if f.startswith(f"__{rank}_") and f.endswith(".distcp")]
    for d in deepspeed_step_dirs(directory):
        out += [f"{d}/{f}" for f in sorted(os.listdir(os.path.join(directory, d)))
                if ZERO_RANK_FILE.fullmatch(f) and f"zero_pp_rank_{rank}_" in f]
    return out


def duplicate_hint(directory: str | os.PathLike, a: str, b: str) -> tuple[str, str | None, str] | None:
    """For tensors stored in both files ``a`` and ``b`` (names in ``directory``): ``(kept, index, why)`` when
    ``from_pretrained`` reads only one of them (``kept``, e.g. ``model.safetensors``; ``index`` the shard index that
    lists the other, or ``None``), else ``None``.

    ``save_pretrained`` removes an earlier save's shards but not an earlier ``model.safetensors``, which
    ``from_pretrained`` then loads instead of the new shards.
    """
    directory = os.fspath(directory)
    for kept, other in ((a, b), (b, a)):
        if kept not in SINGLE_WEIGHT_FILES:
            continue
        idx = kept.removesuffix(".safetensors") + INDEX_SUFFIX
        try:
            listed = os.path.isfile(os.path.join(directory, idx)) and other in read_weight_map(
                os.path.join(directory, idx)).values()
        except ValueError:  # SafetensorsFormatError: an unreadable index lists nothing
            listed = False
        if listed:
            return kept, idx, f"from_pretrained loads {kept} and ignores {idx} and its shards"
        return kept, None, f"from_pretrained loads {kept} only and ignores {other}, which no shard index lists"
    return None


def stored_twice(name: str, first: str, second: str) -> str:
    """The message for tensor ``name`` found in both files ``first`` and ``second`` (paths in one directory), naming
    the file ``from_pretrained`` loads when it reads only one of them (:func:`duplicate_hint`)."""
    hint = duplicate_hint(os.path.dirname(first) or ".", os.path.basename(first), os.path.basename(second))
    return (f"tensor {name!r} is stored twice: in {first} and in {second}; "
            + (f"{hint[2]}: remove the stale one" if hint else "remove the stale file"))
