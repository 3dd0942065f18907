"""The ONNX adapter's constant-only values: TorchScript's causal mask from static lengths, its repeat_interleave."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from attnpass.passes.kinds import Kind
from attnpass.passes.onnx import OnnxAdapter


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value, name))


def _mask_model(q_dims: list) -> ir.Model:
    """``Where(Equal(Trilu(Expand(1, [S_q, S_k])), 0), -inf, 0)`` with S_q, S_k read off ``Shape(q)``, as TorchScript does."""
    nodes = [
        helper.make_node("Shape", ["q"], ["shape"]),
        _const("m2", np.array([-2], np.int64)), _const("m1", np.array([-1], np.int64)),
        _const("big", np.array([2**62], np.int64)),
        helper.make_node("Slice", ["shape", "m2", "m1"], ["sq"]),
        helper.make_node("Slice", ["shape", "m2", "m1"], ["sk"]),
        helper.make_node("Concat", ["sq", "sk"], ["target"], axis=0),
        _const("one", np.array(1.0, np.float32)), _const("zero", np.array(0.0, np.float32)),
        _const("ninf", np.array(-np.inf, np.float32)),
        helper.make_node("Expand", ["one", "target"], ["ones"]),
        helper.make_node("Trilu", ["ones"], ["tril"], upper=0),
        helper.make_node("Equal", ["tril", "zero"], ["masked"]),
        helper.make_node("Where", ["masked", "ninf", "zero"], ["mask"]),
        # K repeated to the query heads the way TorchScript exports repeat_interleave(2, dim=1)
        _const("ax", np.array([2], np.int64)), _const("reps", np.array([1, 1, 2, 1, 1], np.int64)),
        helper.make_node("Unsqueeze", ["k", "ax"], ["k5"]),
        helper.make_node("Tile", ["k5", "reps"], ["k_rep"]),
        _const("reps_wrong", np.array([1, 2, 1, 1], np.int64)),
        helper.make_node("Tile", ["k", "reps_wrong"], ["k_tiled"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, q_dims),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 2, 5, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("mask", "k_rep", "k_tiled")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _value(model: ir.Model, name: str) -> ir.Value:
    (v,) = [o for n in model.graph for o in n.outputs if o.name == name]
    return v


def test_a_mask_built_from_fixed_lengths_is_static_and_its_values_are_read() -> None:
    model = _mask_model([2, 4, 5, 8])
    ad = OnnxAdapter(model)
    mask = _value(model, "mask")
    assert ad.is_static(mask)
    got = ad.static_value(mask)
    assert got is not None and got.shape == (5, 5)
    np.testing.assert_array_equal(got, np.where(np.tril(np.ones((5, 5))) == 0, -np.inf, 0.0))
    # a size limit below the mask's 25 elements: not read
    assert OnnxAdapter(model).static_value(mask, limit=24) is None


def test_a_mask_from_a_run_time_length_is_not_static() -> None:
    model = _mask_model([2, 4, "seq", 8])
    ad = OnnxAdapter(model)
    assert not ad.is_static(_value(model, "mask"))
    assert ad.static_value(_value(model, "mask")) is None
    assert not ad.is_static(_value(model, "k_rep"))  # an activation stays an activation


def test_tile_of_a_new_size_one_axis_reads_as_expand_and_other_tiles_do_not() -> None:
    model = _mask_model([2, 4, 5, 8])
    ad = OnnxAdapter(model)
    rep, tiled = _value(model, "k_rep"), _value(model, "k_tiled")
    assert ad.kind(rep.producer()) is Kind.EXPAND
    assert ad.shape(rep) == (2, 2, 2, 5, 8)
    assert ad.kind(tiled.producer()) is Kind.OTHER  # tiling a 2-head axis repeats heads in another order
