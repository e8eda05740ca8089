"""Sharded training (issue 18): a real Trainer under FSDP2 on 2 CPU processes (gloo), and the guards on its shards.

accelerate leaves FSDP off on CPU (``MULTI_CPU`` is not among the distributed types that take an FSDP plugin), so the
scripts patch that one decision in the test process only (``tests/dist_scripts/_fsdp.py``): the Trainer then wraps
the model with torch's ``fully_shard`` (DTensor parameters, ``Shard(0)``) and saves ``pytorch_model_fsdp_0/``
checkpoints through torch.distributed.checkpoint, as it does on GPUs. Every launch has a subprocess timeout and each
phase a watchdog inside the script, so a rank left waiting in a collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import os

import pytest
from test_distributed import dirs, launch

pytestmark = pytest.mark.distributed


@pytest.mark.slow
def test_fsdp2_through_the_trainer_really_shards_on_cpu(tmp_path):
    out, res = dirs(tmp_path)
    ranks = launch("fsdp2.py", out, res, "plain", tmp_path=tmp_path)
    for r in ranks:
        assert r["error"] is None, r.get("traceback", r["error"])
        assert r["distributed_type"] == "DistributedType.FSDP" and r["is_fsdp_enabled"]
        # fully_shard on the model and each decoder layer (accelerate also wraps the embedding and head): not DDP
        assert {"<model>", "model.layers.0", "model.layers.1"} <= set(r["fsdp_modules"])
        assert r["n_params"] == r["n_dtensors"] == 20  # every parameter a DTensor (the tied head counted once)
        assert r["placements"] == ["(Shard(dim=0),)"]
        assert all(2 * r["local_rows"][n] == r["full_rows"][n] for n in r["full_rows"])  # each rank holds half
        assert r["step"] == 2
    assert {"pytorch_model_fsdp_0", "optimizer_0", "trainer_state.json"} <= set(ranks[0]["checkpoint"])
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "pytorch_model_fsdp_0", ".metadata"))
