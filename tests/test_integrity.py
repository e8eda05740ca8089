"""IntegrityGuard and the manifest core: a manifest at every save, save-time verification, resume checks.

Regression tests for field report R1 ("verify the saved model's integrity after every save"; R1b: a hand-tied head
that reloads at random) and R2 (a dtype that changes on the way back in).
"""

import json
import logging
import os
import pickle
import re
import shutil
import time

import pytest
import torch
from conftest import make_args, requires_transformers_5
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, Trainer, TrainerCallback

from trainer_guard import IntegrityGuard, TiedWeightsGuard, callbacks_from_yaml
from trainer_guard.checksum import CHECKSUM_ALGO, file_checksums
from trainer_guard.checkpoint.manifest import (
    MANIFEST_FILE,
    MalformedManifestError,
    compare,
    entries,
    foreign_reason,
    index_entries,
    read_manifest,
    write_manifest,
)
from trainer_guard.checkpoint.stored import read_index
from trainer_guard.errors import ConfigError, IntegrityError, UsageError
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model, out, callbacks=(), resume=None, **kw):
    kw.setdefault("max_steps", 2)
    trainer = Trainer(model=model, args=make_args(out, **kw), train_dataset=tiny_dataset(16, 16, 128),
                      callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _build(kind):
    return tiny_lora(tiny_model("llama-tied")) if kind == "lora" else tiny_model(kind)


# ------------------------------------------------------------------------------------------- save: manifests
@pytest.mark.parametrize("kind, weights, aliases", [
    ("llama-tied", "model.safetensors", {"lm_head.weight": "model.embed_tokens.weight"}),
    ("lora", "adapter_model.safetensors", {}),
    ("plain-gpt", "model.safetensors", {"out_head.weight": "tok_emb.weight"}),
])
def test_every_checkpoint_gets_a_manifest_of_what_is_on_disk(tmp_path, kind, weights, aliases):
    guard = IntegrityGuard()
    _train(_build(kind), tmp_path, [TiedWeightsGuard(), guard], max_steps=4)
    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        m = read_manifest(ckpt)
        on_disk = file_checksums(ckpt)
        assert m["global_step"] == step and m["algo"] == CHECKSUM_ALGO
        assert {k: e["checksum"] for k, e in entries(m).items()} == on_disk  # every stored tensor, exact
        assert {e["file"] for e in m["tensors"].values()} == {weights}
        assert m["files"][weights]["size"] == os.path.getsize(ckpt / weights)
        assert m["aliases"] == aliases
        assert {"torch", "transformers", "safetensors"} <= set(m["versions"])
        assert not [f for f in os.listdir(ckpt) if f.startswith(".tmp-")]
    assert [t["step"] for t in guard.timings] == [2, 4]
    assert guard.report()[0].startswith("checkpoint-2: checked, manifest of ")
    assert guard.writer.last_seconds is not None  # written in the background, joined by train end


@pytest.mark.slow
def test_readback_catches_a_corrupted_write_that_manifest_mode_cannot_see(tmp_path):
    class FlipOneBit(TrainerCallback):  # bit rot / a torn write between save and verification
        def on_save(self, args, state, control, **kw):
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "model.safetensors")
            data = bytearray(open(path, "rb").read())
            data[-3] ^= 0x10
            open(path, "wb").write(bytes(data))

    with pytest.raises(IntegrityError) as e:
        _train(tiny_model("llama-untied"), tmp_path / "a", [FlipOneBit(), IntegrityGuard(verify="readback")])
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'a' / 'checkpoint-2'} does not hold what the model holds; no manifest was "
                          f"written.")
    assert "\n  - model.norm.weight: checksum " in msg and "in the files differs from" in msg
    assert not os.path.exists(tmp_path / "a" / "checkpoint-2" / MANIFEST_FILE)
    # manifest mode checks headers only: it writes the manifest from memory; the file now disagrees with it
    _train(tiny_model("llama-untied"), tmp_path / "b", [FlipOneBit(), IntegrityGuard(verify="manifest")])
    ckpt = tmp_path / "b" / "checkpoint-2"
    bad = compare(entries(read_manifest(ckpt)), index_entries(read_index(ckpt), file_checksums(ckpt)))
    assert [m.name for m in bad] == ["model.norm.weight"]


class DropTensor(TrainerCallback):
    """Rewrites the saved file without one tensor (a conversion script or a filter that lost a weight)."""

    def __init__(self, name):
        self.name = name

    def on_save(self, args, state, control, **kw):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "model.safetensors")
        sd = load_file(path)
        del sd[self.name]
        save_file(sd, path, metadata={"format": "pt"})


