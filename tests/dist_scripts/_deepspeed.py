"""DeepSpeed ZeRO through the Hugging Face ``Trainer`` on CPU processes (gloo), for tests/dist_scripts/zero.py
(tests/test_deepspeed.py).

No patch is needed: with ``DS_ACCELERATOR=cpu`` (set by the test's launch, before deepspeed is imported) DeepSpeed's
CPU accelerator talks gloo, and ``TrainingArguments(deepspeed=..., use_cpu=True)`` makes accelerate run
``DistributedType.DEEPSPEED``. The first launch JIT-builds DeepSpeed's shared-memory comm op with g++/ninja
(about 90 s); ``TORCH_EXTENSIONS_DIR`` (set by the test, a git-ignored folder of the checkout) keeps it for the
next launches.

- :func:`ds_config`: a small fp32 (or bf16) DeepSpeed config for ZeRO ``stage`` 1, 2 or 3 (the Trainer builds the
  optimizer and scheduler; ``"auto"`` values are filled from the arguments).
- :func:`ds_args`: ``TrainingArguments`` for a tiny DeepSpeed run (``conftest.make_args`` plus ``deepspeed=``).
- :func:`zero_facts`: what actually wraps the model on this rank (DeepSpeedEngine, ZeRO stage, ZeRO-3 partitions),
  so a test can assert that the run really is ZeRO-2 / ZeRO-3.
- :func:`gathered_fingerprint`: the fingerprint of the full model; ZeRO-3 parameters are gathered first
  (``deepspeed.zero.GatheredParameters``, a collective: every rank calls it at the same point).
- :func:`combined_fingerprint`: the same from the ranks' partition checksums, combined without a gather.
"""

from __future__ import annotations

import _common  # noqa: F401  (sys.path, offline settings, one thread)
from _fsdp import watchdog  # noqa: F401  (the same watchdog)


def ds_config(stage: int, bf16: bool = False, gather: bool = True) -> dict:
    """fp32 ZeRO-``stage`` config (``bf16``: bf16 weights, fp32 master copies in the optimizer); no
    ``optimizer``/``scheduler`` entry: the Trainer creates its own. ZeRO-3 gathers the weights into
    ``model.safetensors`` at each save (``stage3_gather_16bit_weights_on_model_save``, as the Hugging Face docs
    advise), besides the rank files of ``global_stepN/``; ``gather=False``: DeepSpeed's default, the rank files
    only."""
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                  "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=gather, stage3_param_persistence_threshold=0,
                    stage3_prefetch_bucket_size=1e6)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "train_batch_size": "auto", "zero_optimization": zero,
            "bf16": {"enabled": bf16}, "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def ds_args(output_dir: str, stage: int, bf16: bool = False, gather: bool = True, **kw):
    """``TrainingArguments`` for a tiny DeepSpeed ZeRO-``stage`` run on CPU (``bf16``: in bf16 mixed precision;
    ``gather``: see :func:`ds_config`)."""
    from conftest import make_args

    return make_args(output_dir, deepspeed=ds_config(stage, bf16, gather), bf16=bf16, **kw)


def zero_facts(trainer) -> dict:
    """What wraps the Trainer's model on this rank."""
    engine = trainer.model_wrapped
    params = list(trainer.model.named_parameters())
    ds = [(n, p) for n, p in params if hasattr(p, "ds_id")]
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
        "engine_class": type(engine).__name__,
        "engine_module_is_model": getattr(engine, "module", None) is trainer.model,
        "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else None,
        "optimizer_class": type(getattr(engine, "optimizer", None)).__name__,
        "n_params": len(params),
        "n_ds_params": len(ds),
        "local_numel": {n: int(p.data.numel()) for n, p in params},
        "full_numel": {n: int(getattr(p, "ds_numel", p.numel())) for n, p in params},
        "partition_numel": {n: int(p.ds_tensor.numel()) for n, p in ds},
    }


def gathered_fingerprint(model) -> str:
    """The 64-bit fingerprint of ``model``'s full parameters (ZeRO-3 partitions gathered; a collective then)."""
    import contextlib

    from trainer_guard.checksum import checksums
    from trainer_guard.core.divergence import model_fingerprint

    named = dict(model.named_parameters())  # each tied storage once
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in named.values()):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None)
    with ctx:
        sums = checksums({n: p.data.detach() for n, p in named.items()}, backend="cpu")
    return f"{model_fingerprint(sums):016x}"


def combined_fingerprint(model) -> str:
    """The fingerprint :func:`gathered_fingerprint` computes, from checksums combined from each rank's partitions
    (:func:`trainer_guard.core.checkpoint.zero3_model_sums`: no parameter gathered; a collective)."""
    from trainer_guard.core.checkpoint import zero3_model_sums
    from trainer_guard.core.divergence import model_fingerprint

    sums = zero3_model_sums(model)
    return f"{model_fingerprint({n: sums[n] for n, _ in model.named_parameters()}):016x}"


def flip_bit(path: str) -> int:
    """Flip one bit in the middle of the largest tensor record of the ``torch.save`` (zip) file ``path``, in place
    (tensor data, not the zip structure: the file still loads, with one value changed). Returns the byte offset."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(big.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
        offset = big.header_offset + 30 + name_len + extra_len + big.file_size // 2 + 2  # a float32's high half
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x04]))
    return offset
