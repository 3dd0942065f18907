"""MLIR coverage of attention written by others: einsum from torch and ONNX, baddbmm from both ONNX exporters.

Each site must be found, fused equal to the original (torch eager / onnxruntime), SSMax(s=0, b=1)
equal to the original, and SSMax(s) equal to ``semantics``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
from torch import nn

from attnpass import mlir as am  # noqa: E402
from attnpass import semantics  # noqa: E402
from attnpass.passes.site import GuardKind  # noqa: E402

warnings.filterwarnings("ignore")
ATOL = 2e-5


class EinsumCausal(nn.Module):
    """einsum-written attention: fp32 upcast of q/k, bool causal ``masked_fill``, probabilities cast back."""

    def forward(self, q, k, v):
        s = q.shape[-2]
        scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        future = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)


class Baddbmm(nn.Module):
    """Heads folded into the batch, the bias added by ``baddbmm`` (BLOOM / fairseq style)."""

    def forward(self, q, k, v, bias):
        b, h, s, d = q.shape
        qf, kf, vf = (x.reshape(b * h, s, d) for x in (q, k, v))
        scores = torch.baddbmm(bias, qf, kf.transpose(1, 2), beta=1.0, alpha=d ** -0.5)
        return torch.bmm(torch.softmax(scores, dim=-1), vf).reshape(b, h, s, d)


def _qkv(shape=(1, 2, 12, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


def _check_all(imported, args, want, ssmax_ref=None, s=0.7):
    (site,) = am.find(imported).sites
    assert site.fusable, site.fuse_blocker
    for kw in (dict(to="fused", tile=5), dict(to="ssmax", s=0.0, b=1.0), dict(to="ssmax", s=0.0, b=1.0, fused=True, tile=5)):
        out, report = am.rewrite(imported, with_report=True, **kw)
        notes = " ".join(report.sites[0].notes)
        assert ("fused via" in notes) == (kw["to"] == "fused" or kw.get("fused", False)) and "left alone" not in notes
        np.testing.assert_allclose(np.asarray(am.compile(out)(*args)), np.asarray(want), atol=ATOL, rtol=1e-5)
    if ssmax_ref is not None:
        for fused in (False, True):
            got = am.compile(am.rewrite(imported, to="ssmax", s=s, fused=fused, tile=5))(*args)
            np.testing.assert_allclose(np.asarray(got), ssmax_ref.numpy(), atol=ATOL, rtol=1e-5)


def test_torch_einsum_causal_upcast():
    q, k, v = _qkv()
    imported = am.import_(EinsumCausal().eval(), (q, k, v))
    assert "torch.aten.einsum" in str(imported)  # kept as einsum at import, as SDPA is
    with torch.no_grad():
        want = EinsumCausal()(q, k, v)
    _check_all(imported, (q, k, v), want, semantics.ssmax_attention(q, k, v, is_causal=True, s=0.7))


def _onnx_einsum(path: str, shape: tuple[int, ...]) -> str:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Einsum", ["q", "k"], ["qk"], equation="bqhd,bkhd->bhqk"),
        helper.make_node("Mul", ["qk", "scale"], ["x"]),
        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
        helper.make_node("Einsum", ["p", "v"], ["out"], equation="bhqk,bkhd->bqhd"),
    ]

    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    graph = helper.make_graph(nodes, "einsum", [info(n) for n in "qkv"], [info("out")],
                              [helper.make_tensor("scale", TensorProto.FLOAT, [], [shape[-1] ** -0.5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_onnx_einsum_in_bshd_layout(tmp_path):
    shape = (1, 12, 2, 8)  # [B, S, H, D]: every operand and the output are permuted from [B, H, S, D]
    path = _onnx_einsum(str(tmp_path / "einsum.onnx"), shape)
    q, k, v = _qkv(shape)
    want = ort.InferenceSession(path).run(None, dict(q=q.numpy(), k=k.numpy(), v=v.numpy()))[0]
    imported = am.import_(path)
    (site,) = am.find(imported).sites
    assert site.q.perm is not None and site.out_perm is not None
    ref = semantics.ssmax_attention(*(x.transpose(1, 2) for x in (q, k, v)), s=0.7).transpose(1, 2)
    _check_all(imported, (q, k, v), want, ref)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_baddbmm(tmp_path, dynamo):
    q, k, v = _qkv()
    bias = torch.randn(2, 12, 12) * 0.5
    bias[..., 10:] = torch.finfo(torch.float32).min
    path = str(tmp_path / "baddbmm.onnx")
    torch.onnx.export(Baddbmm().eval(), (q, k, v, bias), path, dynamo=dynamo)
    args = (q, k, v, bias)
    session = ort.InferenceSession(path)
    assert len(session.get_inputs()) == len(args)
    want = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    imported = am.import_(path)
    ref = semantics.ssmax_attention(*(x.reshape(2, 12, 8) for x in (q, k, v)), attn_mask=bias, s=0.7).reshape(1, 2, 12, 8)
    _check_all(imported, args, want, ref)


# ------------------------------------------------------------------ the ONNX Attention schema's own decomposition

def _expanded_attention(path: str, shapes: dict, mask_type: int | None, **attrs) -> str:
    """The function body that the ONNX spec defines for opset-23 ``Attention``, expanded as onnx's own tests do."""
    from onnx import TensorProto, helper
    from onnx.backend.test.case.node import function_testcase_helper

    def info(name, shape, elem=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, elem, shape)

    ins = [info(n, shapes[n]) for n in "qkv"] + ([info("mask", shapes["mask"], mask_type)] if mask_type else [])
    node = helper.make_node("Attention", [i.name for i in ins], ["out"], **attrs)
    expanded, _ = function_testcase_helper(node, [i.type for i in ins], "attn", [helper.make_opsetid("", 23)])
    nodes, opsets = expanded[0]
    out_shape = shapes["q"][:-1] + [shapes["v"][-1] if len(shapes["q"]) == 4 else shapes["q"][-1]]
    graph = helper.make_graph(nodes, "attention", ins, [info("out", out_shape)])
    onnx.save(helper.make_model(graph, opset_imports=list(opsets)), path)
    return path


