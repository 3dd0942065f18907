"""A built-in tiny GPT-style transformer, written the way real model code writes attention.

It is what ``attnpass demo`` rewrites and what examples and benchmarks use when they need a
whole model rather than one attention block: a causal mask built with ``tril``, a key-padding
mask, an fp32 softmax, dropout and grouped-query attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        allowed = self.causal[:s, :s] & key_keep[:, None, None, :]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = F.dropout(probs, self.dropout, self.training)
        out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, max_len, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_keep)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """``forward(ids, attention_mask) -> logits``; ``attention_mask`` is 1 for real tokens, 0 for padding."""

    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 max_len: int = 1024, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, max_len, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.pos(pos)
        keep = attention_mask.bool()
        for block in self.blocks:
            x = block(x, keep)
        return self.head(self.ln(x))


def example_inputs(batch: int = 2, seq: int = 64, vocab: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask whose second row is right-padded (real padding, no fully masked row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq - seq // 4:] = 0
    return ids, mask
