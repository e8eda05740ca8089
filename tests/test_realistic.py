"""Guards on realistic training setups (QA pass): optimizers that set their own step size, gradient clipping,
pre-padded data, datasets that draw random numbers, and a matrix of healthy configurations that must stay silent
and leave training bit-identical."""

import pytest
import torch
from conftest import make_args
from torch import nn
from transformers import Trainer

from trainer_guard import DtypeGuard, HeadGuard, UntrainedTokensGuard, UpdateAuditGuard
from trainer_guard.core.tokens import count_token_ids
from trainer_guard.tiny import tiny_dataset, tiny_lora, tiny_model


def train(model, tmp_path, callbacks=(), ds=None, optimizers=(None, None), processing_class=None, **kw):
    kw.setdefault("max_steps", 4)
    kw.setdefault("save_strategy", "no")
    trainer = Trainer(model=model, args=make_args(tmp_path, **kw), train_dataset=ds if ds is not None else
                      tiny_dataset(16), callbacks=list(callbacks), optimizers=optimizers,
                      processing_class=processing_class)
    trainer.train()
    return trainer


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def adafactor_relative_step(model):
    from transformers.optimization import Adafactor, AdafactorSchedule

    opt = Adafactor(model.parameters(), scale_parameter=True, relative_step=True, warmup_init=True, lr=None)
    return opt, AdafactorSchedule(opt)  # sets the group LR to 0: Adafactor computes its own step size


# -- UpdateAuditGuard -----------------------------------------------------------------------------------------
def test_adafactor_relative_step_in_bf16_only_warns(tmp_path):
    """transformers' recommended Adafactor setup: group LR 0 is not 'LR 0', and bf16 rounding only warns."""
    model = tiny_model("llama-untied").to(torch.bfloat16)
    guard = UpdateAuditGuard(every=1)
    trainer = train(model, tmp_path, [guard], optimizers=adafactor_relative_step(model))
    assert trainer.state.global_step == 4
    assert guard.findings and {f.cause for f in guard.findings} == {"stalled"}
    assert "a step size the optimizer sets itself (relative_step)" in guard.report()[0]


def test_adafactor_relative_step_detached_branch_gets_its_real_cause(tmp_path):
    model = tiny_model("llama-untied")
    model.model.layers[0].mlp.register_forward_hook(lambda mod, inp, out: out.detach())
    guard = UpdateAuditGuard(mode="warn", every=1)
    train(model, tmp_path, [guard], optimizers=adafactor_relative_step(model))
    assert {f.cause for f in guard.findings} == {"grad_none"}  # was: "its optimizer group 0 has LR 0"


def test_stalled_fp32_updates_blame_the_step_not_the_dtype(tmp_path):
    """SGD with gradients clipped to ~0: float32 weights do not move; 'keep them in float32' would be no advice."""
    guard = UpdateAuditGuard(mode="warn", every=1)
    train(tiny_model("llama-untied"), tmp_path, [guard], optim="sgd", max_grad_norm=1e-9, max_steps=2)
    [line] = guard.report()
    assert "updates too small for float32" in line and "max_grad_norm" in line
    assert "keep these weights in float32" not in line


# -- UntrainedTokensGuard -------------------------------------------------------------------------------------
PAD, RESERVED = 123, 125


def zero_rows_model():
    model = tiny_model("llama-untied")
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[[PAD, RESERVED]] = 0  # pad (config has no pad_token_id: no padding_idx) and a reserved token
    return model


