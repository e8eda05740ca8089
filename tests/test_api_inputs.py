"""The public functions given inputs a user might pass: odd tensors, odd paths, odd models, odd devices.

The standard: bad input gets a ``TrainerGuardError`` naming the culprit and the fix, and loses nothing (never a
model half-modified); good input gets the right result. The Triton kernel runs under ``TRITON_INTERPRET=1`` in a
subprocess, as in ``test_checksum.py`` (the variable must be set before triton is imported).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import requires, triton_interpreter_result
from safetensors.torch import save_file
from torch import nn

import trainer_guard
from trainer_guard import (
    checksums,
    file_checksums,
    find_tied_groups,
    load_weights_inplace,
    missing_head_problems,
    restore_ties,
)
from trainer_guard.errors import ChecksumError, ConfigError, LoadError, TiedWeightsError, UsageError
from trainer_guard.tiny import tiny_model


def _odd_layouts() -> dict[str, torch.Tensor]:
    """Tensors whose bytes are not laid out row-major from offset 0 (plus tiny odd sizes and dtypes)."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "transposed": torch.arange(15, dtype=torch.float32).reshape(3, 5).t(),
        "sliced": torch.arange(20, dtype=torch.float32)[1::3],
        "expanded": torch.arange(3, dtype=torch.float32).reshape(3, 1).expand(3, 4),
        "stride0": torch.tensor([1.5]).expand(7),
        "channels_last": torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2).to(
            memory_format=torch.channels_last),
        "view_row": base[1],
        "view_col": base[:, 2],
        "scalar": torch.tensor(1.5, dtype=torch.float16),
        "empty": torch.empty(3, 0),
        "param": nn.Parameter(torch.arange(5, dtype=torch.float32)),
        "conj": torch.arange(6.0).view(torch.complex64).conj(),
        "transposed_u16": torch.arange(10).to(torch.uint16).reshape(2, 5).t(),
        "u64": torch.arange(3).to(torch.uint64),
        "odd_int8": torch.arange(13, dtype=torch.int8)[1:],
    }


# ------------------------------------------------------------------------------------------------- checksums
def test_non_contiguous_tensors_hash_like_their_contiguous_copy():
    odd = _odd_layouts()
    assert "non-contiguous tensor is read as ``.contiguous()``" in __import__('trainer_guard.checksum.spec').checksum.spec.__doc__
    got = checksums(odd, backend="cpu")
    want = checksums({k: v.detach().resolve_conj().contiguous().clone() for k, v in odd.items()}, backend="cpu")
    assert got == want


_TRITON_CHILD = r"""
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
from test_api_inputs import _odd_layouts
from trainer_guard.checksum.triton import triton_checksums
print("RESULT" + json.dumps({k: str(v) for k, v in triton_checksums(_odd_layouts(), block=4, iters=2).items()}))
"""


@pytest.mark.slow
def test_triton_interpreter_matches_cpu_on_non_contiguous_tensors():
    got = triton_interpreter_result(_TRITON_CHILD)
    assert got == {k: str(v) for k, v in checksums(_odd_layouts(), backend="cpu").items()}


def test_checksums_refuses_a_nested_tensor_with_a_checksum_error():
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(ChecksumError, match=r"'packed'.*nested.*unbind"):
        checksums({"packed": nested}, backend="cpu")


def test_checksums_bad_inputs_get_checksum_errors():
    for bad, says in [([torch.ones(2)], "got list"), ({"w": None}, "'w'.*got NoneType"),
                      ({"m": torch.ones(2, device="meta")}, "meta device"),
                      ({"s": torch.ones(2, 2).to_sparse()}, "layout")]:
        with pytest.raises(ChecksumError, match=says):
            checksums(bad, backend="cpu")
    with pytest.raises(ChecksumError, match="'CPU'"):
        checksums({"w": torch.ones(2)}, backend="CPU")


# -------------------------------------------------------------------------------------------- file_checksums
def test_file_checksums_and_load_accept_bytes_paths_to_a_directory(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(t, str(tmp_path / "model.safetensors"))
    assert file_checksums(os.fsencode(tmp_path)) == checksums(t, backend="cpu")
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(2, 3))
    assert load_weights_inplace(model, os.fsencode(tmp_path)).loaded == 1
    assert torch.equal(model.w, t["w"])


def test_path_of_the_wrong_type_is_a_trainer_guard_error(tmp_path):
    with pytest.raises(ChecksumError, match="NoneType"):
        file_checksums(None)
    with pytest.raises(LoadError, match="NoneType"):
        load_weights_inplace(nn.Linear(2, 2), None)


# ------------------------------------------------------------------------------------- load_weights_inplace
def _llama_dir(tmp_path, kind="llama-tied", seed=1):
    d = tmp_path / kind
    tiny_model(kind, seed=seed).save_pretrained(d)
    return d


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(v.device.type == snap[k].device.type and torch.equal(v.detach(), snap[k])
               for k, v in model.state_dict().items())