@pytest.mark.slow
def test_manifest_mode_stops_when_a_tensor_was_not_saved(tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(IntegrityError, match=f"\n  - {name}: in the model but not saved in the checkpoint files; "
                                             f"it will not be restored$"):
        _train(tiny_model("llama-untied"), tmp_path / "a", [DropTensor(name), IntegrityGuard()])
    # verify="off": only a warning, and the manifest tells the truth about the files
    guard = IntegrityGuard(verify="off")
    _train(tiny_model("llama-untied"), tmp_path / "b", [DropTensor(name), guard])
    assert name not in read_manifest(tmp_path / "b" / "checkpoint-2")["tensors"]
    assert any(name in line and "not saved" in line for line in guard.report())


@pytest.mark.gpu
def test_cuda_model_manifest_equals_the_files(tmp_path):
    # backend "auto" checksums the CUDA model with the Triton kernel; the files are read on the CPU path
    model = tiny_model("llama-tied").cuda()
    trainer = Trainer(model=model, args=make_args(tmp_path, use_cpu=False, max_steps=2),
                      train_dataset=tiny_dataset(16, 16, 128), callbacks=[IntegrityGuard(verify="readback")])
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    assert {k: e["checksum"] for k, e in entries(read_manifest(ckpt)).items()} == file_checksums(ckpt)
    guard = IntegrityGuard()
    _train(tiny_model("llama-tied", seed=1).cuda(), tmp_path, [guard], resume=str(ckpt), max_steps=3,
           use_cpu=False)
    assert any(line.startswith("resumed model matches") for line in guard.report())


# ------------------------------------------------------------------------------------------------ resume
class _Logged(logging.Handler):
    """Collects what transformers' Trainer logs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _trainer_warnings(fn):
    handler, log = _Logged(), logging.getLogger("transformers.trainer")
    log.addHandler(handler)
    try:
        fn()
    finally:
        log.removeHandler(handler)
    return handler.lines


TIE_NOTE = ("the Trainer's warning 'There were missing keys in the checkpoint model loaded: ['lm_head.weight']' is "
            "expected: lm_head.weight is stored once, as its tie model.embed_tokens.weight, and was restored through "
            "the tie (checked against the manifest)")


@pytest.mark.slow
def test_clean_resume_passes(tmp_path):
    _train(tiny_model("llama-tied"), tmp_path, [IntegrityGuard()])
    guard = IntegrityGuard()
    said = _trainer_warnings(lambda: _train(tiny_model("llama-tied", seed=1), tmp_path, [guard],
                                            resume=str(tmp_path / "checkpoint-2"), max_steps=3))
    assert f"resumed model matches {tmp_path / 'checkpoint-2' / MANIFEST_FILE}" in guard.report()
    # transformers warns about the tie alias on every resume of a tied model; the guard says, next to it, why
    assert "There were missing keys in the checkpoint model loaded: ['lm_head.weight']." in said
    assert TIE_NOTE in guard.report()


@pytest.mark.slow
def test_clean_peft_resume_passes(tmp_path):
    _train(_build("lora"), tmp_path, [IntegrityGuard()])
    guard = IntegrityGuard()
    said = _trainer_warnings(lambda: _train(_build("lora"), tmp_path, [guard], resume=str(tmp_path / "checkpoint-2"),
                                            max_steps=3))
    assert any(line.startswith("resumed model matches") for line in guard.report())
    assert not any("missing keys" in line for line in said + guard.report())  # no tie warning to explain


@pytest.mark.slow
def test_untied_resume_has_no_tie_note(tmp_path):
    _train(tiny_model("llama-untied"), tmp_path, [IntegrityGuard()])
    guard = IntegrityGuard()
    _train(tiny_model("llama-untied", seed=1), tmp_path, [guard], resume=str(tmp_path / "checkpoint-2"), max_steps=3)
    assert any(line.startswith("resumed model matches") for line in guard.report())
    assert not any("missing keys" in line for line in guard.report())


R1B_LINE_END = ("(stored once as a tie of model.embed_tokens.weight and the tie was not restored, so it was "
                "initialised at random: declare the tie, e.g. config.tie_word_embeddings=True, TiedWeightsGuard)")


@pytest.mark.slow
def test_r1b_head_reloaded_at_random_is_named(tmp_path):
    # R1b: hand-tied head, config says untied, no TiedWeightsGuard: the checkpoint stores the head once, as the
    # embedding; from_pretrained initialises lm_head at random and a resume (weights only) trains on silently.
    _train(tiny_model("llama-manual-tie"), tmp_path / "run", [IntegrityGuard()], save_only_model=True)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert read_manifest(ckpt)["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    shutil.copytree(tmp_path / "run", tmp_path / "plain")
    trained_embedding = load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"]

    model = LlamaForCausalLM.from_pretrained(tmp_path / "plain" / "checkpoint-2")
    _train(model, tmp_path / "plain", [], resume=str(tmp_path / "plain" / "checkpoint-2"), max_steps=3)
    assert not torch.allclose(model.lm_head.weight, trained_embedding, atol=0.05)  # trained head lost, no error

    # the guard added after the Trainer was built: not wired, the check runs at train begin (wired: see below)
    late = Trainer(model=LlamaForCausalLM.from_pretrained(ckpt), args=make_args(tmp_path / "run", max_steps=3),
                   train_dataset=tiny_dataset(16, 16, 128))
    late.add_callback(IntegrityGuard())
    with pytest.raises(IntegrityError) as e:
        late.train(resume_from_checkpoint=str(ckpt))
    msg = str(e.value)
    assert msg.startswith(f"The resumed model does not match {ckpt / MANIFEST_FILE} (step 2); stopped before "
                          f"training on.")
    lines = msg.split("\n  - ")[1:]
    assert len(lines) == 1 and lines[0].startswith("lm_head.weight: checksum ") and lines[0].endswith(R1B_LINE_END)


@pytest.mark.slow
def test_wired_check_runs_before_the_optimizer_load(tmp_path):
    # With optimizer state in the checkpoint, the untied reload has one more parameter and the Trainer's optimizer
    # load dies with a bare ValueError before any callback runs; wired, the guard names the tensor first.
    from trainer_guard import guard

    _train(tiny_model("llama-manual-tie"), tmp_path, [IntegrityGuard()])
    ckpt = tmp_path / "checkpoint-2"
    args = make_args(tmp_path, max_steps=3)
    plain = Trainer(model=LlamaForCausalLM.from_pretrained(ckpt), args=args, train_dataset=tiny_dataset(16, 16, 128))
    with pytest.raises(ValueError, match="parameter group that doesn't match the size"):
        plain.train(resume_from_checkpoint=str(ckpt))
    wired = guard(Trainer(model=LlamaForCausalLM.from_pretrained(ckpt), args=args,
                          train_dataset=tiny_dataset(16, 16, 128), callbacks=[IntegrityGuard()]))
    with pytest.raises(IntegrityError) as e:
        wired.train(resume_from_checkpoint=str(ckpt))
    assert str(e.value).startswith(f"The resumed model does not match {ckpt / MANIFEST_FILE}; stopped before")
    assert str(e.value).endswith(R1B_LINE_END)


def test_wired_final_save_model_gets_a_manifest(tmp_path):
    from trainer_guard import guard
    from trainer_guard.doctor import diagnose

    trainer = guard(Trainer(model=tiny_model("llama-tied"), args=make_args(tmp_path, max_steps=2),
                            train_dataset=tiny_dataset(16, 16, 128), callbacks=[IntegrityGuard()]))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    m = read_manifest(tmp_path / "final")
    assert m["global_step"] == 2 and set(m["tensors"]) == set(file_checksums(tmp_path / "final"))
    assert diagnose(tmp_path / "final").exit_code == 0


@pytest.mark.slow
def test_r2_dtype_change_on_resume_is_named(tmp_path):
    _train(tiny_model("llama-untied"), tmp_path, [IntegrityGuard()])
    model = tiny_model("llama-untied", seed=1).to(torch.bfloat16)
    with pytest.raises(IntegrityError) as e:
        _train(model, tmp_path, [IntegrityGuard()], resume=str(tmp_path / "checkpoint-2"), max_steps=3)
    assert "\n  - lm_head.weight: dtype is bfloat16 in the resumed model but float32 in the checkpoint manifest" \
        in str(e.value)
    assert str(e.value).count("\n  - ") == 21  # every tensor, each named


@pytest.mark.slow
def test_tensor_the_load_skipped_is_named(tmp_path):
    # The Trainer loads with strict=False: a tensor missing from the file keeps its fresh initialisation.
    name = "model.layers.0.self_attn.q_proj.weight"
    _train(tiny_model("llama-untied"), tmp_path, [IntegrityGuard()])
    DropTensor(name).on_save(make_args(tmp_path), type("S", (), {"global_step": 2})(), None)
    ckpt = tmp_path / "checkpoint-2"
    # the manifest lists every file (version 2): the resume stops before loading anything, naming file and tensor
    with pytest.raises(IntegrityError) as e:
        _train(tiny_model("llama-untied", seed=1), tmp_path, [IntegrityGuard()], resume=str(ckpt), max_steps=3)
    assert str(e.value).split("\n")[0] == (f"{ckpt / 'model.safetensors'} changed since the checkpoint was saved "
                                            f"(truncated: size 109,248 -> 105,048 bytes; no longer holds {name}).")
    # a version 1 manifest (weights only, written before whole-checkpoint manifests): the live model check names it
    m = read_manifest(ckpt)
    v1 = {**m, "version": 1, "files": {"model.safetensors": {"size": m["files"]["model.safetensors"]["size"],
                                                              "tensors": m["files"]["model.safetensors"]["tensors"]}}}
    del v1["digest"]
    write_manifest(ckpt, v1)
    os.utime(ckpt / "model.safetensors", (time.time() + 5, time.time() + 5))  # rewritten after the manifest
    with pytest.raises(IntegrityError) as e:
        _train(tiny_model("llama-untied", seed=1), tmp_path, [IntegrityGuard()], resume=str(ckpt), max_steps=3)
    assert str(e.value).startswith(f"{ckpt / 'model.safetensors'} is 105,048 bytes, the manifest recorded 109,248")
    # (v1 checks the weights' sizes before the load too)
    v1["files"]["model.safetensors"]["size"] = os.path.getsize(ckpt / "model.safetensors")  # the size alone hides it
    write_manifest(ckpt, v1)
    os.utime(ckpt / "model.safetensors", (time.time() + 5, time.time() + 5))
    with pytest.raises(IntegrityError) as e:
        _train(tiny_model("llama-untied", seed=1), tmp_path, [IntegrityGuard()], resume=str(ckpt), max_steps=3)
    lines = str(e.value).split("\n  - ")[1:]
    assert len(lines) == 2 and lines[0].startswith(f"{name}: checksum ")
    # DropTensor rewrote model.safetensors after the manifest: the resume check says so too (core.checkpoint)
    assert lines[1].startswith(f"model.safetensors in {tmp_path / 'checkpoint-2'} changed after its {MANIFEST_FILE} "
                               f"was written")
    assert lines[0].endswith("in the checkpoint manifest (not restored from the checkpoint: the load skipped it, or "
                             "it was re-initialised or changed after the load)")


@pytest.mark.slow
def test_resume_without_manifest_warns_and_continues(tmp_path):
    _train(tiny_model("llama-tied"), tmp_path, [])
    guard = IntegrityGuard()
    _train(tiny_model("llama-tied"), tmp_path, [guard], resume=str(tmp_path / "checkpoint-2"), max_steps=3)
    assert f"{tmp_path / 'checkpoint-2'} has no {MANIFEST_FILE}; the loaded weights were not verified" \
        in guard.report()


# --------------------------------------------------------------------------------------- options and core
def test_partitioned_parameters_get_a_manifest_of_every_file(tmp_path):
    """DeepSpeed ZeRO-3 (parameters marked with ds_id: no rank holds a tensor): the manifest lists every file by its
    bytes, the rank files included, and a changed rank file stops a resume before anything loads."""
    from types import SimpleNamespace

    from trainer_guard.checkpoint.choose import resume_problems

    guard = IntegrityGuard()
    ckpt = tmp_path / "checkpoint-1"
    (ckpt / "global_step1").mkdir(parents=True)
    rank_file = ckpt / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    rank_file.write_bytes(bytes(range(64)))
    (ckpt / "trainer_state.json").write_text('{"global_step": 1}')
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True, process_index=0)
    model = tiny_model("llama-tied")
    model.get_parameter("lm_head.weight").ds_id = 7  # sharded as the model shows it (DeepSpeed ZeRO-3's mark)
    guard.on_save(args, SimpleNamespace(global_step=1), SimpleNamespace(should_save=True), model=model)
    guard.on_step_begin(args, SimpleNamespace(global_step=1), None)  # the deferred write, on the writer thread
    guard.writer.join()
    m = read_manifest(ckpt)
    assert m["tensors"] == {} and set(m["files"]) == {"global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                      "trainer_state.json"}
    guard.on_train_begin(args, SimpleNamespace(global_step=1), None, model=model)  # nothing to compare: no error
    assert guard.report()[0].startswith("sharded parameters no rank holds whole (DeepSpeed ZeRO-3 / FSDP1)")
    assert resume_problems(ckpt) == ([], [])
    data = bytearray(rank_file.read_bytes())
    data[10] ^= 1
    rank_file.write_bytes(bytes(data))
    problems, _ = resume_problems(ckpt)
    assert problems == ["global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt changed since the checkpoint was "
                        "saved (same size, 64 bytes, other bytes)"]


def test_options_are_validated_with_the_valid_choices():
    with pytest.raises(ConfigError) as e:
        IntegrityGuard(verify="fast", backend="gpu")
    assert str(e.value) == ("Invalid options:\n"
                            "  - IntegrityGuard.verify: got 'fast'; expected one of 'off', 'manifest', 'readback'\n"
                            "  - IntegrityGuard.backend: got 'gpu'; expected one of 'auto', 'triton', 'cpu'")


def test_default_config_turns_it_on_in_manifest_mode():
    guards = [c for c in callbacks_from_yaml(os.path.join(ROOT, "configs", "default.yaml"))
              if isinstance(c, IntegrityGuard)]
    assert len(guards) == 1
    assert guards[0].options == {"verify": "manifest", "check_resume": True, "backend": "auto", "repair_load": True,
                                 "fallback": True}


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    from trainer_guard.checkpoint.manifest import build_manifest

    old = build_manifest({"w": torch.ones(3)}, global_step=1, tie_groups=[])
    write_manifest(tmp_path, old)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_manifest(tmp_path, build_manifest({"w": torch.zeros(3)}, global_step=2, tie_groups=[]))
    assert read_manifest(tmp_path) == old and os.listdir(tmp_path) == [MANIFEST_FILE]


def test_sidecar_files_get_the_permissions_open_would_give(tmp_path):
    """mkstemp creates 0600 files; a manifest must be readable wherever the checkpoint's other files are."""
    from trainer_guard.checkpoint.manifest import build_manifest

    write_manifest(tmp_path, build_manifest({"w": torch.ones(3)}, global_step=1, tie_groups=[]))
    (tmp_path / "plain.json").write_text("{}")
    assert os.stat(tmp_path / MANIFEST_FILE).st_mode & 0o777 == os.stat(tmp_path / "plain.json").st_mode & 0o777


@pytest.mark.slow
def test_failed_background_write_stops_the_run(tmp_path, monkeypatch):
    import trainer_guard.checkpoint.writer as manifest_core

    def full_disk(directory, manifest):
        raise OSError("No space left on device")

    monkeypatch.setattr(manifest_core, "write_manifest", full_disk)
    with pytest.raises(IntegrityError) as e:
        _train(tiny_model("llama-tied"), tmp_path, [IntegrityGuard()], max_steps=3)
    assert str(e.value) == (f"{tmp_path / 'checkpoint-2' / MANIFEST_FILE} could not be written (No space left on "
                            f"device); that checkpoint has no manifest. Check free disk space and permissions.")


def test_compare_names_swaps_and_foreign_manifests():
    from trainer_guard.checkpoint.manifest import build_manifest, tensor_entries

    a, b, c = torch.arange(4.0), torch.arange(4.0) + 1, torch.zeros(2, 2)
    m = build_manifest({"a": a, "b": b, "c": c}, global_step=None, tie_groups=[])
    from trainer_guard.checksum import checksums

    live = {"a": b, "b": a, "c": c.bfloat16()}
    got = compare(entries(m), tensor_entries(live, checksums(live)), actual_label="files")
    assert [x.message for x in got] == [
        "a and b: contents swapped in the files (each holds the data the manifest records for the other)",
        "c: dtype is bfloat16 in the files but float32 in the manifest",
    ]
    other = {"x": a}
    assert foreign_reason(m, compare(entries(m), tensor_entries(other, checksums(other))), 1) == (
        "none of the manifest's 3 tensor names is in the files: it describes another model")


def test_read_manifest_rejects_foreign_json(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text('{"format": "something-else", "tensors": {}}')
    with pytest.raises(UsageError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == (f"{tmp_path / MANIFEST_FILE}: not a trainer_guard manifest (format 'something-else', "
                            f"expected 'trainer_guard.manifest')")
    assert not isinstance(e.value, MalformedManifestError)  # foreign, not malformed: doctor labels them apart


def test_background_write_into_a_deleted_checkpoint_is_not_an_error(tmp_path):
    """The Trainer may delete a checkpoint (rotation, load_best_model_at_end cleanup) while its manifest is being
    written: that is not a failed save. A write that fails while the directory exists still raises."""
    import shutil

    from trainer_guard.checkpoint.manifest import build_manifest
    from trainer_guard.checkpoint.writer import ManifestWriter

    m = build_manifest({"w": torch.ones(2)}, global_step=1, tie_groups=[])
    gone = tmp_path / "checkpoint-1"
    gone.mkdir()
    shutil.rmtree(gone)
    w = ManifestWriter()
    w.submit(gone, m)
    w.join()  # no error: nothing is left to describe
    ro = tmp_path / "readonly"
    ro.mkdir()
    (ro / "trainer_guard_manifest.json").mkdir()  # a directory in the way: the rename fails
    w.submit(ro, m)
    with pytest.raises(IntegrityError, match="could not be written"):
        w.join()


def _two_adapters(names=("default", "other"), seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_model("llama-untied", seed=seed), LoraConfig(r=4, target_modules=["q_proj"]),
                           adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("names", [
    pytest.param(("default", "other"), marks=requires_transformers_5(
        "its resume loads a top-level adapter beside those in subdirectories; 4.x loads only the subdirectories")),
    ("my_lora",), ("my_lora", "second")])
def test_named_and_several_peft_adapters_each_get_a_manifest(tmp_path, names):
    """PEFT stores a non-"default" adapter in checkpoint-N/<name>/: each adapter directory gets the manifest of
    what it holds, checked in readback mode, and a clean resume of every adapter passes."""
    guard = IntegrityGuard(verify="readback")
    _train(_two_adapters(names), tmp_path, [guard])
    ckpt = tmp_path / "checkpoint-2"
    for name in names:
        where = ckpt if name == "default" else ckpt / name
        m = read_manifest(where)
        assert {k: e["checksum"] for k, e in entries(m).items()} == file_checksums(where / "adapter_model.safetensors")
        assert {e["file"] for e in m["tensors"].values()} == {"adapter_model.safetensors"}
        assert all("lora_" in k for k in m["tensors"])
    if "default" not in names:
        assert not (ckpt / MANIFEST_FILE).exists()  # nothing stored at the top level, nothing described there
    assert f"in {len(names)} adapter directories" in guard.report()[0] or len(names) == 1

    resumed = IntegrityGuard()
    _train(_two_adapters(names, seed=1), tmp_path, [resumed], resume=str(ckpt), max_steps=3)
    line = next(x for x in resumed.report() if x.startswith("resumed model matches"))
    assert line.count(MANIFEST_FILE) == len(names)


def test_corrupted_second_adapter_is_named_on_resume(tmp_path):
    _train(_two_adapters(), tmp_path, [IntegrityGuard()])
    ckpt = tmp_path / "checkpoint-2"
    f = ckpt / "other" / "adapter_model.safetensors"
    sd = load_file(f)
    key = sorted(sd)[0]
    sd[key] = sd[key] + 1
    save_file(sd, f, metadata={"format": "pt"})
    # before anything loads (the checkpoint's manifest lists every file): the file, then the tensor, named first
    with pytest.raises(IntegrityError, match=r"^" + re.escape(f"{f} changed since the checkpoint was saved (same size, ")
                       + r"[\d,]+ bytes, other bytes: tensor data of " + re.escape(key) + r"\)\."):
        _train(_two_adapters(seed=1), tmp_path, [IntegrityGuard()], resume=str(ckpt), max_steps=3)
    os.remove(ckpt / MANIFEST_FILE)  # no whole-checkpoint manifest: the adapter's own catches it after the load
    with pytest.raises(IntegrityError, match=r"other/" + key.replace(".", r"\.") + r": checksum"):
        _train(_two_adapters(seed=1), tmp_path, [IntegrityGuard()], resume=str(ckpt), max_steps=3)


def _tiny_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1))


@requires_transformers_5("it saves a MoE's fused experts per expert, a layout its own resume cannot "
                         "load; 4.x stores and loads them as they are")
@pytest.mark.slow
@pytest.mark.parametrize("verify", ["manifest", "readback"])
def test_moe_experts_converted_on_save_are_checked_under_their_stored_names(tmp_path, verify):
    """transformers saves Mixtral's fused experts (mlp.experts.gate_up_proj) as per-expert tensors
    (block_sparse_moe.experts.0.w1.weight). The manifest describes them from memory under the stored names (the
    conversion reverted as save_pretrained does), so a resume whose experts did not load is caught."""
    from trainer_guard.doctor import diagnose

    guard = IntegrityGuard(verify=verify)
    _train(_tiny_mixtral(), tmp_path, [guard])
    ckpt = tmp_path / "checkpoint-2"
    m = read_manifest(ckpt)
    assert {e["source"] for e in m["tensors"].values()} == {"model"}
    assert sum(".block_sparse_moe.experts." in k for k in m["tensors"]) == 6
    assert {k: e["checksum"] for k, e in entries(m).items()} == file_checksums(ckpt)
    assert not any("weight conversion" in line for line in guard.report())
    assert diagnose(ckpt).exit_code == 0

    # transformers 5.23's Trainer resumes weights with load_state_dict(strict=False): the per-expert names match
    # nothing, the experts and router keep their random values and training goes on (one logged warning)
    with pytest.raises(IntegrityError) as e:
        _train(_tiny_mixtral(seed=1), tmp_path, [IntegrityGuard(repair_load=False)], resume=str(ckpt), max_steps=3)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight: checksum" in str(e.value)
    assert "7 of these (model.layers.0.block_sparse_moe.experts.0.w1.weight, ...) are stored in the layout" in str(
        e.value) and f"load the model with MixtralForCausalLM.from_pretrained({str(ckpt)!r}) before resuming" in str(
        e.value)
    # the fix the message names: from_pretrained applies the conversion, the Trainer's partial load keeps it
    from transformers import MixtralForCausalLM

    resumed = IntegrityGuard()
    _train(MixtralForCausalLM.from_pretrained(ckpt), tmp_path, [resumed], resume=str(ckpt), max_steps=3)
    assert any(line.startswith("resumed model matches") for line in resumed.report())

    # by default the guard loads what the Trainer skipped, says so, and the model then matches the manifest
    repaired = IntegrityGuard()
    trainer = _train(_tiny_mixtral(seed=1), tmp_path, [repaired], resume=str(ckpt), max_steps=2)
    assert any(line.startswith("resumed model: loaded 3 tensors the Trainer's load_state_dict(strict=False) "
                               "skipped") for line in repaired.report())
    assert any(line.startswith("resumed model matches") for line in repaired.report())
    reference = MixtralForCausalLM.from_pretrained(ckpt)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    # the repair does not depend on the comparison: with check_resume off it still runs (and says so)
    repair_only = IntegrityGuard(check_resume=False)
    trainer = _train(_tiny_mixtral(seed=1), tmp_path, [repair_only], resume=str(ckpt), max_steps=2)
    assert any("loaded 3 tensors" in line for line in repair_only.report())
    assert not any("matches" in line for line in repair_only.report())
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), reference.parameters()))

    class SkipExperts(TrainerCallback):  # an expert that did not load: re-initialised after the weight load
        def on_train_begin(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                model.model.layers[0].mlp.experts.gate_up_proj.normal_()

    # the guard added after the Trainer was built: not wired, so it checks at train begin, after SkipExperts
    late = Trainer(model=MixtralForCausalLM.from_pretrained(ckpt), args=make_args(tmp_path, max_steps=3),
                   train_dataset=tiny_dataset(16, 16, 128), callbacks=[SkipExperts()])
    late.add_callback(IntegrityGuard(repair_load=False))
    with pytest.raises(IntegrityError, match=r"model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight: checksum"):
        late.train(resume_from_checkpoint=str(ckpt))


def test_renamed_tensors_without_a_known_conversion_are_described_from_the_files(tmp_path):
    """A save that renames tensors in a way the library cannot revert: the stored names are checksummed from the
    files (headers give dtype and shape, nothing is read into memory), with a warning."""
    from trainer_guard.checkpoint.reconcile import checkpoint_manifest

    model = tiny_model("llama-untied")
    sd = {k.replace("mlp.", "ffn."): v.clone() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = dict(model.state_dict())
    result = checkpoint_manifest(expected, [], tmp_path, global_step=1)
    assert result.problems == [] and "weight conversion on save?" in result.warnings[0]
    m = result.manifest
    assert {k for k, e in m["tensors"].items() if e["source"] == "file"} == {k for k in sd if ".ffn." in k}
    assert {k: e["checksum"] for k, e in entries(m).items()} == file_checksums(tmp_path)
    index = read_index(tmp_path)
    assert all((e["dtype"], tuple(e["shape"])) == (index[k].dtype, index[k].shape) for k, e in m["tensors"].items())


def _best_model_run(model, out, guard):
    args = make_args(out, max_steps=4, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="loss", greater_is_better=True)  # the higher-loss step 2 is "best"
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(16, 16, 128),
                      eval_dataset=tiny_dataset(8, 16, 128), callbacks=[guard])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    return trainer


def test_best_model_loaded_at_train_end_is_checked(tmp_path):
    guard = IntegrityGuard()
    _best_model_run(tiny_model("llama-untied"), tmp_path, guard)
    assert any(line.startswith("best model matches") for line in guard.report())


@requires_transformers_5("it saves a MoE's fused experts per expert, a layout its own resume cannot "
                         "load; 4.x stores and loads them as they are")
def test_best_model_whose_moe_experts_were_not_loaded_is_an_error(tmp_path):
    """load_best_model_at_end has the same strict=False load as a resume: a MoE's experts stay as trained last."""
    with pytest.raises(IntegrityError, match=r"The best model does not match .*the model in memory is not that "
                                             r"checkpoint(.|\n)*experts\.0\.w1\.weight: checksum(.|\n)*"
                                             r"drop load_best_model_at_end and load MixtralForCausalLM"):
        _best_model_run(_tiny_mixtral(), tmp_path, IntegrityGuard(repair_load=False))


@requires_transformers_5("it saves a MoE's fused experts per expert, a layout its own resume cannot "
                         "load; 4.x stores and loads them as they are")
def test_best_model_moe_experts_are_repaired_by_default(tmp_path):
    from transformers import MixtralForCausalLM

    guard = IntegrityGuard()
    trainer = _best_model_run(_tiny_mixtral(), tmp_path, guard)
    assert any(line.startswith("best model: loaded 3 tensors") for line in guard.report())
    reference = MixtralForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------ malformed JSON on disk
def _saved_manifest(tmp_path):
    from trainer_guard.checkpoint.manifest import build_manifest

    return build_manifest({"w": torch.ones(2, 3)}, global_step=2, tie_groups=[], directory=tmp_path)


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(version=True), r"version is True, expected an integer"),  # True == 1 in Python
    (lambda m: m.update(version=1.0), r"version is 1.0, expected an integer"),
    (lambda m: m["tensors"]["w"].update(shape=[-2, 3]), r"tensor 'w': shape \[-2, 3\] is not a list of sizes"),
    (lambda m: m["tensors"]["w"].update(shape=[True, 3]), r"tensor 'w': shape \[True, 3\] is not a list of sizes"),
    (lambda m: m["tensors"]["w"].update(shape="23"), r"tensor 'w': shape '23' is not a list of sizes"),
    (lambda m: m["tensors"]["w"].update(dtype=None), r"tensor 'w': dtype None is not a dtype name"),
    (lambda m: m["files"]["model.safetensors"].update(size=-5), r"files entry 'model.safetensors' is"),
    # ZeRO-3 saved without gathered weights: the parameters' checksums combined from the partitions
    (lambda m: m.update(partitions=[]), r"'partitions' is a list, expected a dict"),
    (lambda m: m.update(partitions={"p": {"dtype": "float32", "shape": [2], "checksum": "xyz"}}),
     r"tensor 'p': checksum 'xyz' is not 1 to 16 hex digits"),
    (lambda m: m.update(partitions={"p": {"dtype": "float32", "shape": [-1], "checksum": "ff"}}),
     r"tensor 'p': shape \[-1\] is not a list of sizes"),
])
def test_read_manifest_names_malformed_values(tmp_path, edit, says):
    m = _saved_manifest(tmp_path)
    edit(m)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(MalformedManifestError, match=rf"^{re.escape(str(tmp_path / MANIFEST_FILE))}: malformed "
                                                     rf"manifest \({says}.*\); delete it or re-save the checkpoint$"):
        read_manifest(tmp_path)


