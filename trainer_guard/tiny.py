"""Tiny models and synthetic data, built offline from configs, for the demo, notebooks and tests.

Nothing here downloads anything. Model kinds (see :data:`KINDS`):

- ``llama-tied``: ``LlamaForCausalLM`` with ``tie_word_embeddings=True``
- ``llama-manual-tie``: config says untied, then ``lm_head.weight = model.embed_tokens.weight`` by hand (report R1b)
- ``llama-untied``: untied Llama
- ``qwen2`` / ``gemma`` / ``gpt2``: tied configs of those families
- ``plain-gpt``: a plain ``nn.Module`` GPT whose ``out_head.weight = tok_emb.weight`` (report R1a)
- ``mixtral``: a mixture-of-experts ``MixtralForCausalLM`` (untied); transformers saves its fused experts per
  expert, under names the model lacks
- ``llava``: a vision-language ``LlavaForConditionalGeneration`` (tied Llama text model, CLIP vision tower) trained on
  text only, vision tower and projector frozen; transformers saves every weight under its original name (the image
  token id is ``vocab_size``, outside :func:`tiny_dataset`'s ids)

Example:
    >>> from trainer_guard.tiny import tiny_model, tiny_dataset
    >>> model = tiny_model("llama-tied")
    >>> ds = tiny_dataset(n=8, seq_len=16, vocab_size=model.config.vocab_size)
    >>> len(ds)
    8
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KINDS", "TinyGPT", "tiny_model", "tiny_dataset", "tiny_lora"]

KINDS = ("llama-tied", "llama-manual-tie", "llama-untied", "qwen2", "gemma", "gpt2", "plain-gpt", "mixtral", "llava")

VOCAB = 128
HIDDEN = 32


class TinyGPT(nn.Module):
    """A plain ``nn.Module`` GPT with a hand-tied output head (``out_head.weight = tok_emb.weight``).

    ``forward(input_ids, labels=None)`` returns ``{"loss", "logits"}`` like a Hugging Face causal LM, so the
    ``Trainer`` can train it.
    """

    def __init__(self, vocab_size: int = VOCAB, dim: int = HIDDEN, n_layers: int = 2, n_heads: int = 2, max_len: int = 64):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, n_heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_head = nn.Linear(dim, vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # the hand tie of report R1(a)

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.out_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask=None, **_):
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(t, device=input_ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=input_ids.device)
        x = self.norm(self.blocks(x, mask=mask, is_causal=True))
        logits = self.out_head(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return out


def tiny_model(kind: str = "llama-tied", seed: int = 0, vocab_size: int = VOCAB, hidden: int = HIDDEN) -> nn.Module:
    """Build a tiny model of ``kind`` (one of :data:`KINDS`) with a fixed seed."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    if kind in ("llama-tied", "llama-untied", "llama-manual-tie"):
        cfg = tf.LlamaConfig(tie_word_embeddings=(kind == "llama-tied"), **common)
        model = tf.LlamaForCausalLM(cfg)
        if kind == "llama-manual-tie":
            model.lm_head.weight = model.model.embed_tokens.weight
        return model
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **common))
    if kind == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(tie_word_embeddings=True, head_dim=16, **common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=2, n_head=2,
                                                n_positions=64, tie_word_embeddings=True,
                                                bos_token_id=0, eos_token_id=0))
    if kind == "plain-gpt":
        return TinyGPT(vocab_size=vocab_size, dim=hidden)
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
    if kind == "llava":
        text = tf.LlamaConfig(**{**common, "vocab_size": vocab_size + 1}, tie_word_embeddings=True)
        vision = tf.CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=8, patch_size=4)
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text, vision_config=vision,
                                                                image_token_index=vocab_size, tie_word_embeddings=True))
        for module in (model.model.vision_tower, model.model.multi_modal_projector):
            module.requires_grad_(False)  # text-only data: no gradient reaches them (UpdateAuditGuard would say so)
        return model
    raise ValueError(f"kind can be {', '.join(KINDS)}, got {kind!r}")


def tiny_lora(model: nn.Module, **lora_kwargs):
    """Wrap ``model`` in PEFT LoRA on its attention/MLP linears (any model kind above)."""
    from peft import LoraConfig, get_peft_model

    if isinstance(model, TinyGPT):
        # not "out_proj": nn.MultiheadAttention reads out_proj.weight directly, so LoRA there never trains
        # (UpdateAuditGuard reports it: tests/test_update_audit.py)
        targets = ["linear1", "linear2"]
    elif model.config.model_type == "gpt2":
        targets = ["c_attn", "c_proj"]
    else:
        targets = ["q_proj", "v_proj"]
    kw = dict(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    kw.update(lora_kwargs)
    return get_peft_model(model, LoraConfig(**kw))


def tiny_dataset(n: int = 32, seq_len: int = 16, vocab_size: int = VOCAB, seed: int = 0):
    """A ``datasets.Dataset`` of random token ids with ``labels == input_ids`` (causal LM)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, seq_len), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * seq_len] * n})
