"""The public core API used outside the Trainer (a plain PyTorch or accelerate loop): checksums, ties, in-place
loading and manifests on the inputs such a user passes."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import requires
import trainer_guard
from trainer_guard import checksums, file_checksums, find_tied_groups, load_weights_inplace
from trainer_guard.errors import ChecksumError, LoadError, TrainerGuardError


def _t5(seed, **kw):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, tie_word_embeddings=True)
    return T5ForConditionalGeneration(cfg, **kw)


def _bert_mlm(seed):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------- checksums
@requires("torch", "2.7", "torch.float8_e8m0fnu")
def test_same_bytes_under_another_dtype_or_shape_get_another_checksum():
    """The guarantee covers the torch 2.x dtypes too: unsigned ints and float8 variants of the same bytes."""
    raw = torch.arange(16, dtype=torch.uint8)
    views = {str(dt): raw.view(dt) for dt in (torch.uint8, torch.int8, torch.bool, torch.float8_e4m3fn,
                                              torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
                                              torch.float8_e8m0fnu)}
    views.update({str(dt): raw.view(dt) for dt in (torch.int16, torch.uint16, torch.float16, torch.bfloat16)})
    views.update({str(dt): raw.view(dt) for dt in (torch.int32, torch.uint32, torch.float32)})
    views.update({str(dt): raw.view(dt) for dt in (torch.int64, torch.uint64, torch.float64, torch.complex64)})
    views.update({"u8_2x8": raw.reshape(2, 8), "u8_8x2": raw.reshape(8, 2), "u8_1x16": raw.reshape(1, 16)})
    sums = checksums(views, backend="cpu")
    assert len(set(sums.values())) == len(views)
    # a 0-dim scalar differs from the 1-element vector, and zero-size tensors differ by shape
    s = checksums({"s": torch.tensor(1.0), "v": torch.tensor([1.0]), "a": torch.zeros(0, 3), "b": torch.zeros(3, 0)},
                  backend="cpu")
    assert len(set(s.values())) == 4


@requires("torch", "2.7", "torch.float8_e8m0fnu")
def test_cpu_path_equals_file_path_for_every_dtype_safetensors_stores(tmp_path):
    src = torch.arange(-7, 17, dtype=torch.float32)
    tensors = {
        "u16": torch.arange(7).to(torch.uint16), "u32": torch.arange(3).to(torch.uint32),
        "u64": torch.arange(5).to(torch.uint64), "f64": src.double()[:5], "c64": torch.randn(3, dtype=torch.complex64),
        "f8": src.to(torch.float8_e4m3fn), "f8b": src.to(torch.float8_e5m2)[:5],
        "f8fnuz": src.to(torch.float8_e4m3fnuz)[:3], "f8e5fnuz": src.to(torch.float8_e5m2fnuz)[:9],
        "e8m0": src.abs().add(1).to(torch.float8_e8m0fnu)[:7], "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 3), "i64": torch.arange(3),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    reloaded = load_file(path)
    reloaded["f64"].requires_grad_()  # a leaf that requires grad checksums like its data
    assert file_checksums(path) == checksums(tensors, backend="cpu") == checksums(reloaded, backend="cpu")


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")
def test_quantized_tensor_is_refused_with_the_way_to_checksum_it():
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8)
    with pytest.raises(ChecksumError, match=r"'q'.*quantized tensor.*int_repr\(\)"):
        checksums({"q": q}, backend="cpu")


def test_build_manifest_with_a_header_and_no_checksum_is_a_trainer_guard_error():
    from trainer_guard.checkpoint.manifest import TensorInfo, build_manifest

    with pytest.raises(ChecksumError, match=r"'w'.*header only.*sums"):
        build_manifest({"w": TensorInfo("model.safetensors", "float32", (2,))}, global_step=1, tie_groups=[])


# --------------------------------------------------------------------------------------------------- loading
def test_t5_four_way_tie_loads_from_any_one_name_and_stays_tied(tmp_path):
    src = _t5(0)
    sd = {k: v.clone() for k, v in src.state_dict().items() if k in load_file(_save(src, tmp_path / "a"))}
    assert "shared.weight" in sd and "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd.pop("shared.weight")  # a file that stores the tie under another of its names
    path = tmp_path / "head.safetensors"
    save_file(sd, path)
    dst = _t5(1)
    result = load_weights_inplace(dst, path)
    assert set(result.aliases) == {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert _same_state(src, dst)
    assert find_tied_groups(dst) == [["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                      "lm_head.weight"]]


def _save(model, d):
    model.save_pretrained(d)
    return os.path.join(d, "model.safetensors")


def test_t5_on_the_meta_device_is_materialised_tied(tmp_path):
    src = _t5(0)
    src.save_pretrained(tmp_path)
    with torch.device("meta"):
        dst = _t5(1)
    load_weights_inplace(dst, tmp_path)
    assert _same_state(src, dst) and len(find_tied_groups(dst)[0]) == 4


def test_bert_mlm_decoder_weight_and_bias_ties_survive_and_bf16_needs_cast(tmp_path):
    src = _bert_mlm(0)
    src.save_pretrained(tmp_path)
    dst = _bert_mlm(1)
    load_weights_inplace(dst, tmp_path)
    assert _same_state(src, dst)
    assert dst.cls.predictions.decoder.bias is dst.cls.predictions.bias
    low = _bert_mlm(2).to(torch.bfloat16)
    before = {k: v.clone() for k, v in low.state_dict().items()}
    with pytest.raises(LoadError, match=r"dtype float32 in the file, bfloat16 in the model \(pass cast=True"):
        load_weights_inplace(low, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in low.state_dict().items())
    load_weights_inplace(low, tmp_path, cast=True)
    assert low.cls.predictions.decoder.weight.dtype == torch.bfloat16
    assert torch.equal(low.cls.predictions.decoder.weight, src.cls.predictions.decoder.weight.bfloat16())
    assert low.cls.predictions.decoder.weight is low.bert.embeddings.word_embeddings.weight


class _SharedBuffers(nn.Module):
    """A persistent buffer that shares its storage with another module's non-persistent one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.lin = nn.Module(), nn.Module(), nn.Linear(3, 3)
        mask = torch.ones(4)
        self.a.register_buffer("scratch", mask, persistent=False)
        self.b.register_buffer("mask", mask)


