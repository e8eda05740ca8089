"""FSDP SHARDED_STATE_DICT checkpoints (torch.distributed.checkpoint directories) read on CPU, in one process:
``.metadata`` through a restricted unpickler, tensors from their ``.distcp`` chunks with ``weights_only=True``,
checksums equal to the consolidated tensors', and ``doctor`` / ``diff`` on them (issue 18). The 2-process runs
that write such checkpoints through the Trainer are in tests/test_sharded.py."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from trainer_guard.checkpoint.contents import commit
from trainer_guard.checkpoint.manifest import write_manifest
from trainer_guard.checkpoint.reconcile import dcp_manifest
from trainer_guard.checksum import checksums
from trainer_guard.checksum.disk import dcp_checksums
from trainer_guard.diff import diff
from trainer_guard.doctor import diagnose
from trainer_guard.errors import ChecksumError, IntegrityError
from trainer_guard.formats.dcp import DcpFormatError, dcp_problems, read_dcp_index, read_dcp_tensor
from trainer_guard.tiny import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _save_dcp(directory: str, sd: dict) -> str:
    """What accelerate's save_fsdp_model writes for SHARDED_STATE_DICT: ``{"model": state_dict}`` through DCP."""
    where = os.path.join(directory, "pytorch_model_fsdp_0")
    dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(where), no_dist=True)
    return where


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-untied", seed=0)


@pytest.fixture
def ckpt(tmp_path, model):
    """A committed ``checkpoint-2`` holding a DCP model directory, a trainer_state.json and its manifest."""
    d = tmp_path / "checkpoint-2"
    d.mkdir()
    sd = model.state_dict()
    _save_dcp(str(d), sd)
    (d / "trainer_state.json").write_text('{"global_step": 2}')
    checked = dcp_manifest(str(d), sd, checksums(sd, backend="cpu"), global_step=2, tie_groups=[])
    assert checked.problems == [] and checked.manifest is not None
    write_manifest(str(d), commit(str(d), checked.manifest))
    return str(d)


def test_index_and_checksums_equal_the_consolidated_tensors(tmp_path, model):
    sd = model.state_dict()
    where = _save_dcp(str(tmp_path), sd)
    index = read_dcp_index(where)
    assert set(index.tensors) == set(sd)  # accelerate's "model" key dropped: the state dict's own names
    for name, t in index.tensors.items():
        assert (t.dtype, t.shape) == (str(sd[name].dtype).removeprefix("torch."), tuple(sd[name].shape))
    assert dcp_problems(where, index) == []
    name = "model.embed_tokens.weight"
    assert torch.equal(read_dcp_tensor(where, index.tensors[name]), sd[name])
    assert dcp_checksums(where) == checksums(sd, backend="cpu")


def test_doctor_passes_a_committed_dcp_checkpoint_and_fails_one_flipped_bit(ckpt, tmp_path, model):
    report = diagnose(ckpt)
    assert report.exit_code == 0, [f.message for f in report.problems + report.unusable]
    assert report.summary["sharded"] == "fsdp" and report.summary["tensors"] == len(model.state_dict())
    bad = str(tmp_path / "bad" / "checkpoint-2")
    shutil.copytree(ckpt, bad)
    path = os.path.join(bad, "pytorch_model_fsdp_0", "__0_0.distcp")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4096)  # inside the data of the last chunks
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    report = diagnose(bad)
    found = [f.message for f in report.problems]
    assert report.exit_code == 1
    assert any(m.startswith("pytorch_model_fsdp_0/__0_0.distcp changed since the checkpoint was saved") for m in found)


def test_a_sharded_checkpoint_and_its_consolidated_export_compare_equal(ckpt, tmp_path, model):
    export = str(tmp_path / "export")
    model.save_pretrained(export)  # what accelerate merge-weights / save_model(FULL_STATE_DICT) produce
    report = diff(ckpt, export, source="files")
    assert report["identical"], report
    report = diff(ckpt, export)  # A from its manifest, B from its files: the same values
    assert report["identical"], report


