"""UntrainedTokensGuard and core.tokens (field report R4: never-trained special-token rows used by the data)."""

import pytest
import torch

from conftest import make_args
from trainer_guard import UntrainedTokensError, UntrainedTokensGuard
from trainer_guard.core.tokens import count_token_ids, template_token_ids, untrained_rows
from trainer_guard.tiny import tiny_lora, tiny_model

IM_START, IM_END, RESERVED = 121, 122, 125  # "special tokens" whose rows a base model never trained


def base_model(kind="llama-untied"):
    """A tiny base model whose special-token rows were never trained (zeros), like Llama 3's reserved tokens."""
    model = tiny_model(kind)
    with torch.no_grad():
        for w in {id(t): t for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
                  }.values():
            w[[IM_START, IM_END, RESERVED]] = 0
    return model


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)}
    vocab.update({"<unk>": 120, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<pad>": 123, "<x>": 124,
                  "<|reserved|>": RESERVED})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tpl = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", chat_template=tpl,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|reserved|>"])


def chat_dataset(n=8, seq_len=8):
    """Chat-formatted examples: each starts with <|im_start|> and ends with <|im_end|>."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        body = torch.randint(0, 120, (seq_len - 2,), generator=g).tolist()
        rows.append([IM_START, *body, IM_END])
    return Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask": [[1] * seq_len] * n})


def make_trainer(tmp_path, model, callbacks=(), ds=None, **kw):
    from transformers import Trainer

    return Trainer(model=model, args=make_args(tmp_path, max_steps=2, save_strategy="no", **kw),
                   train_dataset=ds if ds is not None else chat_dataset(), processing_class=tokenizer(),
                   callbacks=list(callbacks))


def test_untrained_rows_found_relative_to_typical_rows():
    w = torch.randn(50, 8)
    w[3] = 1e-7  # tiny but not zero: still untrained
    w[7] = 0
    assert untrained_rows(w) == [3, 7]
    assert untrained_rows(torch.randn(50, 8)) == []


def test_without_guard_lora_leaves_used_rows_untrained_silently(tmp_path):
    model = tiny_lora(base_model())
    make_trainer(tmp_path, model).train()
    emb = model.get_input_embeddings().weight
    assert emb[IM_START].abs().max() == 0  # used in every example, never trained, nothing said


def test_report_names_ids_counts_template_and_what_to_enable(tmp_path):
    guard = UntrainedTokensGuard()
    model = tiny_lora(base_model())
    make_trainer(tmp_path, model, [guard]).train()
    assert guard.report() == [
        "input embedding: 3 row(s) look never trained (~0): ids [121, 122, 125]",
        "output head: 3 row(s) look never trained (~0): ids [121, 122, 125]",
        "training data (all 8 examples, 64 tokens) uses: id 121 '<|im_start|>' x8, id 122 '<|im_end|>' x8",
        "the chat template uses: id 121 '<|im_start|>' x3, id 122 '<|im_end|>' x3",  # 3-message sample chat
        "input embedding rows [121, 122] cannot train (the weight is frozen): with PEFT add 'embed_tokens' to "
        "LoraConfig(modules_to_save=[...]) or use LoraConfig(trainable_token_indices={'embed_tokens': [121, 122]}); "
        "without PEFT set requires_grad=True on the input embedding's weight (a fix of frozen rows lives only in "
        "the base weights, which an adapter checkpoint does not store)",
        "output head rows [121, 122] cannot train (the weight is frozen): with PEFT add 'lm_head' to "
        "LoraConfig(modules_to_save=[...]) or use LoraConfig(trainable_token_indices={'lm_head': [121, 122]}); "
        "without PEFT set requires_grad=True on the output head's weight (a fix of frozen rows lives only in the "
        "base weights, which an adapter checkpoint does not store)",
    ]
    assert model.get_input_embeddings().weight[IM_START].abs().max() == 0  # report only: nothing changed


def test_fix_sets_used_rows_to_trained_mean_and_they_train(tmp_path):
    model = tiny_lora(base_model(), modules_to_save=["embed_tokens", "lm_head"])
    guard = UntrainedTokensGuard(mode="fix")
    trainer = make_trainer(tmp_path, model, [guard])
    emb = model.get_input_embeddings()
    w = emb.modules_to_save["default"].weight
    trained = [i for i in range(128) if i not in (IM_START, IM_END, RESERVED)]
    mean = w[trained].detach().float().mean(0)
    guard.check(model, chat_dataset(), tokenizer())
    assert torch.allclose(w[IM_START].detach(), mean) and torch.allclose(w[IM_END].detach(), mean)
    assert w[RESERVED].abs().max() == 0  # unused: left alone unless fix_unused=True
    assert "fixed: input embedding rows [121, 122] set to the mean of 125 trained rows" in guard.report()
    assert not any("cannot train" in line for line in guard.report())
    trainer.train()
    assert not torch.allclose(w[IM_START].detach(), mean)  # trainable copy: it learns


def test_raise_mode_and_trainable_token_indices(tmp_path):
    model = tiny_lora(base_model(), trainable_token_indices={"embed_tokens": [IM_START, IM_END]})
    with pytest.raises(UntrainedTokensError) as e:
        make_trainer(tmp_path, model, [UntrainedTokensGuard(mode="raise")]).train()
    msg = str(e.value)
    assert msg.startswith("Training would use never-trained embedding rows (NaN/garbage losses):\n"
                          "  - input embedding: ")
    assert "input embedding rows" not in msg  # 121 and 122 are trainable through trainable_token_indices
    assert "output head rows [121, 122] cannot train" in msg
    assert msg.endswith("Use UntrainedTokensGuard(mode='fix') to set them to the mean of the trained rows, or remove "
                        "those tokens from the data/template.")


def test_tied_model_one_table_and_no_false_alarm():
    guard = UntrainedTokensGuard()
    assert guard.check(tiny_model("llama-tied"), chat_dataset(), tokenizer()) == []  # all rows trained: silent
    lines = guard.check(base_model("llama-tied"), chat_dataset(), tokenizer())
    assert lines[0] == "input embedding: 3 row(s) look never trained (~0): ids [121, 122, 125]"
    assert not any(line.startswith("output head") for line in lines)  # the tied head is the same rows


def test_scan_streams_iterable_datasets_within_budget():
    from datasets import IterableDataset

    def gen():
        for i in range(1000):
            yield {"input_ids": [IM_START, i % 100, IM_END], "text": "x"}

    full = count_token_ids(IterableDataset.from_generator(gen), [IM_START, RESERVED], max_tokens=None)
    assert (full.counts, full.examples, full.tokens, full.complete) == ({IM_START: 1000}, 1000, 3000, True)
    part = count_token_ids(IterableDataset.from_generator(gen), [IM_START], max_tokens=30)
    assert (part.counts, part.examples, part.complete, part.stopped) == ({IM_START: 10}, 10, False, "max_tokens=30")

    class TorchIterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([torch.tensor([IM_END, 5, 999])] * 4)

    scan = count_token_ids(TorchIterable(), [IM_END], vocab_size=128)
    assert scan.counts == {IM_END: 4} and scan.out_of_range == 4


def test_template_ids():
    tok = tokenizer()
    assert template_token_ids(tok, [IM_START, IM_END, RESERVED]) == {IM_START: 3, IM_END: 3}  # system+user+assistant
    tok.chat_template = None
    assert template_token_ids(tok, [IM_START]) == {}


def test_options_validated():
    with pytest.raises(Exception, match=r"UntrainedTokensGuard.rtol: got 2.0; must be between 0 and 1"):
        UntrainedTokensGuard(rtol=2.0)


def test_untokenized_or_ragged_data_is_said_not_silently_clean():
    from datasets import Dataset

    guard = UntrainedTokensGuard()
    lines = guard.check(base_model(), Dataset.from_dict({"text": ["<|im_start|> w1", "w2"]}), None)
    assert ("training data not scanned: its examples have no token ids in 'input_ids' (tokenized by the collator, "
            "or another field?); set UntrainedTokensGuard(column=...) or tokenize the dataset before training") in lines
    assert any(e.startswith("training data not scanned") for e in guard.events)
    ragged = [{"input_ids": [[IM_START, 1], [2, 3, IM_END]]}, {"input_ids": "raw text"}]
    scan = count_token_ids(ragged, [IM_START, IM_END])
    assert (scan.counts, scan.tokens, scan.no_ids) == ({IM_START: 1, IM_END: 1}, 5, 1)


def test_padding_row_is_not_reported(tmp_path):
    """nn.Embedding(padding_idx=...) keeps the pad row at zero by design; pad positions are masked out."""
    import transformers as tf
    from datasets import Dataset
    from transformers import Trainer

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    assert float(model.get_input_embeddings().weight[0].abs().max()) == 0.0
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 128, (10,), generator=g).tolist() + [0] * 6 for _ in range(16)]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 10 + [0] * 6] * 16,
                            "labels": [r[:10] + [-100] * 6 for r in ids]})
    guard = UntrainedTokensGuard(mode="raise")
    Trainer(model=model, args=make_args(tmp_path, max_steps=2, save_strategy="no"), train_dataset=ds,
            callbacks=[guard]).train()
    assert guard.found["untrained"]["input embedding"] == []


@pytest.mark.slow
def test_resumed_trainable_token_rows_are_trained_not_overwritten(tmp_path):
    """PEFT trainable_token_indices keep the trained rows in the adapter (trainable_tokens_delta), the base rows stay
    ~0. On a resume the guard used to judge the base rows: raise mode stopped a healthy resume, and fix mode wrote the
    trained mean-of-rows start value over the rows the checkpoint had just restored (silent loss of training)."""
    from safetensors.torch import load_file
    from transformers import Trainer

    def trainer(model, guard, **kw):
        args = make_args(tmp_path, max_steps=2, save_steps=2, **kw)
        return Trainer(model=model, args=args, train_dataset=chat_dataset(), processing_class=tokenizer(),
                       callbacks=[guard])

    def model():
        return tiny_lora(base_model("llama-tied"), trainable_token_indices={"embed_tokens": [IM_START, IM_END]})

    trainer(model(), UntrainedTokensGuard(mode="fix")).train()
    ckpt = tmp_path / "checkpoint-2"
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    saved = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]

    for mode in ("fix", "raise", "report"):
        m, guard = model(), UntrainedTokensGuard(mode=mode)
        trainer(m, guard).train(resume_from_checkpoint=str(ckpt))  # nothing left to train: only the load ran
        delta = m.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
        assert torch.equal(delta.detach(), saved), mode
        assert guard.found["untrained"]["input embedding"] == [RESERVED], mode  # unused: reported, not acted on
        assert not any(line.startswith("fixed") for line in guard.report()), mode


def test_lora_on_the_embedding_is_not_called_frozen():
    """LoRA targeting embed_tokens / lm_head trains every row (each token has its own LoRA column / row): the
    advice "cannot train (the weight is frozen): add it to modules_to_save" would be wrong."""
    model = tiny_lora(base_model(), target_modules=["q_proj", "embed_tokens", "lm_head"])
    lines = UntrainedTokensGuard().check(model, chat_dataset(), tokenizer())
    assert lines[0] == "input embedding: 3 row(s) look never trained (~0): ids [121, 122, 125]"
    assert not any("cannot train" in line for line in lines)
    frozen = tiny_lora(base_model(), target_modules=["q_proj"])
    assert sum("cannot train" in line for line in UntrainedTokensGuard().check(frozen, chat_dataset(), tokenizer())) == 2


# -- tokens added to the tokenizer without resize_token_embeddings ----------------------------------------------
def _grown_tokenizer():
    tok = tokenizer()
    tok.add_tokens(["<tool>", "</tool>", "<think>", "</think>"])  # ids 126-129; the tiny model has 128 rows
    return tok


def _dataset_using(token_id: int, n: int = 8):
    from datasets import Dataset

    rows = [[1, 2, token_id, 3, 4, 5, 6, 7]] * n
    return Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask": [[1] * 8] * n})


def test_tokenizer_larger_than_the_embedding_is_named_before_the_index_error(tmp_path):
    """Tokens added without model.resize_token_embeddings: the run dies at the first batch holding one with a bare
    'index out of range' (a device-side assert on CUDA); the guard names the sizes, the new tokens and the fix."""
    model, tok = tiny_model("llama-untied"), _grown_tokenizer()
    assert model.get_input_embeddings().weight.shape[0] == 128 and len(tok) == 130
    from transformers import Trainer

    def trainer(callbacks):
        return Trainer(model=model, args=make_args(tmp_path, max_steps=1, save_strategy="no"),
                       train_dataset=_dataset_using(129), processing_class=tok, callbacks=callbacks)

    with pytest.raises(IndexError, match="index out of range"):  # the pitfall, without the guard
        trainer([]).train()
    with pytest.raises(UntrainedTokensError, match=r"the tokenizer has 130 tokens but the input embedding has 128 "
                                                   r"rows: ids 128-129 \('<think>', '</think>'\) index past it"):
        trainer([UntrainedTokensGuard(mode="raise")]).train()
    lines = UntrainedTokensGuard().check(model, _dataset_using(129), tok)  # report mode: said, nothing changed
    assert len(lines) == 1 and "model.resize_token_embeddings(len(tokenizer))" in lines[0], lines
    model.resize_token_embeddings(len(tok))
    assert UntrainedTokensGuard(mode="raise").check(model, _dataset_using(129), tok) == []


def test_data_ids_past_the_embedding_are_counted_when_the_data_is_scanned():
    """A dataset tokenized by another model's tokenizer (ids past this embedding) is named in the scan's report."""
    lines = UntrainedTokensGuard().check(base_model(), _dataset_using(200), tokenizer())
    assert any(line.startswith("training data holds 8 token id(s) outside the input embedding's 128 rows")
               for line in lines), lines
    with pytest.raises(UntrainedTokensError, match="8 token id"):
        UntrainedTokensGuard(mode="raise").check(base_model(), _dataset_using(200), tokenizer())
