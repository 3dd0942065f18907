"""ONNX consumers of the probabilities that read no element of them are not escapes; real escapes are reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import attnpass.onnx as aonnx

B, H, S, D = 2, 3, 5, 4


def _model(extra_nodes: list, extra_outputs: list) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "V"], ["Y"]),
        *extra_nodes,
    ]
    io = [helper.make_tensor_value_info(n, f, [B, H, S, D]) for n in ("Q", "K", "V")]
    outs = [helper.make_tensor_value_info("Y", f, [B, H, S, D]), *extra_outputs]
    inits = [helper.make_tensor("scale", f, [], [D ** -0.5]), helper.make_tensor("zero", f, [], [0.0])]
    graph = helper.make_graph(nodes, "g", io, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _feeds() -> dict:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((B, H, S, D)).astype(np.float32) for n in ("Q", "K", "V")}


def test_type_shape_size_and_dead_consumers_are_not_uses(tmp_path: Path) -> None:
    extra = [
        helper.make_node("CastLike", ["zero", "p"], ["zero_like_p"]),  # p only gives the type
        helper.make_node("Shape", ["p"], ["p_shape"]),
        helper.make_node("Size", ["p"], ["p_size"]),
        helper.make_node("Neg", ["p"], ["unused"]),  # dead: nobody reads it
        helper.make_node("Add", ["Y", "zero_like_p"], ["Y2"]),
    ]
    model = _model(extra, [helper.make_tensor_value_info("p_shape", TensorProto.INT64, [4]),
                           helper.make_tensor_value_info("p_size", TensorProto.INT64, []),
                           helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [B, H, S, D])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = aonnx.find(path)
    assert len(report) == 1 and report[0].fusable, report[0].fuse_blocker
    res = aonnx.rewrite(path, tmp_path / "fused.onnx", to="fused", inputs=_feeds())
    assert len(res.rewritten) == 1 and res.validation.passed


def test_probabilities_as_a_graph_output_are_not_fusable_but_take_ssmax(tmp_path: Path) -> None:
    model = _model([helper.make_node("Identity", ["p"], ["probs"])],
                   [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [B, H, S, S])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = aonnx.find(path)
    assert len(report) == 1 and not report[0].fusable
    assert "(a graph output)" in report[0].fuse_blocker
    res = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.0, bias=1.0, inputs=_feeds())
    assert len(res.rewritten) == 1 and res.validation.passed
