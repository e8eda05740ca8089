"""load_weights_inplace (field report R2: loading fine-tuned weights needs the model + a full state dict).

Peak memory is measured by benchmarks/bench_loading.py (not a timed test); here: correctness, ties, shards,
meta-device init, and that every header problem is reported before anything is copied.
"""

import os

import pytest
import torch
from safetensors.torch import save_file, save_model

from conftest import make_args, requires_transformers_5

from trainer_guard import LoadError, find_tied_groups, load_weights_inplace
from trainer_guard.core import loading
from trainer_guard.tiny import tiny_model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, expected):
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_roundtrip_file_and_sharded_dir(tmp_path):
    src = tiny_model("llama-untied", seed=1)
    src.save_pretrained(tmp_path / "one")
    src.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    for path in (tmp_path / "one" / "model.safetensors", tmp_path / "sharded"):
        dst = tiny_model("llama-untied", seed=2)
        result = load_weights_inplace(dst, path)
        assert_same(dst, snapshot(src))
        assert result.loaded == len(src.state_dict()) and result.missing == [] and result.aliases == {}


def test_tied_parameters_loaded_once_and_stay_tied(tmp_path):
    src = tiny_model("llama-tied", seed=1)
    src.save_pretrained(tmp_path)  # transformers stores the tie once (no lm_head.weight)
    dst = tiny_model("llama-tied", seed=2)
    result = load_weights_inplace(dst, tmp_path)
    assert result.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)


def test_plain_module_saved_by_safetensors_save_model(tmp_path):
    src, dst = tiny_model("plain-gpt", seed=1), tiny_model("plain-gpt", seed=2)
    save_model(src, str(tmp_path / "m.safetensors"))  # dedupes the tie, keeps one name
    result = load_weights_inplace(dst, tmp_path / "m.safetensors")
    assert dst.out_head.weight is dst.tok_emb.weight and torch.equal(dst.tok_emb.weight, src.tok_emb.weight)
    assert len(result.aliases) == 1


def test_meta_model_is_materialised_on_the_requested_device(tmp_path):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    src = tiny_model("llama-tied", seed=1)
    src.save_pretrained(tmp_path)
    with init_empty_weights():
        dst = LlamaForCausalLM(src.config)
    assert dst.lm_head.weight.device.type == "meta"
    result = load_weights_inplace(dst, tmp_path, device="cpu")
    assert all(t.device.type == "cpu" for t in [*dst.parameters(), *dst.buffers()]) and result.still_meta == []
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    for n, p in src.named_parameters():
        assert torch.equal(dst.get_parameter(n), p), n


def test_shape_mismatch_names_tensors_and_changes_nothing(tmp_path):
    tiny_model("llama-untied", vocab_size=96).save_pretrained(tmp_path)
    dst = tiny_model("llama-untied", seed=2)
    before = snapshot(dst)
    with pytest.raises(LoadError) as e:
        load_weights_inplace(dst, tmp_path)
    assert str(e.value) == (
        f"Cannot load {tmp_path} into LlamaForCausalLM; nothing was changed:\n"
        "  - model.embed_tokens.weight: shape [96, 32] in the file, [128, 32] in the model\n"
        "  - lm_head.weight: shape [96, 32] in the file, [128, 32] in the model\n"
        "Load into the model class/config the weights were saved from (strict=False skips missing and unexpected "
        "names, never shape mismatches)."
    )
    assert_same(dst, before)


def test_dtype_mismatch_is_an_error_unless_cast(tmp_path):
    src = tiny_model("llama-untied", seed=1).to(torch.bfloat16)
    src.save_pretrained(tmp_path)
    dst = tiny_model("llama-untied", seed=2)
    before = snapshot(dst)
    with pytest.raises(LoadError, match=r"  - model.embed_tokens.weight: dtype bfloat16 in the file, float32 in the "
                                        r"model \(pass cast=True to convert\)\n(.|\n)*  \.\.\. and 1 more\n"):
        load_weights_inplace(dst, tmp_path)  # 21 tensors: 20 listed
    assert_same(dst, before)
    load_weights_inplace(dst, tmp_path, cast=True)
    assert dst.lm_head.weight.dtype == torch.float32
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight.float())


