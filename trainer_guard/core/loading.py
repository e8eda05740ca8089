"""Memory-lean loading of ``.safetensors`` weights into an existing model, tensor by tensor (field report R2).

``model.load_state_dict(torch.load(path))`` holds the model *and* a full state dict: twice the model (R2's 25 GB +
25 GB on a 40 GB A100). :func:`load_weights_inplace` reads one tensor at a time with ``safe_open`` (mmap), copies
it into the existing parameter on that parameter's device and drops it (tensors above :data:`CHUNK_BYTES` in row
blocks); the file mapping is reopened every :data:`REOPEN_BYTES` so the pages already read leave the process's
resident set. Peak memory is the model plus a few tens of MB, whatever the largest tensor.

Every header is checked (names, shapes, dtypes, tie aliases, optionally the manifest's checksums) *before* the
first byte is copied: a :class:`~trainer_guard.errors.LoadError` leaves the model untouched.

Example:
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from safetensors.torch import save_file
    >>> from trainer_guard.core.loading import load_weights_inplace
    >>> src, dst = nn.Linear(4, 2), nn.Linear(4, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> save_file(src.state_dict(), path)
    >>> result = load_weights_inplace(dst, path)
    >>> torch.equal(dst.weight, src.weight), result.loaded
    (True, 2)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

import numpy as np

from ..checkpoint.manifest import compare, dtype_name, entries, read_manifest
from ..checkpoint.saved import stored_names
from ..errors import LoadError, SafetensorsFormatError
from ..files import ADAPTER_CONFIG, stored_twice
from ..formats.safetensors import as_path, read_header, torch_dtype, weight_files
from ..checksum.cpu import word_sum
from ..checksum.disk import file_checksums
from .ties import find_tied_groups

__all__ = ["LoadResult", "load_weights_inplace", "safetensors_files_of", "REOPEN_BYTES", "CHUNK_BYTES"]

REOPEN_BYTES = 64 * 1024 * 1024
"""Reopen a file's mapping after this many bytes were read through it, so its pages leave the resident set."""
CHUNK_BYTES = 32 * 1024 * 1024
"""Tensors larger than this are copied in row blocks of at most this size (embeddings, output heads)."""

_MAX_LISTED = 20


@dataclass
class LoadResult:
    """What :func:`load_weights_inplace` did.

    Attributes:
        loaded: tensors copied (a tie group counts once).
        bytes: bytes copied.
        aliases: ``{model name: file name}`` for tied names filled through the tensor they share.
        missing: model tensors not in the files (only with ``strict=False``).
        unexpected: file tensors the model does not have (only with ``strict=False``).
        verified: tensors whose checksum matched the manifest (``verify_manifest=True``).
        still_meta: tensors left on the ``meta`` device (non-persistent buffers, which checkpoints never store:
            build the model with ``accelerate.init_empty_weights()``, which leaves buffers real).
    """

    loaded: int = 0
    bytes: int = 0
    aliases: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    verified: int = 0
    still_meta: list[str] = field(default_factory=list)


