"""Scale benchmark: does any guard or CLI check get super-linear or memory-hungry as inputs grow?

Times, in one process, on inputs two sizes apart (so the ratio shows the growth; ~4x for linear code):

- deep tiny Llama models (hidden 16, many tensors), plain and PEFT LoRA ``target_modules="all-linear"``:
  ``find_tied_groups``, ``restore_ties``, ``trainable_record``, ``continuation_problems``, ``adapter_preflight``,
  ``find_dtype_mismatches`` (bf16 model, fp32 LoRA), ``UpdateAudit`` baseline and check, ``plan_manifests``, the
  manifest's size and parse time, ``verify_against``;
- UntrainedTokensGuard's data scan (``count_token_ids``) on a ``datasets.Dataset`` and an ``IterableDataset`` with a
  128K vocabulary, under the default budget (2M tokens / 30 s) and without the token budget, and
  ``untrained_rows`` on a 128K x 4096 bf16 embedding;
- ``trainer-guard doctor`` / ``diff`` (in process) on a 51-shard checkpoint with ~10K and ~40K tensors, and
  ``file_checksums`` on directories of many small files.

Peers for the two fixes made after this benchmark found them (same run): the per-parameter scan over every PEFT
adapter module that ``find_dtype_mismatches`` used to do, and the per-example ``torch.bincount`` over the whole
vocabulary that ``count_token_ids`` used to do.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py            # ~3-4 min on 2 cores, < 2 GB
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --quick    # smaller sizes, ~1 min

Prints markdown rows. Nothing is downloaded (models are built from configs, data is random).
"""

from __future__ import annotations

import datasets  # noqa: F401  (import before numpy/torch: avoids a huggingface_hub partial-import issue)

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timed(f, *a, repeat: int = 1, **k):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = f(*a, **k)
        best = min(best, time.perf_counter() - t)
    return best, out


def _row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def _llama(layers: int, peft: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", modules_to_save=["embed_tokens"]))
    return model


def _old_adapter_scan(model) -> int:
    """The peer: find_dtype_mismatches' adapter test before the fix (every adapter module per parameter not in the
    dominant dtype, here bf16)."""
    from trainer_guard.core.dtype import _peft_adapter_modules

    adapters = _peft_adapter_modules(model)
    n = 0
    for name, p in model.named_parameters():
        if p.dtype == torch.bfloat16:
            continue
        mod_name = name.rpartition(".")[0]
        n += any(mod_name == a or mod_name.startswith(a + ".") for a in adapters)
    return n


def bench_models(sizes: list[int]) -> None:
    from trainer_guard.core.audit import UpdateAudit
    from trainer_guard.core.checkpoint import plan_manifests, verify_against
    from trainer_guard.core.dtype import find_dtype_mismatches
    from trainer_guard.core.manifest import MANIFEST_FILE, read_manifest, write_manifest
    from trainer_guard.core.preflight import adapter_preflight
    from trainer_guard.core.ties import find_tied_groups, restore_ties
    from trainer_guard.core.trainable import continuation_problems, trainable_record

    print("\n### Many tensors: deep tiny Llama (hidden 16)\n")
    _row("model", "tensors", "operation", "best s", "notes")
    _row("---", "---:", "---", "---:", "---")
    for peft in (False, True):
        for layers in sizes:
            model = _llama(layers, peft)
            label = f"L{layers}" + (" + LoRA all-linear" if peft else "")
            n = len(list(model.named_parameters()))
            t, groups = _timed(find_tied_groups, model, repeat=3)
            _row(label, n, "find_tied_groups", f"{t:.3f}", f"{len(groups)} group(s)")
            t, _ = _timed(restore_ties, model, groups, repeat=3)
            _row(label, n, "restore_ties (nothing split)", f"{t:.3f}", "")
            t, _ = _timed(trainable_record, model, repeat=3)
            _row(label, n, "trainable_record", f"{t:.3f}", "")
            if peft:
                t, _ = _timed(adapter_preflight, model, repeat=3)
                _row(label, n, "adapter_preflight", f"{t:.3f}", "")
                model.to(torch.bfloat16)
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.data = p.data.float()
                t, rep = _timed(find_dtype_mismatches, model, repeat=3)
                _row(label, n, "find_dtype_mismatches (bf16, fp32 LoRA)", f"{t:.3f}",
                     f"{len(rep.kept)} kept, {len(rep.mismatched)} mismatched")
                t, _ = _timed(_old_adapter_scan, model)
                _row(label, n, "peer: the adapter test before the fix", f"{t:.3f}", "O(params x adapter modules)")
            params = dict(model.named_parameters())
            opt = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=1e-3)
            audit = UpdateAudit(params, every=100)
            t, _ = _timed(audit.baseline, repeat=2)
            _row(label, n, "UpdateAudit baseline (checksum all)", f"{t:.3f}", "")
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            opt.step()
            t, found = _timed(audit.step, opt)
            _row(label, n, "UpdateAudit check (step 1)", f"{t:.3f}", f"{len(found)} finding(s)")
            opt.step()
            t, _ = _timed(audit.step, opt)
            _row(label, n, "UpdateAudit step between checks", f"{t:.4f}", "")
            d = tempfile.mkdtemp(prefix="tg_scale_")
            try:
                model.save_pretrained(d)
                t, plan = _timed(plan_manifests, model, d, global_step=1)
                _row(label, n, "plan_manifests (checks + checksums + manifest)", f"{t:.3f}",
                     f"problems: {len(plan.problems)}")
                for where, m in plan.writes:
                    write_manifest(where, m)
                where = plan.writes[0][0]
                size = os.path.getsize(os.path.join(where, MANIFEST_FILE))
                t, _ = _timed(read_manifest, where, repeat=3)
                _row(label, n, "read_manifest (parse + validate)", f"{t:.3f}",
                     f"{size / 1e6:.2f} MB on disk, {size / n:.0f} B/tensor")
                t, v = _timed(verify_against, model, d, repeat=2)
                _row(label, n, "verify_against", f"{t:.3f}", f"problems: {len(v.problems)}")
                if peft:
                    t, probs = _timed(continuation_problems, model, d)
                    _row(label, n, "continuation_problems", f"{t:.3f}", f"{len(probs)} problem(s)")
            finally:
                shutil.rmtree(d, ignore_errors=True)
            del model, params, opt, audit


