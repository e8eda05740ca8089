"""Supported versions (issue 19): setup.cfg's floors and the constraints file .ci/run's floor job installs
(.ci/floors.txt) agree, and what older libraries do differently is handled: transformers 4.x lists
``_tied_weights_keys`` (5.x maps them), a 4.x model has ``active_adapter`` without ``peft_config``, and safetensors
before 0.7/0.8 cannot read complex64 or the float8 fnuz/e8m0 variants that newer releases write."""

import configparser
import json
import re
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

from trainer_guard import load_weights_inplace
from trainer_guard.core.head import head_tensor_names, missing_head_problems
from trainer_guard.core.trainable import mark_adapter_training
from trainer_guard.tiny import tiny_lora, tiny_model

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the floors
def _declared() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    out = {}
    for req in (r.strip() for r in cfg["options"]["install_requires"].splitlines()):
        if req:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", req)
            assert m, f"setup.cfg: {req!r} has no '>=' floor (the floor job installs each requirement at its floor)"
            out[m[1].lower()] = m[2]
    return out


def _pinned() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_floor_job_installs_exactly_the_declared_minimums():
    assert _pinned() == _declared()


def test_floor_job_installs_from_the_floors_file():
    assert "-c .ci/floors.txt" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------- transformers 4.x vs 5.x
@pytest.mark.parametrize("style", ["list (4.x)", "dict (5.x)"])
def test_head_check_reads_tied_weights_keys_in_both_forms(tmp_path, monkeypatch, style):
    """A BertForMaskedLM saved without its decoder and no tie declared is reported on 4.x as on 5.x (the check
    read only the 5.x dict and was silently off for masked, seq2seq and vision-language LMs on 4.x)."""
    from safetensors.torch import save_file
    from transformers import BertForMaskedLM, LlamaForCausalLM

    keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    monkeypatch.setattr(BertForMaskedLM, "_tied_weights_keys", list(keys) if style.startswith("list") else keys)
    monkeypatch.setattr(LlamaForCausalLM, "_tied_weights_keys", ["lm_head.weight"] if style.startswith("list")
                        else {"lm_head.weight": "model.embed_tokens.weight"})
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["BertForMaskedLM"], "model_type": "bert", "tie_word_embeddings": False}))
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"))
    (problem,) = missing_head_problems(tmp_path)
    assert "BertForMaskedLM, a masked LM, but no output-head tensor (cls.predictions.decoder.weight)" in problem
    assert head_tensor_names("LlamaForCausalLM")[0] == "lm_head.weight"


def test_fix_mode_marks_only_a_peft_adapter_as_training():
    """ResumeGuard(mode='fix') crashed on 4.56/4.57 full fine-tunes: 'LlamaForCausalLM' object has no attribute
    'peft_config' (4.x models have active_adapter, a PeftAdapterMixin method)."""
    mark_adapter_training(tiny_model("llama-tied"))  # no adapter: nothing to mark, no error
    lora = tiny_lora(tiny_model("llama-tied"))
    lora.peft_config["default"].inference_mode = True
    mark_adapter_training(lora)
    assert lora.peft_config["default"].inference_mode is False


# ------------------------------------------------------------------------------------------ old safetensors
def _write(path: Path, tensors: dict[str, tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written by hand (safetensors' own save_file cannot write these dtypes before 0.7/0.8)."""
    header, data = {}, b""
    for name, (code, t) in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


_CODES = {"C64": "complex64", "C128": "complex128", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
          "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "BF16": "bfloat16"}


@pytest.mark.parametrize("safe_open_reads", [True, False], ids=["installed-safetensors", "safetensors-lacks-dtype"])
def test_load_weights_inplace_reads_dtypes_older_safetensors_lack(tmp_path, monkeypatch, safe_open_reads):
    """KeyError / InvalidHeaderDeserialization on complex64 and float8 variants with safetensors < 0.8: such a file
    is read through trainer_guard's own header reader instead, same bytes, in row blocks for a large tensor."""
    import trainer_guard.core.loading as loading

    dtypes = {code: getattr(torch, name) for code, name in _CODES.items() if hasattr(torch, name)}
    src = {f"w_{code}": (code, torch.arange(24.0).reshape(6, 4).to(dt)) for code, dt in dtypes.items()}
    _write(tmp_path / "m.safetensors", src)
    if not safe_open_reads:
        def refuse(*a, **k):
            raise RuntimeError("Error while deserializing header: InvalidHeaderDeserialization")

        monkeypatch.setattr(safetensors, "safe_open", refuse)
        monkeypatch.setattr(loading, "CHUNK_BYTES", 16)  # a few rows at a time
    model = nn.Module()
    for name, (_, t) in src.items():
        model.register_parameter(name, nn.Parameter(torch.zeros_like(t), requires_grad=False))
    assert load_weights_inplace(model, tmp_path / "m.safetensors").loaded == len(src)
    for name, (_, t) in src.items():
        assert torch.equal(getattr(model, name).view(torch.uint8), t.view(torch.uint8)), name
