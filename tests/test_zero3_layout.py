"""DeepSpeed ZeRO-3's flat partitions in trainer_guard's shard-aware token code, without DeepSpeed (issue 18).

A ZeRO-3 parameter is an empty tensor with ``ds_id``, its full shape in ``ds_shape`` and ``ds_numel`` elements split
into equal flat partitions (``ds_tensor``, the last one padded): rank ``r`` holds elements ``[r*P, (r+1)*P)``. Here
N "ranks" are threads of one process, each holding a fake parameter of that layout, and ``gather`` is an in-memory
all-gather; the results must equal the unsharded functions' on the same table. (The real thing, DeepSpeed on 2 CPU
processes through the Trainer: tests/test_deepspeed.py.)
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest
import torch

from trainer_guard.core.sharding import full_shape, is_sharded, is_zero3, zero3_span
from trainer_guard.core.tokens import set_rows_to_trained_mean, untrained_rows


class World:
    """``n`` ranks as threads; :meth:`gather` is an all-gather (every thread must call it at the same point)."""

    def __init__(self, n: int, group_size: int | None = None):
        self.n, self.slots, self.barrier, self.local = n, [None] * n, threading.Barrier(n), threading.local()
        self.group_size = group_size  # ranks r, r + group_size, ... hold the same partition (group "part")

    def rank_in(self, group=None) -> int:
        return self.local.rank % self.group_size if group == "part" else self.local.rank

    def gather(self, obj):
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def run(self, fn, monkeypatch):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", self.rank_in)
        results, errors = [None] * self.n, []

        def body(r):
            self.local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as e:  # surfaced below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        return results


class FakeZ3Optimizer:
    """The two methods of DeepSpeed's stage-3 optimizer that the fix uses: each rank's fp32 partition."""

    def __init__(self):
        self.hp: dict[int, torch.Tensor] = {}

    def get_local_fp32_param(self, p):
        return self.hp[id(p)]

    def set_local_hp_param(self, value, p):
        assert value.numel() == p.ds_tensor.numel()
        self.hp[id(p)].copy_(value.view(-1))


def zero3_param(full: torch.Tensor, rank: int, world: int, optimizer=None) -> torch.nn.Parameter:
    """Rank ``rank``'s view of ``full`` as a ZeRO-3 parameter (padded flat partition; empty data)."""
    part = math.ceil(full.numel() / world)
    flat = torch.zeros(part * world, dtype=full.dtype)
    flat[:full.numel()] = full.flatten()
    p = torch.nn.Parameter(torch.empty(0, dtype=full.dtype))
    p.ds_id, p.ds_shape, p.ds_numel = 7, full.shape, full.numel()
    p.ds_tensor = flat[rank * part:(rank + 1) * part].clone()
    if optimizer is not None:
        p._z3_optimizer = optimizer
        optimizer.hp[id(p)] = p.ds_tensor.detach().float().clone()
    return p


def reassemble(parts: list[torch.Tensor], shape) -> torch.Tensor:
    return torch.cat([t.view(-1) for t in parts])[:math.prod(shape)].view(shape)


def table(rows: int = 125, cols: int = 36, zero=(5, 63, 100)) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    w[list(zero)] = 0
    return w


@pytest.mark.parametrize("world", [1, 2, 3, 7])  # 7: partitions of 643 elements, rows split, the last one padded
def test_untrained_rows_from_flat_partitions_equal_the_whole_tables(world, monkeypatch):
    w = table()
    # rows split between two partitions (at 2 ranks: row 62; 3: row 41; 7: rows 17 and 35) whose only non-zero
    # value lies in one of the two pieces: trained, which only the combined peaks of both pieces show
    w[[17, 35, 41, 62]] = 0
    w[17, 0] = w[35, 35] = w[41, 0] = w[62, 35] = 0.5
    expected = untrained_rows(w)
    assert expected == [5, 63, 100]
    w_ = World(world)
    found = w_.run(lambda r: untrained_rows(zero3_param(w, r, world), gather=w_.gather), monkeypatch)
    assert found == [expected] * world


