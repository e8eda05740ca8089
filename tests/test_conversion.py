"""core.conversion: loading the tensors a checkpoint stores in transformers' converted layout (MoE experts), which
``Trainer``'s ``load_state_dict(strict=False)`` skips (transformers issue #48805)."""

import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer_guard.core.conversion import conversion_map, load_converted


def _moe(kind, seed):
    torch.manual_seed(seed)
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                num_local_experts=3, num_experts_per_tok=1))
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                              moe_intermediate_size=8, num_experts=3, num_experts_per_tok=1,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))


def _saved(kind, tmp_path):
    model = _moe(kind, 0)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_what_load_state_dict_skips_is_loaded_exactly(tmp_path, kind):
    saved = _saved(kind, tmp_path)
    model = _moe(kind, 1)
    stored = load_file(tmp_path / "model.safetensors")
    result = model.load_state_dict(stored, strict=False)  # what the Trainer does on resume
    assert result.missing_keys  # the experts: silently left as they were
    done = load_converted(model, tmp_path)
    assert done.problems == [] and sorted(done.loaded) == sorted(result.missing_keys)
    for (name, p), q in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(p, q), name
    assert load_converted(model, tmp_path).loaded == done.loaded  # idempotent: loads the same again


def test_every_element_has_one_stored_place():
    model = _moe("mixtral", 0)
    w = model.model.layers[0].mlp.experts.gate_up_proj
    maps = conversion_map(model, "model.layers.0.mlp.experts.gate_up_proj", w)
    assert len(maps) == 6  # 3 experts x (w1, w3)
    flat = torch.cat([m.reshape(-1) for m in maps.values()]).sort().values
    assert torch.equal(flat.long(), torch.arange(w.numel()))
    assert conversion_map(model, "model.embed_tokens.weight", model.model.embed_tokens.weight) is None


def _rewrite(path, change):
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
     "model.layers.1.mlp.experts.gate_up_proj: the checkpoint lacks "
     "model.layers.1.block_sparse_moe.experts.2.w3.weight of the 6 tensors it is stored as"),
    (lambda sd: sd.update({"model.layers.1.block_sparse_moe.experts.0.w2.weight":
                           sd["model.layers.1.block_sparse_moe.experts.0.w2.weight"].half()}),
     "model.layers.1.mlp.experts.down_proj: stored part model.layers.1.block_sparse_moe.experts.0.w2.weight is "
     "float16 [16, 32] in model.safetensors, the model expects float32 [16, 32]"),
])
def test_a_bad_checkpoint_loads_nothing_and_names_the_tensor(tmp_path, change, message):
    _saved("mixtral", tmp_path)
    _rewrite(tmp_path / "model.safetensors", change)
    model = _moe("mixtral", 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = load_converted(model, tmp_path)
    assert done == ([], [message])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # all or nothing


def _sharded_mixtral(tmp_path):
    """A 2-layer Mixtral saved in 4 shards with its manifest; returns the shard holding layer 1's experts (layer 0's
    are in earlier shards: a load that writes as it reads has written layer 0 when it gets there)."""
    from trainer_guard.checkpoint.manifest import write_manifest
    from trainer_guard.checkpoint.reconcile import checkpoint_manifest
    from trainer_guard.checkpoint.saved import saved_tensors

    saved = _moe("mixtral", 0)
    saved.save_pretrained(tmp_path, max_shard_size="20KB")
    write_manifest(tmp_path, checkpoint_manifest(*saved_tensors(saved), tmp_path, global_step=None).manifest)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert len(set(weight_map.values())) > 2 and not any(
        f == shard for k, f in weight_map.items() if k.startswith("model.layers.0.block_sparse_moe"))
    return shard


@pytest.mark.parametrize("fault", ["io-error", "corrupted"])
def test_a_shard_that_cannot_be_read_loads_nothing_and_names_it(tmp_path, monkeypatch, fault):
    """All or nothing: every stored tensor is read (and checked against the manifest) before any is written, so
    an I/O error or a corrupted shard leaves every parameter bit-identical and names the file and tensor."""
    import safetensors

    from trainer_guard.checksum import safetensors_entries

    shard = _sharded_mixtral(tmp_path)
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    if fault == "io-error":  # the disk fails while reading that shard's tensor data (headers still read)
        real = safetensors.safe_open

        class Failing:
            def __init__(self, path, *args, **kwargs):
                self.f, self.bad = real(path, *args, **kwargs), str(path).endswith(shard)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def get_tensor(self, name):
                if self.bad:
                    raise OSError(errno.EIO, "Input/output error")
                return self.f.get_tensor(name)

        monkeypatch.setattr(safetensors, "safe_open", Failing)
        said = f"in {shard} cannot be read (OSError: [Errno 5] Input/output error)"
    else:  # one byte of a stored expert flipped on disk: headers and sizes intact, only the checksum tells
        _, tensors, _ = safetensors_entries(tmp_path / shard)
        with open(tmp_path / shard, "r+b") as f:
            f.seek(tensors[key]["begin"] + 5)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x10]))
        said = f"stored part {key} in {shard} has checksum"
    model = _moe("mixtral", 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = load_converted(model, tmp_path)
    assert done.loaded == [] and done.problems
    assert any(said in p for p in done.problems), done.problems
    assert all("nothing was loaded" in p for p in done.problems)
    for name, v in model.state_dict().items():
        assert torch.equal(before[name], v), name  # bit-identical: layer 0 was not written either


def test_moe_experts_are_copied_into_strided_views_without_index_maps(tmp_path, monkeypatch):
    """MoE experts and renamed tensors are strided views of their parameter: loaded with no element-index map (the
    memory that dominated: 4 bytes an element plus transformers' copies), and still exactly."""
    import trainer_guard.core.conversion as conversion

    def no_maps(*args, **kwargs):
        raise AssertionError("group_map called for a tensor stored as strided views")

    saved = _saved("mixtral", tmp_path)
    model = _moe("mixtral", 1)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    monkeypatch.setattr(conversion, "group_map", no_maps)
    assert load_converted(model, tmp_path).problems == []
    for (name, p), q in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(p, q), name


def test_models_without_a_converted_layout_are_left_alone(tmp_path):
    from trainer_guard.tiny import tiny_lora, tiny_model

    tied = tiny_model("llama-tied")
    tied.save_pretrained(tmp_path / "tied")  # lm_head is stored once, as the embedding: no conversion
    assert load_converted(tied, tmp_path / "tied") == ([], [])
    lora = tiny_lora(tiny_model("llama-untied"))
    lora.save_pretrained(tmp_path / "lora")  # an adapter checkpoint: the base weights are not in it
    assert load_converted(lora, tmp_path / "lora") == ([], [])


def _llava(seed):
    import transformers as tf

    torch.manual_seed(seed)
    text = tf.LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=8, patch_size=4)
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text, vision_config=vision,
                                                           image_token_index=127))


