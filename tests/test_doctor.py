"""``trainer-guard doctor``: healthy checkpoints pass; each corruption is found and named, with the right exit code.

Exit codes: 0 healthy, 1 problems, 2 unusable input. Bad input from the issue: flipped bit, truncation, swapped
tensors, foreign manifest, missing files; plus R1b (tie stored once, config untied), R4 (adapter mostly full copies),
R2 (dtype mix).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_args
from safetensors.torch import load_file, save_file
from transformers import Trainer

from trainer_guard import IntegrityGuard, TiedWeightsGuard
from trainer_guard.cli import main
from trainer_guard.checksum import safetensors_entries
from trainer_guard.checkpoint.contents import commit
from trainer_guard.checkpoint.manifest import MANIFEST_FILE, read_manifest, write_manifest
from trainer_guard.doctor import diagnose
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model


def _train(model, out, callbacks=(), **kw):
    kw.setdefault("max_steps", 2)
    Trainer(model=model, args=make_args(out, **kw), train_dataset=tiny_dataset(16, 16, 128),
            callbacks=[*callbacks, IntegrityGuard()]).train()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _train(tiny_model("llama-untied"), root / "llama", max_steps=4)
    _train(tiny_model("llama-manual-tie"), root / "manual")
    # TiedWeightsGuard records the base model's tie next to the adapter: not a problem of the adapter
    _train(tiny_lora(tiny_model("llama-tied"), modules_to_save=["embed_tokens", "lm_head"]), root / "lora",
           [TiedWeightsGuard()])
    return root


@pytest.fixture
def ckpt(runs, tmp_path):
    """A private copy of a healthy 4-step Llama checkpoint (with optimizer state and manifest)."""
    return shutil.copytree(runs / "llama" / "checkpoint-4", tmp_path / "checkpoint-4")


def _doctor(path, *extra, capsys):
    code = main(["doctor", str(path), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def _saved_like_this(ck):
    """The checkpoint as if saved with the files as they are now: its manifest (every file) written again."""
    write_manifest(ck, commit(ck, read_manifest(ck)))


def _messages(report, key):
    return [f["message"] for f in report[key]]


def test_healthy_checkpoint(ckpt, capsys):
    assert main(["doctor", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "ok [tensors] 21 tensors match the manifest (step 4)" in text
    assert text.rstrip().endswith("verdict: HEALTHY (exit 0)")
    code, rep = _doctor(ckpt, capsys=capsys)
    assert (code, rep["status"], rep["problems"], rep["unusable"]) == (0, "healthy", [], [])
    assert rep["summary"]["manifest"]["global_step"] == 4 and rep["summary"]["tensors"] == 21


def _flip_bit(path, name, byte=5, bit=3):
    start = safetensors_entries(path)[1][name]["begin"]
    with open(path, "r+b") as f:
        f.seek(start + byte)
        b = f.read(1)[0]
        f.seek(start + byte)
        f.write(bytes([b ^ (1 << bit)]))


def test_flipped_bit_names_the_tensor(ckpt, capsys):
    _flip_bit(ckpt / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 1 and rep["unusable"] == []
    (msg,) = _messages(rep, "problems")
    assert msg.startswith("model.layers.1.mlp.up_proj.weight: checksum ")
    assert msg.endswith("in the manifest (data changed)")


def test_truncated_file_is_unusable_and_named(ckpt, capsys):
    path = ckpt / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2
    assert _messages(rep, "unusable") == [
        f"model.safetensors: truncated: {size - 100} bytes on disk, the header needs {size} (last 100 missing)"]
    assert _messages(rep, "problems") == [f"model.safetensors: {size - 100} bytes, the manifest recorded {size}"]
    assert not any(f["check"] == "tensors" for f in rep["passed"]), rep["passed"]  # nothing was compared: no pass


def test_swapped_tensors_are_named_as_a_swap(ckpt, capsys):
    path = ckpt / "model.safetensors"
    sd = load_file(path)
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    sd[a], sd[b] = sd[b], sd[a]
    save_file(sd, path, metadata={"format": "pt"})
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 1
    assert _messages(rep, "problems") == [
        f"{b} and {a}: contents swapped in the files (each holds the data the manifest records for the other)"]


def test_manifest_from_another_checkpoint_is_foreign(runs, ckpt, capsys):
    shutil.copy(runs / "llama" / "checkpoint-2" / MANIFEST_FILE, ckpt / MANIFEST_FILE)
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2
    assert _messages(rep, "unusable") == [f"foreign manifest: {MANIFEST_FILE} is for step 2 but trainer_state.json "
                                          f"says step 4: it was copied from another checkpoint"]


def test_manifest_of_another_model_is_foreign(runs, ckpt, capsys):
    shutil.copy(runs / "lora" / "checkpoint-2" / MANIFEST_FILE, ckpt / MANIFEST_FILE)
    os.remove(ckpt / "trainer_state.json")
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2
    assert _messages(rep, "unusable") == ["foreign manifest: it describes adapter_model.safetensors, none of which is "
                                          "here (this directory holds model.safetensors)"]
    os.rename(ckpt / "model.safetensors", ckpt / "adapter_model.safetensors")  # same file name, other tensors
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        "foreign manifest: none of the manifest's 10 tensor names is in the files: it describes another model"]


def test_manifest_in_another_format_is_foreign(ckpt, capsys):
    (ckpt / MANIFEST_FILE).write_text(json.dumps({"format": "other-tool", "tensors": {}}))
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2
    assert _messages(rep, "unusable") == [f"foreign manifest: {ckpt / MANIFEST_FILE}: not a trainer_guard manifest "
                                          f"(format 'other-tool', expected 'trainer_guard.manifest')"]


def test_edited_manifest_is_caught_by_its_fingerprint(ckpt, capsys):
    m = json.loads((ckpt / MANIFEST_FILE).read_text())
    m["tensors"]["lm_head.weight"]["checksum"] = "0" * 16
    (ckpt / MANIFEST_FILE).write_text(json.dumps(m))
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and "the manifest was edited or corrupted" in _messages(rep, "unusable")[0]


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["files"].update({"model.safetensors": 5}), "files entry 'model.safetensors' is 5"),
    (lambda m: m["files"]["model.safetensors"].update({"size": "abc"}), "files entry 'model.safetensors' is"),
    (lambda m: m["files"].update({"../../etc/passwd": {"size": 1}}), "is not a file name in the checkpoint"),
    (lambda m: m["tensors"]["model.norm.weight"].update({"file": ["a"]}), "tensor entry 'model.norm.weight'"),
    (lambda m: m["aliases"].update({"lm_head.weight": ["a"]}), "alias 'lm_head.weight' maps to ['a']"),
    (lambda m: m.update({"global_step": "4"}), "global_step is '4'"),
])
def test_hand_edited_manifest_values_are_unusable_input_not_tracebacks(ckpt, capsys, edit, says):
    m = json.loads((ckpt / MANIFEST_FILE).read_text())
    edit(m)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(m))
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and "malformed manifest" in _messages(rep, "unusable")[0] and says in _messages(rep, "unusable")[0]
    assert main(["diff", str(ckpt), str(ckpt)]) == 0  # diff compares the files instead, and says why
    out, err = capsys.readouterr()
    assert f"note: {ckpt / MANIFEST_FILE}: malformed manifest (" in out and says in out and "from files" in out
    assert main(["diff", str(ckpt), str(ckpt), "--source", "manifest"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / MANIFEST_FILE}: malformed manifest (" in err and says in err and "Traceback" not in err


@pytest.mark.parametrize("name, text, says", [
    ("trainer_guard_ties.json", '{"aliases": {"lm_head.weight": ["a"]}}', "trainer_guard_ties.json: malformed"),
    ("model.safetensors.index.json", '{"weight_map": {"a.weight": ["x"]}}',
     "model.safetensors.index.json: 'weight_map' is not a mapping of tensor names to files"),
])
def test_hand_edited_sidecars_are_unusable_input_not_tracebacks(ckpt, capsys, name, text, says):
    (ckpt / name).write_text(text)
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and says in " ".join(_messages(rep, "unusable"))


def test_newer_or_unreadable_manifest_is_named_not_called_foreign(ckpt, capsys, monkeypatch):
    m = json.loads((ckpt / MANIFEST_FILE).read_text())
    (ckpt / MANIFEST_FILE).write_text(json.dumps({**m, "version": 99}))
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        f"{ckpt / MANIFEST_FILE}: manifest version 99 is not supported (this trainer_guard reads versions 1 to 2); "
        f"upgrade trainer_guard"]
    import trainer_guard.checkpoint.manifest as manifest

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(manifest, "read_json", denied)
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        f"{ckpt / MANIFEST_FILE}: unreadable (Permission denied); check its permissions"]

def test_unreadable_weights_file_is_a_finding(ckpt, capsys, monkeypatch):
    import trainer_guard.checkpoint.verify as doctor  # the file checks moved there from the doctor

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(doctor, "file_problem", denied)
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and "model.safetensors: unreadable (Permission denied)" in _messages(rep, "unusable")


def test_missing_weights_file_is_named(ckpt, capsys):
    os.remove(ckpt / "model.safetensors")
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2
    assert _messages(rep, "unusable") == [f"{ckpt}: no *.safetensors weights in this directory"]
    assert _messages(rep, "problems") == ["model.safetensors: listed in the manifest (21 tensors) but missing"]


def test_missing_shard_of_a_model_dir_is_named(tmp_path, capsys):
    model = tiny_model("llama-untied")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) >= 2
    code, rep = _doctor(tmp_path, capsys=capsys)
    assert code == 2 and _messages(rep, "unusable")[0].startswith(f"{MANIFEST_FILE}: missing")
    assert _doctor(tmp_path, "--no-manifest-ok", capsys=capsys)[0] == 0
    os.remove(tmp_path / shards[-1])
    code, rep = _doctor(tmp_path, "--no-manifest-ok", capsys=capsys)
    assert code == 1
    (msg,) = _messages(rep, "problems")
    assert msg.startswith(f"{shards[-1]}: listed in model.safetensors.index.json (") and msg.endswith("but missing")


def test_r1b_tie_stored_once_but_config_untied(runs, capsys):
    code, rep = _doctor(runs / "manual" / "checkpoint-2", capsys=capsys)
    assert code == 1
    assert _messages(rep, "problems") == [
        "lm_head.weight: stored only as a tie of model.embed_tokens.weight, but config.json says "
        "tie_word_embeddings=false: from_pretrained will initialise it at random (R1b). Set tie_word_embeddings: "
        "true in config.json, or save with TiedWeightsGuard"]


def test_r5_model_dir_without_head_is_named(tmp_path, capsys):
    # R1b saved with plain save_pretrained: no manifest, no ties record; the head check (core.head) names it
    tiny_model("llama-manual-tie").save_pretrained(tmp_path)
    code, rep = _doctor(tmp_path, "--no-manifest-ok", capsys=capsys)
    assert code == 1
    (msg,) = _messages(rep, "problems")
    assert msg.startswith(f"{tmp_path}: config.json names LlamaForCausalLM, a causal LM, but no output-head tensor")


def test_adapter_size_split_by_module(runs, tmp_path, capsys):
    assert not (runs / "lora" / "checkpoint-2" / "trainer_guard_ties.json").exists()  # adapters: no base ties record
    code, rep = _doctor(runs / "lora" / "checkpoint-2", capsys=capsys)
    assert code == 0 and rep["problems"] == []
    rows = {(r["module"], r["kind"]): r for r in rep["summary"]["adapter"]["modules"]}
    assert set(rows) == {("embed_tokens", "full copy"), ("lm_head", "full copy"), ("q_proj", "lora"),
                         ("v_proj", "lora")}
    assert rows[("embed_tokens", "full copy")]["bytes"] == 128 * 32 * 4
    assert rows[("q_proj", "lora")]["tensors"] == 4  # lora_A + lora_B in 2 layers
    (msg,) = _messages(rep, "warnings")
    assert msg.startswith("adapter_model.safetensors: full copies of embed_tokens, lm_head are 90% of its 36.4 kB (R4)")
    # R3: the config promises trainable full copies the file does not hold
    ck = shutil.copytree(runs / "lora" / "checkpoint-2", tmp_path / "c")
    cfg = json.loads((ck / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["embed_tokens", "lm_head", "score"]
    (ck / "adapter_config.json").write_text(json.dumps(cfg))
    _saved_like_this(ck)
    code, rep = _doctor(ck, capsys=capsys)
    assert code == 1 and _messages(rep, "problems") == [
        "score: adapter_config.json lists it in modules_to_save but adapter_model.safetensors stores no copy of it: "
        "it will load untrained"]


def test_dtype_mix_is_reported(tmp_path, capsys):
    model = tiny_model("llama-untied")
    model.lm_head.to(torch.bfloat16)  # R2: a head made in another dtype than the model
    model.save_pretrained(tmp_path)
    code, rep = _doctor(tmp_path, "--no-manifest-ok", capsys=capsys)
    assert code == 0
    assert any(m.startswith("dtype mix: most weights are float32 but lm_head.weight (bfloat16)")
               for m in _messages(rep, "warnings"))


def test_plain_module_tie_record_is_read(tmp_path, capsys):
    Trainer(model=tiny_model("plain-gpt"), args=make_args(tmp_path, max_steps=2),
            train_dataset=tiny_dataset(16, 16, 128), callbacks=[TiedWeightsGuard(), IntegrityGuard()]).train()
    capsys.readouterr()  # the Trainer's log lines
    code, rep = _doctor(tmp_path / "checkpoint-2", capsys=capsys)
    assert code == 0
    assert _messages(rep, "warnings") == ["out_head.weight: stored once as tok_emb.weight; load with strict=False and "
                                          "re-tie (TiedWeightsGuard does both)"]


def test_big_files_show_progress_on_stderr_but_never_in_json(ckpt, capsys, monkeypatch):
    import trainer_guard.checkpoint.verify as doctor  # the file checks moved there from the doctor

    monkeypatch.setattr(doctor, "PROGRESS_BYTES", 1)
    assert main(["doctor", str(ckpt)]) == 0
    assert "checksum" in capsys.readouterr().err  # the tqdm bar over the file's bytes
    assert main(["doctor", str(ckpt), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["status"] == "healthy" and "checksum" not in out.err


@pytest.mark.slow
def test_unusable_inputs_never_print_a_traceback(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    proc = subprocess.run([sys.executable, "-m", "trainer_guard.cli", "doctor", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "!! [files] model.safetensors: not a safetensors file or truncated (header length " in proc.stdout
    assert proc.stdout.rstrip().endswith("verdict: UNUSABLE INPUT (checks that need none still ran) (exit 2)")
    for path, why in ((tmp_path / "nope", "no such directory"),
                      (tmp_path / "model.safetensors", "is a file; pass the directory that holds it")):
        assert main(["doctor", str(path)]) == 2
        assert f"!! [input] {path}: {why}" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["index_list", "ties_list", "tensors_list", "fingerprint_null", "files_list"])
def test_malformed_sidecars_are_unusable_input_not_tracebacks(what, runs, tmp_path, capsys):
    ck = shutil.copytree(runs / "manual" / "checkpoint-2", tmp_path / what)
    mpath = ck / "trainer_guard_manifest.json"
    m = json.loads(mpath.read_text())
    if what == "index_list":
        (ck / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    elif what == "ties_list":
        (ck / "trainer_guard_ties.json").write_text('{"aliases": ["lm_head.weight"]}')
    else:
        key, value = {"tensors_list": ("tensors", []), "fingerprint_null": ("fingerprint", None),
                      "files_list": ("files", ["model.safetensors"])}[what]
        m[key] = value
        mpath.write_text(json.dumps(m))
    code = main(["doctor", str(ck)])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    if what in ("tensors_list", "files_list", "fingerprint_null"):  # diff compares the files instead, says why
        assert main(["diff", str(runs / "manual" / "checkpoint-2"), str(ck)]) == 0
        assert f"note: {mpath}: malformed manifest (" in capsys.readouterr().out
        assert main(["diff", str(runs / "manual" / "checkpoint-2"), str(ck), "--source", "manifest"]) == 2
        assert f"{mpath}: malformed manifest (" in capsys.readouterr().err


def _named_adapters_run(out):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama-untied"), LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="mine")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    _train(model, out)
    return out / "checkpoint-2"


def test_named_peft_adapters_in_sub_directories_are_each_checked(tmp_path, capsys):
    """PEFT saves adapters not named "default" into <checkpoint>/<name>/: each is checked, none is "unusable"."""
    from trainer_guard.checkpoint.saved import adapter_subdirs

    ckpt = _named_adapters_run(tmp_path)
    capsys.readouterr()  # the training log
    assert adapter_subdirs(ckpt) == ["mine", "second"]
    assert adapter_subdirs(tmp_path) == []  # output_dir/checkpoint-2 is a checkpoint, not an adapter directory
    code, rep = _doctor(ckpt, capsys=capsys)
    assert (code, rep["unusable"], rep["problems"]) == (0, [], [])
    assert sorted(_messages(rep, "passed")) == ["mine/: 4 tensors match the manifest (step 2)",
                                                "second/: 4 tensors match the manifest (step 2)"]
    assert set(rep["summary"]["adapters"]) == {"mine", "second"}
    name = sorted(safetensors_entries(ckpt / "second" / "adapter_model.safetensors")[1])[0]
    _flip_bit(ckpt / "second" / "adapter_model.safetensors", name, byte=0)
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 1 and _messages(rep, "problems")[0].startswith(f"second/: {name}: checksum ")
    assert main(["doctor", str(ckpt)]) == 1
    assert "  second/:  4 tensors, manifest of step 2" in capsys.readouterr().out
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "global_step": 7}))  # copied from elsewhere
    code, rep = _doctor(ckpt, capsys=capsys)
    assert code == 2 and _messages(rep, "unusable")[0].startswith(
        "mine/: foreign manifest: trainer_guard_manifest.json is for step 2 but ../trainer_state.json says step 7")


def test_diff_compares_every_adapter_sub_directory(tmp_path, capsys):
    from trainer_guard.diff import diff

    ckpt = _named_adapters_run(tmp_path)
    capsys.readouterr()
    assert main(["diff", str(ckpt), str(ckpt)]) == 0
    assert "8 tensors: 8 same, 0 changed, 0 only in A, 0 only in B" in capsys.readouterr().out
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    shutil.rmtree(other / "second")  # an adapter only A has
    sd = load_file(other / "mine" / "adapter_model.safetensors")
    key = sorted(sd)[0]
    sd[key] = sd[key] + 1
    save_file(sd, other / "mine" / "adapter_model.safetensors", metadata={"format": "pt"})
    report = diff(ckpt, other)
    assert report["counts"] == {"same": 3, "changed": 1, "only_a": 4, "only_b": 0}
    assert report["tensors"][f"mine/{key}"] == "changed"
    assert all(report["tensors"][n] == "only_a" for n in report["tensors"] if n.startswith("second/"))
    # mine/ was re-written after its manifest: both sides of it come from the files; second/ from its manifest
    assert report["a"]["source"] == "manifest and files" and report["b"]["source"] == "files"
    (note,) = report["b"]["notes"]  # and says why
    assert report["a"]["notes"] == [] and note.endswith(": compared the files instead")
    assert note.startswith(f"{other / 'mine' / MANIFEST_FILE} does not describe the files here (")
    assert main(["diff", str(ckpt), str(other)]) == 1 and "Traceback" not in capsys.readouterr().err
    (ckpt / "second" / MANIFEST_FILE).write_text("{")  # the adapter only A has: its files answer, a note says why
    report = diff(ckpt, other)
    assert report["counts"]["only_a"] == 4 and report["a"]["source"] == "files" and report["a"]["notes"] == [
        f"{ckpt / 'second' / MANIFEST_FILE}: malformed manifest (not valid JSON: Expecting property name enclosed in "
        f"double quotes: line 1 column 2 (char 1)): compared the files instead"]
    (other / MANIFEST_FILE).write_text('{"format": "other"}')  # a stray file where no weights are: not a part
    for extra in ([], ["--source", "files"]):
        assert main(["diff", str(ckpt), str(other), *extra]) == 1, capsys.readouterr().err

_DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON nested deeper than Python's parser goes


@pytest.mark.parametrize("name, says", [
    ("config.json", "[input] config.json: unreadable (JSON nested too deeply)"),
    ("trainer_state.json", "[manifest] trainer_state.json: unreadable (JSON nested too deeply)"),
    ("trainer_guard_ties.json", "[ties] trainer_guard_ties.json: unreadable (JSON nested too deeply)"),
    ("model.safetensors.index.json", "[files] model.safetensors.index.json: unreadable (JSON nested too deeply)"),
    (MANIFEST_FILE, f"[manifest] {MANIFEST_FILE}: malformed manifest (JSON nested too deeply); delete it or re-save "
                    f"the checkpoint"),
])
def test_json_nested_too_deeply_is_named_not_a_recursion_error(ckpt, capsys, name, says):
    (ckpt / name).write_text(_DEEP)
    assert main(["doctor", str(ckpt)]) == 2
    out = capsys.readouterr().out
    assert f"!! {says}" in out and "head check could not run" not in out


def test_safetensors_header_nested_too_deeply(tmp_path, capsys):
    import struct

    header = _DEEP.encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    code, rep = _doctor(tmp_path, "--no-manifest-ok", capsys=capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        "model.safetensors: header is not valid JSON (nested too deeply); not a safetensors file, or corrupted"]


@pytest.mark.parametrize("checksum, shape, says", [
    ("1" * 40, None, "tensor 'model.norm.weight': checksum '1111"),  # a checksum no 64-bit algorithm wrote
    ("-1", None, "tensor 'model.norm.weight': checksum '-1' is not 1 to 16 hex digits (0 to 2**64-1)"),
    (None, "[1e400]", "tensor 'model.norm.weight': shape [inf] is not a list of sizes"),  # json reads 1e400 as inf
    (None, "[2.5]", "tensor 'model.norm.weight': shape [2.5] is not a list of sizes"),
])
def test_manifest_numbers_out_of_range_are_a_report_not_an_exception(ckpt, capsys, checksum, shape, says):
    text = (ckpt / MANIFEST_FILE).read_text()
    m = json.loads(text)
    entry = m["tensors"]["model.norm.weight"]
    if checksum is not None:
        entry["checksum"] = checksum
        text = json.dumps(m)
    else:
        entry["shape"] = "SHAPE"
        text = json.dumps(m).replace('"SHAPE"', shape)
    (ckpt / MANIFEST_FILE).write_text(text)
    rep = diagnose(ckpt)  # documented never to raise for bad input
    assert rep.exit_code == 2
    (msg,) = [f.message for f in rep.unusable]  # malformed, not "foreign manifest: <full path>: ..."
    assert msg.startswith(f"{MANIFEST_FILE}: malformed manifest ({says}") and msg.endswith(
        "); delete it or re-save the checkpoint")
    assert rep.summary["head_check"] == "ran" and rep.summary["dtypes"]  # the checks that need no manifest ran
    code, out = _doctor(ckpt, capsys=capsys)  # --json: the full report, not the bare error object
    assert code == 2 and out["path"] == str(ckpt) and out["unusable"][0]["message"] == msg


def test_index_with_a_null_weight_map_is_named(tmp_path, capsys):
    tiny_model("llama-untied").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": null}')
    code, rep = _doctor(tmp_path, "--no-manifest-ok", capsys=capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        "model.safetensors.index.json: 'weight_map' is not a mapping of tensor names to files"]


def test_unreadable_config_is_named_once(tmp_path, capsys):
    tiny_model("llama-untied").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("not json")
    code, rep = _doctor(tmp_path, "--no-manifest-ok", capsys=capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        "config.json: unreadable (Expecting value: line 1 column 1 (char 0))"]  # not again, unnamed, by the head check


@pytest.mark.parametrize("value", ['"embed_tokens"', "[1]", "[null]", "5"])
def test_malformed_modules_to_save_is_named(runs, tmp_path, capsys, value):
    ck = shutil.copytree(runs / "lora" / "checkpoint-2", tmp_path / "c")
    cfg = json.loads((ck / "adapter_config.json").read_text())
    cfg["modules_to_save"] = json.loads(value)
    (ck / "adapter_config.json").write_text(json.dumps(cfg))
    _saved_like_this(ck)
    capsys.readouterr()
    code, rep = _doctor(ck, capsys=capsys)
    assert code == 2 and rep["problems"] == []  # not one "problem" per character of a string
    assert _messages(rep, "unusable") == [f"adapter_config.json: 'modules_to_save' is {json.loads(value)!r}, expected "
                                          f"a list of module names (or null); fix or re-save the adapter"]


def test_a_trainer_output_dir_names_its_checkpoints(runs, capsys):
    code, rep = _doctor(runs / "llama", capsys=capsys)
    assert code == 2 and _messages(rep, "unusable") == [  # one finding: not also "manifest missing"
        f"{runs / 'llama'}: no *.safetensors weights in this directory (it holds checkpoint-2, checkpoint-4: pass one "
        f"of those)"]


def test_missing_manifest_says_how_to_get_one_for_a_checkpoint_and_for_a_final_save(ckpt, tmp_path, capsys):
    """A checkpoint gets its manifest from IntegrityGuard's on_save; a trainer.save_model() output fires no event,
    so only a wired Trainer writes one there: the advice differs, and --no-manifest-ok is offered."""
    os.remove(ckpt / MANIFEST_FILE)
    code, rep = _doctor(ckpt, capsys=capsys)
    (msg,) = _messages(rep, "unusable")
    assert code == 2 and "train with IntegrityGuard" in msg and "--no-manifest-ok" in msg, msg
    final = tmp_path / "final"
    tiny_model("llama-untied").save_pretrained(final)
    code, rep = _doctor(final, capsys=capsys)
    (msg,) = _messages(rep, "unusable")
    assert code == 2 and "trainer = trainer_guard.guard(trainer)" in msg and "save_model()" in msg, msg
    code, rep = _doctor(final, "--no-manifest-ok", capsys=capsys)
    (msg,) = _messages(rep, "warnings")
    assert code == 0 and "could not be verified" in msg and "--no-manifest-ok" not in msg, msg
