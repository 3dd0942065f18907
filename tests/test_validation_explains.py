"""Validation that explains itself: mask inputs found from the graph (not by name), NaN/inf compared as
values, and a clear message when the original model cannot be validated on generated inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import attnpass.onnx as aonnx
from attnpass import validate as val
from attnpass.cli import main
from attnpass.errors import AttnpassError
from attnpass.maskfeeds import mask_inputs

B, H, S, D = 2, 2, 8, 4
F32_MIN = float(np.finfo(np.float32).min)


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_t", TensorProto.FLOAT, [], [value]))


def _model(mask_name: str, mask_type: int = TensorProto.FLOAT, extra: list[onnx.NodeProto] | None = None,
           extra_inputs: list[onnx.ValueInfoProto] | None = None, out: str = "out", expand: bool = False) -> onnx.ModelProto:
    """``softmax(q k^T * c + mask) v`` with the mask an input named ``mask_name`` (``[B, 1, 1, S]``).

    A bool mask goes through ``Where(mask, 0, finfo.min)`` first; ``expand`` broadcasts it to the scores'
    shape (``Expand(mask, Shape(scores))``: q and k then reach the mask term, but only through a shape);
    ``extra`` nodes may post-process ``att``.
    """
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        _const("scale", 1.0 / np.sqrt(D)),
        helper.make_node("Mul", ["qk", "scale"], ["z"]),
    ]
    bias = mask_name
    if mask_type == TensorProto.BOOL:
        nodes += [_const("zero", 0.0), _const("fill", F32_MIN), helper.make_node("Where", [mask_name, "zero", "fill"], ["bias"])]
        bias = "bias"
    if expand:
        nodes += [helper.make_node("Shape", ["z"], ["zshape"]), helper.make_node("Expand", [bias, "zshape"], ["bias_full"])]
        bias = "bias_full"
    nodes += [
        helper.make_node("Add", ["z", bias], ["zm"]),
        helper.make_node("Softmax", ["zm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["att" if extra else out]),
        *(extra or []),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", H, "seq", D]) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info(mask_name, mask_type, ["batch", 1, 1, "seq"]))
    graph = helper.make_graph(nodes, "attn", inputs + (extra_inputs or []),
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", H, "seq", D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_float_mask_not_named_mask_gets_bias_values_and_ssmax_validates(tmp_path: Path) -> None:
    src = _save(_model("attn_bias"), tmp_path / "bias.onnx")
    assert mask_inputs(aonnx.load(src)) == {"attn_bias": mask_inputs(aonnx.load(src))["attn_bias"]}
    assert mask_inputs(aonnx.load(src))["attn_bias"].style == "bias"
    feeds = val.make_inputs(src)
    bias = feeds["attn_bias"]
    assert bias.dtype == np.float32 and set(np.unique(bias).tolist()) == {0.0, F32_MIN}
    pad = bias.shape[-1] // 4  # the later sequences are padded at the end
    assert (bias[0] == 0).all() and (bias[1, ..., -pad:] == F32_MIN).all() and (bias[1, ..., :-pad] == 0).all()
    res = aonnx.rewrite(src, tmp_path / "ssmax.onnx", to="ssmax", s=0.9)
    assert len(res.rewritten) == 1 and res.self_test.passed and res.validation.passed
    assert res.validation.input_shapes["attn_bias"] == (B, 1, 1, 16)


def test_inputs_reaching_a_mask_only_through_a_shape_are_not_masks(tmp_path: Path) -> None:
    src = _save(_model("attn_bias", expand=True), tmp_path / "expand.onnx")
    found = mask_inputs(aonnx.load(src))
    assert set(found) == {"attn_bias"} and found["attn_bias"].style == "bias"
    feeds = val.make_inputs(src)
    assert len(np.unique(feeds["q"])) > 100  # q stays Gaussian, not a 0/1 pattern


def test_bool_mask_input_follows_the_graph_polarity(tmp_path: Path) -> None:
    """``Where(keep, 0, min)``: True keeps a key, so padding is False (whatever the input is called)."""
    src = _save(_model("key_keep", TensorProto.BOOL), tmp_path / "bool.onnx")
    feeds = val.make_inputs(src)
    keep = feeds["key_keep"]
    pad = keep.shape[-1] // 4
    assert keep.dtype == np.bool_ and keep[0].all() and not keep[1, ..., -pad:].any() and keep[1, ..., :-pad].all()


def test_identical_nonfinite_outputs_compare_equal() -> None:
    r = np.array([[0.0, -np.inf, np.nan], [1.0, np.inf, 2.0]], np.float32)
    assert val.compare({"o": r}, {"o": r.copy()}, 1e-4, 1e-4).passed
    moved = r.copy()
    moved[1, 1] = -np.inf
    rep = val.compare({"o": r}, {"o": moved}, 1e-4, 1e-4)
    assert not rep.passed and "NaN/inf in one model only" in rep.outputs[0].reason
    nan_for_number = r.copy()
    nan_for_number[1, 0] = np.nan
    assert not val.compare({"o": r}, {"o": nan_for_number}, 1e-4, 1e-4).passed
    assert not val.compare({"o": r}, {"o": r + 1.0}, 1e-4, 1e-4).passed
    json.dumps(rep.as_dict(), allow_nan=False)  # strict JSON: no NaN/Infinity tokens


def test_identical_inf_models_validate(tmp_path: Path) -> None:
    """A model whose output holds -inf validates against itself (it did not: inf - inf is NaN)."""
    log = [helper.make_node("Abs", ["att"], ["a"]), _const("zero", 0.0), helper.make_node("Mul", ["a", "zero"], ["a0"]),
           helper.make_node("Log", ["a0"], ["out"])]  # log(0) = -inf everywhere
    src = _save(_model("attn_bias", extra=log), tmp_path / "inf.onnx")
    feeds = val.make_inputs(src)
    assert np.isneginf(val.run(src, feeds)["out"]).all()
    assert val.validate(src, src, feeds).passed


def test_nan_original_gives_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = [helper.make_node("Log", ["x"], ["lx"]), helper.make_node("Add", ["att", "lx"], ["out"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", H, "seq", D])
    src = _save(_model("attn_bias", extra=log, extra_inputs=[x]), tmp_path / "nan.onnx")
    out = tmp_path / "out.onnx"
    with pytest.raises(AttnpassError, match="the original model gives NaN at output out on generated inputs.*--inputs"):
        aonnx.rewrite(src, out, to="ssmax")
    assert main(["rewrite", str(src), "-o", str(out), "--to", "ssmax"]) == 2
    err = capsys.readouterr().err
    assert "original model gives NaN at output out" in err and "--inputs" in err and not out.exists()
    feeds = val.make_inputs(src)
    feeds["x"] = np.abs(feeds["x"]) + 1.0
    np.savez(tmp_path / "feeds.npz", **feeds)
    assert main(["rewrite", str(src), "-o", str(out), "--to", "ssmax", "--inputs", str(tmp_path / "feeds.npz")]) == 0
    assert out.exists()


def test_validate_unrelated_models_says_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _save(_model("attn_bias"), tmp_path / "a.onnx")
    b = _save(_model("attn_bias", out="y"), tmp_path / "b.onnx")
    rep = val.validate(a, b)
    assert not rep.passed and "no output 'out'" in rep.outputs[0].reason and "'y'" in rep.outputs[0].reason
    assert main(["validate", str(a), str(b)]) == 1
    assert "no output 'out'" in capsys.readouterr().out
    c = _save(_model("other_bias"), tmp_path / "c.onnx")
    with pytest.raises(AttnpassError, match=r"takes input\(s\) \['other_bias'\] that the feeds do not have"):
        val.validate(a, c)
