"""Load what a ``Trainer`` resume skips: tensors a checkpoint stores in transformers' converted layout.

transformers 5 converts some weights at load time (Mixtral's per-expert ``block_sparse_moe.experts.N.w1/w3`` are
fused into ``mlp.experts.gate_up_proj``) and reverts the conversion when it saves. ``Trainer`` loads checkpoints
(resume, ``load_best_model_at_end``) with ``load_state_dict(strict=False)``, which matches none of the stored
names: the experts and router keep whatever they held, with one logged warning (transformers issue #48805).
Vision-language models (LLaVA, Qwen2-VL) are saved under their original names (``language_model.model.*``), so a
resume loads none of their weights at all (transformers issue #43701).

:func:`load_converted` loads them. It asks transformers' own ``revert_weight_conversion`` where each element of a
live tensor is stored, by running it on tensors of element indices: the conversions are pure data movement (split,
concatenate, stack, transpose, permute, rename), so the result maps every stored element to its live position.
Live tensors that share a stored tensor (``q_proj``, ``k_proj``, ``v_proj`` stored as one ``qkv_proj``) are mapped
together.

All or nothing, in two passes. The first writes nothing: it checks that the map is a bijection and every stored
tensor's dtype and shape, then opens every file and gets every stored tensor it needs (with the checkpoint's
``trainer_guard_manifest.json``, each is checksummed against it). The second copies them into the parameters,
reading through the files the first pass opened (kept open: a file deleted or replaced meanwhile does not change
what is read). A file that cannot be opened or read, or a tensor whose checksum differs from the manifest, is a
problem of the first pass: nothing is loaded. What can still stop the second pass half-way is no read: memory
running out, an interrupt (the guard then stops the run, saying the model may be partly loaded).

Memory. A stored tensor that is a strided view of one live tensor (every MoE expert, every rename) is copied
straight into that view of the parameter: its map is found from one small-integer coordinate tensor per dimension,
broadcast (no memory) until transformers' split operations copy it, and checked in blocks. Measured on a bf16
Mixtral ``gate_up_proj`` of 134 MB: 140 MB of extra CPU memory at the peak (was 672 MB with element indices). Other
groups (tensors fused on disk, split in memory) use element indices (4 bytes an element, plus the copies
transformers' split operations make) and, unless the group is one contiguous CPU tensor, one buffer of its size.
"""

from __future__ import annotations

import itertools
import math
import os
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch

from ..checksum.spec import CHECKSUM_ALGO
from ..checksum.tensors import tensor_checksum
from ..checkpoint.manifest import MANIFEST_FILE, TensorInfo, dtype_name, entries, read_manifest
from ..checkpoint.saved import as_saved, stored_names
from ..checkpoint.stored import read_index

__all__ = ["ConvertedLoad", "conversion_map", "group_map", "load_converted"]

_BLOCK = 1 << 20  # elements compared at a time when checking that a stored tensor is a strided view


class ConvertedLoad(NamedTuple):
    """Result of :func:`load_converted`: live names ``loaded``, and ``problems`` (nothing was loaded when any)."""

    loaded: list[str]
    problems: list[str]


