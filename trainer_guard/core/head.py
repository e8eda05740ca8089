"""Language-model checkpoints saved without their output head (field reports R5 and R1b).

Pure functions, no Trainer; reads only ``config.json`` and tensor *names* (safetensors headers, index files).

Two ways a model meant for generation ends up on disk without its trained head:

- R5: loaded with ``AutoModel`` (``LlamaModel``, no head) and saved: ``config.json`` names ``LlamaModel``;
- R1b: ``lm_head.weight = embed_tokens.weight`` tied by hand while ``tie_word_embeddings=False``: the config names
  ``LlamaForCausalLM`` but ``lm_head.weight`` is not stored.

Either way ``AutoModelForCausalLM.from_pretrained`` initialises the head at random, with only a load-time
"MISSING" report. A head that is legitimately absent because the config declares the tie is fine. The same holds for
encoder-decoder LMs (``BartForConditionalGeneration``, ``MarianMTModel``; a bare ``MarianModel`` reloads with
``AutoModelForSeq2SeqLM``), masked LMs (``BertForMaskedLM``'s ``cls.predictions.decoder.weight``) and
vision-language models (``LlavaForConditionalGeneration``).

Example:
    >>> import tempfile
    >>> from trainer_guard.tiny import tiny_model
    >>> from trainer_guard.core.head import missing_head_problems
    >>> d = tempfile.mkdtemp()
    >>> tiny_model("llama-untied").model.save_pretrained(d)  # AutoModel-style: the bare LlamaModel
    >>> "saved from LlamaModel, the llama model without its output head" in missing_head_problems(d)[0]
    True
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..checkpoint.sharded import dcp_dirs, sharded_index
from ..errors import IntegrityError, SafetensorsFormatError, UsageError
from ..formats.safetensors import as_path, read_header, read_weight_map, safetensors_files

__all__ = ["missing_head_problems", "stored_tensor_names", "head_tensor_names", "model_class"]

_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_COMMON_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")


def stored_tensor_names(directory: str | os.PathLike) -> set[str] | None:
    """Names of the tensors a model directory stores (headers, index files, an FSDP checkpoint's DCP metadata), or
    ``None`` if it has no weight files.

    Raises:
        UsageError: a weight file or shard index is unreadable or malformed (names it).
    """
    directory = os.fspath(directory)
    files = os.listdir(directory)
    names: set[str] = set()
    found = False
    for idx in (f for f in files if f.endswith(".index.json")):
        names.update(read_weight_map(os.path.join(directory, idx), UsageError))
        found = True
    for fname in safetensors_files(directory):  # files only: a folder named old.safetensors is not a weight file
        try:  # the header alone, through the one reader (no torch)
            names.update(read_header(os.path.join(directory, fname)).tensors)
        except SafetensorsFormatError as e:
            raise UsageError(f"{fname} in {directory} is not a readable safetensors file ({e.brief}); re-save the "
                             f"checkpoint or check it with `trainer-guard doctor`") from None
        found = True
    if not found and dcp_dirs(directory):  # FSDP SHARDED_STATE_DICT: the names in the DCP metadata
        try:
            names.update(sharded_index(directory))
        except IntegrityError as e:
            raise UsageError(str(e)) from None
        found = True
    if not found:
        for fname in (f for f in files if f.endswith(".bin") and "model" in f):
            import torch

            sd = torch.load(os.path.join(directory, fname), map_location="meta", weights_only=True, mmap=True)
            names.update(sd)
            found = True
    return names if found else None


def model_class(arch: str) -> Any:
    """The transformers class named ``arch`` (``config.json``'s ``architectures``), or ``None`` when this version has
    none or it fails to import."""
    if not arch.isidentifier():
        return None
    import transformers

    try:
        return getattr(transformers, arch, None)
    except Exception:  # a lazily imported model module may fail on optional dependencies
        return None


def head_tensor_names(arch: str) -> tuple[str, ...]:
    """Names the output head of class ``arch`` may be stored under (its tied-weights map, then common names)."""
    own = [k for k in _tied_keys(arch) if k.endswith(".weight")]
    return tuple(dict.fromkeys([*own, *_COMMON_HEADS]))


def _tied_keys(arch: str) -> list[str]:
    """The tied parameter names class ``arch`` declares in ``_tied_weights_keys``: transformers 5 maps each tied
    name to its source (a dict: its keys), 4.x lists them (a list, or ``None``)."""
    cls = model_class(arch)
    keys = getattr(cls, "_tied_weights_keys", None) if cls is not None else None
    if isinstance(keys, dict):
        return [k for k in keys if isinstance(k, str)]
    if isinstance(keys, (list, tuple)):
        return [k for k in keys if isinstance(k, str)]
    return []


def _tie_declared(directory: str, cfg: dict) -> bool:
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    try:  # the key is absent: the config class's default decides
        from transformers import AutoConfig

        loaded = AutoConfig.from_pretrained(directory, local_files_only=True)
        text = loaded.get_text_config() if hasattr(loaded, "get_text_config") else loaded
        return bool(getattr(text, "tie_word_embeddings", False))
    except Exception:
        return False


def _generation_class(model_type: str) -> tuple[str | None, str | None, str | None]:
    """``(base class, class with the head, Auto class)`` of a generative family (one with a causal-LM class) whose
    bare base model has no output head: decoder-only (``LlamaModel`` -> ``LlamaForCausalLM``,
    ``AutoModelForCausalLM``) or encoder-decoder (``MarianModel`` -> ``MarianMTModel``, ``AutoModelForSeq2SeqLM``;
    not ``MarianForCausalLM``, a decoder without the encoder). ``None``s for encoders (their base model is the usual
    way to use them) and unknown types."""
    from transformers.models.auto import modeling_auto as ma

    def first(names: Any) -> str | None:
        return names if isinstance(names, str) or not names else names[0]

    base = first(ma.MODEL_MAPPING_NAMES.get(model_type))
    causal = first(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type))
    if not base or not causal or model_type in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return None, None, None
    seq2seq = first(ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type))
    return (base, seq2seq, "AutoModelForSeq2SeqLM") if seq2seq else (base, causal, "AutoModelForCausalLM")


def _lm_kind(arch: str) -> tuple[str | None, tuple[str, ...]]:
    """What kind of language model class ``arch`` is (``"a causal LM"``, ...) and the names its output head may be
    stored under; ``(None, ())`` for any other class.

    Causal LMs (``*ForCausalLM`` / ``*LMHeadModel``): :func:`head_tensor_names`. Sequence-to-sequence LMs
    (``BartForConditionalGeneration``, ``MarianMTModel``), masked LMs (``BertForMaskedLM``) and vision-language
    models (``LlavaForConditionalGeneration``, stored as ``language_model.lm_head.weight``): only the output head
    their class ties to the input embedding (``_tied_weights_keys``; a class without one cannot lose its head to a
    tie), not the encoder/decoder input embeddings some of them (T5) tie as well."""
    if arch.endswith(_HEAD_SUFFIXES):
        return "a causal LM", head_tensor_names(arch)
    from transformers.models.auto import modeling_auto as ma

    for kind, mapping in (("a sequence-to-sequence LM", ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                          ("a masked LM", ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
                          ("a vision-language model", ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)):
        if any(arch == v or (not isinstance(v, str) and arch in v) for v in mapping.values()):
            heads = tuple(k for k in _tied_keys(arch) if k.endswith(".weight") and not _is_input_embedding(k))
            return (kind, heads) if heads else (None, ())
    return None, ()


def _is_input_embedding(name: str) -> bool:
    """``encoder.embed_tokens.weight``, ``bert.embeddings.word_embeddings.weight``, ``shared.weight``: not a head."""
    return any(seg.startswith("embed") or seg.endswith("embeddings") or seg == "shared" for seg in name.split("."))


def missing_head_problems(directory: str | os.PathLike) -> list[str]:
    """Why the model in ``directory`` would reload with a randomly initialised output head (empty when fine).

    Reported:

    - the config names a causal-LM class (``*ForCausalLM`` / ``*LMHeadModel``), a sequence-to-sequence LM class
      (``BartForConditionalGeneration``), a masked-LM class (``BertForMaskedLM``) or a vision-language model
      (``LlavaForConditionalGeneration``), no output-head tensor is
      stored and the config declares no tie (R1b);
    - the config names the *bare* base model of a decoder-only or encoder-decoder family (``LlamaModel``,
      ``MarianModel``: saved from ``AutoModel``, R5) and declares no tie, so there is no head at all.

    A directory without ``config.json`` (a PEFT adapter, a plain ``nn.Module`` checkpoint) or without weight files
    has nothing to check and returns ``[]``.

    Args:
        directory: a checkpoint or model directory.

    Returns:
        One message per problem, each naming the class to load/save with.

    Raises:
        UsageError: ``directory`` is not a directory (a file, a missing path), or ``config.json``, a weight file or
            a shard index is unreadable or malformed (names it).
    """
    directory = as_path(directory, UsageError)
    if not os.path.isdir(directory):
        why = "is a file; pass the directory that holds it" if os.path.isfile(directory) else "no such directory"
        raise UsageError(f"{directory}: {why} (missing_head_problems checks a checkpoint or model directory)")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        return []
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
        why = "JSON nested too deeply" if isinstance(e, RecursionError) else e
        raise UsageError(f"{cfg_path}: unreadable config ({why}); fix it or re-save the model") from None
    if not isinstance(cfg, dict):
        return []
    names = stored_tensor_names(directory)
    if names is None or _tie_declared(directory, cfg):
        return []
    problems = []
    model_type = str(cfg.get("model_type", ""))
    for arch in cfg.get("architectures") or []:
        if not isinstance(arch, str):
            continue
        if arch.endswith(_HEAD_SUFFIXES) and any(n == h or n.endswith("." + h) for n in names for h in _COMMON_HEADS):
            continue  # a causal LM whose head is stored under a usual name: fine, without importing transformers
        kind, heads = _lm_kind(arch)
        if kind is not None:
            if any(n == h or n.endswith("." + h) for n in names for h in heads):
                continue
            problems.append(
                f"{directory}: config.json names {arch}, {kind}, but no output-head tensor ({heads[0]}) is "
                f"stored and tie_word_embeddings is false, so {arch}.from_pretrained initialises the head at "
                f"random. If the head was tied to the input embedding by hand, set config.tie_word_embeddings=True "
                f"before saving (TiedWeightsGuard does); otherwise save the {arch} that holds the trained head "
                f"again with save_pretrained."
            )
            continue
        base, with_head, auto = _generation_class(model_type)
        if base is not None and arch == base:
            problems.append(
                f"{directory}: saved from {arch}, the {model_type} model without its output head (loaded with "
                f"AutoModel?); config.json declares no tie, so {with_head}.from_pretrained / "
                f"{auto} would initialise the head at random. For generation, load the original "
                f"checkpoint with {auto} ({with_head}) and save that."
            )
    return problems
