"""``trainer-guard diff A B`` (issue 8): per-tensor same/changed/only-in-A/only-in-B, summarised by module, from
manifests when present else from the files; exit 0 identical, 1 different, 2 unusable."""

import json
import os
import shutil

import pytest
import torch
from conftest import make_args
from safetensors.torch import load_file, save_file
from transformers import Trainer

from trainer_guard.cli import main
from trainer_guard.diff import diff
from trainer_guard.tiny import tiny_dataset, tiny_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 4-step run of an untied Llama whose embed_tokens was frozen by mistake: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    model = tiny_model("llama-untied")
    model.model.embed_tokens.weight.requires_grad_(False)
    Trainer(model=model, args=make_args(out, max_steps=4, save_steps=2), train_dataset=tiny_dataset(16)).train()
    model.save_pretrained(out / "sharded", max_shard_size="20KB")
    model.save_pretrained(out / "single")
    return out


def cli(capsys, *argv):
    rc = main(["diff", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_frozen_module_shows_as_unchanged_over_steps(run_dir, capsys):
    rc, out, _ = cli(capsys, run_dir / "checkpoint-2", run_dir / "checkpoint-4")
    assert rc == 1
    lines = out.splitlines()
    assert lines[0] == f"A: {run_dir / 'checkpoint-2'} (step 2, 21 tensors, from files)"
    assert lines[2] == "21 tensors: 1 same, 20 changed, 0 only in A, 0 only in B"
    assert "  model.embed_tokens: unchanged over 2 steps" in lines
    # how much: ||B - A|| / ||A|| over both layers' up_proj, and the largest change of one value
    a, b = load_file(run_dir / "checkpoint-2" / "model.safetensors"), load_file(run_dir / "checkpoint-4" / "model.safetensors")
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)]
    d = torch.cat([(b[n].double() - a[n].double()).reshape(-1) for n in names])
    rel = d.norm() / torch.cat([a[n].double().reshape(-1) for n in names]).norm()
    assert f"  model.layers.*.mlp.up_proj: changed over 2 steps by {rel:.2%} (max |B-A| {d.abs().max():.1e}) " \
           f"(2 tensors)" in lines, out
    assert lines[-1] == "different"
    rc, out, _ = cli(capsys, run_dir / "checkpoint-2", run_dir / "checkpoint-4", "--checksums-only")
    assert "  model.layers.*.mlp.up_proj: changed over 2 steps (2 tensors)" in out.splitlines()


def test_identical_and_sharded_vs_single_file(run_dir, capsys):
    rc, out, _ = cli(capsys, run_dir / "sharded", run_dir / "single")
    assert len([f for f in os.listdir(run_dir / "sharded") if f.endswith(".safetensors")]) > 1
    assert rc == 0 and out.splitlines()[-1] == "identical"
    assert "21 tensors: 21 same, 0 changed, 0 only in A, 0 only in B" in out
    assert cli(capsys, run_dir / "checkpoint-4", run_dir / "single")[0] == 0  # final checkpoint == saved model


def test_json_report(run_dir, capsys):
    rc, out, _ = cli(capsys, run_dir / "checkpoint-2", run_dir / "checkpoint-4", "--json")
    report = json.loads(out)
    assert rc == 1 and report["identical"] is False and report["steps"] == 2
    assert report["counts"] == {"same": 1, "changed": 20, "only_a": 0, "only_b": 0}
    assert report["tensors"]["model.embed_tokens.weight"] == "same"
    assert {"module": "model.embed_tokens", "status": "unchanged", "tensors": 1, "counts": {"same": 1}} \
        in report["modules"]
    assert report["a"]["source"] == "files" and report["a"]["global_step"] == 2


def test_only_in_a_or_b_and_dtype_change(tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    w = torch.arange(6.0).reshape(2, 3)
    save_file({"m.layers.0.w": w, "m.head.w": w.clone(), "m.old.w": w.clone()}, tmp_path / "a" / "model.safetensors")
    save_file({"m.layers.0.w": w, "m.head.w": w.bfloat16(), "m.new.w": w.clone()}, tmp_path / "b" / "model.safetensors")
    rc, out, _ = cli(capsys, tmp_path / "a", tmp_path / "b", "--tensors")
    assert rc == 1
    assert out.splitlines()[2:] == [
        "4 tensors: 1 same, 1 changed, 1 only in A, 1 only in B",
        "  m.head: changed",
        "  m.layers.0: unchanged",
        "  m.new: only in B",
        "  m.old: only in A",
        "  ! m.head.w: dtype float32 -> bfloat16",
        "  changed  m.head.w",
        "  only_b   m.new.w",
        "  only_a   m.old.w",
        "different",
    ]


def test_a_whole_model_cast_is_one_line(run_dir, tmp_path, capsys):
    sd = load_file(run_dir / "single" / "model.safetensors")
    (tmp_path / "bf16").mkdir()
    save_file({k: v.bfloat16() for k, v in sd.items()}, tmp_path / "bf16" / "model.safetensors")
    rc, out, _ = cli(capsys, run_dir / "single", tmp_path / "bf16")
    flagged = [line for line in out.splitlines() if line.startswith("  ! ")]
    assert rc == 1 and flagged == ["  ! 21 tensors: dtype float32 -> bfloat16 (lm_head.weight, ...; --tensors lists "
                                   "them)"], flagged
    rc, out, _ = cli(capsys, run_dir / "single", tmp_path / "bf16", "--tensors")
    assert len([line for line in out.splitlines() if line.startswith("  ! ")]) == 21

def test_unusable_input_exits_2(run_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, tmp_path / "missing", run_dir / "single")
    assert rc == 2 and err == (f"trainer-guard diff: error: {tmp_path / 'missing'}: no such file or directory; pass "
                               f"a checkpoint or model directory\n")
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, tmp_path / "empty", run_dir / "single")
    assert rc == 2 and "no *.safetensors file and no trainer_guard_manifest.json; nothing to compare" in err
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "single", broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(broken / "model.safetensors") - 10)
    rc, _, err = cli(capsys, broken, run_dir / "single")
    assert rc == 2 and "model.safetensors" in err and "truncated" in err


