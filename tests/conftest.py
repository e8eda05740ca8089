"""Shared test helpers: tiny models, Trainer arguments, offline settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# With DeepSpeed installed (the test extra, .ci/run), transformers' save/load paths import it, and on a host without
# a GPU it prints "Setting accelerator to CPU ..." to stdout unless told which accelerator to use: tests that read a
# command's output would see it. CI has no GPU; the DeepSpeed tests set the same.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

torch.set_num_threads(1)

from transformers.utils import logging as hf_logging  # noqa: E402

# trainer_guard's logger sits under transformers' (trainer_guard/log.py), which does not propagate to the root logger
# unless asked: ask, so that caplog (on the root logger) sees guard lines as it did before
hf_logging.enable_propagation()


def requires(package: str, minimum: str, why: str):
    """Skip a test below ``package`` ``minimum`` (the floor job in ``.ci/run`` installs the oldest supported versions):
    it needs ``why``, which older releases lack."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        have = version(package)
    except PackageNotFoundError:
        return pytest.mark.skip(reason=f"needs {package}>={minimum}: {why}; {package} is not installed")
    return pytest.mark.skipif(Version(have) < Version(minimum),
                              reason=f"needs {package}>={minimum}: {why}; this is {package} {have}")


def requires_transformers_5(why: str):
    """Skip a test on transformers 4.x (the floor job): it asserts 5.x-only behaviour, ``why``."""
    return requires("transformers", "5.0.0.dev0", f"transformers 5.x behaviour ({why})")


def make_args(output_dir, **kw):
    """TrainingArguments for a tiny CPU run: no reporting, deterministic, small batches."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], logging_steps=1, learning_rate=1e-2, seed=0, save_strategy="steps", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def triton_interpreter_result(child: str):
    """Run the Python source ``child`` (argv[1]: this tests/ directory) in a fresh process under
    ``TRITON_INTERPRET=1`` (it must be set before triton is imported) and return the JSON it prints after
    ``RESULT``."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", child, os.path.dirname(os.path.abspath(__file__))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