def test_pre_padded_data_pad_positions_are_not_uses(tmp_path):
    """Right-padded examples: the pad id sits only where attention_mask is 0; that is not a use of its row."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 120, (5,), generator=g).tolist() for _ in range(8)]
    ds = Dataset.from_dict({"input_ids": [r + [PAD] * 3 for r in rows], "labels": [r + [-100] * 3 for r in rows],
                            "attention_mask": [[1] * 5 + [0] * 3] * 8})
    guard = UntrainedTokensGuard(mode="raise")
    train(zero_rows_model(), tmp_path, [guard], ds=ds, max_steps=1)
    assert "training data (all 8 examples, 64 tokens) uses: none of them" in guard.report()
    # a real (attended) use of the pad id still counts
    scan = count_token_ids([{"input_ids": [PAD, 1, PAD], "attention_mask": [1, 1, 0]}], [PAD])
    assert scan.counts == {PAD: 1}
    assert count_token_ids([{"input_ids": [PAD, 1, PAD]}], [PAD]).counts == {PAD: 2}  # no mask: every position


class RandomCrops(torch.utils.data.IterableDataset):
    """Draws from the global torch RNG while iterated (random augmentation)."""

    def __iter__(self):
        for _ in range(64):
            ids = torch.randint(0, 120, (8,)).tolist()
            ids[0] = RESERVED
            yield {"input_ids": ids, "labels": ids}


def test_scanning_a_random_dataset_does_not_change_training(tmp_path):
    ref = losses(train(zero_rows_model(), tmp_path / "a", ds=RandomCrops()))
    guard = UntrainedTokensGuard()
    got = losses(train(zero_rows_model(), tmp_path / "b", [guard], ds=RandomCrops()))
    assert any("uses: id 125 x64" in line for line in guard.report())
    assert got == ref


# -- DtypeGuard: report R2 on a classification model ----------------------------------------------------------
def _r2_classifier():
    """Report R2: a bf16 model whose new classification head was created in float32; and its data."""
    import transformers as tf
    from datasets import Dataset

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    model = tf.AutoModelForSequenceClassification.from_config(cfg).to(torch.bfloat16)
    model.score = nn.Linear(32, 3, bias=False)  # the new head, float32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (16, 8), generator=g).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": [i % 3 for i in range(16)], "attention_mask": [[1] * 8] * 16})
    return model, ds


@pytest.mark.slow
def test_fp32_head_under_bf16_autocast_is_left_alone_in_fix_mode(tmp_path):
    """With bf16=True the R2 model trains unguarded (autocast): fix mode must not change that run, only say so."""
    model, ds = _r2_classifier()
    ref = losses(train(model, tmp_path / "a", ds=ds, bf16=True))
    model, ds = _r2_classifier()
    guard = DtypeGuard()
    got = losses(train(model, tmp_path / "b", [guard], ds=ds, bf16=True))
    assert model.score.weight.dtype == torch.float32 and got == ref
    left = [line for line in guard.report() if "left 1 parameter(s) wider than the model's torch.bfloat16" in line]
    assert len(left) == 1 and "bf16=True" in left[0], guard.report()  # said once (checked at init and train begin)
    model, ds = _r2_classifier()
    train(model, tmp_path / "c", [DtypeGuard(cast_under_autocast=True)], ds=ds, bf16=True)
    assert model.score.weight.dtype == torch.bfloat16


def test_kept_fp32_linear_without_autocast_is_warned_once(tmp_path):
    """keep_fp32=['score'] with no autocast: the run is about to fail with R2's error; the guard says why, once."""
    model, ds = _r2_classifier()
    guard = DtypeGuard(keep_fp32=["score"])
    with pytest.raises(RuntimeError, match="dtype"):
        train(model, tmp_path, [guard], ds=ds)
    said = [line for line in guard.report() if "keep_fp32 keeps score.weight" in line]
    assert len(said) == 1 and "Train with bf16=True/fp16=True (autocast)" in said[0], guard.report()
    model, ds = _r2_classifier()
    guard = DtypeGuard(keep_fp32=["score"])
    train(model, tmp_path, [guard], ds=ds, bf16=True)  # autocast: fine, nothing to say
    assert not any("keep_fp32 keeps" in line for line in guard.report())


def test_bf16_classifier_with_fp32_score_head_trains_in_fix_mode(tmp_path):
    model, ds = _r2_classifier()
    guards = [DtypeGuard(), UpdateAuditGuard(every=1), HeadGuard()]
    trainer = train(model, tmp_path, guards, ds=ds, save_strategy="steps", save_steps=2)
    assert trainer.state.global_step == 4 and model.score.weight.dtype == torch.bfloat16
    assert guards[1].findings == [] and guards[2].report() == [] and len(guards[2].checked) == 2


# -- healthy setups: silent, and training bit-identical with and without the guards ---------------------------
def _iterable():
    from datasets import IterableDataset

    rows = tiny_dataset(64).to_list()
    return IterableDataset.from_generator(lambda: iter(rows))


HEALTHY = {
    "lora-grad-ckpt-reentrant": (lambda: tiny_lora(tiny_model("llama-untied"), lora_dropout=0.1),
                                 dict(gradient_checkpointing=True,
                                      gradient_checkpointing_kwargs={"use_reentrant": True})),
    "bf16-autocast-neftune": (lambda: tiny_model("llama-tied"), dict(bf16=True, neftune_noise_alpha=5)),
    "accum3-odd-dataset-warmup": (lambda: tiny_model("qwen2"),
                                  dict(gradient_accumulation_steps=3, per_device_train_batch_size=2, max_steps=-1,
                                       num_train_epochs=2, warmup_steps=3, ds=tiny_dataset(17))),
    "adafactor-label-smoothing": (lambda: tiny_model("gpt2"), dict(optim="adafactor", label_smoothing_factor=0.1)),
    "iterable-lora-bias-all": (lambda: tiny_lora(tiny_model("qwen2"), bias="all"), dict(ds="iterable")),
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(HEALTHY))
def test_healthy_setups_are_silent_and_unchanged(setup, tmp_path):
    build, kw = HEALTHY[setup]
    runs = []
    for guarded in (False, True):
        k = dict(kw)
        if k.get("ds") == "iterable":
            k["ds"] = _iterable()
        model = build()
        guards = [UpdateAuditGuard(every=1), DtypeGuard(), HeadGuard()] if guarded else []
        trainer = train(model, tmp_path / str(guarded), guards, **k)
        runs.append((losses(trainer), {n: p.detach().clone() for n, p in model.named_parameters()}, guards))
    (l0, w0, _), (l1, w1, guards) = runs
    assert [g.report() for g in guards] == [[], [], []]
    assert l0 == l1 and all(torch.equal(w0[n], w1[n]) for n in w0)
