"""ONNX sites the exporters don't produce on their own: attention inside a model-local function and
inside an ``If`` branch (built with ``onnx.helper``), and fused SSMax checked against the reference math.

The chain in both is ``MatMul(q, Transpose(k)) * c -> Where(mask, ., finfo.min) -> Softmax -> MatMul(., v)``
with a ``[B, 1, 1, S]`` key-padding mask, so SSMax's ``n`` must come from the padding (not from S).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import attnpass.onnx as aonnx
from attnpass import semantics
from attnpass.validate import run

H, D = 2, 8
SCALE = 1.0 / np.sqrt(D)
F32_MIN = float(np.finfo(np.float32).min)


def _attention_nodes(prefix: str, q: str, k: str, v: str, mask: str, out: str) -> list[onnx.NodeProto]:
    """The softmax chain, as the TorchScript exporter writes it (``Constant`` nodes, not initializers)."""
    c = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [f"{prefix}{name}"], value=helper.make_tensor(f"{prefix}{name}_t", TensorProto.FLOAT, [], [value]))
    return [
        helper.make_node("Transpose", [k], [f"{prefix}kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [q, f"{prefix}kt"], [f"{prefix}qk"]),
        c("scale", float(SCALE)),
        helper.make_node("Mul", [f"{prefix}qk", f"{prefix}scale"], [f"{prefix}z"]),
        c("fill", F32_MIN),
        helper.make_node("Where", [mask, f"{prefix}z", f"{prefix}fill"], [f"{prefix}zm"]),
        helper.make_node("Softmax", [f"{prefix}zm"], [f"{prefix}p"], axis=-1),
        helper.make_node("MatMul", [f"{prefix}p", v], [out]),
    ]


def _inputs(with_cond: bool = False) -> list[onnx.ValueInfoProto]:
    qkv = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", H, "seq", D]) for n in "qkv"]
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, ["batch", 1, 1, "seq"])
    cond = [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])] if with_cond else []
    return [*qkv, mask, *cond]


def _out() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", H, "seq", D])


def function_model() -> onnx.ModelProto:
    """Main graph calls ``local.Attn(q, k, v, mask)``; the function body holds the chain (no shapes inside)."""
    fn = helper.make_function("local", "Attn", ["q", "k", "v", "m"], ["o"],
                              _attention_nodes("", "q", "k", "v", "m", "o"), [helper.make_opsetid("", 18)])
    graph = helper.make_graph([helper.make_node("Attn", ["q", "k", "v", "attention_mask"], ["out"], domain="local")],
                              "with_function", _inputs(), [_out()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                             functions=[fn], ir_version=9)


def if_model() -> onnx.ModelProto:
    """``If(cond)``: the then-branch is attention on outer-scope q/k/v/mask, the else-branch passes v through."""
    then_g = helper.make_graph(_attention_nodes("t_", "q", "k", "v", "attention_mask", "t_out"), "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["v"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph([node], "with_if", _inputs(with_cond=True), [_out()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _feeds(cond: bool | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, H, 6, D)).astype(np.float32) * 2 for n in "qkv"}
    mask = np.ones((2, 1, 1, 6), bool)
    mask[1, ..., -2:] = False  # the second sequence is padded: n = 4 there, 6 in the first
    feeds["attention_mask"] = mask
    if cond is not None:
        feeds["cond"] = np.array(cond)
    return feeds


def _reference(feeds: dict[str, np.ndarray], s: float | None = None, b: float | None = None) -> np.ndarray:
    q, k, v = (torch.from_numpy(feeds[n]) for n in "qkv")
    m = torch.from_numpy(feeds["attention_mask"])
    if s is None:
        return semantics.attention(q, k, v, m, scale=SCALE).numpy()
    return semantics.ssmax_attention(q, k, v, m, scale=SCALE, s=s, b=b).numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("graphs")
    out = {}
    for name, proto in (("function", function_model()), ("if", if_model())):
        onnx.checker.check_model(proto)
        out[name] = d / f"{name}.onnx"
        onnx.save(proto, out[name])
    return out


def _ops(path: Path) -> set[tuple[str, str]]:
    model = ir.load(path)
    graphs = [model.graph, *(f.graph for f in model.functions.values())]
    return {(n.domain, n.op_type) for g in graphs for n in ir.traversal.RecursiveGraphIterator(g)}


@pytest.mark.parametrize("name", ["function", "if"])
def test_site_found_with_rank_and_heads(models, name):
    rep = aonnx.find(models[name])
    assert len(rep) == 1, rep.as_dict()
    site = rep[0]
    assert site.heads == H and site.head_dim == D and site.fusable and abs(site.scale - SCALE) < 1e-6
    assert site.mask_kind == "bool"


@pytest.mark.parametrize("name", ["function", "if"])
@pytest.mark.parametrize("target", ["ort", "onnx23"])
def test_fused_inside_function_and_branch(models, tmp_path, name, target):
    out = tmp_path / "fused.onnx"
    res = aonnx.rewrite(models[name], out, to="fused", target=target, inputs=_feeds(True if name == "if" else None))
    assert len(res.rewritten) == 1 and res.validation.passed
    ops = _ops(out)
    assert (("com.microsoft", "MultiHeadAttention") if target == "ort" else ("", "Attention")) in ops
    assert ("", "Softmax") not in ops
    if name == "if":  # both branches still run
        for cond in (True, False):
            feeds = _feeds(cond)
            np.testing.assert_allclose(run(out, feeds)["out"], run(models[name], feeds)["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["function", "if"])
def test_ssmax_counts_keys_from_the_padding(models, tmp_path, name):
    """SSMax in onnxruntime equals ``semantics.ssmax_attention`` (n = 6 and 4 per batch row), unfused and fused."""
    feeds = _feeds(True if name == "if" else None)
    want = _reference(feeds, s=0.9, b=0.2)
    assert np.abs(want - _reference(feeds)).max() > 1e-3  # SSMax with these s, b does change the output
    for to, target in (("ssmax", "ort"), ("fused", "ort"), ("fused", "onnx23")):
        out = tmp_path / f"{to}_{target}.onnx"
        res = aonnx.rewrite(models[name], out, to=to, target=target, s=0.9, bias=0.2, inputs=feeds)
        assert len(res.rewritten) == 1 and res.self_test.passed and res.validation.passed
        np.testing.assert_allclose(run(out, feeds)["out"], want, rtol=1e-4, atol=1e-5)
        assert ("", "Softmax") not in _ops(out) if to == "fused" else ("", "Softmax") in _ops(out)


def causal_attention_op_model(s_q: int = 3, s_k: int = 6) -> onnx.ModelProto:
    """Opset-23 ``Attention(is_causal=1)`` with fewer queries than keys and a boolean key-padding mask
    (expanded over the queries first: onnxruntime wants the mask's query axis in full)."""
    shape = helper.make_node("Constant", [], ["mask_shape"], value=helper.make_tensor("ms", TensorProto.INT64, [4], [1, 1, s_q, s_k]))
    expand = helper.make_node("Expand", ["attention_mask", "mask_shape"], ["mask_full"])
    node = helper.make_node("Attention", ["q", "k", "v", "mask_full"], ["out"], is_causal=1)
    ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", H, s_q, D])]
    ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", H, s_k, D]) for n in "kv"]
    ins.append(helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, ["batch", 1, 1, s_k]))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", H, s_q, D])
    graph = helper.make_graph([shape, expand, node], "causal_op", ins, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_ssmax_on_causal_attention_op(tmp_path):
    """An sdpa-form site: n from the padding under ``is_causal`` (top-left without a KV cache, as the op
    defines it), counted without a ``[S_q, S_k]`` tensor, equals the reference SSMax."""
    src = tmp_path / "causal_op.onnx"
    onnx.save(causal_attention_op_model(), src)
    rng = np.random.default_rng(1)
    feeds = {"q": rng.standard_normal((2, H, 3, D)).astype(np.float32) * 2}
    feeds.update({n: rng.standard_normal((2, H, 6, D)).astype(np.float32) * 2 for n in "kv"})
    mask = np.ones((2, 1, 1, 6), bool)
    mask[1, ..., 1] = False  # a hole inside the causal window of every row of the second sequence
    feeds["attention_mask"] = mask
    allowed = torch.from_numpy(mask) & torch.ones(3, 6, dtype=torch.bool).tril()
    q, k, v = (torch.from_numpy(feeds[n]) for n in "qkv")
    np.testing.assert_allclose(run(src, feeds)["out"], semantics.attention(q, k, v, allowed).numpy(), rtol=1e-5, atol=1e-5)
    out = tmp_path / "ssmax.onnx"
    res = aonnx.rewrite(src, out, to="ssmax", s=0.9, bias=0.2, inputs=feeds)
    assert len(res.rewritten) == 1 and res.self_test.passed
    assert "cumulative sum" in " ".join(res.report.sites[0].notes)
    want = semantics.ssmax_attention(q, k, v, allowed, s=0.9, b=0.2).numpy()
    np.testing.assert_allclose(run(out, feeds)["out"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["ort", "onnx23"])
def test_fused_attention_that_is_the_graph_output_keeps_its_name(tmp_path, target: str) -> None:
    """When ``P @ V`` is itself the model's output, the fused op must take over its name."""

    class Bare(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1) @ v

    q = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "bare.onnx"
    torch.onnx.export(Bare(), (q, q, q), str(src), dynamo=False, opset_version=17)
    out_name = onnx.load(str(src)).graph.output[0].name
    res = aonnx.rewrite(src, tmp_path / f"bare.{target}.onnx", to="fused", target=target)
    assert len(res.rewritten) == 1 and res.validation.passed
    assert onnx.load(str(res.written)).graph.output[0].name == out_name