def _old_scan(dataset, ids, vocab: int, max_tokens: int) -> int:
    """The peer: count_token_ids' per-example accumulation before the fix (a bincount over the vocabulary)."""
    from trainer_guard.core.tokens import _attended, _examples, _ids_of

    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[torch.tensor(ids)] = True
    counts = torch.zeros(vocab, dtype=torch.long)
    tokens = 0
    for ex in _examples(dataset, "input_ids", "attention_mask"):
        if tokens >= max_tokens:
            break
        t = _ids_of(ex, "input_ids")
        tokens += t.numel()
        keep = (t >= 0) & (t < vocab)
        att = _attended(ex, "attention_mask", t.numel())
        if att is not None:
            keep &= att
        t = t[keep]
        hit = t[mask[t]]
        if hit.numel():
            counts += torch.bincount(hit, minlength=vocab)
    return tokens


def bench_tokens(n_examples: int, seq: int, vocab: int) -> None:
    import datasets

    from trainer_guard.core.tokens import count_token_ids, untrained_rows

    print(f"\n### UntrainedTokensGuard: data scan ({n_examples:,} examples x {seq} tokens, vocab {vocab:,}; an "
          f"untrained id in every example)\n")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(n_examples, seq), dtype=np.int64)
    ids[:, 0] = vocab - 5
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids, np.int8).tolist()})
    build = time.perf_counter() - t0
    del ids
    want = list(range(vocab - 256, vocab))
    _row("dataset", "budget", "time s", "examples", "tokens", "stopped by", "s per 1M tokens")
    _row("---", "---", "---:", "---:", "---:", "---", "---:")
    for label, d in (("Dataset", ds), ("IterableDataset", ds.to_iterable_dataset())):
        for mt in (2_000_000, None):
            t, s = _timed(count_token_ids, d, want, vocab_size=vocab, max_tokens=mt, max_seconds=30.0)
            _row(label, f"max_tokens={mt}, max_seconds=30", f"{t:.2f}", f"{s.examples:,}", f"{s.tokens:,}",
                 s.stopped or "(complete)", f"{t / s.tokens * 1e6:.2f}")
    t, tokens = _timed(_old_scan, ds, want, vocab, 2_000_000)
    _row("Dataset", "peer: the per-example bincount before the fix, 2M tokens", f"{t:.2f}", "", f"{tokens:,}", "",
         f"{t / tokens * 1e6:.2f}")
    print(f"\n(building the Dataset from lists took {build:.1f} s, not counted)\n")
    w = torch.randn(vocab, 4096, dtype=torch.bfloat16)
    w[vocab - 256:] = 0
    t, rows = _timed(untrained_rows, w, repeat=3)
    print(f"untrained_rows on a {vocab:,} x 4096 bf16 embedding ({w.numel() * 2 / 2**30:.2f} GiB): {t:.3f} s "
          f"({len(rows)} rows found)")
    del w


