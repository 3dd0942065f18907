"""SSMax on soft-capping ``Attention`` ops through their ONNX function body (``rewrite/onnx/body.py``), beyond the
ONNX spec's own cases (``test_onnx_spec_attention.py``): several unnamed ops in one graph, a float mask whose finite
part SSMax scales, and an op whose body cannot be built (kept, with the reason)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import attnpass.onnx as aonnx
from attnpass import semantics
from attnpass.validate import run

warnings.filterwarnings("ignore")

B, H, S, T, D = 1, 2, 4, 5, 8


def _two_ops() -> onnx.ModelProto:
    """``Y = Attention(Attention(Q, K, V, softcap=2), K, V, mask, softcap=3, scale=0.5)``, both nodes unnamed."""
    def vi(name: str, shape, t: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, t, list(shape))
    nodes = [helper.make_node("Attention", ["Q", "K", "V"], ["Y1"], softcap=2.0),
             helper.make_node("Attention", ["Y1", "K", "V", "M"], ["Y"], softcap=3.0, scale=0.5)]
    ins = [vi("Q", (B, H, S, D)), vi("K", (B, H, T, D)), vi("V", (B, H, T, D)), vi("M", (S, T))]
    graph = helper.make_graph(nodes, "g", ins, [vi("Y", (B, H, S, D))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("Q", (B, H, S, D)), ("K", (B, H, T, D)), ("V", (B, H, T, D)))}
    m = (0.5 * rng.standard_normal((S, T))).astype(np.float32)
    m[0, 1:] = -np.inf  # row 0 sees one key, row 2 all but two
    m[2, :2] = -np.inf
    return {**f, "M": m}


def test_two_unnamed_softcap_ops_take_ssmax_with_a_scaled_bias(tmp_path: Path) -> None:
    path = tmp_path / "two.onnx"
    onnx.save(_two_ops(), path)
    feeds = _feeds()
    res = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.7, bias=0.3, inputs=feeds)
    assert res.rewritten == [0, 1], res.left
    x = {k: torch.from_numpy(v).double() for k, v in feeds.items()}
    y1 = semantics.ssmax_attention(x["Q"], x["K"], x["V"], s=0.7, b=0.3, softcap=2.0)
    want = semantics.ssmax_attention(y1, x["K"], x["V"], x["M"], scale=0.5, s=0.7, b=0.3, softcap=3.0)
    np.testing.assert_allclose(run(tmp_path / "ssmax.onnx", feeds)["Y"], want.numpy(), atol=1e-5, rtol=1e-4)
    # fused SSMax: the ops are already fused; SSMax goes into their bodies, checked against the unfused rewrite
    fused = aonnx.rewrite(path, tmp_path / "fused.onnx", to="fused", ssmax=True, s=0.7, bias=0.3, target="onnx23", inputs=feeds)
    assert set(fused.left) == {0, 1} and all("function body" in r for r in fused.left.values()), fused.left
    np.testing.assert_allclose(run(tmp_path / "fused.onnx", feeds)["Y"], want.numpy(), atol=1e-5, rtol=1e-4)


def test_op_whose_body_cannot_be_built_is_kept_with_the_reason() -> None:
    """The body depends on the inputs' types: with Q's element type unknown it is not built, the op stays as it was
    (the other op is still rewritten) and the reason names both the soft-capping and the missing type."""
    from attnpass.modelio import load
    from attnpass.passes import onnx as onnx_pass
    from attnpass.rewrite import onnx as onnx_rewrite
    from attnpass.spec import RewriteSpec

    model = load(_two_ops())
    model.graph.inputs[0].type = None
    report = onnx_pass.find(model)
    assert len(report.sites) == 2
    done = onnx_rewrite.emit(model, report, RewriteSpec("ssmax", 0.7))
    first = next(s.index for s in report.sites if s.softmax.inputs[0].name == "Q")
    assert set(done.left) == {first}, done.left
    assert "softcap" in done.left[first] and "type or rank of input 'Q'" in done.left[first], done.left
    ops = [n.op_type for n in model.graph]
    assert ops.count("Attention") == 1 and ops.index("Attention") == 0  # the first op kept, the second expanded


def test_body_whose_site_is_left_is_removed_again(monkeypatch) -> None:
    """When the site found in the body does not take SSMax, the body goes and the op stays, reading its inputs alone."""
    from dataclasses import replace

    from attnpass.modelio import load
    from attnpass.passes import onnx as onnx_pass
    from attnpass.passes.plan import Action
    from attnpass.rewrite import onnx as onnx_rewrite
    from attnpass.rewrite.onnx import body
    from attnpass.spec import RewriteSpec

    real = body.plan_for
    monkeypatch.setattr(body, "plan_for", lambda *a: replace(real(*a), action=Action.LEAVE, reason="a reason of the plan"))
    model = load(_two_ops())
    before = [n.op_type for n in model.graph]
    done = onnx_rewrite.emit(model, onnx_pass.find(model), RewriteSpec("ssmax", 0.7))
    assert set(done.left) == {0, 1} and all("a reason of the plan" in why for why in done.left.values()), done.left
    assert [n.op_type for n in model.graph] == before
    assert all(len(v.uses()) == n for v, n in zip(model.graph.inputs, (1, 2, 2, 1)))  # Q once, K and V twice, M once
