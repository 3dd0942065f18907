"""Attention written the ways issue 11 found uncovered: in-place arithmetic, views around the mask add,
run-time tensor scales and a constant added to the scores.  Each takes ``(q, k, v, *extra)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class InplaceDivAddMask(nn.Module):
    """HF Falcon: ``scores /= sqrt(d)`` then ``scores += mask`` in place, softmax in fp32."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2)
        scores /= math.sqrt(q.shape[-1])
        scores += mask
        return F.softmax(scores, dim=-1, dtype=torch.float32) @ v


class InplaceMethods(nn.Module):
    """``mul_`` / ``sub_`` / ``masked_fill_`` / ``add_`` as Tensor methods on the scores."""

    def forward(self, q, k, v, allowed):
        scores = torch.matmul(q, k.transpose(2, 3))
        scores.mul_(q.shape[-1] ** -0.5)
        scores.sub_(0.0)
        scores.masked_fill_(~allowed, float("-inf"))
        scores.add_(0.0)
        return torch.softmax(scores, dim=-1) @ v


class InplaceDivMethod(nn.Module):
    """``div_`` as a method, bias added with ``add_``."""

    def forward(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores.div_(math.sqrt(q.shape[-1]))
        scores.add_(bias)
        return torch.softmax(scores, dim=-1) @ v


class Bmm3DView4DMask(nn.Module):
    """fairseq / MBart: ``[B*H, S, S]`` scores viewed to ``[B, H, S, S]`` for the mask add, and back."""

    def forward(self, q, k, v, mask):
        b, h, s, d = q.shape
        q3, k3, v3 = (q * d ** -0.5).reshape(b * h, s, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
        w = torch.bmm(q3, k3.transpose(1, 2))
        w = w.view(b, h, s, -1) + mask
        w = w.view(b * h, s, -1)
        return torch.bmm(F.softmax(w, dim=-1), v3).view(b, h, s, d)


class Bmm3DViewNoMask(nn.Module):
    """The same views with nothing but a scale in the 4-D view."""

    def forward(self, q, k, v):
        b, h, s, d = q.shape
        q3, k3, v3 = q.reshape(b * h, s, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
        w = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, s, -1) * d ** -0.5
        return torch.bmm(F.softmax(w.view(b * h, s, -1), dim=-1), v3).view(b, h, s, d)


class Bmm3DMasked(nn.Module):
    """``bmm`` attention with the heads folded into the batch and the mask laid out on the 3-D scores.

    ``mask`` is additive, broadcastable to ``[B*H, S, S]`` (e.g. a padding mask repeated per head); ``causal``
    masks the upper triangle with ``masked_fill`` on the 3-D scores.
    """

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, mask):
        b, h, s, d = q.shape
        q3, k3, v3 = q.reshape(b * h, s, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
        w = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5 + mask
        if self.causal:
            upper = torch.ones(s, w.shape[-1], dtype=torch.bool, device=w.device).triu(1)
            w = w.masked_fill(upper, float("-inf"))
        return torch.bmm(F.softmax(w, dim=-1), v3).view(b, h, s, d)


class TensorScale(nn.Module):
    """Scores times a per-head run-time factor (a ``[H, 1, 1]`` parameter), as learned-temperature models do."""

    def __init__(self, heads: int = 4):
        super().__init__()
        self.temp = nn.Parameter(torch.linspace(0.2, 0.6, heads).reshape(heads, 1, 1))

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) * self.temp, dim=-1) @ v


class TensorScaleInput(nn.Module):
    """The per-head factor is an input: divided by it."""

    def forward(self, q, k, v, temp):
        return torch.softmax((q @ k.transpose(-2, -1)) / temp, dim=-1) @ v


class ConstantAdded(nn.Module):
    """A constant added to the scores: softmax is shift-invariant per row, so it changes nothing."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + 1.0
        return torch.softmax(scores, dim=-1) @ v


class SlidingWindow(nn.Module):
    """A hand-written local window: key j is attendable from query i when ``i - w < j <= i``."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        s_q, s_k = q.shape[-2], k.shape[-2]
        i = torch.arange(s_q, device=q.device)[:, None]
        j = torch.arange(s_k, device=q.device)[None, :]
        keep = (j <= i) & (j > i - self.window)
        scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        return F.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v