@pytest.mark.slow
def test_vision_language_model_resume_loads_every_renamed_tensor(tmp_path):
    """transformers saves a LLaVA under its original names (language_model.model.*): the Trainer's resume matches
    none of them and would go on from the model it was given (transformers issue #43701). IntegrityGuard loads
    them all, then finds the model equal to the checkpoint's manifest."""
    from conftest import make_args
    from transformers import Trainer

    from trainer_guard import IntegrityGuard
    from trainer_guard.errors import IntegrityError
    from trainer_guard.tiny import tiny_dataset

    def train(model, guard, resume=None, steps=2):
        trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=steps), callbacks=[guard],
                          train_dataset=tiny_dataset(16, 16, 100))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = train(_llava(0), IntegrityGuard())
    ckpt = str(tmp_path / "checkpoint-2")
    with pytest.raises(IntegrityError, match=r"  - vision_tower\.encoder\.layers\.0\.mlp\.fc1\.weight: checksum (.|\n)*"
                                             r"of these \(language_model\.lm_head\.weight, \.\.\.\) are stored in "
                                             r"the layout transformers saves"):
        train(_llava(1), IntegrityGuard(repair_load=False), resume=ckpt)
    guard = IntegrityGuard()
    resumed = train(_llava(1), guard, resume=ckpt)
    assert any(line.startswith("resumed model: loaded ") for line in guard.report())
    for (name, p), q in zip(resumed.model.state_dict().items(), first.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_tensors_fused_on_disk_and_split_in_memory_are_mapped_together(tmp_path):
    """GTE stores one qkv_proj; in memory it is q_proj, k_proj and v_proj. Mapped one at a time, q_proj alone would
    look like a too-small qkv_proj; mapped together, every element has its place."""
    import transformers as tf

    def gte(seed):
        torch.manual_seed(seed)
        return tf.GteForMaskedLM(tf.GteConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2))

    saved = gte(0)
    saved.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert any("qkv" in k for k in stored) and not any("qkv" in k for k in saved.state_dict())
    model = gte(1)
    model.load_state_dict(stored, strict=False)
    done = load_converted(model, tmp_path)
    assert done.problems == [] and any(n.endswith("q_proj.weight") for n in done.loaded)
    for (name, p), q in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(p, q), name
