"""Results of the scale fixes (benchmarks/bench_scale.py) are those of the code they replaced. Behaviour only, no
timings."""

from __future__ import annotations

import random
from collections import Counter

import torch

from trainer_guard.names import dotted_prefixes as _dotted_prefixes
from trainer_guard.core.tokens import count_token_ids


def test_adapter_prefix_lookup_matches_the_scan_it_replaced():
    # find_dtype_mismatches once asked `any(m == a or m.startswith(a + ".") for a in adapters)` per parameter
    rng = random.Random(0)
    parts = ["a", "b", "ab", "a.b", "", "lora_A", "lora_AB"]
    for _ in range(5000):
        name = ".".join(rng.choice(parts) for _ in range(rng.randint(0, 4)))
        adapters = {".".join(rng.choice(parts) for _ in range(rng.randint(0, 3))) for _ in range(3)}
        old = any(name == a or name.startswith(a + ".") for a in adapters)
        assert (bool(adapters) and not adapters.isdisjoint(_dotted_prefixes(name))) == old, (name, adapters)
    assert _dotted_prefixes("x.lora_A.default") == ["x", "x.lora_A", "x.lora_A.default"]
    assert "x.lora_A" not in _dotted_prefixes("x.lora_AB.default")


def test_count_token_ids_counts_repeats_within_and_across_examples():
    rng = torch.Generator().manual_seed(0)
    vocab, wanted = 50, [3, 7, 7, 49, 0]
    data, expected = [], Counter()
    for _ in range(40):
        ids = torch.randint(0, vocab, (12,), generator=rng)
        ids[:3] = 7  # the same id several times in one example
        mask = (torch.rand(12, generator=rng) > 0.3).long()
        data.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
        expected.update(i for i, m in zip(ids.tolist(), mask.tolist()) if m and i in set(wanted))
    scan = count_token_ids(data, wanted, vocab_size=vocab)
    assert scan.counts == {i: expected[i] for i in sorted(set(wanted)) if expected[i]}
    assert all(type(v) is int for v in scan.counts.values())
    assert scan.complete and scan.tokens == 40 * 12