def test_missing_and_unexpected_names(tmp_path):
    src = tiny_model("llama-untied", seed=1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    sd["extra.bias"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    dst = tiny_model("llama-untied", seed=2)
    before = snapshot(dst)
    with pytest.raises(LoadError) as e:
        load_weights_inplace(dst, tmp_path)
    assert "  - lm_head.weight: missing from the file(s)\n  - extra.bias: in the file(s) but not in the model" in str(
        e.value)
    assert_same(dst, before)
    result = load_weights_inplace(dst, tmp_path, strict=False)
    assert result.missing == ["lm_head.weight"] and result.unexpected == ["extra.bias"]
    assert torch.equal(dst.model.norm.weight, src.model.norm.weight)
    assert torch.equal(dst.lm_head.weight, before["lm_head.weight"])


@pytest.mark.parametrize("strict", [True, False])
def test_a_file_with_no_name_in_common_is_refused_and_an_adapter_is_named(tmp_path, strict):
    """strict=False used to 'load' 0 tensors and return quietly; an adapter directory gets the PEFT way to load it."""
    from trainer_guard.tiny import tiny_lora

    tiny_lora(tiny_model("llama-untied")).save_pretrained(tmp_path / "adapter")
    dst = tiny_model("llama-untied", seed=2)
    before = snapshot(dst)
    with pytest.raises(LoadError, match=r"none of its \d+ tensor names .* is in the model; nothing was changed\. It "
                                        r"is a PEFT adapter: load it with PeftModel\.from_pretrained"):
        load_weights_inplace(dst, tmp_path / "adapter", strict=strict)
    assert_same(dst, before)

def test_verify_manifest_catches_a_modified_file_before_copying(tmp_path):
    manifest = pytest.importorskip("trainer_guard.checkpoint.manifest")
    src = tiny_model("llama-untied", seed=1)
    src.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    manifest.write_manifest(tmp_path, manifest.build_manifest(sd, global_step=0, tie_groups=[]))
    dst = tiny_model("llama-untied", seed=2)
    assert load_weights_inplace(dst, tmp_path, verify_manifest=True).verified == len(sd)
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1  # the file changes after the manifest was written
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    dst = tiny_model("llama-untied", seed=2)
    before = snapshot(dst)
    with pytest.raises(LoadError, match=r"does not match its manifest; nothing was changed:\n  - model.norm.weight: "):
        load_weights_inplace(dst, tmp_path, verify_manifest=True)
    assert_same(dst, before)
    with pytest.raises(LoadError, match="has no trainer_guard manifest"):
        os.remove(tmp_path / manifest.MANIFEST_FILE)
        load_weights_inplace(dst, tmp_path, verify_manifest=True)


def test_files_reopened_and_big_tensors_copied_in_row_blocks(tmp_path, monkeypatch):
    """The two memory bounds: pages leave the resident set (reopen) and no full copy of a big tensor (chunks)."""
    import safetensors

    opened, real_open = [], safetensors.safe_open

    def counting_open(*a, **k):
        opened.append(a[0])
        return real_open(*a, **k)

    monkeypatch.setattr(safetensors, "safe_open", counting_open)
    monkeypatch.setattr(loading, "REOPEN_BYTES", 4096)
    monkeypatch.setattr(loading, "CHUNK_BYTES", 1000)  # embeddings are 16 KiB: copied 7 rows at a time
    src = tiny_model("llama-untied", seed=1)
    src.save_pretrained(tmp_path)
    dst = tiny_model("llama-untied", seed=2)
    load_weights_inplace(dst, tmp_path, progress=True)
    assert len(opened) > 5  # headers once, then a fresh mapping every 4 KiB read
    assert_same(dst, snapshot(src))


def test_bad_paths(tmp_path):
    with pytest.raises(LoadError, match="no such file or directory"):
        load_weights_inplace(tiny_model("llama-untied"), tmp_path / "nope")
    with pytest.raises(LoadError, match="no \\*.safetensors file in this directory"):
        load_weights_inplace(tiny_model("llama-untied"), tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(LoadError, match="unreadable safetensors file"):
        load_weights_inplace(tiny_model("llama-untied"), tmp_path / "bad.safetensors")



@pytest.mark.parametrize("index", ['{"weight_map": null}', '[' * 100000, '{"weight_map": {"a": 1}}'])
def test_malformed_shard_index_is_a_load_error_naming_it(tmp_path, index):
    model = tiny_model("llama-untied")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(LoadError, match="model.safetensors.index.json: (malformed|unreadable) index"):
        load_weights_inplace(model, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def _peak_extra(load):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = _status("VmRSS")
    load()
    return _status("VmHWM") - before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_model_plus_a_bounded_window(tmp_path, monkeypatch):
    """R2: load_state_dict(load_file(...)) holds a second copy of the model; load_weights_inplace holds a window of
    REOPEN_BYTES + CHUNK_BYTES (scaled down here: 4 + 2 MiB) whatever the size of the model or its largest tensor."""
    from safetensors.torch import load_file
    from torch import nn

    monkeypatch.setattr(loading, "REOPEN_BYTES", 4 << 20)
    monkeypatch.setattr(loading, "CHUNK_BYTES", 2 << 20)

    def build():
        return nn.Sequential(nn.Embedding(8192, 1024), *[nn.Linear(1024, 1024) for _ in range(8)])  # 32 + 8x4 MiB

    path = str(tmp_path / "m.safetensors")
    save_file({k: v.contiguous() for k, v in build().state_dict().items()}, path)
    model_bytes = 64 << 20
    model = build()
    extra = _peak_extra(lambda: load_weights_inplace(model, path))
    assert extra < 0.25 * model_bytes, extra / model_bytes  # window: <= ~6 MiB + page-cache rounding
    model = build()
    extra = _peak_extra(lambda: model.load_state_dict(load_file(path)))
    assert extra > 0.9 * model_bytes, extra / model_bytes  # the full second copy


@pytest.mark.gpu
def test_load_into_gpu_model_without_a_full_gpu_copy(tmp_path):
    src = tiny_model("llama-untied", seed=1)
    src.save_pretrained(tmp_path)
    dst = tiny_model("llama-untied", seed=2).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    load_weights_inplace(dst, tmp_path)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= max(t.numel() * t.element_size() for t in dst.parameters())
    for n, p in src.named_parameters():
        assert torch.equal(dst.get_parameter(n).cpu(), p), n
    meta = tiny_model("llama-untied", seed=3).to("meta")
    load_weights_inplace(meta, tmp_path, device="cuda")
    assert all(p.device.type == "cuda" for p in meta.parameters())


@requires_transformers_5("Mixtral and LLaVA checkpoints in the converted layout it saves")
@pytest.mark.parametrize("kind", ["mixtral", "llava"])
def test_checkpoint_in_transformers_converted_layout(tmp_path, kind):
    """transformers 5 saves a Mixtral's fused experts per expert and a LLaVA under its original names: every such
    Trainer checkpoint failed with "missing from the file(s)" and the advice to load into the class the weights were
    saved from, which it was. Those tensors are now loaded through the conversion, the rest as before."""
    from transformers import Trainer

    from trainer_guard.tiny import tiny_dataset

    trained = tiny_model(kind)
    Trainer(model=trained, args=make_args(tmp_path, max_steps=1, save_steps=1), train_dataset=tiny_dataset(8)).train()
    ckpt = tmp_path / "checkpoint-1"
    model = tiny_model(kind, seed=1)
    result = load_weights_inplace(model, ckpt)
    a, b = dict(trained.named_parameters()), dict(model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert find_tied_groups(model) == find_tied_groups(trained)
    assert result.loaded == len(dict(model.named_parameters()))
    with torch.device("meta"):
        empty = tiny_model(kind)
    with pytest.raises(LoadError, match="stored in the layout transformers' save_pretrained writes"):
        load_weights_inplace(empty, ckpt)
    assert all(p.device.type == "meta" for p in empty.parameters())  # nothing was changed
