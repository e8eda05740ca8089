"""``doctor`` and ``diff`` on file-system oddities: the Hugging Face cache's symlinked snapshots (and copies of them
whose links dangle), read-only and unreadable checkpoints, odd paths (empty, an unexpanded ``~``, a file inside a
checkpoint), weight files without tensors, shards without their index; neither command writes into what it reads.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer_guard.cli import main
from trainer_guard.checkpoint.manifest import build_manifest, write_manifest
from trainer_guard.tiny import tiny_model

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
LINK = "a symbolic link to ../../blobs/"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``single``: a tiny untied Llama in one file, with a manifest; ``sharded``: the same in 3 shards, without."""
    root = tmp_path_factory.mktemp("models")
    model = tiny_model("llama-untied")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    sd = load_file(root / "single" / "model.safetensors")
    write_manifest(root / "single", build_manifest(sd, global_step=None, tie_groups=[], directory=root / "single"))
    return root


def _hub_cache(src, root, repo="models--org--name"):
    """``src`` laid out as the Hugging Face cache does: ``snapshots/<sha>/<file>`` links to ``../../blobs/<sha256>``.
    Returns the snapshot directory."""
    snap = root / repo / "snapshots" / "0123abcd"
    (root / repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in sorted(os.listdir(src)):
        data = (src / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snap / name)
    return snap


def _listing(*roots):
    """Every path under ``roots`` (links not followed) with its size, mtime, ctime and mode."""
    out = {}
    for r in roots:
        for dirpath, dirs, files in os.walk(r):
            for name in [".", *dirs, *files]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
    return out


def _json(argv, capsys):
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, json.loads(out)


def _messages(report, key):
    return [f["message"] for f in report[key]]


# ------------------------------------------------------------------------------ the Hugging Face cache layout
def test_hub_cache_snapshot_of_symlinks_is_read_through_its_links(models, tmp_path, capsys):
    single = _hub_cache(models / "single", tmp_path / "a")
    sharded = _hub_cache(models / "sharded", tmp_path / "b")
    assert os.path.islink(single / "model.safetensors") and os.path.islink(sharded / "model.safetensors.index.json")
    before = _listing(tmp_path / "a", tmp_path / "b")
    code, rep = _json(["doctor", str(single)], capsys)
    assert code == 0 and rep["summary"]["tensors"] == 21 and "21 tensors match the manifest" in str(rep["passed"])
    code, rep = _json(["doctor", str(sharded) + os.sep, "--no-manifest-ok"], capsys)
    assert code == 0 and rep["summary"]["tensors"] == 21 and len(rep["summary"]["files"]) == 3
    code, rep = _json(["diff", str(single), str(sharded)], capsys)
    assert code == 0 and rep["identical"] and rep["counts"]["same"] == 21
    os.symlink(single, tmp_path / "linked")  # a symlinked checkpoint directory, and a file through it
    code, rep = _json(["diff", str(tmp_path / "linked"), str(tmp_path / "linked" / "model.safetensors")], capsys)
    assert code == 0 and rep["identical"]
    assert _listing(tmp_path / "a", tmp_path / "b") == before  # nothing written into the snapshots or the blobs


def test_a_hub_cache_entry_names_its_snapshots(models, tmp_path, capsys):
    """`doctor ~/.cache/huggingface/hub/models--org--name` (the entry, not a snapshot) says which path to pass."""
    _hub_cache(models / "single", tmp_path)
    entry = tmp_path / "models--org--name"
    hint = "(a Hugging Face cache entry: pass one of its snapshots, snapshots/0123abcd)"
    code, rep = _json(["doctor", str(entry)], capsys)
    assert code == 2 and _messages(rep, "unusable") == [f"{entry}: no *.safetensors weights in this directory {hint}"]
    code, rep = _json(["diff", str(entry), str(models / "single")], capsys)
    assert code == 2 and rep["error"].endswith(hint)


def test_a_link_that_cannot_be_followed_is_named_not_taken_for_absent(models, tmp_path, capsys):
    """`cp -r snapshots/<sha> elsewhere` copies the relative links, not the blobs: every file dangles. Before, doctor
    said "no *.safetensors weights in this directory" (single file) or exited 2 from the head check (a shard), and
    diff claimed the directory had no manifest."""
    single = _hub_cache(models / "single", tmp_path / "a")
    os.remove(os.path.realpath(single / "model.safetensors"))
    code, rep = _json(["doctor", str(single)], capsys)
    assert code == 2
    (msg,) = [m for m in _messages(rep, "unusable")]
    assert msg.startswith(f"model.safetensors: {LINK}") and "cannot be followed (No such file or directory)" in msg
    assert "cp -rL" in msg
    assert main(["diff", str(single), str(models / "single")]) == 2
    err = capsys.readouterr().err
    assert f"{single}: model.safetensors: {LINK}" in err and "no trainer_guard_manifest.json" not in err

    sharded = _hub_cache(models / "sharded", tmp_path / "b")
    shard = "model-00002-of-00003.safetensors"
    os.remove(os.path.realpath(sharded / shard))
    code, rep = _json(["doctor", str(sharded), "--no-manifest-ok"], capsys)
    assert code == 2 and [m.split(":")[0] for m in _messages(rep, "unusable")] == [shard]
    assert rep["problems"] == [] and rep["summary"]["head_check"].startswith("skipped")  # not "could not run"
    assert main(["diff", str(models / "sharded"), str(sharded)]) == 2
    assert f"{sharded}: {shard}: {LINK}" in capsys.readouterr().err

    index = "model.safetensors.index.json"
    os.remove(os.path.realpath(sharded / index))
    code, rep = _json(["doctor", str(sharded), "--no-manifest-ok"], capsys)
    assert code == 2 and [m.split(":")[0] for m in _messages(rep, "unusable")] == [shard, index]


def test_shards_without_their_index_are_a_problem(models, tmp_path, capsys):
    """from_pretrained finds no weights in shards without model.safetensors.index.json; doctor said HEALTHY."""
    d = shutil.copytree(models / "sharded", tmp_path / "d")
    os.remove(d / "model.safetensors.index.json")
    code, rep = _json(["doctor", str(d), "--no-manifest-ok"], capsys)
    assert code == 1
    (msg,) = _messages(rep, "problems")
    assert msg.startswith("model.safetensors.index.json: missing, but 3 shard(s) of 3 are here "
                          "(model-00001-of-00003.safetensors, ")
    assert "from_pretrained and a resume find no weights without it" in msg


# ----------------------------------------------------------------------------------- weight files without weights
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_a_weights_file_without_tensors_is_unusable_not_healthy(tmp_path, capsys, metadata):
    """A header-only file (zero tensors) is no model: doctor said HEALTHY and diff "identical"."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({}, tmp_path / name / "model.safetensors", metadata=metadata)
    code, rep = _json(["doctor", str(tmp_path / "a"), "--no-manifest-ok"], capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        "model.safetensors: no tensors stored (a safetensors header only): there are no weights to check or load; "
        "save the model again"]
    code, rep = _json(["diff", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    assert code == 2 and rep["error"].startswith(f"{tmp_path / 'a'} and {tmp_path / 'b'}: no tensors stored")
    save_file({"w": torch.ones(2)}, tmp_path / "b" / "model.safetensors")
    code, rep = _json(["diff", str(tmp_path / "b" / "model.safetensors"), str(tmp_path / "a")], capsys)
    assert code == 2 and rep["error"].startswith(f"{tmp_path / 'a'}: no tensors stored")


# ----------------------------------------------------------------------------------- permissions, read-only
def test_read_only_checkpoint_is_checked_and_left_as_it_was(models, tmp_path, capsys):
    d = shutil.copytree(models / "single", tmp_path / "ro")
    for p in [*d.iterdir(), d]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        before = _listing(d)
        assert _json(["doctor", str(d)], capsys)[0] == 0
        assert _json(["diff", str(d), str(models / "single")], capsys)[0] == 0
        assert _json(["diff", str(d), str(models / "single"), "--source", "files"], capsys)[0] == 0
        assert _listing(d) == before
    finally:
        d.chmod(0o755)


@pytest.mark.skipif(ROOT, reason="running as root: chmod 000 does not stop root from reading")
def test_unreadable_weights_file_and_directory_are_named(models, tmp_path, capsys):
    d = shutil.copytree(models / "single", tmp_path / "ck")
    (d / "model.safetensors").chmod(0)
    try:
        code, rep = _json(["doctor", str(d)], capsys)
        assert code == 2 and "model.safetensors: unreadable (Permission denied)" in _messages(rep, "unusable")
        code, rep = _json(["diff", str(d), str(models / "single"), "--source", "files"], capsys)
        assert code == 2 and rep["error"] == f"{d / 'model.safetensors'}: cannot read: Permission denied"
    finally:
        (d / "model.safetensors").chmod(0o644)
    d.chmod(0)
    try:
        code, rep = _json(["diff", str(d), str(models / "single")], capsys)
        assert code == 2 and rep["error"] == f"{d}: Permission denied"
        assert _json(["doctor", str(d)], capsys)[0] == 2
    finally:
        d.chmod(0o755)


def test_an_unexpected_os_error_names_the_path_not_the_errno(models, monkeypatch, capsys):
    """Any OSError no check expected ends as `PATH: reason` on stderr and in the JSON, not `[Errno 13] ...: 'PATH'`
    (the case above, which root cannot reproduce)."""
    import trainer_guard.diff as diff_mod

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/data/ck")

    monkeypatch.setattr(diff_mod, "_sides", denied)
    code, rep = _json(["diff", str(models / "single"), str(models / "single")], capsys)
    assert (code, rep["error"]) == (2, "/data/ck: Permission denied")
    assert main(["diff", str(models / "single"), str(models / "single")]) == 2
    assert capsys.readouterr().err == "trainer-guard diff: error: /data/ck: Permission denied\n"


def test_unreadable_config_gives_no_tie_verdict(models, tmp_path, capsys):
    """With config.json unreadable the tie can be neither passed nor given the advice for a directory without one
    (both were printed, contradicting each other)."""
    d = shutil.copytree(models / "single", tmp_path / "d", ignore=shutil.ignore_patterns("trainer_guard_*"))
    (d / "trainer_guard_ties.json").write_text(json.dumps({"aliases": {"lm_head.weight": "model.embed_tokens.weight"}}))
    sd = load_file(d / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text("{")
    code, rep = _json(["doctor", str(d), "--no-manifest-ok"], capsys)
    assert code == 2 and [f["check"] for f in rep["unusable"]] == ["input"]
    assert not [f for f in rep["warnings"] + rep["passed"] if f["check"] == "ties"]


# --------------------------------------------------------------------------------------------------- paths
def test_missing_paths_name_both_sides_and_an_unexpanded_home(tmp_path, monkeypatch, capsys):
    code, rep = _json(["diff", str(tmp_path / "x"), str(tmp_path / "y")], capsys)
    assert code == 2 and rep["error"] == (f"{tmp_path / 'x'}: no such file or directory; {tmp_path / 'y'}: no such "
                                          f"file or directory; pass two checkpoint or model directories")
    code, rep = _json(["doctor", ""], capsys)
    assert code == 2 and _messages(rep, "unusable") == ["the path is empty; pass a checkpoint or model directory"]
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ck").mkdir()
    code, rep = _json(["doctor", "~/ck"], capsys)
    assert code == 2 and _messages(rep, "unusable") == [
        f"~/ck: no such directory ('~' is not expanded here: did you mean {tmp_path / 'ck'}?)"]
    code, rep = _json(["diff", "~/ck", str(tmp_path / "ck")], capsys)
    assert code == 2 and f"did you mean {tmp_path / 'ck'}?" in rep["error"]


def test_a_file_inside_a_checkpoint(models, capsys):
    """doctor wants the directory; diff takes a .safetensors file, and for any other file names the directory."""
    d = models / "single"
    for name in ("model.safetensors", "config.json"):
        code, rep = _json(["doctor", str(d / name)], capsys)
        assert code == 2 and _messages(rep, "unusable") == [f"{d / name}: is a file; pass the directory that holds it"]
    code, rep = _json(["diff", str(d / "config.json"), str(d)], capsys)
    assert code == 2 and rep["error"] == (f"{d / 'config.json'}: not a safetensors file; diff compares checkpoint or "
                                          f"model directories, or .safetensors files: pass the directory that holds "
                                          f"it ({d})")


def test_names_with_spaces_and_unicode_and_relative_paths(models, tmp_path, monkeypatch, capsys):
    d = shutil.copytree(models / "single", tmp_path / "my models" / "lläma ✓")
    monkeypatch.chdir(d)
    code, rep = _json(["doctor", "."], capsys)
    assert code == 0 and rep["path"] == "."
    monkeypatch.chdir(tmp_path / "my models")
    code, rep = _json(["diff", "lläma ✓/", os.path.relpath(models / "single")], capsys)
    assert code == 0 and rep["identical"] and rep["a"]["path"] == "lläma ✓/"


def test_python_dash_m_trainer_guard():
    r = subprocess.run([sys.executable, "-m", "trainer_guard", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: trainer-guard" in r.stdout and "doctor" in r.stdout, r.stderr


# ------------------------------------------------------------------------ fixed in core modules
def test_a_directory_named_like_a_weights_file_does_not_break_the_head_check(models, tmp_path, capsys):
    d = shutil.copytree(models / "single", tmp_path / "d")
    (d / "old.safetensors").mkdir()
    code, rep = _json(["doctor", str(d)], capsys)
    assert (code, rep["unusable"]) == (0, [])


@pytest.mark.slow
def test_works_when_numba_cannot_cache(models):
    code = ("import sys, numba.core.caching as c\n"
            "c.CacheImpl._locator_classes = []  # what numba finds when nothing it may write to is writable\n"
            "from trainer_guard.cli import main\n"
            "sys.exit(main(['doctor', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(models / "single")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-500:]