def test_read_manifest_names_an_int_too_long_for_python(tmp_path):
    text = json.dumps(_saved_manifest(tmp_path)).replace('"global_step": 2', '"global_step": ' + "9" * 5000)
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(MalformedManifestError, match=r"trainer_guard_manifest.json: malformed manifest \(not "
                                                     r"valid JSON: Exceeds the limit .*\); delete it or re-save the "
                                                     r"checkpoint$"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("header, says", [
    (b"[" * 100_000 + b"]" * 100_000, "header is not valid JSON (nested too deeply); not a safetensors file"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}', "tensor 'w' has no valid data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [false, 4]}}', "tensor 'w' has no valid data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}', "tensor 'w' has no valid data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}', "tensor 'w' has no valid data_offsets"),
])
def test_file_problem_names_a_malformed_header(tmp_path, header, says):
    import struct

    from trainer_guard.checkpoint.stored import file_problem

    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert says in file_problem(path)
    with pytest.raises(IntegrityError, match=re.escape(says)):
        read_index(path)


@pytest.mark.parametrize("pattern, text, says", [
    (r"^.*$", "[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"),
    (r'"shape": \[2, 3\]', '"shape": [1e400, 3]', r"tensor 'w': shape \[inf, 3\] is not a list of sizes"),  # inf
    (r'"shape": \[2, 3\]', '"shape": [2.5, 3]', r"tensor 'w': shape \[2.5, 3\] is not a list of sizes"),
    (r'"checksum": "\w+"', '"checksum": "-1"', r"tensor 'w': checksum '-1' is not 1 to 16 hex digits \(0 to 2\*\*64"),
    (r'"checksum": "\w+"', '"checksum": "1' + "0" * 16 + '"', r"tensor 'w': checksum '10+' is not 1 to 16 hex digits"),
    (r'"checksum": "\w+"', '"checksum": "0x1f"', r"tensor 'w': checksum '0x1f' is not 1 to 16 hex digits"),
    (r'"fingerprint": "\w+"', '"fingerprint": "' + "f" * 40 + '"', r"fingerprint is 'f[f.]+', expected 1 to 16 hex"),
    (r'"fingerprint": "\w+"', '"fingerprint": ""', r"fingerprint is '', expected 1 to 16 hex digits"),
])
def test_read_manifest_names_json_too_deep_and_numbers_out_of_range(tmp_path, pattern, text, says):
    """Not a RecursionError / OverflowError, and not a checksum no 64-bit algorithm wrote."""
    raw = re.sub(pattern, lambda _: text, json.dumps(_saved_manifest(tmp_path)), count=1, flags=re.S)
    assert raw != json.dumps(_saved_manifest(tmp_path))
    (tmp_path / MANIFEST_FILE).write_text(raw)
    with pytest.raises(MalformedManifestError, match=rf"^{re.escape(str(tmp_path / MANIFEST_FILE))}: malformed "
                                                     rf"manifest \({says}.*\); delete it or re-save the "
                                                     rf"checkpoint$") as e:
        read_manifest(tmp_path)
    again = pickle.loads(pickle.dumps(e.value))  # survives a process boundary (multiprocessing, distributed)
    assert (str(again), again.path, again.what) == (str(e.value), str(tmp_path / MANIFEST_FILE), e.value.what)
