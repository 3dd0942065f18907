"""Tiny Hugging Face models built offline from config classes (random weights, eager attention).

``CORPUS`` maps a name to (builder, expected attention sites).  Every builder returns
``(model, args, kwargs)`` with a padded batch where the model takes a mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T

VOCAB = 100
SEQ = 7


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - 2:] = 0  # right padding: no fully masked query row
    return ids, mask


def _decoder_common() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                attn_implementation="eager", use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def bert():
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       attn_implementation="eager")
    ids, mask = _ids()
    return T.BertModel(cfg), (ids,), {"attention_mask": mask}


def gpt2():
    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager", use_cache=False,
                       bos_token_id=1, eos_token_id=2)
    ids, mask = _ids()
    return T.GPT2Model(cfg), (ids,), {"attention_mask": mask}


def llama():
    cfg = T.LlamaConfig(num_key_value_heads=2, **_decoder_common())
    ids, mask = _ids()
    return T.LlamaModel(cfg), (ids,), {"attention_mask": mask}


def t5():
    cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                     attn_implementation="eager", use_cache=False)
    ids, mask = _ids()
    return T.T5Model(cfg), (ids,), {"attention_mask": mask, "decoder_input_ids": ids[:, :5]}


def vit():
    cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, attn_implementation="eager")
    return T.ViTModel(cfg), (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),), {}


def mixtral():
    cfg = T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **_decoder_common())
    ids, mask = _ids()
    return T.MixtralModel(cfg), (ids,), {"attention_mask": mask}


def gemma2():
    cfg = T.Gemma2Config(num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0, final_logit_softcapping=None,
                         sliding_window=4, **_decoder_common())
    ids, mask = _ids()
    return T.Gemma2Model(cfg), (ids,), {"attention_mask": mask}


def llama_sdpa():
    common = _decoder_common()
    common["attn_implementation"] = "sdpa"
    cfg = T.LlamaConfig(num_key_value_heads=2, **common)
    ids, mask = _ids()
    return T.LlamaModel(cfg), (ids,), {"attention_mask": mask}


def falcon():
    """In-place ``scores /= sqrt(d)`` on the eager path; multi-query (one KV head)."""
    cfg = T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                         new_decoder_architecture=False, alibi=False, attn_implementation="eager", use_cache=False,
                         bos_token_id=1, eos_token_id=2)
    ids, mask = _ids()
    return T.FalconModel(cfg), (ids,), {"attention_mask": mask}


def _seq2seq(cls_cfg, cls_model, **extra):
    cfg = cls_cfg(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  attn_implementation="eager", use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  decoder_start_token_id=2, **extra)
    return cls_model(cfg)


def bart():
    ids, mask = _ids()
    return _seq2seq(T.BartConfig, T.BartModel), (ids,), {"attention_mask": mask, "decoder_input_ids": ids[:, :5]}


def whisper():
    cfg = T.WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                          max_source_positions=8, max_target_positions=16, attn_implementation="eager", use_cache=False,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    feats = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    ids, _ = _ids()
    return T.WhisperModel(cfg), (feats,), {"decoder_input_ids": ids[:, :5]}


def gpt_neox():
    cfg = T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          attn_implementation="eager", use_cache=False, bos_token_id=1, eos_token_id=2)
    ids, mask = _ids()
    return T.GPTNeoXModel(cfg), (ids,), {"attention_mask": mask}


def phi():
    cfg = T.PhiConfig(**_decoder_common())
    ids, mask = _ids()
    return T.PhiModel(cfg), (ids,), {"attention_mask": mask}


def qwen2():
    cfg = T.Qwen2Config(num_key_value_heads=2, **_decoder_common())
    ids, mask = _ids()
    return T.Qwen2Model(cfg), (ids,), {"attention_mask": mask}


def mistral():
    cfg = T.MistralConfig(num_key_value_heads=2, sliding_window=4, **_decoder_common())
    ids, mask = _ids()
    return T.MistralModel(cfg), (ids,), {"attention_mask": mask}


def clip_text():
    cfg = T.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=16, attn_implementation="eager", pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    ids, mask = _ids()
    return T.CLIPTextModel(cfg), (ids,), {"attention_mask": mask}


def distilbert():
    cfg = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, attn_implementation="eager")
    ids, mask = _ids()
    return T.DistilBertModel(cfg), (ids,), {"attention_mask": mask}


# name -> (builder, expected sites): T5 has encoder self, decoder self and cross attention per layer;
# Mixtral's router softmax per layer must not count.
CORPUS: dict[str, tuple[Callable, int]] = {
    "bert": (bert, 2),
    "gpt2": (gpt2, 2),
    "llama": (llama, 2),
    "t5": (t5, 6),
    "vit": (vit, 2),
    "mixtral": (mixtral, 2),
    "gemma2": (gemma2, 2),
    "llama_sdpa": (llama_sdpa, 2),
}


def qwen2_moe(causal_lm: bool = False):
    cfg = T.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, norm_topk_prob=True, **_decoder_common())
    ids, mask = _ids()
    return (T.Qwen2MoeForCausalLM if causal_lm else T.Qwen2MoeModel)(cfg), (ids,), {"attention_mask": mask}


def olmoe(causal_lm: bool = False):
    cfg = T.OlmoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **_decoder_common())
    ids, mask = _ids()
    return (T.OlmoeForCausalLM if causal_lm else T.OlmoeModel)(cfg), (ids,), {"attention_mask": mask}


def mixtral_lm():
    cfg = T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **_decoder_common())
    ids, mask = _ids()
    return T.MixtralForCausalLM(cfg), (ids,), {"attention_mask": mask}


# The MoE families whose routers (softmax -> top-k) the top-k pass must find and fuse: name -> (builder, routers).
# Kept out of CORPUS so the attention corpus tests do not grow.
MOE: dict[str, tuple[Callable, int]] = {
    "mixtral": (mixtral, 2),
    "qwen2_moe": (qwen2_moe, 2),
    "olmoe": (olmoe, 2),
}


def output_tensor(out) -> torch.Tensor:
    """The main output of an HF model call, whatever its output class."""
    if isinstance(out, tuple):
        return out[0]
    for name in ("last_hidden_state", "logits"):
        t = getattr(out, name, None)
        if t is not None:
            return t
    raise TypeError(type(out))


class TextModel(torch.nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state``: plain tensors in and out for the exporters."""

    def __init__(self, m: torch.nn.Module):
        super().__init__()
        self.m = m

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids, attention_mask=attention_mask).last_hidden_state
