"""The attention spellings issue 11 found missed, through torch.export and the compile backend.

Found / fused / SSMax in every IR is the variant table's (``test_variant_table``); here, what only
torch.compile's dynamo graph shows, and the mask added in a view of another rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attnpass
from attnpass import semantics
from attnpass.lowering import backend
from tests import gap_modules as G

B, H, S, D = 2, 4, 9, 8
ATTN = torch.ops.attnpass.attention.default


@dataclass
class Case:
    name: str
    module: torch.nn.Module
    args: tuple
    sem: dict[str, Any]  # the semantics.attention call the module means (q may be replaced, see q_factor)
    blocker: str | None = None  # a word the "not fusable" reason must hold; None: fusable
    note: str | None = None  # a word one of the site's notes must hold
    q_factor: Any = None  # the module scales the scores by this run-time tensor: semantics gets q * q_factor
    ids: dict = field(default_factory=dict)


def _cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, -3:] = False
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    allowed = keep[:, None, None, :] & semantics.causal_allowed(S, S)
    bias = 0.3 * torch.randn(B, H, S, S, generator=g)
    temp = torch.linspace(0.2, 0.6, H).reshape(H, 1, 1)
    padding3 = additive.expand(B, H, S, S).reshape(B * H, S, S)  # heads folded into the batch
    temp_in = torch.rand(H, 1, 1, generator=g) + 0.5
    return [
        Case("inplace_div_add", G.InplaceDivAddMask(), (q, k, v, additive), dict(attn_mask=additive)),
        Case("inplace_methods", G.InplaceMethods(), (q, k, v, allowed), dict(attn_mask=allowed)),
        Case("inplace_div_method", G.InplaceDivMethod(), (q, k, v, bias), dict(attn_mask=bias)),
        Case("bmm_view_scale", G.Bmm3DViewNoMask(), (q, k, v), dict()),
        Case("bmm_3d_padding", G.Bmm3DMasked(), (q, k, v, padding3), dict(attn_mask=additive)),
        Case("bmm_3d_causal_bias", G.Bmm3DMasked(causal=True), (q, k, v, bias[0, 0]),
             dict(attn_mask=bias[0, 0].masked_fill(~semantics.causal_allowed(S, S), float("-inf")))),
        Case("tensor_scale_param", G.TensorScale(H), (q, k, v), dict(scale=1.0), q_factor=temp),
        Case("tensor_scale_input", G.TensorScaleInput(), (q, k, v, temp_in), dict(scale=1.0), q_factor=1.0 / temp_in),
        Case("constant_added", G.ConstantAdded(), (q, k, v), dict(), note="shift-invariant"),
    ]


CASES = _cases()


def _sem(case: Case, **extra: Any) -> torch.Tensor:
    q, k, v = (x.double() for x in case.args[:3])
    if case.q_factor is not None:
        q = q * case.q_factor.double()
    kw = {key: (val.double() if isinstance(val, torch.Tensor) and val.is_floating_point() else val) for key, val in case.sem.items()}
    return semantics.attention(q, k, v, **kw, **extra).float()


@pytest.mark.parametrize("rewrite", ["fuse", "ssmax"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compile_backend_sees_the_same_site(case: Case, rewrite: str) -> None:
    """dynamo's torch-level graph: ``operator.itruediv``, ``Tensor.mul_`` whose result nobody reads, views."""
    torch._dynamo.reset()
    backend.reports.clear()
    opts = {"inner": "eager", "rewrite": rewrite, **({"s": 0.43} if rewrite == "ssmax" else {})}
    out = torch.compile(case.module.eval(), backend="attnpass", options=opts)(*case.args)
    assert sum(len(r.sites) for r in backend.reports) == 1
    want = case.module(*case.args) if rewrite == "fuse" else _sem(case, ssmax_s=0.43)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-5)


def test_mask_added_in_a_head_view_is_laid_out_on_the_scores() -> None:
    """fairseq / MBart: the mask is added to a ``[B, H, S, S]`` view of ``[B*H, S, S]`` scores.  The site records
    the view; the fx emitter broadcasts the mask over the heads and folds it as the scores are, keeping its own
    ``[.., 1, S_k]`` padding shape (no ``S x S`` mask is built), and the fused op equals the original."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, -2:] = False
    mask = torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
    module = G.Bmm3DView4DMask().eval()
    (site,) = attnpass.find(module, (q, k, v, mask)).sites
    (view,) = [m.view for m in site.masks]
    assert len(view) == 4 and view[1] == H and view[3] in (S, view[2])  # batch and length may be symbols (dynamic)
    fused = attnpass.fuse(module, (q, k, v, mask))
    expands = [list(n.args[1]) for n in fused.graph.nodes if n.target is torch.ops.aten.expand.default]
    # the padding mask is broadcast over the heads only ([B, 1, 1, S] -> [B, H, 1, S], then folded): one row per
    # head, no S x S mask
    assert [-1, H, -1, -1] in expands
    torch.testing.assert_close(fused(q, k, v, mask), module(q, k, v, mask), rtol=1e-5, atol=1e-5)
