"""Peak memory of loading fine-tuned weights into an existing model (field report R2). A script, not a test.

Compares, each in a fresh subprocess so one method's allocations cannot hide another's:

- ``inplace``:      ``trainer_guard.load_weights_inplace(model, "model.safetensors")``
- ``torch.load``:   ``model.load_state_dict(torch.load("model.pt", weights_only=True))``
- ``torch.load(mmap)``: the same with ``mmap=True``
- ``load_file``:    ``model.load_state_dict(safetensors.torch.load_file("model.safetensors"))``

The model is a Llama-shaped ``LlamaForCausalLM`` (untied, fp32 by default) of about ``--gb`` GB, created on the
meta device and materialised with ``to_empty`` + ``zero_`` (resident before the load starts, no slow init). Each
child imports every library first, takes its baseline RSS, builds the model, resets its peak RSS
(``/proc/self/clear_refs``), loads, and reports ``VmHWM``; the table gives the peak *above the process baseline
before the model existed*, and that peak over the model's size (goal of issue 6: <= 1.1x). With ``--device cuda``
the model lives on the GPU and the table adds ``torch.cuda.max_memory_allocated`` over the model's size (host RSS
still reported).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_loading.py --gb 2 --dir /tmp/bench_loading
    python benchmarks/bench_loading.py --gb 4 --device cuda     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

METHODS = ("inplace", "torch.load", "torch.load(mmap)", "load_file")


def _config(gb: float):
    from transformers import LlamaConfig

    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((gb * 1e9 / 4 - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _build(cfg, device: str, dtype):
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
    return model


def _prepare(args) -> dict:
    """Write model.safetensors and model.pt of a seeded model once; return its size."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(args.dir, exist_ok=True)
    st, pt = os.path.join(args.dir, "model.safetensors"), os.path.join(args.dir, "model.pt")
    cfg = _config(args.gb)
    if not (os.path.isfile(st) and os.path.isfile(pt)):
        model = _build(cfg, "cpu", getattr(torch, args.dtype))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, st, metadata={"format": "pt"})
        torch.save(sd, pt)
        del model, sd
    return {"layers": cfg.num_hidden_layers, "file_bytes": os.path.getsize(st)}


def _child(args) -> None:
    import safetensors.torch  # noqa: F401  (every library imported before the baseline is taken)
    import torch
    import transformers  # noqa: F401

    import trainer_guard  # noqa: F401

    if args.device.startswith("cuda"):
        torch.cuda.init()
    base = _status("VmRSS")
    cfg = _config(args.gb)
    model = _build(cfg, args.device, getattr(torch, args.dtype))
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    st, pt = os.path.join(args.dir, "model.safetensors"), os.path.join(args.dir, "model.pt")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    if args.method == "inplace":
        from trainer_guard import load_weights_inplace

        load_weights_inplace(model, st)
    elif args.method == "torch.load":
        model.load_state_dict(torch.load(pt, weights_only=True, map_location=args.device))
    elif args.method == "torch.load(mmap)":
        model.load_state_dict(torch.load(pt, weights_only=True, mmap=True, map_location="cpu"))
    elif args.method == "load_file":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(st, device=args.device))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    ok = all(float(p.reshape(-1)[:64].abs().sum()) > 0 for p in model.parameters() if p.dim() > 1)
    out = {"method": args.method, "model_bytes": model_bytes, "base_rss": base, "peak_rss": peak,
           "seconds": seconds, "loaded": ok}
    if cuda:
        out["gpu_peak"] = torch.cuda.max_memory_allocated()
        out["gpu_name"] = torch.cuda.get_device_name()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="model size in GB (default 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--dir", default="/tmp/bench_loading", help="where the weight files are written (kept)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return _child(args)
    info = _prepare(args)
    import safetensors
    import torch
    import transformers

    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--gb", str(args.gb), "--dtype", args.dtype, "--device", args.device,
               "--dir", args.dir, "--method", method]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{method}: failed (rc {res.returncode}): {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        if not rows[-1]["loaded"]:
            print(f"{method}: weights did not arrive in the model", file=sys.stderr)
    gib = 1024 ** 3
    print(f"\nmodel: LlamaForCausalLM {info['layers']} layers, {args.dtype}, {rows[0]['model_bytes'] / gib:.2f} GiB"
          f" (file {info['file_bytes'] / gib:.2f} GiB); device {args.device}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, safetensors {safetensors.__version__}; "
          f"{platform.machine()}, {os.cpu_count()} cpus" + (f"; {rows[0].get('gpu_name')}" if "gpu_peak" in rows[0]
                                                            else ""))
    head = "| method | peak RSS above baseline (GiB) | / model size | load time (s) |"
    sep = "|---|---|---|---|"
    if "gpu_peak" in rows[0]:
        head, sep = head + " peak GPU alloc (GiB) | GPU / model |", sep + "---|---|"
    print(head + "\n" + sep)
    for r in rows:
        over = r["peak_rss"] - r["base_rss"]
        line = (f"| {r['method']} | {over / gib:.2f} | {over / r['model_bytes']:.2f}x | {r['seconds']:.1f} |")
        if "gpu_peak" in r:
            line += f" {r['gpu_peak'] / gib:.2f} | {r['gpu_peak'] / r['model_bytes']:.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