def test_manifests_are_used_when_both_sides_have_one(run_dir, tmp_path, capsys):
    manifest = pytest.importorskip("trainer_guard.checkpoint.manifest")
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run_dir / "checkpoint-4", a)
    shutil.copytree(run_dir / "checkpoint-4", b)
    for d in (a, b):
        tensors = load_file(d / "model.safetensors")
        manifest.write_manifest(d, manifest.build_manifest(tensors, global_step=4, tie_groups=[]))
    assert diff(a, b)["a"]["source"] == "manifest"
    assert cli(capsys, a, b)[0] == 0
    # a file written after its manifest (re-saved without the guard): the manifest no longer answers for it
    tensors = load_file(b / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, b / "model.safetensors", metadata={"format": "pt"})
    rc, out, _ = cli(capsys, a, b)
    assert rc == 1 and "  model.norm: changed" in out and diff(a, b)["b"]["source"] == "files"
    rc, out, _ = cli(capsys, a, b, "--source", "files")
    assert rc == 1 and "  model.norm: changed" in out
    rc, _, err = cli(capsys, a, b, "--source", "manifest")
    assert rc == 2 and "model.safetensors was written after the manifest" in err
    # a truncated copy is never "identical"
    c = tmp_path / "c"
    shutil.copytree(a, c)
    with open(c / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert cli(capsys, a, c)[0] == 2
    # one side without a manifest: both sides are read from the files
    os.remove(a / manifest.MANIFEST_FILE)
    assert diff(a, b)["b"]["source"] == "files" and cli(capsys, a, b)[0] == 1
    rc, _, err = cli(capsys, a, b, "--source", "manifest")
    assert rc == 2 and "no trainer_guard_manifest.json; drop --source manifest" in err
    (a / manifest.MANIFEST_FILE).write_text('{"format": "something-else"}')
    assert cli(capsys, a, b)[0] == 2


def test_json_callers_get_json_on_unusable_input(tmp_path, run_dir, capsys):
    rc, out, err = cli(capsys, tmp_path / "missing", run_dir / "single", "--json")
    assert rc == 2 and "no such file or directory" in err
    report = json.loads(out)
    assert report["status"] == "unusable" and report["exit_code"] == 2 and "missing" in report["error"]


def test_backwards_steps_and_a_stray_shard(run_dir, tmp_path, capsys):
    rc, out, _ = cli(capsys, run_dir / "checkpoint-4", run_dir / "checkpoint-2")
    assert rc == 1 and "  model.embed_tokens: unchanged" in out.splitlines() and "-2 steps" not in out
    manifest = pytest.importorskip("trainer_guard.checkpoint.manifest")
    a = tmp_path / "a"
    shutil.copytree(run_dir / "checkpoint-4", a)
    manifest.write_manifest(a, manifest.build_manifest(load_file(a / "model.safetensors"), global_step=4,
                                                       tie_groups=[], files=None, directory=a))
    shutil.copy(a / "model.safetensors", a / "model-2.safetensors")  # a copy the manifest does not list
    rc, _, err = cli(capsys, a, run_dir / "checkpoint-4")  # the manifest no longer answers: the files do
    assert rc == 2 and "is stored twice: in " in err and "model-2.safetensors" in err, err


def _with_manifest(src, dst, *, step, tensors_of=None):
    """A copy of checkpoint ``src`` with a manifest describing ``tensors_of``'s weights (default: its own)."""
    manifest = pytest.importorskip("trainer_guard.checkpoint.manifest")
    shutil.copytree(src, dst)
    tensors = load_file((tensors_of or dst) / "model.safetensors")
    manifest.write_manifest(dst, manifest.build_manifest(tensors, global_step=step, tie_groups=[], directory=dst))
    return dst


def test_a_manifest_copied_from_another_checkpoint_never_says_identical(run_dir, tmp_path, capsys):
    """checkpoint-4 holding checkpoint-2's manifest (same size, written after the files): trainer_state.json says
    step 4, the manifest step 2; the files answer, and they differ."""
    a = _with_manifest(run_dir / "checkpoint-2", tmp_path / "a", step=2)
    b = _with_manifest(run_dir / "checkpoint-4", tmp_path / "b", step=2, tensors_of=a)
    report = diff(a, b)
    assert report["b"]["source"] == "files" and not report["identical"]
    assert report["counts"] == {"same": 1, "changed": 20, "only_a": 0, "only_b": 0}
    rc, _, err = cli(capsys, a, b, "--source", "manifest")
    assert rc == 2 and "it is for step 2 but trainer_state.json says step 4: copied from another checkpoint" in err


def test_an_edited_manifest_never_answers_for_the_files(run_dir, tmp_path, capsys):
    a = _with_manifest(run_dir / "checkpoint-4", tmp_path / "a", step=4)
    b = _with_manifest(run_dir / "checkpoint-4", tmp_path / "b", step=4)
    m = json.loads((b / "trainer_guard_manifest.json").read_text())
    m["tensors"]["model.norm.weight"]["checksum"] = "0" * 16  # the fingerprint no longer matches
    (b / "trainer_guard_manifest.json").write_text(json.dumps(m))
    report = diff(a, b)
    assert report["identical"] and (report["a"]["source"], report["b"]["source"]) == ("files", "files")
    assert (report["a"]["notes"], report["b"]["notes"]) == ([], [
        f"{b / 'trainer_guard_manifest.json'} does not describe the files here (its fingerprint does not match its "
        f"own tensor entries: it was edited or corrupted): compared the files instead"])
    rc, _, err = cli(capsys, a, b, "--source", "manifest")
    assert rc == 2 and "its fingerprint does not match its own tensor entries: it was edited or corrupted" in err
    for checksum in ("1" * 40, "-1"):  # not even a 64-bit number: malformed, the files answer, and the note says why
        m["tensors"]["model.norm.weight"]["checksum"] = checksum
        (b / "trainer_guard_manifest.json").write_text(json.dumps(m))
        report = diff(a, b)
        assert report["identical"] and report["b"]["source"] == "files"
        (note,) = report["b"]["notes"]
        assert note.startswith(f"{b / 'trainer_guard_manifest.json'}: malformed manifest (tensor 'model.norm.weight': "
                               f"checksum '{checksum[:3]}") and "is not 1 to 16 hex digits" in note
        rc, out, _ = cli(capsys, a, b)
        assert rc == 0 and f"\nnote: {note}\n" in out
        rc, _, err = cli(capsys, a, b, "--source", "manifest")
        assert rc == 2 and err.startswith(f"trainer-guard diff: error: {b / 'trainer_guard_manifest.json'}: "
                                          f"malformed manifest (tensor 'model.norm.weight': checksum ")


def test_pathological_json_is_a_message_not_a_traceback(run_dir, tmp_path, capsys):
    import struct

    deep = "[" * 100_000 + "]" * 100_000
    a = shutil.copytree(run_dir / "checkpoint-4", tmp_path / "a")
    (a / "trainer_state.json").write_text('{"global_step": 1e400}')  # inf: no step, not an OverflowError
    assert diff(a, run_dir / "checkpoint-4")["a"]["global_step"] is None
    (a / "model.safetensors.index.json").write_text(deep)
    rc, _, err = cli(capsys, a, run_dir / "checkpoint-4")
    assert rc == 2 and err == (f"trainer-guard diff: error: {a / 'model.safetensors.index.json'}: unreadable index "
                               f"(JSON nested too deeply); fix or delete it\n")
    (a / "model.safetensors.index.json").unlink()
    (a / "trainer_guard_manifest.json").write_text(deep)  # malformed: the files answer, and a note says why
    rc, out, _ = cli(capsys, a, run_dir / "checkpoint-4", "--json")
    assert rc == 0 and json.loads(out)["a"]["notes"] == [
        f"{a / 'trainer_guard_manifest.json'}: malformed manifest (JSON nested too deeply): compared the files instead"]
    rc, _, err = cli(capsys, a, run_dir / "checkpoint-4", "--source", "manifest")
    assert rc == 2 and err == (f"trainer-guard diff: error: {a / 'trainer_guard_manifest.json'}: malformed manifest "
                               f"(JSON nested too deeply); delete it or re-save the checkpoint\n")
    (a / "trainer_guard_manifest.json").unlink()
    header = deep.encode()
    (a / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    rc, _, err = cli(capsys, a, run_dir / "checkpoint-4")
    assert rc == 2 and err == (f"trainer-guard diff: error: {a / 'model.safetensors'}: header is not valid JSON "
                               f"(nested too deeply); not a safetensors file, or corrupted; re-save or re-download it\n")


def test_a_trainer_output_dir_names_its_checkpoints(run_dir, capsys):
    rc, _, err = cli(capsys, run_dir, run_dir / "single")
    assert rc == 2 and err == (f"trainer-guard diff: error: {run_dir}: no *.safetensors file and no "
                               f"trainer_guard_manifest.json; nothing to compare (it holds checkpoint-2, checkpoint-4: "
                               f"pass one of those)\n")
