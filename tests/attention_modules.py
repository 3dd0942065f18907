"""Hand-written attention modules, one per pattern variant the matcher must cover.

Each takes ``(q, k, v, *extra)`` so the test can compare against ``semantics`` directly;
``SPEC`` says what semantics call each one means (mask, causal, softcap, GQA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalTril(nn.Module):
    """GPT-2 (old style): ``tril`` buffer, ``masked_fill(mask == 0, -inf)``, divide by sqrt(d)."""

    def __init__(self, s: int = 16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(s, s, dtype=torch.bool)))

    def forward(self, q, k, v):
        s = q.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.bias[:s, :s], float("-inf"))
        return torch.matmul(F.softmax(scores, dim=-1), v)


class PaddedAdditive(nn.Module):
    """BERT-style: additive ``finfo.min`` key-padding mask, scale as a multiply, dropout in eval."""

    def forward(self, q, k, v, keep):
        mask = (1.0 - keep[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5) + mask
        probs = F.dropout(F.softmax(scores, dim=-1), p=0.1, training=self.training)
        return probs @ v


class GQARepeatInterleave(nn.Module):
    """GQA with ``repeat_interleave`` and an explicit causal+padding bool mask via ``where``."""

    def forward(self, q, k, v, allowed):
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(q.shape[-1]))
        scores = torch.where(allowed, scores, torch.tensor(float("-inf")))
        return torch.matmul(scores.softmax(-1), v)


class CrossEinsum(nn.Module):
    """Cross attention written with einsum, ``S_q != S_k``, additive mask, fp32 upcast around softmax."""

    def forward(self, q, k, v, mask):
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        probs = torch.softmax((scores + mask).float(), dim=-1).to(q.dtype)
        return torch.einsum("bhqk,bhkd->bhqd", probs, v)


class Baddbmm3D(nn.Module):
    """Old fairseq/BART style: ``[B*H, S, D]`` tensors, ``baddbmm`` with the bias and the scale as alpha."""

    def forward(self, q, k, v, bias):
        b, h, s, d = q.shape
        q3, k3, v3 = q.reshape(b * h, s, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
        scores = torch.baddbmm(bias.reshape(b * h, s, -1), q3, k3.transpose(1, 2), beta=1.0, alpha=1.0 / math.sqrt(d))
        out = torch.bmm(torch.softmax(scores, dim=-1), v3)
        return out.reshape(b, h, s, d)


class SoftcapPrescaled(nn.Module):
    """Gemma-2 soft-capping (``div -> tanh -> mul``) with q pre-scaled (Whisper style), causal via triu."""

    def __init__(self, cap: float = 5.0):
        super().__init__()
        self.cap = cap

    def forward(self, q, k, v):
        s = q.shape[-2]
        q = q * (q.shape[-1] ** -0.5)
        scores = q @ k.transpose(-2, -1)
        scores = torch.tanh(scores / self.cap) * self.cap
        causal = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
        return torch.softmax(scores + causal, dim=-1) @ v


class SDPACall(nn.Module):
    """Already fused: SSMax must still apply (through q), fuse swaps the kernel."""

    def forward(self, q, k, v, allowed):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class SDPACausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class ReturnsProbs(nn.Module):
    """The probabilities are also returned (``output_attentions``): SSMax yes, fusion no."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return p @ v, p


class NotAttention(nn.Module):
    """A classifier head and an MoE router: softmaxes that are never attention."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.head = nn.Linear(d, 5)
        self.router = nn.Parameter(torch.randn(d, 4))

    def forward(self, q, k, v):
        x = q.mean(dim=(1, 2))
        cls = torch.softmax(self.head(x), dim=-1)
        gates = torch.softmax(x @ self.router, dim=-1)
        top = gates.topk(2, dim=-1).values
        return cls, top