@pytest.mark.parametrize("world", [2, 7])
def test_fix_writes_each_partition_and_the_optimizer_copy_like_the_whole_table(world, monkeypatch):
    w = table()
    whole = w.clone()
    n_whole = set_rows_to_trained_mean(whole, [63, 100], [5, 63, 100])
    opt = FakeZ3Optimizer()
    w_ = World(world)
    params = [None] * world

    def fix(r):
        params[r] = p = zero3_param(w, r, world, opt)
        return set_rows_to_trained_mean(p, [63, 100], [5, 63, 100], gather=w_.gather)

    assert w_.run(fix, monkeypatch) == [n_whole] * world == [122] * world
    torch.testing.assert_close(reassemble([p.ds_tensor for p in params], w.shape), whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reassemble([opt.hp[id(p)] for p in params], w.shape), whole, rtol=1e-6, atol=1e-7)
    assert torch.equal(reassemble([p.ds_tensor for p in params], w.shape)[5], torch.zeros(36))


def test_fix_counts_each_partition_once_when_partition_groups_repeat(monkeypatch):
    """4 ranks in 2 partition groups of 2 (ZeRO-3 with a partition group smaller than the world, as MiCS / hpZ):
    ranks 0 and 2 hold the same partition, 1 and 3 the other. Each partition's sums count once."""
    w = table()
    whole = w.clone()
    set_rows_to_trained_mean(whole, [63, 100], [5, 63, 100])
    w_ = World(4, group_size=2)
    params = [None] * 4

    def fix(r):
        params[r] = p = zero3_param(w, r % 2, 2)
        p.ds_process_group = "part"
        return set_rows_to_trained_mean(p, [63, 100], [5, 63, 100], gather=w_.gather)

    assert w_.run(fix, monkeypatch) == [122] * 4
    for pair in ((0, 1), (2, 3)):
        got = reassemble([params[r].ds_tensor for r in pair], w.shape)
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)


def test_zero12_fix_also_writes_this_ranks_fp32_fragment():
    """ZeRO-1/2: the parameter is whole; the optimizer's fp32 master is a separate flat copy whose fragment on this
    rank covers some elements (``param._hp_mapping``). The fixed rows must reach it, the others stay as they were."""
    w = table()
    expected = w.clone()
    set_rows_to_trained_mean(expected, [63, 100], [5, 63, 100])
    start, numel = 63 * 36 + 10, 40 * 36  # from inside row 63 to inside row 103
    hp = w.flatten()[start:start + numel].clone() + 1000.0  # distinguishable from the parameter's values
    p = torch.nn.Parameter(w.clone())
    p._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=start, numel=numel),
                                    get_hp_fragment=lambda optim_state_key=None: hp)
    before = hp.clone()
    set_rows_to_trained_mean(p.data, [63, 100], [5, 63, 100])  # the data alone: no mapping, nothing else written
    assert torch.equal(hp, before)
    p.data.copy_(w)
    with torch.no_grad():
        set_rows_to_trained_mean(p, [63, 100], [5, 63, 100])
    torch.testing.assert_close(p.detach(), expected)
    changed = torch.zeros(numel, dtype=torch.bool)
    for row in (63, 100):
        a, b = max(row * 36, start) - start, min((row + 1) * 36, start + numel) - start
        changed[a:b] = True
        torch.testing.assert_close(hp[a:b], expected.flatten()[start + a:start + b])
    assert torch.equal(hp[~changed], before[~changed])


def test_zero3_layout_helpers_and_engines():
    w = table()
    p = zero3_param(w, 1, 2)
    assert is_zero3(p) and not is_zero3(w) and full_shape(p) == w.shape and full_shape(w) == w.shape
    values, first = zero3_span(p)  # no process group: position 0
    assert first == 0 and values.numel() == math.ceil(w.numel() / 2)
    assert zero3_span(w) is None

    class DeepSpeedEngine(torch.nn.Module):  # what is_sharded asks an engine: does it partition parameters?
        def __init__(self, stage):
            super().__init__()
            self.module, self.stage = torch.nn.Linear(2, 2), stage

        def zero_optimization_partition_weights(self):
            return self.stage >= 3

    assert not is_sharded(DeepSpeedEngine(2)) and is_sharded(DeepSpeedEngine(3))