def test_a_persistent_buffer_tied_to_a_non_persistent_one_loads(tmp_path):
    src = _SharedBuffers()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["b.mask"] = torch.full((4,), 7.0)
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    dst = _SharedBuffers()
    assert find_tied_groups(dst, include_buffers=True) == [["a.scratch", "b.mask"]]
    result = load_weights_inplace(dst, path)  # was a raw KeyError: 'a.scratch'
    assert result.loaded == 3 and not result.missing
    assert torch.equal(dst.b.mask, sd["b.mask"]) and torch.equal(dst.a.scratch, sd["b.mask"])


@pytest.mark.parametrize("wrap", ["compile", "dataparallel"])
def test_wrapped_models_load_a_file_saved_from_the_unwrapped_one(tmp_path, wrap):
    """torch.compile / DataParallel (accelerate's prepared model) prefix names with _orig_mod. / module."""
    src = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    path = tmp_path / "m.safetensors"
    save_file(src.state_dict(), path)
    inner = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model = torch.compile(inner) if wrap == "compile" else nn.DataParallel(inner)
    result = load_weights_inplace(model, path)  # was: "none of its 4 tensor names is in the model"
    assert result.loaded == 4 and _same_state(src, inner)


def test_a_file_saved_from_the_wrapper_still_loads_into_the_wrapper(tmp_path):
    inner = nn.Sequential(nn.Linear(3, 3))
    path = tmp_path / "m.safetensors"
    save_file({k: torch.full_like(v, 2.0) for k, v in nn.DataParallel(inner).state_dict().items()}, path)
    load_weights_inplace(nn.DataParallel(inner), path)
    assert torch.equal(inner[0].weight, torch.full((3, 3), 2.0))


def test_verify_manifest_mismatch_names_the_tensor_and_changes_nothing(tmp_path):
    from trainer_guard.checkpoint.manifest import build_manifest, write_manifest

    src = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    save_file(src.state_dict(), tmp_path / "model.safetensors")
    man = build_manifest(dict(src.state_dict()), global_step=1, tie_groups=[])
    man["tensors"]["1.bias"]["checksum"] = "%016x" % (int(man["tensors"]["1.bias"]["checksum"], 16) ^ 1)
    write_manifest(tmp_path, man)
    dst = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(LoadError, match=r"1\.bias: checksum .* differs"):
        load_weights_inplace(dst, tmp_path, verify_manifest=True)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_every_public_error_is_a_trainer_guard_error():
    for name in trainer_guard.__all__:
        obj = getattr(trainer_guard, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, TrainerGuardError), name


def test_a_file_saved_from_a_wrapper_names_the_prefix_when_loaded_into_the_bare_model(tmp_path):
    """DDP's state_dict() prefixes every name with 'module.': loading it into the bare model names the cause."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    f = str(tmp_path / "ddp.safetensors")
    save_file({f"module.{k}": v.clone() for k, v in model.state_dict().items()}, f)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadError, match=r"Its names start with 'module\.': it was saved from a torch.compile/DDP "
                                        r"wrapper; load into that wrapper"):
        load_weights_inplace(model, f)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