def safetensors_files_of(path: str | os.PathLike) -> list[str]:
    """The ``.safetensors`` files behind ``path`` (:func:`trainer_guard.formats.safetensors.weight_files`).

    Raises:
        LoadError: the path does not exist, holds no safetensors file, or its index names a missing shard.
    """
    return weight_files(path, LoadError)


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every state tensor of ``model`` by name (ties included) and ``name -> its tie group``."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for b_name, b in module._buffers.items():
            if b is not None and b_name not in module._non_persistent_buffers_set:
                tensors[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    groups: dict[str, list[str]] = {}
    for g in find_tied_groups(model, include_buffers=True):
        # only names a checkpoint can hold: a non-persistent buffer sharing the storage is filled in place with it
        state = [n for n in g if n in tensors]
        for n in state:
            groups[n] = state
    return tensors, groups


def _headers(files: list[str]) -> dict[str, tuple[str, torch.dtype | str, tuple[int, ...]]]:
    """Name -> ``(file, torch dtype (its code when this torch has none), shape)`` of every tensor in ``files``."""
    out: dict[str, tuple[str, torch.dtype | str, tuple[int, ...]]] = {}
    for fp in files:
        try:
            header = read_header(fp)
        except SafetensorsFormatError as e:  # truncated, padded or foreign: the message names the file
            raise LoadError(f"{fp}: unreadable safetensors file ({e.brief}); re-save or re-download it") from None
        for key, t in header.tensors.items():
            if key in out:
                raise LoadError(stored_twice(key, out[key][0], fp))
            out[key] = (fp, torch_dtype(t.dtype) or t.dtype, t.shape)
    return out


def _fmt(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _verify_manifest(path: str, files: list[str], headers: dict) -> int:
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    manifest = read_manifest(directory)
    if manifest is None:
        raise LoadError(f"{directory}: verify_manifest=True but the directory has no trainer_guard manifest; "
                        f"load without verify_manifest or save through a guarded Trainer")
    sums: dict[str, int] = {}
    for fp in files:
        sums.update(file_checksums(fp))
    expected = {k: v for k, v in entries(manifest).items()
                if os.path.isdir(path) or k in headers}  # a single file of a sharded dir holds part of it
    actual = {k: {"checksum": sums.get(k), "dtype": dtype_name(_fmt(d)), "shape": s}
              for k, (_, d, s) in headers.items()}
    bad = compare(expected, actual)
    if bad:
        raise LoadError(f"{path} does not match its manifest; nothing was changed:\n  - "
                        + "\n  - ".join(m.message for m in bad[:_MAX_LISTED])
                        + "\nThe checkpoint was modified or damaged after it was saved; load another checkpoint.")
    return len(expected)


def _converted(model: nn.Module, headers: dict, path: str) -> tuple[set[str], set[str]]:
    """``(live names, stored names)`` of the tensors a transformers model's ``save_pretrained`` stores under other
    names (its load-time weight conversions: Mixtral's per-expert weights, a vision-language model's original
    names), when ``path`` is a checkpoint directory that stores them so; ``(set(), set())`` otherwise."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return set(), set()
    if not isinstance(model, PreTrainedModel) or not os.path.isdir(path):
        return set(), set()
    live, stored = set(), set()
    for name, t in model.state_dict().items():
        names = stored_names(model, name, t)
        if names != {name} and name not in headers and names <= set(headers):
            live.add(name)
            stored |= names
    return live, stored


def _plan(model: nn.Module, headers: dict, strict: bool, cast: bool, path: str, result: LoadResult,
          skip: set[str] = frozenset()):
    tensors, groups = _model_tensors(model)
    plan: list[tuple[str, list[str]]] = []  # (file key, model names sharing that tensor)
    problems: list[str] = []
    done: set[str] = {m for n in skip for m in groups.get(n, [n])}  # loaded otherwise (converted layout), ties too
    used: set[str] = set()
    for name, t in tensors.items():
        if name in done:
            continue
        group = groups.get(name, [name])
        done.update(group)
        present = [n for n in group if n in headers]
        if not present:
            (problems if strict else result.missing).append(
                f"{name}: missing from the file(s)" if strict else name)
            continue
        key = present[0]
        used.update(present)
        for alias in group:
            if alias != key:
                result.aliases[alias] = key
        _, fdtype, fshape = headers[key]
        if tuple(t.shape) != fshape:
            problems.append(f"{key}: shape {list(fshape)} in the file, {list(t.shape)} in the model")
        elif fdtype != t.dtype and not (cast and isinstance(fdtype, torch.dtype)):
            problems.append(f"{key}: dtype {_fmt(fdtype)} in the file, {_fmt(t.dtype)} in the model "
                            f"(pass cast=True to convert)")
        for other in present[1:]:
            if headers[other][1:] != headers[key][1:]:
                problems.append(f"{other}: stored separately from {key} but they are tied in the model and their "
                                f"dtype/shape differ")
            elif _stored_sum(headers, other) != _stored_sum(headers, key):
                problems.append(f"{other}: stored separately from {key} with different values, but they are tied in "
                                f"the model, so one of them would be lost (saved from an untied model?); load into "
                                f"a model built untied (config.tie_word_embeddings=False), or remove one of them "
                                f"from the file")
        plan.append((key, group))
    extra = sorted(set(headers) - used)
    if headers and not used and not skip:  # not one name in common: the wrong file, not a partial load
        adapter = os.path.isfile(os.path.join(path if os.path.isdir(path) else os.path.dirname(path),
                                              ADAPTER_CONFIG))
        wrapped = next((p for p in ("_orig_mod.", "module.") if all(k.startswith(p) for k in headers)
                        and any(k[len(p):] in tensors for k in headers)), None)
        raise LoadError(f"Cannot load {path} into {type(model).__name__}: none of its {len(headers)} tensor names "
                        f"(e.g. {sorted(headers)[0]}) is in the model; nothing was changed. "
                        + ("It is a PEFT adapter: load it with PeftModel.from_pretrained(base_model, path) or "
                           "peft.set_peft_model_state_dict(model, safetensors.torch.load_file(file))" if adapter else
                           f"Its names start with {wrapped!r}: it was saved from a torch.compile/DDP wrapper; load "
                           f"into that wrapper (torch.compile(model) / accelerator.prepare(model)), or save "
                           f"accelerator.unwrap_model(model) / model._orig_mod instead" if wrapped else
                           "Load into the model class/config the weights were saved from"))
    if strict:
        problems.extend(f"{k}: in the file(s) but not in the model" for k in extra)
    else:
        result.unexpected = extra
    if problems:
        listed = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise LoadError(f"Cannot load {path} into {type(model).__name__}; nothing was changed:\n  - "
                        + "\n  - ".join(listed) + more
                        + "\nLoad into the model class/config the weights were saved from (strict=False skips "
                          "missing and unexpected names, never shape mismatches).")
    return tensors, plan


def _stored_sum(headers: dict, key: str) -> int:
    """Word sum (:func:`~trainer_guard.checksum.cpu.word_sum`) of tensor ``key``'s bytes in its file, through mmap."""
    fp = headers[key][0]
    try:
        e = read_header(fp).tensors[key]
    except SafetensorsFormatError as err:
        raise LoadError(str(err)) from None
    if e.end == e.begin:
        return 0
    mm = np.memmap(fp, dtype=np.uint8, mode="r")
    try:
        return word_sum(np.asarray(mm[e.begin : e.end]))
    finally:
        del mm


class _RawFile:
    """A safetensors file read through :func:`read_header` and numpy's mmap, for the ``get_tensor`` /
    ``get_slice`` calls :class:`_Reader` makes: the fallback where the installed safetensors rejects the file's header
    because it lacks a dtype (before 0.6: complex64, the float8 fnuz/e8m0 variants). Same bytes, copy-on-write map
    (the file is never written)."""

    def __init__(self, path: str) -> None:
        try:
            self.header = read_header(path)
        except SafetensorsFormatError as err:
            raise LoadError(str(err)) from None
        self.mm = np.memmap(path, dtype=np.uint8, mode="c")

    def get_slice(self, key: str) -> torch.Tensor:
        e = self.header.tensors[key]
        dtype = torch_dtype(e.dtype)
        if dtype is None:
            raise LoadError(f"{self.header.path}: tensor {key!r} is stored as {e.dtype}, which torch "
                            f"{torch.__version__} has no dtype for; load it with a newer torch")
        return torch.from_numpy(self.mm[e.begin : e.end]).view(dtype).reshape(e.shape)

    get_tensor = get_slice


class _Reader:
    """Reads tensors from one file through ``safe_open``, reopening the mapping every :data:`REOPEN_BYTES`."""

    def __init__(self, path: str) -> None:
        self.path, self.read, self._cm, self.f = path, 0, None, None
        self.opens = 0

    def _handle(self):
        if self.f is None or self.read >= REOPEN_BYTES:
            self.close()
            from safetensors import safe_open

            try:
                self._cm = safe_open(self.path, framework="pt", device="cpu")
                self.f = self._cm.__enter__()
            except Exception:  # the header passed read_header: this safetensors lacks one of its dtypes (< 0.6)
                self._cm, self.f = None, _RawFile(self.path)
            self.read = 0
            self.opens += 1
        return self.f

    def copy_into(self, key: str, dest: torch.Tensor) -> int:
        """Copy tensor ``key`` into ``dest``, in row blocks of at most :data:`CHUNK_BYTES`; return bytes read."""
        row = dest[0].numel() * dest.element_size() if dest.dim() else 0
        nbytes = dest.numel() * dest.element_size()
        if dest.dim() == 0 or nbytes <= CHUNK_BYTES or row == 0:
            t = self._handle().get_tensor(key)
            dest.copy_(t)
            self.read += nbytes
            return nbytes
        step = max(1, CHUNK_BYTES // row)
        for a in range(0, dest.shape[0], step):
            b = min(a + step, dest.shape[0])
            part = self._handle().get_slice(key)[a:b]
            dest[a:b].copy_(part)
            del part
            self.read += (b - a) * row
        return nbytes

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
        self._cm = self.f = None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _destination(tensors: dict, names: list[str], device) -> torch.Tensor:
    """The tensor to write into: the target itself, or a new one when it is on ``meta`` or another device."""
    target = tensors[names[0]]
    dest = torch.device(device) if device is not None else (target.device if target.device.type != "meta"
                                                             else torch.device("cpu"))
    if target.device == dest:
        return target.data
    return torch.empty(target.shape, dtype=target.dtype, device=dest)


def _install(model: nn.Module, tensors: dict, names: list[str], new: torch.Tensor) -> None:
    """Put ``new`` in place of the tensor(s) behind ``names`` (one shared storage), keeping ties."""
    if new.data_ptr() == tensors[names[0]].data_ptr() and new.device == tensors[names[0]].device:
        return  # copied in place
    replaced: dict[int, torch.Tensor] = {}
    for n in names:
        t = tensors[n]
        if id(t) not in replaced:
            if isinstance(t, nn.Parameter) and torch._has_compatible_shallow_copy_type(t, new):
                t.data = new  # same Parameter object: optimizer references and identity ties survive
                replaced[id(t)] = t
                continue
            # meta -> real (or an incompatible tensor type): a new Parameter, set wherever the old one was
            replaced[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        new_t = replaced[id(t)]
        if new_t is t:
            continue
        module, attr = _owner(model, n)
        (module._parameters if isinstance(t, nn.Parameter) else module._buffers)[attr] = new_t
        tensors[n] = new_t


@torch.no_grad()
def load_weights_inplace(
    model: nn.Module,
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    verify_manifest: bool = False,
    *,
    strict: bool = True,
    cast: bool = False,
    progress: bool = False,
) -> LoadResult:
    """Load a ``.safetensors`` file or a (sharded) checkpoint directory into ``model``'s existing tensors.

    Args:
        model: the model to fill; its parameter and persistent-buffer names must match the file's tensor names.
            Parameters on the ``meta`` device (empty-weight init) are materialised on ``device`` (default CPU);
            a Hugging Face model with meta parameters gets ``model.tie_weights()`` first.
            A ``torch.compile`` or ``DataParallel``/``DistributedDataParallel`` wrapper (``accelerator.prepare``) is
            loaded through the module it wraps when the file's names lack the wrapper's prefix.
        path: a ``.safetensors`` file, or a directory (its ``*.safetensors.index.json`` shards, else every
            ``*.safetensors`` in it). A directory that stores some tensors in the layout transformers'
            ``save_pretrained`` writes for the model's class (its weight conversions: Mixtral's per-expert weights,
            LLaVA's original names) has those loaded by :func:`trainer_guard.core.conversion.load_converted`, in
            place, first and all or nothing (the model's tensors must then be real and, with ``device``, on it).
        device: where the tensors end up; ``None`` keeps each on its current device. Each tensor is read on the
            CPU and copied straight into its destination, so a GPU model never needs a second CPU copy.
        verify_manifest: check every tensor's checksum, dtype and shape against the directory's trainer_guard
            manifest before copying anything (reads the files once more).
        strict: missing or unexpected names are an error (else they are reported in the result).
        cast: convert a tensor whose stored dtype differs from the model's (else an error).
        progress: show a progress bar over the bytes (transformers' tqdm; off when its bars are disabled).

    Returns:
        A :class:`LoadResult`. Tied parameters are filled once, from whichever of their names the file stores.

    Raises:
        LoadError: naming every tensor with a missing/unexpected name, a shape or dtype mismatch, a manifest
            mismatch, a tie the file stores twice with different values (under any ``strict``), or an unreadable
            file; also a ``model`` that is not an ``nn.Module`` and a ``device`` that is not usable here (``meta``,
            a typo, CUDA without CUDA). All headers are checked first; on such an error the model is
            unchanged. (An I/O error in the middle of copying can still leave it partly loaded.)

    Example:
        >>> model = AutoModelForCausalLM.from_config(config)  # doctest: +SKIP
        >>> load_weights_inplace(model.cuda(), "out/checkpoint-1000")  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise LoadError(f"load_weights_inplace() needs the model to fill, a torch nn.Module, got "
                        f"{type(model).__name__}; build the model first (e.g. from_config), then load into it")
    if device is not None:
        device = _usable_device(device)
    path = as_path(path, LoadError)
    files = safetensors_files_of(path)
    headers = _headers(files)
    model = _unwrapped(model, headers)
    result = LoadResult()
    if callable(getattr(model, "tie_weights", None)) and any(p.device.type == "meta" for p in model.parameters()):
        model.tie_weights()  # accelerate.init_empty_weights() re-registers tied parameters as separate meta tensors
    conv_live, conv_stored = _converted(model, headers, path)
    tensors, plan = _plan(model, {k: v for k, v in headers.items() if k not in conv_stored}, strict, cast, path,
                          result, skip=conv_live)
    if conv_live:
        awkward = sorted(n for n in conv_live if tensors[n].device.type == "meta"
                         or (device is not None and tensors[n].device != torch.device(device)))
        if awkward:
            raise LoadError(
                f"Cannot load {path} into {type(model).__name__}; nothing was changed: {len(conv_live)} tensors are "
                f"stored in the layout transformers' save_pretrained writes for this class (weight conversion, "
                f"e.g. per-expert MoE weights), which load_weights_inplace fills only in place on the tensors' own "
                f"device, and {', '.join(awkward[:3])}{', ...' if len(awkward) > 3 else ''} are on the meta device "
                f"or not on {device}: build the model on its final device first, or load it with "
                f"{type(model).__name__}.from_pretrained({path!r})")
    if verify_manifest:
        result.verified = _verify_manifest(path, files, headers)
    if conv_live:  # all or nothing on its own; run before any other copy, so a refusal leaves the model unchanged
        from .conversion import load_converted

        done = load_converted(model, path)
        if done.problems:
            raise LoadError(f"Cannot load {path} into {type(model).__name__}; nothing was changed:\n  - "
                            + "\n  - ".join(done.problems[:_MAX_LISTED]))
        result.loaded += len(done.loaded)
        result.bytes += sum(_nbytes(headers[k]) for k in conv_stored)
    by_key = {key: names for key, names in plan}
    files_keys: dict[str, list[str]] = {}
    for key in by_key:
        files_keys.setdefault(headers[key][0], []).append(key)
    for fp in files_keys:  # read in file order: sequential I/O
        order = {k: i for i, k in enumerate(_file_order(fp))}
        files_keys[fp].sort(key=lambda k: order.get(k, 0))
    bar = None
    if progress:
        from transformers.utils.logging import tqdm

        total = sum(t.numel() * t.element_size() for key, names in plan for t in [tensors[names[0]]])
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="load_weights_inplace")
    try:
        for fp, keys in files_keys.items():
            reader = _Reader(fp)
            try:
                for key in keys:
                    dest = _destination(tensors, by_key[key], device)
                    n = reader.copy_into(key, dest)
                    _install(model, tensors, by_key[key], dest)
                    result.bytes += n
                    result.loaded += 1
                    if bar is not None:
                        bar.update(n)
            finally:
                reader.close()
    finally:
        if bar is not None:
            bar.close()
    result.still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    return result


def _unwrapped(model: nn.Module, headers: dict) -> nn.Module:
    """The module whose names the file uses: ``torch.compile``'s ``OptimizedModule`` and ``DataParallel`` /
    ``DistributedDataParallel`` (what ``accelerator.prepare`` returns) prefix every name with ``_orig_mod.`` /
    ``module.``, which files saved from the unwrapped model (``save_pretrained``, ``accelerator.unwrap_model``) lack.
    The wrapper shares its parameters with the inner module, so loading into the inner one fills the wrapper too."""
    while True:
        inner = None
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner, prefix = model._orig_mod, "_orig_mod."
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner, prefix = model.module, "module."
        if inner is None or any(k.startswith(prefix) for k in headers):
            return model
        model = inner


def _usable_device(device) -> torch.device:
    """``device`` as a ``torch.device``; :class:`LoadError` naming it when it is not one, is ``meta`` (which holds no
    data: every weight would be replaced by an empty tensor) or cannot hold tensors in this process."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise LoadError(f"device={device!r} is not a usable device ({e}); pass e.g. 'cpu', 'cuda', 'cuda:0', or "
                        f"None to keep each tensor where it is; nothing was changed") from None
    if dev.type == "meta":
        raise LoadError(f"device={device!r}: the meta device holds no data, so every loaded weight would be thrown "
                        f"away; pass a real device ('cpu', 'cuda:0') or None; nothing was changed")
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # noqa: BLE001 - torch raises AssertionError, RuntimeError, ... by backend
        raise LoadError(f"device={device!r} cannot be used in this process ({type(e).__name__}: {e}); pass a device "
                        f"that exists here, e.g. 'cpu', or None; nothing was changed") from None
    return dev


def _nbytes(header: tuple) -> int:
    _, dtype, shape = header
    n = 1
    for d in shape:
        n *= d
    return n * (torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1)


def _file_order(fp: str) -> list[str]:
    """Tensor names of a safetensors file in on-disk order (from its validated header's data offsets)."""
    return read_header(fp).in_file_order()
