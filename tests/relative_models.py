"""Models whose Q already carries a relative of SSMax, built offline from transformers' config classes.

Llama 4's text model (every layer NoPE, so every layer has attention temperature tuning; the RoPE
layers use complex rotary embeddings the ONNX exporter cannot take) and Ministral 3
(``llama_4_scaling`` on every layer) come from transformers itself.  Qwen-1's log-n scaling is
remote code (not in transformers), so ``QwenLogn`` is a hand-written attention with the same formula
and the same table-slicing form as Qwen-1's ``logn_tensor``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from tests import hf_corpus as C

#: Small parameters so the factor changes inside a 7-token trace (the numeric tests need that).
SMALL_L4 = {"attn_scale": 0.1, "floor_scale": 2}
SMALL_M3 = {"beta": 0.2, "original_max_position_embeddings": 3}


def _common() -> dict:
    return {**C._decoder_common(), "head_dim": 8, "num_key_value_heads": 2, "max_position_embeddings": 64}


def llama4_config(tuning: bool = True, **params) -> T.Llama4TextConfig:
    return T.Llama4TextConfig(intermediate_size_mlp=64, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=0,
                              moe_layers=[], no_rope_layers=[0, 0], attention_chunk_size=None, attn_temperature_tuning=tuning,
                              **params, **_common())


def ministral3_config(beta: float = 0.1, original_max_position_embeddings: int = 16384) -> T.Ministral3Config:
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 64 / original_max_position_embeddings,
            "original_max_position_embeddings": original_max_position_embeddings, "max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": beta}
    return T.Ministral3Config(rope_parameters=rope, **_common())


class Hidden(nn.Module):
    """An HF base model as ``ids -> last_hidden_state`` (what the exporters and the MLIR import take)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).last_hidden_state


def llama4(tuning: bool = True, **params) -> Hidden:
    torch.manual_seed(0)
    return Hidden(T.Llama4TextModel(llama4_config(tuning, **params))).eval()


def ministral3(**params) -> Hidden:
    torch.manual_seed(0)
    return Hidden(T.Ministral3Model(ministral3_config(**params))).eval()


def ids(seq: int = 7) -> torch.Tensor:
    return torch.randint(3, C.VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))


class QwenLogn(nn.Module):
    """Qwen-1's log-n attention: ``q *= logn_tensor[:, start:end]``, ``logn[i] = max(1, log(i + 1) / log(seq_length))``."""

    def __init__(self, seq_length: int = 4, heads: int = 2, dim: int = 8, max_len: int = 32):
        super().__init__()
        logn = [math.log(i, seq_length) if i > seq_length else 1.0 for i in range(1, max_len + 1)]
        self.register_buffer("logn_tensor", torch.tensor(logn)[None, :, None, None])
        self.qkv = nn.Linear(heads * dim, 3 * heads * dim)
        self.heads, self.dim = heads, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.dim).unbind(2)
        q = q * self.logn_tensor[:, :s].type_as(q).expand_as(q)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dim)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return torch.matmul(F.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, -1)