def test_a_malicious_metadata_pickle_is_refused_without_running_it(ckpt, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    meta = os.path.join(ckpt, "pytorch_model_fsdp_0", ".metadata")
    with open(meta, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(DcpFormatError, match=r"\.metadata: not a readable torch.distributed.checkpoint metadata file"):
        read_dcp_index(os.path.dirname(meta))
    report = diagnose(ckpt)
    assert not marker.exists()
    assert report.exit_code == 1
    assert any("pytorch_model_fsdp_0/.metadata" in f.message for f in report.problems)


def test_damaged_metadata_and_truncated_shard_are_named_without_a_traceback(ckpt):
    shard = os.path.join(ckpt, "pytorch_model_fsdp_0", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    report = diagnose(ckpt)
    messages = [f.message for f in report.problems]
    assert report.exit_code == 1
    assert any(m.startswith("pytorch_model_fsdp_0/__0_0.distcp is truncated: ") for m in messages), messages
    with pytest.raises(ChecksumError, match="__0_0.distcp"):
        dcp_checksums(os.path.dirname(shard))
    with open(os.path.join(ckpt, "pytorch_model_fsdp_0", ".metadata"), "wb") as f:
        f.write(b"\x80\x04garbage")
    proc = subprocess.run([sys.executable, "-m", "trainer_guard", "doctor", ckpt], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "pytorch_model_fsdp_0/.metadata: not a readable torch.distributed.checkpoint metadata file" in proc.stdout


def test_every_sampled_bit_flip_of_the_metadata_is_damage_named_by_its_file(ckpt):
    """One flipped bit anywhere in ``.metadata`` (sampled every 5th byte, a different bit each time) is damage to that
    file: exit 1 naming it, never unusable input or a 'foreign manifest' (a flip in a ``planner_data`` name once made
    every tensor name keep accelerate's ``model.`` prefix), never an exception (a chunk placed outside its tensor
    raised torch's RuntimeError) and nothing on stderr (a length blown up to gigabytes was allocated)."""
    meta = os.path.join(ckpt, "pytorch_model_fsdp_0", ".metadata")
    orig = open(meta, "rb").read()
    assert b"planner_data" in orig
    outcomes = {}
    for off in [*range(0, len(orig), 5), orig.index(b"planner_data")]:
        damaged = bytearray(orig)
        damaged[off] ^= 1 << (off % 8)
        open(meta, "wb").write(bytes(damaged))
        report = diagnose(ckpt)
        named = any("pytorch_model_fsdp_0/.metadata" in f.message for f in report.problems)
        outcomes.setdefault((report.exit_code, named, bool(report.unusable)), off)
    open(meta, "wb").write(orig)
    assert list(outcomes) == [(1, True, False)], outcomes  # (exit code, file named, unusable) -> first offset
    assert diagnose(ckpt).exit_code == 0


def test_a_damaged_metadata_length_or_chunk_place_is_refused_before_it_is_used(tmp_path, model, capfd):
    where = _save_dcp(str(tmp_path), model.state_dict())
    meta = os.path.join(where, ".metadata")
    with open(meta, "rb") as f:
        md = pickle.load(f)  # the test's own file: DCP's objects, to place one chunk outside its tensor
    chunk = md.state_dict_metadata["model.model.norm.weight"].chunks[0]
    chunk.offsets = torch.Size([30])  # 30 + 32 values > the tensor's 32, its stored bytes placed there too
    md.storage_data = {dataclasses.replace(k, offset=torch.Size([30])) if k.fqn == "model.model.norm.weight" else k: v
                       for k, v in md.storage_data.items()}
    with open(meta, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(DcpFormatError, match=r"model\.model\.norm\.weight: chunk at \[30\] of size \[32\] lies outside "
                                             r"the tensor's shape \[32\]"):
        read_dcp_index(where)
    # a byte-array of 2**40 bytes declared by 9 bytes: refused before anything is allocated
    open(meta, "wb").write(b"\x80\x05\x96" + (2 ** 40).to_bytes(8, "little") + b"x" * 64 + b".")
    with pytest.raises(DcpFormatError, match=r"expected 1099511627776 bytes in a bytearray8, but only 65 remain"):
        read_dcp_index(where)
    assert capfd.readouterr().err == ""


def test_a_dcp_directory_that_holds_another_model_is_no_manifest(tmp_path, model):
    sd = model.state_dict()
    _save_dcp(str(tmp_path), sd)
    other = dict(sd)
    other["model.norm.weight"] = torch.ones(7)
    checked = dcp_manifest(str(tmp_path), other, checksums(other, backend="cpu"), global_step=1, tie_groups=[])
    assert checked.manifest is None
    assert checked.problems == ["pytorch_model_fsdp_0/: model.norm.weight is stored as float32 [32], the model holds "
                                "float32 [7]"]
    with pytest.raises(IntegrityError):
        read_dcp_index(str(tmp_path))  # not a DCP directory itself: its .metadata is missing


def test_each_rank_names_the_files_it_wrote_and_the_writer_takes_their_checksums(ckpt):
    from trainer_guard.checksum.disk import bytes_checksums
    from trainer_guard.checkpoint.contents import describe_files
    from trainer_guard.files import rank_files

    for name in ("rng_state_0.pth", "rng_state_1.pth"):
        open(os.path.join(ckpt, name), "wb").write(b"rng")
    os.makedirs(os.path.join(ckpt, "optimizer_0"))
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        open(os.path.join(ckpt, "optimizer_0", name), "wb").write(b"state")
    assert rank_files(ckpt, 1) == ["rng_state_1.pth", "optimizer_0/__1_0.distcp"]
    assert rank_files(ckpt, 0) == ["rng_state_0.pth", "optimizer_0/__0_0.distcp", "pytorch_model_fsdp_0/__0_0.distcp"]
    manifest = {"tensors": {}}
    plain = describe_files(ckpt, manifest)
    assert plain["optimizer_0/.metadata"]["checksum"]  # DCP's index is listed, though its name starts with a dot
    # a checksum the rank that wrote the file computed is taken as it is (here a marker value, to see it used) ...
    used = describe_files(ckpt, manifest, known={"rng_state_1.pth": (3, 0xABC)})
    assert used["rng_state_1.pth"]["checksum"] == f"{0xABC:016x}"
    assert {k: v for k, v in used.items() if k != "rng_state_1.pth"} == {
        k: v for k, v in plain.items() if k != "rng_state_1.pth"}
    # ... unless the file has another size by now: then it is read here
    again = describe_files(ckpt, manifest, known={"rng_state_1.pth": (4, 0xABC)})
    path = os.path.join(ckpt, "rng_state_1.pth")
    assert again["rng_state_1.pth"]["checksum"] == f"{bytes_checksums([path])[path]:016x}"


def test_a_resume_check_takes_the_checksums_each_rank_read_of_its_own_files(ckpt):
    """At a resume every rank checksums the shard files it wrote (rank_files) and the writing rank compares those
    values with the manifest instead of reading every rank's files itself: a flipped bit is found either way."""
    from trainer_guard.checksum.disk import bytes_checksums
    from trainer_guard.checkpoint.choose import pick_checkpoint

    rel = "pytorch_model_fsdp_0/__0_0.distcp"
    path = os.path.join(ckpt, *rel.split("/"))
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 4]))
    size = os.path.getsize(path)
    read_there = bytes_checksums([path])[path]  # what the rank that wrote it reads now
    for known in (None, {rel: (size, read_there)}, {rel: (size + 1, 0)}):  # (a stale size is read here again)
        picked = pick_checkpoint(os.path.dirname(ckpt), ckpt, known=known)
        assert picked.error and picked.error.startswith(f"{path} changed since the checkpoint was saved"), known


def test_a_checkpoint_without_manifest_is_stopped_on_a_damaged_metadata_before_the_load(tmp_path, model):
    """Saved without IntegrityGuard: the checks that need no manifest still read the DCP metadata (safely) and find
    a chunk past the end of its file, so the resume stops with a message naming the file, not DCP's traceback."""
    from trainer_guard.checkpoint.choose import pick_checkpoint

    d = tmp_path / "checkpoint-2"
    d.mkdir()
    _save_dcp(str(d), model.state_dict())
    (d / "trainer_state.json").write_text('{"global_step": 2}')
    assert pick_checkpoint(str(tmp_path), str(d)).error is None
    shard = d / "pytorch_model_fsdp_0" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    error = pick_checkpoint(str(tmp_path), str(d)).error
    assert error.startswith(f"{shard} is truncated: 1,000 bytes, its .metadata places chunks up to byte ")
    assert len(error.splitlines()) == 2, error  # the file named once, then what to do
    (d / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"not a pickle")
    error = pick_checkpoint(str(tmp_path), str(d)).error
    assert "pytorch_model_fsdp_0/.metadata: not a readable torch.distributed.checkpoint metadata file" in error


def test_diff_says_why_a_deepspeed_checkpoint_without_safetensors_has_nothing_to_compare(tmp_path):
    from trainer_guard.diff import load_side
    from trainer_guard.errors import UsageError

    ckpt = tmp_path / "checkpoint-1"
    (ckpt / "global_step1").mkdir(parents=True)
    (ckpt / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"pickle")
    with pytest.raises(UsageError, match=r"a DeepSpeed ZeRO checkpoint: its global_step\*/ rank files are pickles"):
        load_side(str(ckpt))
