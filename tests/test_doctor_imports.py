"""`trainer-guard doctor` at checksum speed (issue 22): a healthy model directory is verified without importing torch
or transformers, and with every core."""

from __future__ import annotations

import subprocess
import sys

from trainer_guard.checkpoint.manifest import build_manifest, write_manifest
from trainer_guard.checksum.disk import file_checksums
from trainer_guard.formats.safetensors import read_weight_map
from trainer_guard.tiny import tiny_model

_CHILD = r"""
import sys
from trainer_guard.cli import main
code = main(["doctor", sys.argv[1]])
heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules)
print("RESULT", code, ",".join(heavy) or "-")
"""


def _saved(tmp_path, kind: str):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards and an index
    sums = file_checksums(tmp_path)
    tensors = {n: t for n, t in model.state_dict().items() if n in sums}
    files = read_weight_map(tmp_path / "model.safetensors.index.json")
    write_manifest(tmp_path, build_manifest(tensors, global_step=None, tie_groups=[], files=files, sums=sums))
    return tmp_path


def _doctor(path, **env) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, **env})
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, r.stdout + r.stderr
    _, code, heavy = line[0].split()
    return int(code), heavy


def test_doctor_verifies_an_untied_causal_lm_without_torch_or_transformers(tmp_path):
    path = _saved(tmp_path, "llama-untied")
    assert _doctor(path) == (0, "-")
    assert _doctor(path, TRAINER_GUARD_THREADS="1") == (0, "-")


def test_doctor_still_catches_a_flipped_bit_without_torch(tmp_path):
    path = _saved(tmp_path, "llama-untied")
    shard = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    code, heavy = _doctor(path)
    assert code == 1 and heavy == "-"


_DIFF_CHILD = r"""
import sys
from trainer_guard.cli import main
code = main(["diff", sys.argv[1], sys.argv[2]])
print("RESULT", code, ",".join(sorted(m for m in ("torch", "transformers") if m in sys.modules)) or "-")
"""


def test_diff_says_how_much_each_module_changed_without_torch(tmp_path):
    import torch

    a, b = _saved(tmp_path / "a", "llama-untied"), tmp_path / "b"
    model = tiny_model("llama-untied")
    with torch.no_grad():
        w = model.get_parameter("lm_head.weight")
        before = w.detach().double().clone()
        w.add_(0.05 * torch.randn_like(w))
        rel = float((w.double() - before).norm() / before.norm())
    _saved(b, "llama-untied")  # same seed: identical but for the head, saved again with the change below
    model.save_pretrained(b, max_shard_size="20KB")
    sums = file_checksums(b)
    files = read_weight_map(b / "model.safetensors.index.json")
    write_manifest(b, build_manifest({n: t for n, t in model.state_dict().items() if n in sums}, global_step=None,
                                     tie_groups=[], files=files, sums=sums))
    r = subprocess.run([sys.executable, "-c", _DIFF_CHILD, str(a), str(b)], capture_output=True, text=True,
                       timeout=300)
    assert r.stdout.strip().splitlines()[-1] == "RESULT 1 -", r.stdout + r.stderr
    head = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("lm_head")]
    assert head and f"by {100 * rel:.2f}%" in head[0], r.stdout