_MHA = dict(q=[1, 2, 6, 8], k=[1, 2, 6, 8], v=[1, 2, 6, 8], mask=[6, 6])
ATTENTION_SCHEMA_CASES = {
    # name: (shapes, mask type (1 float, 9 bool, None), attributes)
    "float-mask": (_MHA, 1, {}),
    "bool-mask": (_MHA, 9, {}),
    "float-mask-causal": (_MHA, 1, dict(is_causal=1)),
    "no-mask": (_MHA, None, {}),
    "gqa-bool-mask": (dict(_MHA, q=[1, 4, 6, 8]), 9, {}),
    "3d-heads-attr": (dict(q=[1, 6, 16], k=[1, 6, 16], v=[1, 6, 16]), None, dict(q_num_heads=2, kv_num_heads=2)),
    "softcap-scale": (_MHA, None, dict(softcap=2.0, scale=0.1)),
    "cross-causal": (dict(_MHA, q=[1, 2, 4, 8]), None, dict(is_causal=1)),
}


@pytest.mark.parametrize("name", list(ATTENTION_SCHEMA_CASES))
def test_onnx_attention_schema_decomposition_fuses(tmp_path, name):
    """Its fully-masked-row guard ``Where(ReduceMax(bias) == -inf, 0, p)`` is the no-attendable-key rule."""
    shapes, mask_type, attrs = ATTENTION_SCHEMA_CASES[name]
    path = _expanded_attention(str(tmp_path / "attention.onnx"), shapes, mask_type, **attrs)
    assert "ReduceMax" in {n.op_type for n in onnx.load(path).graph.node}
    rng = np.random.default_rng(0)
    args = [torch.from_numpy(rng.standard_normal(shapes[n]).astype(np.float32)) for n in "qkv"]
    if mask_type == 9:
        mask = torch.from_numpy(rng.random(shapes["mask"]) > 0.3)
        mask[2] = False  # a row with no attendable key: the guard's case
        args.append(mask)
    elif mask_type == 1:
        mask = torch.from_numpy((rng.standard_normal(shapes["mask"]) * 0.5).astype(np.float32))
        mask[:, 4:] = -math.inf
        mask[2] = -math.inf
        args.append(mask)
    feeds = dict(zip(["q", "k", "v", "mask"], (a.numpy() for a in args)))
    want = ort.InferenceSession(path).run(None, feeds)[0]
    if mask_type:
        assert not want[0, :, 2].any()
    imported = am.import_(path)
    (site,) = am.find(imported).sites
    # the matcher classifies the guard (through MlirAdapter.no_key_test) as implied: none left to emit
    assert any(g.kind is GuardKind.NO_KEY for g in site.guards) and not site.row_guards
    assert any("guard: implied" in n for n in site.notes)
    _check_all(imported, tuple(args), want)


def test_a_row_guard_on_another_tensor_is_not_the_no_key_rule(tmp_path):
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Add", ["qk", "mask"], ["x"]),
        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
        helper.make_node("ReduceMax", ["other", "axes"], ["mx"], keepdims=1),
        helper.make_node("Equal", ["mx", "ninf"], ["empty"]),
        helper.make_node("Where", ["empty", "zero", "p"], ["pz"]),
        helper.make_node("MatMul", ["pz", "v"], ["out"]),
    ]

    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(
        nodes, "guard", [info(n, [1, 2, 6, 8]) for n in "qkv"] + [info("mask", [6, 6]), info("other", [6, 6])],
        [info("out", [1, 2, 6, 8])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
         helper.make_tensor("ninf", TensorProto.FLOAT, [], [-math.inf]), helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    path = str(tmp_path / "guard.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    (site,) = am.find(am.import_(path)).sites
    assert not site.fusable and "rows zeroed after the softmax" in site.fuse_blocker
