"""``doctor`` and ``diff`` on directory layouts that transformers' and PEFT's own ``save_pretrained`` produce.

- a sharded save into a directory that held a single-file save, and the reverse: ``save_pretrained`` removes old
  shards but leaves an old ``model.safetensors`` (which ``from_pretrained`` then loads instead of the new shards)
  and an old ``model.safetensors.index.json`` (harmless: ``from_pretrained`` prefers ``model.safetensors``);
- a LoRA adapter with ``trainable_token_indices`` (a delta of a few rows, not a full copy of the embedding);
- an adapter compared with a full model.
"""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer_guard.cli import main
from trainer_guard.diff import diff
from trainer_guard.errors import UsageError
from trainer_guard.tiny import tiny_lora, tiny_model


def _doctor(path, *extra, capsys):
    code = main(["doctor", str(path), "--json", "--no-manifest-ok", *extra])
    return code, json.loads(capsys.readouterr().out)


def _messages(report, key):
    return [f["message"] for f in report[key] if f["check"] != "manifest"]


def test_stale_index_left_by_a_single_file_save_over_a_sharded_one_is_a_warning(tmp_path, capsys):
    old, new = tiny_model("llama-untied", seed=0), tiny_model("llama-untied", seed=1)
    old.save_pretrained(tmp_path / "d", max_shard_size="50KB")
    new.save_pretrained(tmp_path / "d")  # removes the old shards, keeps the old index
    assert sorted(f for f in os.listdir(tmp_path / "d") if "safetensors" in f) == [
        "model.safetensors", "model.safetensors.index.json"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d")  # loads fine: model.safetensors wins
    assert torch.equal(loaded.lm_head.weight, new.lm_head.weight)
    code, rep = _doctor(tmp_path / "d", capsys=capsys)
    assert code == 0, rep["problems"]
    (msg,) = _messages(rep, "warnings")
    assert msg.startswith("model.safetensors.index.json:") and "from_pretrained loads model.safetensors" in msg
    new.save_pretrained(tmp_path / "single")
    report = diff(tmp_path / "d", tmp_path / "single")  # was: "sharded checkpoint is incomplete", exit 2
    assert report["identical"]


def test_old_single_file_next_to_a_newer_sharded_save_is_named_once(tmp_path, capsys):
    old, new = tiny_model("llama-untied", seed=0), tiny_model("llama-untied", seed=1)
    old.save_pretrained(tmp_path / "d")
    new.save_pretrained(tmp_path / "d", max_shard_size="50KB")  # keeps the old model.safetensors
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert torch.equal(loaded.lm_head.weight, old.lm_head.weight)  # the new save is silently ignored
    code, rep = _doctor(tmp_path / "d", capsys=capsys)
    assert code == 1
    (msg,) = _messages(rep, "problems")  # was: one "stored twice" line per tensor (21), naming no cause
    assert "from_pretrained loads model.safetensors" in msg and "model.safetensors.index.json" in msg, msg
    assert "21 tensors" in msg
    rc = main(["diff", str(tmp_path / "d"), str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "from_pretrained loads model.safetensors" in err, err


def test_stray_shard_next_to_a_single_file_is_named_once(tmp_path, capsys):
    model = tiny_model("llama-untied")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    model.save_pretrained(tmp_path / "d")
    os.link(tmp_path / "sharded" / "model-00001-of-00003.safetensors", tmp_path / "d" / "model-00001-of-00003.safetensors")
    code, rep = _doctor(tmp_path / "d", capsys=capsys)
    assert code == 1
    (msg,) = _messages(rep, "problems")
    assert msg.startswith("model-00001-of-00003.safetensors") and "from_pretrained loads model.safetensors" in msg


def test_trainable_tokens_are_not_called_a_full_copy(tmp_path, capsys):
    peft_model = tiny_lora(tiny_model("llama-untied"), trainable_token_indices=list(range(100)))
    peft_model.save_pretrained(tmp_path)
    code, rep = _doctor(tmp_path, capsys=capsys)
    assert code == 0
    rows = {(r["module"], r["kind"]) for r in rep["summary"]["adapter"]["modules"]}
    assert ("embed_tokens", "trainable tokens") in rows, rows
    assert not _messages(rep, "warnings")  # was: "full copies of token_adapter are 78% ... (R4)"


def test_adapter_against_a_full_model_is_a_clear_usage_error(tmp_path, capsys):
    tiny_lora(tiny_model("llama-untied")).save_pretrained(tmp_path / "adapter")
    tiny_model("llama-untied").save_pretrained(tmp_path / "full")
    with pytest.raises(UsageError, match="PEFT adapter"):
        diff(tmp_path / "adapter", tmp_path / "full")
    rc = main(["diff", str(tmp_path / "full"), str(tmp_path / "adapter"), "--json"])
    out = capsys.readouterr().out
    assert rc == 2 and "merge_and_unload" in json.loads(out)["error"]


def test_manifest_and_inplace_load_name_the_file_that_loads_for_an_old_single_file(tmp_path):
    """The same layout as above, met by IntegrityGuard's save check and by load_weights_inplace: the error says which
    file from_pretrained loads, not only 'stored twice'."""
    from trainer_guard import load_weights_inplace
    from trainer_guard.core.checkpoint import plan_manifests
    from trainer_guard.errors import LoadError

    old, new = tiny_model("llama-untied", seed=0), tiny_model("llama-untied", seed=1)
    old.save_pretrained(tmp_path / "d")
    new.save_pretrained(tmp_path / "d", max_shard_size="50KB")
    (problem,) = plan_manifests(new, tmp_path / "d", global_step=None).problems
    assert "is stored twice" in problem and "from_pretrained loads model.safetensors" in problem, problem
    os.remove(tmp_path / "d" / "model.safetensors.index.json")  # no index: every file is read
    target = tiny_model("llama-untied", seed=2)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    with pytest.raises(LoadError, match="from_pretrained loads model.safetensors only and ignores model-0000"):
        load_weights_inplace(target, tmp_path / "d")
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())
