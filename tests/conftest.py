"""Shared test helpers: tiny models, Trainer arguments, offline settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


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