def _sharded(base: str, layers: int, shard: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer_guard.core.checkpoint import plan_manifests
    from trainer_guard.core.manifest import write_manifest

    cfg = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for tag in ("a", "b"):
        d = os.path.join(base, tag)
        if tag == "b":
            with torch.no_grad():
                model.model.layers[3].mlp.up_proj.weight.add_(1)
        model.save_pretrained(d, max_shard_size=shard)
        for where, m in plan_manifests(model, d, global_step=1).writes:
            write_manifest(where, m)
    with open(os.path.join(base, "a", "model.safetensors.index.json")) as f:
        return len(json.load(f)["weight_map"])


def bench_cli(sizes: list[tuple[int, str]], n_files: list[int]) -> None:
    from safetensors.torch import save_file

    from trainer_guard.checksum import file_checksums
    from trainer_guard.diff import diff
    from trainer_guard.doctor import diagnose

    print("\n### doctor / diff / file_checksums (in process, warm page cache)\n")
    _row("checkpoint", "tensors", "operation", "best s", "notes")
    _row("---", "---:", "---", "---:", "---")
    base = tempfile.mkdtemp(prefix="tg_scale_cli_")
    try:
        for layers, shard in sizes:
            d = os.path.join(base, f"L{layers}")
            n = _sharded(d, layers, shard)
            shards = len([f for f in os.listdir(os.path.join(d, "a")) if f.endswith(".safetensors")])
            label = f"{shards} shards + index"
            a, b = os.path.join(d, "a"), os.path.join(d, "b")
            t, r = _timed(diagnose, a, repeat=2)
            _row(label, n, "doctor", f"{t:.3f}", r.status)
            t, r = _timed(diff, a, b, repeat=2)
            _row(label, n, "diff (manifests)", f"{t:.3f}", str(r['counts']))
            t, _ = _timed(diff, a, b, source="files", repeat=2)
            _row(label, n, "diff --source files", f"{t:.3f}", "")
            t, _ = _timed(file_checksums, a, repeat=2)
            _row(label, n, "file_checksums (directory)", f"{t:.3f}", "")
            shutil.rmtree(d, ignore_errors=True)
        for k in n_files:
            d = os.path.join(base, f"files{k}")
            os.makedirs(d)
            for i in range(k):
                save_file({f"t{i}.a": torch.randn(64), f"t{i}.b": torch.randn(8)},
                          os.path.join(d, f"part{i:05d}.safetensors"))
            t, s = _timed(file_checksums, d, repeat=2)
            _row(f"{k} small files, no index", len(s), "file_checksums (directory)", f"{t:.3f}", "")
            t, r = _timed(diagnose, d, no_manifest_ok=True, repeat=2)
            _row(f"{k} small files, no index", len(s), "doctor --no-manifest-ok", f"{t:.3f}", r.status)
            t, _ = _timed(diff, d, d, source="files", repeat=2)
            _row(f"{k} small files, no index", len(s), "diff --source files", f"{t:.3f}", "")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    ap.add_argument("--only", choices=["models", "tokens", "cli"], help="run one section")
    args = ap.parse_args()
    import peft
    import transformers

    import trainer_guard

    print(f"Machine: {_cpu_name()}, {os.cpu_count()} CPU(s), torch threads {torch.get_num_threads()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, datasets {datasets.__version__}, numpy {np.__version__}, "
          f"trainer_guard {trainer_guard.__version__}; load average {os.getloadavg()[0]:.1f} at the start")
    if args.only in (None, "models"):
        bench_models([25, 100] if args.quick else [50, 200])
    if args.only in (None, "tokens"):
        bench_tokens(20_000 if args.quick else 200_000, 128, 128_000)
    if args.only in (None, "cli"):
        bench_cli([(280, "60KB")] if args.quick else [(1110, "230KB"), (4440, "920KB")],
                  [200] if args.quick else [500, 2000])


if __name__ == "__main__":
    sys.exit(main())