def conversion_map(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Where ``save_pretrained`` stores the live tensor ``name``: stored name -> index tensor (of the stored shape)
    of positions in ``tensor.reshape(-1)``; ``None`` when it is stored unchanged under its own name. For a tensor
    stored together with others (fused on disk, split in memory) see :func:`group_map`.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
        >>> w = model.model.layers[0].mlp.experts.gate_up_proj
        >>> sorted(conversion_map(model, "model.layers.0.mlp.experts.gate_up_proj", w))[0]
        'model.layers.0.block_sparse_moe.experts.0.w1.weight'
    """
    if stored_names(model, name, tensor) == {name}:
        return None  # decided on a meta tensor: nothing allocated for the tensors stored as they are
    return group_map(model, {name: tensor})


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def group_map(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored name -> index tensor of positions in the concatenation of ``tensors``' flattened values (in the given
    order): where ``save_pretrained`` stores each of their elements when it saves them together."""
    total = sum(t.numel() for t in tensors.values())
    dtype, tags, offset = _index_dtype(total), {}, 0
    for name, t in tensors.items():
        tags[name] = torch.arange(offset, offset + t.numel(), dtype=dtype).view(t.shape)
        offset += t.numel()
    return dict(as_saved(model, tags))


def _bijective(maps: dict[str, torch.Tensor], numel: int) -> bool:
    if sum(t.numel() for t in maps.values()) != numel:
        return False
    seen = torch.zeros(numel, dtype=torch.bool)
    for t in maps.values():
        seen[t] = True  # any shape indexes the flat mask: no flattened copy of a non-contiguous map
    return bool(seen.all())


class _Part(NamedTuple):
    """A stored tensor that is a strided view of the live tensor ``live``: the live coordinates of its element at
    stored coordinates ``x`` are ``origin[d] + sum_j steps[d][j] * x[j]`` (every step >= 0)."""

    live: str
    shape: tuple[int, ...]
    origin: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """This part's elements of ``t`` (the live tensor, or any tensor of its shape), as a view: writes go to
        ``t``. Raises ``RuntimeError`` when the view would leave ``t``'s storage."""
        offset = t.storage_offset() + sum(a * s for a, s in zip(self.origin, t.stride()))
        strides = [sum(step[j] * s for step, s in zip(self.steps, t.stride())) for j in range(len(self.shape))]
        return t.as_strided(self.shape, strides, offset)


class _Group(NamedTuple):
    """One group of live tensors loaded together: ``names``, ``what`` (for messages), the stored names ``stored``;
    ``parts`` when every stored tensor is a strided view of the one live tensor (else element indices are used)."""

    names: list[str]
    what: str
    stored: list[str]
    parts: dict[str, _Part] | None


def _coordinate_dtype(size: int) -> torch.dtype:
    """The smallest integer dtype holding ``0 .. size - 1``."""
    return torch.int16 if size <= 2**15 else torch.int32 if size <= 2**31 else torch.int64


def _affine(p: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """``(origin, steps)`` when every element of ``p`` is ``origin + sum_j steps[j] * x[j]`` at coordinates ``x``,
    else ``None``. ``p`` is never copied: dimensions it is broadcast along (stride 0) hold one value and are checked
    once; the rest is compared in blocks of at most :data:`_BLOCK` elements, in ``p``'s dtype where it holds every
    expected value."""
    nd = p.dim()
    if p.numel() == 0:
        return None
    origin = int(p[(0,) * nd])
    steps = tuple(int(p[tuple(int(i == j) for i in range(nd))]) - origin if p.shape[j] > 1 else 0 for j in range(nd))
    p = p[tuple(slice(0, 1) if p.stride(j) == 0 else slice(None) for j in range(nd))]  # broadcast: step 0 there
    shape = tuple(p.shape)
    if nd == 0 or p.numel() == 1:
        return origin, steps
    bound = abs(origin) + sum(abs(s) * (n - 1) for s, n in zip(steps, shape))
    dtype = p.dtype if bound <= torch.iinfo(p.dtype).max else torch.int64
    cut = next(c for c in range(nd) if math.prod(shape[c + 1:]) <= _BLOCK)  # dims after cut: one block's tail
    tail = torch.zeros((), dtype=dtype)
    for j in range(cut + 1, nd):
        tail = tail.unsqueeze(-1) + steps[j] * torch.arange(shape[j], dtype=dtype)
    rows = max(1, _BLOCK // max(1, tail.numel()))
    for lead in itertools.product(*(range(n) for n in shape[:cut])):
        base = origin + sum(s * i for s, i in zip(steps, lead))
        block = p[lead]
        for r in range(0, shape[cut], rows):
            at = torch.arange(r, min(r + rows, shape[cut]), dtype=dtype).view(-1, *[1] * tail.dim())
            got = block[r:r + rows].to(dtype)  # a view, unless widened: one block at a time
            if not torch.equal(got, base + steps[cut] * at + tail):
                return None
    return origin, steps


def _strided_parts(model: torch.nn.Module, name: str, t: torch.Tensor,
                   shapes: dict[str, tuple[int, ...]]) -> dict[str, _Part] | None:
    """Stored name -> :class:`_Part` when every tensor the live ``t`` is stored as is a strided view of it and the
    views cover each element once; ``None`` otherwise (the caller then maps element indices).

    Runs the conversion once per dimension ``d`` of ``t`` on the coordinate along ``d`` (broadcast from one row of
    the smallest integer dtype: memory only where transformers copies), so no index tensor of ``t``'s size exists."""
    if t.dim() == 0:
        return None
    origins: dict[str, list[int]] = {k: [] for k in shapes}
    steps: dict[str, list[tuple[int, ...]]] = {k: [] for k in shapes}
    for d, size in enumerate(t.shape):
        dtype = _coordinate_dtype(size)
        probe = torch.arange(size, dtype=dtype).view([-1 if i == d else 1 for i in range(t.dim())]).expand(t.shape)
        out = as_saved(model, {name: probe})
        del probe
        if {k: tuple(v.shape) for k, v in out.items()} != shapes or any(v.dtype != dtype for v in out.values()):
            return None  # the conversion did more than move data (or could not run on a broadcast tensor)
        for k in list(out):
            found = _affine(out.pop(k))  # popped: a copy transformers made is freed once its views are checked
            if found is None or min(found[1], default=0) < 0:
                return None
            origins[k].append(found[0])
            steps[k].append(found[1])
    parts = {k: _Part(name, shapes[k], tuple(origins[k]),
                      tuple(tuple(steps[k][d][j] for j in range(len(shapes[k]))) for d in range(t.dim())))
             for k in shapes}
    if sum(math.prod(s) for s in shapes.values()) != t.numel():
        return None
    seen = torch.zeros(t.shape, dtype=torch.bool)  # as many elements as t, all covered: each exactly once
    try:
        for part in parts.values():
            part.view(seen).fill_(True)
    except RuntimeError:  # a view outside t
        return None
    return parts if bool(seen.all()) else None


def _groups(model: torch.nn.Module, live: dict[str, torch.Tensor], index: dict) -> list[list[str]]:
    """Live names the Trainer's load missed whose stored names the checkpoint holds, grouped when they share a
    stored tensor (union of overlapping stored-name sets), in model order."""
    stored: dict[str, set[str]] = {}
    for name, tensor in live.items():
        if name in index:
            continue  # the Trainer's load matched it by name
        names = stored_names(model, name, tensor)
        if names != {name} and not names.isdisjoint(index):
            stored[name] = names
    groups: list[tuple[list[str], set[str]]] = []
    for name, names in stored.items():
        hit = [g for g in groups if g[1] & names]
        merged = ([n for g in hit for n in g[0]] + [name], set().union(names, *(g[1] for g in hit)))
        groups = [g for g in groups if not any(g is h for h in hit)] + [merged]
    order = {n: i for i, n in enumerate(live)}
    return sorted((sorted(g[0], key=order.get) for g in groups), key=lambda g: order[g[0]])


def _check_group(model: torch.nn.Module, live: dict[str, torch.Tensor], group: list[str],
                 index: dict[str, TensorInfo]) -> tuple[_Group | None, list[str]]:
    """The plan for loading ``group`` and its problems (names, dtypes and shapes against the files' headers, the
    map a bijection); reads no file."""
    what = group[0] if len(group) == 1 else f"{', '.join(group)} (stored together)"
    meta = {n: torch.empty(live[n].shape, dtype=live[n].dtype, device="meta") for n in group}
    shapes = {k: tuple(v.shape) for k, v in as_saved(model, meta).items()}
    absent = sorted(k for k in shapes if k not in index)
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        return None, [f"{what}: the checkpoint lacks {absent[0]}{more} of the {len(shapes)} tensors it is stored as"]
    problems = []
    dtypes = {dtype_name(live[n].dtype) for n in group}
    for k, shape in sorted(shapes.items()):
        info = index[k]
        if dtypes != {info.dtype} or info.shape != shape:
            problems.append(f"{what}: stored part {k} is {info.dtype} {list(info.shape)} in {info.file}, the "
                            f"model expects {'/'.join(sorted(dtypes))} {list(shape)}")
    if problems:
        return None, problems
    parts = _strided_parts(model, group[0], live[group[0]], shapes) if len(group) == 1 else None
    if parts is None and not _bijective(group_map(model, {n: live[n] for n in group}),
                                        sum(live[n].numel() for n in group)):
        return None, [f"{what}: transformers' conversion of it is not a plain re-arrangement; not loaded"]
    return _Group(group, what, sorted(shapes), parts), []


def _manifest_sums(directory: str) -> dict[str, int]:
    """Stored name -> checksum from the checkpoint's manifest; empty without one (or with another algorithm)."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("algo") != CHECKSUM_ALGO:
        return {}
    return {k: e["checksum"] for k, e in entries(manifest).items()}


def _open_and_check(directory: str, groups: list[_Group], index: dict[str, TensorInfo],
                    stack: ExitStack) -> tuple[dict[str, Any], list[str]]:
    """Open every file holding a stored tensor of ``groups`` (kept open on ``stack``) and get each such tensor,
    checksummed against the manifest when the checkpoint has one. Returns file -> open handle, and the problems
    (the file and tensor, what is wrong, what to do); writes nothing."""
    from safetensors import safe_open

    sums = _manifest_sums(directory)
    owner = {k: g.what for g in groups for k in g.stored}
    by_file: dict[str, list[str]] = {}
    for k in sorted(owner):
        by_file.setdefault(index[k].file, []).append(k)
    fix = "nothing was loaded. Restore or re-copy the file (check the disk), or resume from another checkpoint"
    handles, problems = {}, []
    for fname, keys in sorted(by_file.items()):
        try:
            handles[fname] = stack.enter_context(safe_open(os.path.join(directory, fname), framework="pt"))
        except Exception as e:  # safetensors raises its own SafetensorError; OSError for I/O
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            problems.append(f"{owner[keys[0]]}: {fname}, which stores {keys[0]}{more}, cannot be opened "
                            f"({type(e).__name__}: {e}); {fix}")
            continue
        for k in keys:
            try:
                got = handles[fname].get_tensor(k)
                if k in sums:
                    got = tensor_checksum(got)
            except Exception as e:
                problems.append(f"{owner[k]}: stored part {k} in {fname} cannot be read ({type(e).__name__}: {e}); "
                                f"{fix}")
                continue
            if k in sums and got != sums[k]:
                problems.append(f"{owner[k]}: stored part {k} in {fname} has checksum {got:016x}, "
                                f"{MANIFEST_FILE} records {sums[k]:016x}: the file changed after the save "
                                f"(corrupted or overwritten); {fix}")
    return handles, problems


def _write(model: torch.nn.Module, live: dict[str, torch.Tensor], group: _Group, index: dict[str, TensorInfo],
           handles: dict[str, Any]) -> None:
    """Copy ``group``'s stored tensors into its live tensors, one stored tensor at a time."""
    if group.parts is not None:  # strided views: straight into the parameter, no index, no buffer
        for k in group.stored:
            part = group.parts[k]
            part.view(live[part.live]).copy_(handles[index[k].file].get_tensor(k))
        return
    tensors = [live[n] for n in group.names]
    maps = group_map(model, dict(zip(group.names, tensors)))
    one = len(tensors) == 1 and tensors[0].device.type == "cpu" and tensors[0].is_contiguous()
    buf = tensors[0].view(-1) if one else torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
    for k in group.stored:
        buf[maps.pop(k)] = handles[index[k].file].get_tensor(k)  # the map freed as soon as it is used
    if one:
        return
    offset = 0
    for t in tensors:
        t.copy_(buf[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()


def load_converted(model: torch.nn.Module, directory: str | os.PathLike) -> ConvertedLoad:
    """Load into ``model`` every tensor the checkpoint ``directory`` stores in transformers' converted layout and
    no live tensor has by name (what ``load_state_dict(strict=False)`` skipped). Everything is checked first:
    names, dtypes, shapes, that each file opens and each stored tensor can be read, and, when the checkpoint has a
    trainer_guard manifest, each stored tensor's checksum; nothing is loaded when anything is wrong (``problems``
    name the file and tensor).

    Only Hugging Face models converted by transformers are touched; any other model returns ``([], [])``.

    Raises:
        IntegrityError: a safetensors file's header is unreadable or truncated (:func:`read_index`); nothing loaded.
        UsageError: the checkpoint's manifest is malformed; nothing loaded.

    Example:
        >>> import tempfile
        >>> from trainer_guard.tiny import tiny_model
        >>> model, d = tiny_model("llama-tied"), tempfile.mkdtemp()
        >>> model.save_pretrained(d)
        >>> load_converted(model, d)  # a dense Llama stores every tensor under its own name
        ConvertedLoad(loaded=[], problems=[])
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return ConvertedLoad([], [])
    if not isinstance(model, PreTrainedModel):  # PEFT wrappers too: their checkpoints hold adapters only
        return ConvertedLoad([], [])
    directory = os.fspath(directory)
    index = read_index(directory)
    live = model.state_dict()
    plans: list[_Group] = []
    problems: list[str] = []
    for group in _groups(model, live, index):  # first pass, headers and maps: nothing read, nothing written
        plan, found = _check_group(model, live, group, index)
        problems += found
        if plan is not None:
            plans.append(plan)
    if problems or not plans:
        return ConvertedLoad([], problems)
    with ExitStack() as stack:
        handles, problems = _open_and_check(directory, plans, index, stack)  # every stored tensor, still no write
        if problems:
            return ConvertedLoad([], problems)
        with torch.no_grad():
            for plan in plans:  # second pass, through the handles the first one opened
                _write(model, live, plan, index, handles)
    return ConvertedLoad([n for p in plans for n in p.names], [])