@pytest.mark.parametrize("device, says", [("meta", "meta"), ("gpu", "'gpu'")])
def test_load_weights_inplace_refuses_an_unusable_device_and_changes_nothing(tmp_path, device, says):
    d = _llama_dir(tmp_path)
    model = tiny_model("llama-tied", seed=2)
    snap = _snapshot(model)
    with pytest.raises(LoadError, match=says):
        load_weights_inplace(model, d, device=device)
    assert _unchanged(model, snap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_weights_inplace_refuses_cuda_without_cuda(tmp_path):
    d = _llama_dir(tmp_path)
    model = tiny_model("llama-tied", seed=2)
    snap = _snapshot(model)
    with pytest.raises(LoadError, match="'cuda'"):
        load_weights_inplace(model, d, device="cuda")
    assert _unchanged(model, snap)


def test_load_weights_inplace_refuses_a_file_storing_a_tie_twice_with_different_values(tmp_path):
    # an untied checkpoint (head != embeddings) loaded into a tied model: one of the two would be silently dropped
    d = _llama_dir(tmp_path, "llama-untied")
    model = tiny_model("llama-tied", seed=2)
    snap = _snapshot(model)
    with pytest.raises(LoadError, match=r"lm_head\.weight.*different values"):
        load_weights_inplace(model, d)
    assert _unchanged(model, snap)
    with pytest.raises(LoadError, match="different values"):
        load_weights_inplace(model, d, strict=False)
    assert _unchanged(model, snap)


def test_load_weights_inplace_accepts_a_tie_stored_twice_with_equal_values(tmp_path):
    src = tiny_model("llama-tied", seed=1)
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = tiny_model("llama-tied", seed=2)
    result = load_weights_inplace(model, tmp_path)
    assert result.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(model.lm_head.weight, src.lm_head.weight)


@pytest.mark.parametrize("dtype", [torch.complex64] + [getattr(torch, n) for n in ("float8_e8m0fnu",
                                                                                      "float8_e4m3fnuz")
                                                       if hasattr(torch, n)])
@requires("safetensors", "0.8", "its save_file writes complex64 (0.7) and the float8 fnuz/e8m0 variants; "
          "tests/test_versions.py loads such files with older releases")
def test_load_weights_inplace_loads_every_dtype_safetensors_stores(tmp_path, dtype):
    src = torch.ones(2, 3).to(dtype)
    save_file({"w": src}, str(tmp_path / "m.safetensors"))
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(2, 3).to(dtype), requires_grad=False)
    assert load_weights_inplace(model, tmp_path / "m.safetensors").loaded == 1
    assert torch.equal(model.w.view(torch.uint8), src.view(torch.uint8))


def test_load_weights_inplace_refuses_a_non_module(tmp_path):
    d = _llama_dir(tmp_path)
    with pytest.raises(LoadError, match="nn.Module.*OrderedDict"):
        load_weights_inplace(tiny_model("llama-tied").state_dict(), d)


# ---------------------------------------------------------------------------------------------------- ties
class _TiedBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        t = torch.arange(3.0)
        self.register_buffer("a", t)
        self.register_buffer("b", t)


def test_restore_ties_re_ties_buffer_groups_that_find_tied_groups_reports():
    m = _TiedBuffers()
    groups = find_tied_groups(m, include_buffers=True)
    assert groups == [["a", "b"]]
    m.b = m.a.clone()  # split, same values
    assert find_tied_groups(m, include_buffers=True) == []
    msgs = restore_ties(m, groups)
    assert msgs and find_tied_groups(m, include_buffers=True) == [["a", "b"]]
    m.b = m.a.clone() + 1  # split, different values: refused, nothing changed
    with pytest.raises(TiedWeightsError, match="b differs from a"):
        restore_ties(m, groups)
    assert m.b.data_ptr() != m.a.data_ptr()


def test_tie_functions_refuse_malformed_inputs():
    m = tiny_model("llama-tied")
    with pytest.raises(TiedWeightsError, match="list of tie groups"):
        restore_ties(m, "lm_head.weight")
    with pytest.raises(TiedWeightsError, match="stored"):
        restore_ties(m, [["model.embed_tokens.weight", "lm_head.weight"]], stored="lm_head.weight")
    with pytest.raises(TiedWeightsError, match="nn.Module.*dict"):
        find_tied_groups(m.state_dict())


# ------------------------------------------------------------------------------------------- head, preflight
def test_missing_head_problems_refuses_a_file_or_missing_path(tmp_path):
    d = tmp_path / "m"
    tiny_model("llama-manual-tie").save_pretrained(d)
    assert missing_head_problems(d)  # the directory: the R1b problem is found
    with pytest.raises(UsageError, match="is a file; pass the directory"):
        missing_head_problems(d / "model.safetensors")
    with pytest.raises(UsageError, match="no such directory"):
        missing_head_problems(tmp_path / "nope")
    assert missing_head_problems(os.fsencode(d)) == missing_head_problems(d)


def test_adapter_preflight_refuses_a_non_string_optim():
    from trainer_guard.tiny import tiny_lora

    model = tiny_lora(tiny_model("llama-untied"), modules_to_save=["lm_head"])
    with pytest.raises(UsageError, match="optim"):
        trainer_guard.adapter_preflight(model, optim=None)


# ------------------------------------------------------------------------------------------------- config
def test_callbacks_from_yaml_refuses_a_path_that_is_not_a_path():
    r, w = os.pipe()  # an int path would open (and close) that file descriptor
    try:
        os.write(w, b"tied_weights: true\n")
        os.close(w)  # (left open, the read of fd r would block forever)
        for bad in (r, {"tied_weights": True}):
            with pytest.raises(ConfigError, match="callbacks_from_dict"):
                trainer_guard.callbacks_from_yaml(bad)
        os.fstat(r)  # still open
    finally:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass
