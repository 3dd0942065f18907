"""The ONNX ``Attention`` op itself in MLIR: torch-mlir's importer leaves ``torch.operator "onnx.Attention"``,
which torch-mlir cannot lower.  attnpass sees it as a fused site and replaces it by its loop nest (fused, or
with the SSMax factor inside), so the module compiles; the result is checked against onnxruntime on the
original model with the onnx spec case's own inputs.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass.mlir as am  # noqa: E402
from tests.test_onnx_spec_attention import SPECS, Spec, _build  # noqa: E402

warnings.filterwarnings("ignore")

NONPAD = ["attention_4d_causal_nonpad_batch_prefill", "attention_4d_causal_nonpad_continued_prefill",
          "attention_4d_gqa_causal_nonpad_decode", "attention_4d_causal_nonpad_attn_mask_composition",
          "attention_4d_causal_nonpad_negative_offset_structural_empty"]
#: 4-D configurations the loop nest replaces (plain, causal, float / bool masks, GQA, scale, softcap).
REWRITTEN = ["attention", "attention_causal", "attention_attn_mask", "attention_attn_mask_bool", "attention_gqa",
             "attention_gqa_attn_mask", "attention_scaled", "attention_softcap", "attention_attn_4d_mask_causal",
             "attention_diff_head_sizes",
             # 3-D: heads packed in the last axis ([B, S, H*D]), unpacked around the loop nest and packed back
             "attention_3d", "attention_3d_gqa_causal", "attention_3d_softcap",
             # sliding windows (an index test in the loop nest, key tiles past the window skipped); float16 in and
             # out, computed in float32 inside
             "attention_local_window", "attention_bidirectional_window", "attention_causal_fp16",
             # a KV cache: present = concat(past, new) emitted beside the loop nest, which attends over both
             "attention_with_past_and_present", "attention_gqa_with_past_and_present",
             # causal (and a causal window) over a KV cache: query row i sits at position past_len + i
             "attention_4d_causal_with_past_and_present", "attention_with_past_and_present_qk_matmul_bias_3d_mask_causal",
             "attention_with_past_and_present_qk_matmul_bias_4d_mask_causal", "attention_local_window_with_past",
             # nonpad_kv_seqlen (a cache buffer, L_b valid keys per batch entry): keys j < L_b, causal aligned to their end
             *NONPAD]
#: Left with the reason in the report: (fused only) an op whose probabilities are an output.
LEFT = {"attention_with_qk_matmul_softmax": "probabilities"}


def _op_model(name: str, tmp_path: Path, every_output: bool = False) -> tuple[Path, list[np.ndarray], Any]:
    spec = next((s for s in SPECS if s.export == name), Spec(name))  # the onnx package has more cases than the table
    case = next(c for c in _build(spec) if not c.name.endswith("_expanded"))
    path = tmp_path / f"{name}.onnx"
    onnx.save(case.model, path)
    ins = list(case.data_sets[0][0])
    want = ort.InferenceSession(str(path)).run(None, {vi.name: x for vi, x in zip(case.model.graph.input, ins)})
    return path, ins, want if every_output else want[0]


def _run(module, ins: list[np.ndarray]) -> np.ndarray:
    got = am.compile(module)(*ins)
    return np.asarray(got[0] if isinstance(got, list | tuple) else got)


@pytest.mark.parametrize("name", REWRITTEN)
@pytest.mark.parametrize("to", ["fused", "ssmax"])
def test_attention_op_replaced_and_equal_to_onnxruntime(name: str, to: str, tmp_path: Path) -> None:
    path, ins, want = _op_model(name, tmp_path)
    module = am.import_(path)
    (site,) = am.find(module).sites
    assert site.form == "sdpa" and "onnx.Attention" in " ".join(site.notes)
    kw = {"s": 0.0, "b": 1.0} if to == "ssmax" else {}  # SSMax(s=0, b=1) is the identity
    out, result = am.rewrite(module, to=to, with_report=True, **kw)
    assert len(result.rewritten) == 1, result.left
    text = str(out)
    assert "onnx.Attention" not in text and "attnpass_fused_" in text
    got = _run(out, ins)
    assert got.dtype == want.dtype  # float16 in, float16 out
    tol = 2e-3 if want.dtype == np.float16 else 1e-5  # float16: one rounding of the output
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["attention_local_window", "attention_bidirectional_window"])
def test_attention_op_window_ssmax_counts_the_window(name: str, tmp_path: Path) -> None:
    """SSMax on a windowed op counts ``n`` as the keys inside the window: equal to ``semantics`` with the window as a
    bool mask, and to the rewrite of the same op expanded into its body (where the window is a mask tensor)."""
    import torch

    from attnpass import semantics

    path, ins, _ = _op_model(name, tmp_path)
    q, k, v = (torch.from_numpy(x) for x in ins)
    i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
    left, right = {"attention_local_window": (2, 0), "attention_bidirectional_window": (1, 2)}[name]
    keep = (j >= i - left) & (j <= i + right)
    want = semantics.ssmax_attention(q, k, v, attn_mask=keep, s=0.7).numpy()
    for fused in (False, True):
        got = _run(am.rewrite(am.import_(path), to="ssmax", s=0.7, fused=fused), ins)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    spec = next(s for s in SPECS if s.export == name)
    expanded = next(c for c in _build(spec) if c.name.endswith("_expanded"))
    onnx.save(expanded.model, tmp_path / "expanded.onnx")
    got = _run(am.rewrite(am.import_(tmp_path / "expanded.onnx"), to="ssmax", s=0.7), ins)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_op_window_skips_key_tiles_past_the_window(tmp_path: Path) -> None:
    """Causal with a left window of 2 over 4 queries and 6 keys: keys 4 and 5 are never read (tile of 1 key per
    iteration: the loop ends at key 4), and keys before the window are masked by the index test."""
    path, ins, want = _op_model("attention_local_window", tmp_path)
    out = am.rewrite(am.import_(path), to="fused", tile=1)
    text = str(out)
    (loop,) = re.findall(r"scf\.for %\w+ = %c0\w* to %(\w+) step %c1\w* ", text)  # inside the loop over (b, h)
    assert loop == "c4" and "arith.cmpi uge" in text  # keys [0, 4) visited; j + left >= i tested
    np.testing.assert_allclose(_run(out, ins), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["attention_causal", "attention_3d_gqa_causal"])
def test_attention_op_ssmax_factor_changes_the_output(name: str, tmp_path: Path) -> None:
    """With ``s != 0`` the factor is really applied: the output moves away from the original."""
    path, ins, want = _op_model(name, tmp_path)
    out = am.rewrite(am.import_(path), to="ssmax", s=2.0, b=0.0)
    got = _run(out, ins)
    assert np.isfinite(got).all() and np.abs(got - want).max() > 1e-3
    # row 0 of a causal op attends one key: the factor s log 1 = 0 leaves it as it was ([B, H, S, D] or [B, S, H*D])
    row0 = (..., 0, slice(None)) if got.ndim == 4 else (slice(None), 0)
    np.testing.assert_allclose(got[row0], want[row0], rtol=1e-5, atol=1e-5)


def test_attention_op_3d_reads_head_size_from_the_heads(tmp_path: Path) -> None:
    """A 3-D op's default scale is ``1/sqrt(H*D / q_num_heads)``, not of Q's packed last axis; K/V heads give GQA."""
    path, _, _ = _op_model("attention_3d_gqa_causal", tmp_path)
    (site,) = am.find(am.import_(path)).sites
    assert site.three_d and (site.heads, site.kv_heads, site.head_dim) == (9, 3, 8)
    assert site.scale == pytest.approx(1 / np.sqrt(8))
    text = str(am.rewrite(am.import_(path), to="fused"))
    assert "tensor.expand_shape" in text and "tensor.collapse_shape" in text


@pytest.mark.parametrize("name", sorted(LEFT))
def test_attention_op_left_with_the_reason(name: str, tmp_path: Path) -> None:
    path, _, _ = _op_model(name, tmp_path)
    out, result = am.rewrite(am.import_(path), to="fused", with_report=True)
    assert not result.rewritten and LEFT[name] in " ".join(map(str, result.left.values()))
    assert "onnx.Attention" in str(out)


@pytest.mark.parametrize("name", ["attention_local_window", "attention_bidirectional_window", "attention_causal_fp16"])
def test_expanded_window_and_fp16_fused_equal_to_onnxruntime(name: str, tmp_path: Path) -> None:
    """The same cases expanded into the schema's body: the window arrives as a mask tensor, float16 as float16 masks
    and operands (once refused: "computes in f32 and the site is not f32")."""
    spec = next(s for s in SPECS if s.export == name)
    case = next(c for c in _build(spec) if c.name.endswith("_expanded"))
    path = tmp_path / "expanded.onnx"
    onnx.save(case.model, path)
    ins = list(case.data_sets[0][0])
    want = ort.InferenceSession(str(path)).run(None, {vi.name: x for vi, x in zip(case.model.graph.input, ins)})[0]
    tol = 2e-3 if want.dtype == np.float16 else 1e-5
    for kw in ({"to": "fused"}, {"to": "ssmax", "s": 0.0, "b": 1.0, "fused": True}):
        out, result = am.rewrite(am.import_(path), with_report=True, **kw)
        assert len(result.rewritten) == 1 and "fused via" in " ".join(result.report.sites[0].notes), result.left
        got = _run(out, ins)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


#: The op's other outputs, emitted around the loop nest: present_key/value (4-D and 3-D, GQA), and
#: qk_matmul_output in each mode (1: soft-capped, 2: with the mask, 3: the probabilities, under SSMax only).
EXTRA_OUTPUTS = [("attention_with_past_and_present_qk_matmul_bias_3d_mask", "fused"),
                 ("attention_3d_gqa_with_past_and_present", "fused"),
                 ("attention_with_qk_matmul_softcap", "fused"),
                 ("attention_3d_with_past_and_present_qk_matmul_softmax", "ssmax")]


@pytest.mark.parametrize(("name", "to"), EXTRA_OUTPUTS)
def test_attention_op_every_output_equal_to_onnxruntime(name: str, to: str, tmp_path: Path) -> None:
    path, ins, want = _op_model(name, tmp_path, every_output=True)
    kw = {"s": 0.0, "b": 1.0} if to == "ssmax" else {}
    out, result = am.rewrite(am.import_(path), to=to, with_report=True, **kw)
    assert len(result.rewritten) == 1, result.left
    assert "onnx.Attention" not in str(out)
    got = am.compile(out)(*ins)
    assert isinstance(got, list | tuple) and len(got) == len(want) > 1
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def test_attention_op_kv_cache_ssmax_counts_past_and_new_keys(tmp_path: Path) -> None:
    """SSMax over a KV cache: ``n`` is every key, past and new (18 here), and the probabilities output
    (mode 3) is SSMax's, the same as the one ``Y`` is computed with."""
    path, ins, want = _op_model("attention_3d_with_past_and_present_qk_matmul_softmax", tmp_path, every_output=True)
    q, k, v, mask, pk, pv = ins
    s = 0.7
    got = am.compile(am.rewrite(am.import_(path), to="ssmax", s=s, b=0.0))(*ins)
    b_, h = pk.shape[:2]

    def heads(x: np.ndarray) -> np.ndarray:  # [B, S, H*D] -> [B, H, S, D]
        return x.reshape(b_, x.shape[1], h, -1).transpose(0, 2, 1, 3)

    keys, vals = np.concatenate([pk, heads(k)], 2), np.concatenate([pv, heads(v)], 2)
    qh = heads(q)
    n = keys.shape[2]
    logits = (qh @ keys.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1]) + mask) * (s * np.log(n))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (p @ vals).transpose(0, 2, 1, 3).reshape(want[0].shape)
    np.testing.assert_allclose(np.asarray(got[3]), p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[0]), y, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])  # present_key
    assert np.abs(np.asarray(got[0]) - want[0]).max() > 1e-3  # the factor really applied


def test_expanded_body_with_probabilities_output_left_with_the_onnx_reason(tmp_path: Path) -> None:
    """The schema's function body with ``qk_matmul_output`` mode 3: the probabilities are returned, so MLIR reports
    the site "not fusable" in ONNX's words; SSMax still applies, and both outputs stay onnxruntime's at s=0, b=1."""
    from attnpass.validate import run
    from tests.test_onnx_spec_attention import _case

    spec = next(s for s in SPECS if s.export == "attention_with_qk_matmul_softmax")
    path, feeds, _ = _case(spec, True, tmp_path)
    fused, res = am.rewrite(am.import_(path), to="fused", with_report=True)
    assert not res.rewritten and "used by the return value (a graph output)" in res.left[0]
    out, res = am.rewrite(am.import_(path), to="ssmax", s=0.0, b=1.0, with_report=True)
    assert len(res.rewritten) == 1, res.left
    got, want = am.compile(out)(*feeds.values()), list(run(path, feeds).values())
    assert isinstance(got, list | tuple) and len(got) == len(want) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def test_attention_op_causal_kv_cache_ssmax_counts_past_and_earlier_keys(tmp_path: Path) -> None:
    """Causal over a KV cache of P keys: query row i sits at position P + i, so SSMax's ``n_i = P + i + 1``
    (not ``i + 1``, not every key), in the loop nest and in the key count alike."""
    path, ins, want = _op_model("attention_4d_causal_with_past_and_present", tmp_path)
    q, k, v, pk, pv = ins
    s, p_len = 0.7, pk.shape[2]
    keys, vals = np.concatenate([pk, k], 2), np.concatenate([pv, v], 2)
    rows, n_keys = q.shape[2], keys.shape[2]
    i, j = np.arange(rows)[:, None], np.arange(n_keys)[None, :]
    scores = q @ keys.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])

    def ssmax(n: np.ndarray) -> np.ndarray:
        logits = np.where(j <= p_len + i, scores * (s * np.log(n))[:, None], -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        return (w / w.sum(-1, keepdims=True)) @ vals

    n = p_len + np.arange(rows) + 1.0
    got = _run(am.rewrite(am.import_(path), to="ssmax", s=s, b=0.0), ins)
    np.testing.assert_allclose(got, ssmax(n), rtol=1e-5, atol=1e-5)
    assert np.abs(got - ssmax(np.arange(rows) + 1.0)).max() > 1e-3  # the offset really counted
    assert np.abs(got - want).max() > 1e-3  # the factor really applied


def _cached_causal_model(path: Path, rows: int, new: int, past: int) -> list[np.ndarray]:
    """An opset-23 causal ``Attention`` over a KV cache (``[1, 2, ., 8]``), saved at ``path``; its inputs."""
    shapes = {"Q": rows, "K": new, "V": new, "past_key": past, "past_value": past}
    outs = {"Y": rows, "present_key": past + new, "present_value": past + new}  # onnxruntime wants the presents
    node = onnx.helper.make_node("Attention", ["Q", "K", "V", "", "past_key", "past_value"], list(outs), is_causal=1)
    f32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [node], "cached_causal", [onnx.helper.make_tensor_value_info(n, f32, [1, 2, s, 8]) for n, s in shapes.items()],
        [onnx.helper.make_tensor_value_info(n, f32, [1, 2, s, 8]) for n, s in outs.items()])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)]), path)
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 2, s, 8)).astype(np.float32) for s in shapes.values()]


@pytest.mark.parametrize(("rows", "new", "past", "tile"), [(2, 6, 4, 1), (128, 128, 16, 16)])
def test_attention_op_causal_kv_cache_key_loop_bounds(rows: int, new: int, past: int, tile: int, tmp_path: Path) -> None:
    """The causal key loop ends at ``P + S_q`` (2 queries after 4 cached keys read keys [0, 6) of 10), and the
    query blocks' key ranges (128 queries in blocks of 64) end at ``P + q0 + 64``: equal to onnxruntime."""
    path = tmp_path / "cached.onnx"
    ins = _cached_causal_model(path, rows, new, past)
    want = ort.InferenceSession(str(path)).run(None, dict(zip(["Q", "K", "V", "past_key", "past_value"], ins)))[0]
    for kw in ({"to": "fused"}, {"to": "ssmax", "s": 0.0, "b": 1.0}):
        out = am.rewrite(am.import_(path), tile=tile, **kw)
        if rows == 2:
            (loop,) = re.findall(r"scf\.for %\w+ = %c0\w* to %(\w+) step %c1\w* ", str(out))  # inside the (b, h) loop
            assert loop == f"c{past + rows}"
        np.testing.assert_allclose(_run(out, ins), want, rtol=1e-5, atol=1e-5)


def test_attention_op_causal_kv_cache_masked_scores_follow_the_onnx_reference(tmp_path: Path) -> None:
    """``qk_matmul_output`` mode 2 of a causal op over a KV cache carries the offset causal mask as the onnx
    reference computes it (onnxruntime's mode 2 leaves the causal mask out); ``Y`` and the presents equal both."""
    name = "attention_with_past_and_present_qk_matmul_bias_4d_mask_causal"
    case = next(c for c in _build(Spec(name)) if not c.name.endswith("_expanded"))
    path = tmp_path / f"{name}.onnx"
    onnx.save(case.model, path)
    ins, reference = list(case.data_sets[0][0]), case.data_sets[0][1]
    want = ort.InferenceSession(str(path)).run(None, {vi.name: x for vi, x in zip(case.model.graph.input, ins)})
    got = am.compile(am.rewrite(am.import_(path), to="fused"))(*ins)
    assert isinstance(got, list | tuple) and len(got) == len(want) == len(reference) == 4
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)
    qk = np.asarray(got[3])
    np.testing.assert_allclose(qk, reference[3], rtol=1e-5, atol=1e-5)
    # row i keeps keys j <= P + i of P + S_new: S_new - 1 - i of them masked
    masked = [ins[1].shape[2] - 1 - i for i in range(ins[0].shape[2])]
    assert np.isinf(qk).sum(-1).tolist() == [[masked] * qk.shape[1]] * qk.shape[0]


def test_attention_op_window_over_kv_cache_ssmax_counts_the_offset_window(tmp_path: Path) -> None:
    """A causal left window of 2 over a KV cache of 8 keys (10 in all): row i at position p = 8 + i keeps keys
    [p - 2, p], so ``n = 3, 3, 2, 1`` (the window clipped by the last key): equal to ``semantics`` with that mask."""
    import torch

    from attnpass import semantics

    path, ins, _ = _op_model("attention_local_window_with_past", tmp_path)
    q, k, v, pk, pv = (torch.from_numpy(x) for x in ins)
    keys, vals = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    p = pk.shape[2] + torch.arange(q.shape[-2])[:, None]
    j = torch.arange(keys.shape[-2])[None, :]
    keep = (j >= p - 2) & (j <= p)
    assert keep.sum(-1).tolist() == [3, 3, 2, 1]
    want = semantics.ssmax_attention(q, keys, vals, attn_mask=keep, s=0.7).numpy()
    got = _run(am.rewrite(am.import_(path), to="ssmax", s=0.7), ins)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_op_nonpad_ssmax_counts_the_valid_keys(tmp_path: Path) -> None:
    """SSMax over ``nonpad_kv_seqlen``: ``n`` counts the keys ``j < L_b`` that the causal mask (row ``i`` at
    ``L_b - S_q + i``) and the op's mask keep; equal to ``semantics`` on those keys.  A row with no attendable key
    (a negative position) is 0, never NaN."""
    from tests.test_onnx_spec_attention import _op_reference

    for name in (NONPAD[0], NONPAD[3], NONPAD[4]):  # L_b per batch entry; with the op's mask; rows with no key last
        path, ins, want = _op_model(name, tmp_path)
        model = onnx.load(str(path))
        feeds = {vi.name: x for vi, x in zip(model.graph.input, ins)}
        ref, rows = _op_reference(model, feeds, 0.7, 0.0)
        got = _run(am.rewrite(am.import_(path), to="ssmax", s=0.7, b=0.0), ins)
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, np.where(rows, ref, 0), rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.abs(got - want).max() > 1e-3, name  # the factor really applied
    assert not rows.all() and (got[~rows.repeat(got.shape[-1], -1)] == 0).all()  # the structural-empty case's rows


def _nonpad_model(path: Path, rows: int, keys: int, lens: list[int], **attrs: int) -> tuple[onnx.ModelProto, dict]:
    """An opset-25 ``Attention`` over a cache buffer of ``keys`` keys (``[B, 2, ., 8]``) with ``nonpad_kv_seqlen``."""
    f32, b = onnx.TensorProto.FLOAT, len(lens)
    node = onnx.helper.make_node("Attention", ["Q", "K", "V", "", "", "", "nonpad_kv_seqlen"], ["Y"], **attrs)
    shapes = {"Q": rows, "K": keys, "V": keys}
    graph = onnx.helper.make_graph(
        [node], "nonpad", [onnx.helper.make_tensor_value_info(n, f32, [b, 2, s, 8]) for n, s in shapes.items()]
        + [onnx.helper.make_tensor_value_info("nonpad_kv_seqlen", onnx.TensorProto.INT64, [b])],
        [onnx.helper.make_tensor_value_info("Y", f32, [b, 2, rows, 8])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 25)])
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((b, 2, s, 8)).astype(np.float32) for n, s in shapes.items()}
    return model, feeds | {"nonpad_kv_seqlen": np.array(lens, np.int64)}


@pytest.mark.parametrize(("rows", "keys", "lens", "tile", "attrs"),
                         [(2, 12, [3, 5], 2, {"is_causal": 1, "left_window_size": 1}), (128, 128, [100, 37], 16, {"is_causal": 1})])
def test_attention_op_nonpad_key_loop_ends_at_the_longest_entry(rows: int, keys: int, lens: list[int], tile: int,
                                                                 attrs: dict, tmp_path: Path) -> None:
    """The batch shares one key loop, which ends at ``max_b L_b`` rounded up to a tile: values past it are never read
    (NaN there leaves the output finite), each entry's own padding before it is removed by the index test; a window
    is aligned to the end of the valid keys too.  Equal to onnxruntime on finite values (one query block of 2 rows;
    two query blocks of 64, each with its own key range)."""
    from tests.test_onnx_spec_attention import _op_reference

    path = tmp_path / "nonpad.onnx"
    model, feeds = _nonpad_model(path, rows, keys, lens, **attrs)
    want = ort.InferenceSession(str(path)).run(None, feeds)[0]
    end = -(-max(lens) // tile) * tile
    poisoned = dict(feeds, V=feeds["V"].copy(), K=feeds["K"].copy())
    poisoned["V"][:, :, end:] = np.nan
    poisoned["K"][:, :, end:] = np.nan
    ins = list(poisoned.values())
    runs = [({"to": "fused"}, want)] + ([({"to": "ssmax", "s": 0.7, "b": 0.0}, _op_reference(model, feeds, 0.7, 0.0)[0])]
                                        if rows == 2 else [])
    for kw, ref in runs:
        got = _run(am.rewrite(am.import_(path), tile=tile, **kw), ins)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=str(kw))


def test_expanded_nonpad_decode_sizes_folded_static_and_fused(tmp_path: Path) -> None:
    """The schema's body for a decode step over ``nonpad_kv_seqlen``: its causal mask's row indices are
    ``Range(0, Gather(Shape(Q), -2))``, which torch-mlir leaves ``arange`` of a ``?`` length; the import folds that
    constant length, so the scores are static (no ``?`` anywhere the site reads) and the site fuses.  Fused and
    SSMax(s=0.7, in the loop nest) equal onnxruntime and ``semantics`` (``n`` counts keys ``j < L_b`` only)."""
    from tests.test_onnx_spec_attention import _case, _op_reference

    spec = next(s for s in SPECS if s.export == "attention_4d_gqa_causal_nonpad_decode")
    path, feeds, _ = _case(spec, True, tmp_path)
    op_path, op_feeds, _ = _case(spec, False, tmp_path)
    want = ort.InferenceSession(str(path)).run(None, feeds)[0]
    module = am.import_(path)
    (softmax,) = [line for line in str(module).splitlines() if "torch.aten.softmax" in line]
    assert "?" not in softmax and "[2,4,1,8]" in softmax
    ins = list(feeds.values())
    ref, _ = _op_reference(onnx.load(str(op_path)), op_feeds, 0.7, 0.0)
    for kw, expect in (({"to": "fused"}, want), ({"to": "ssmax", "s": 0.7, "b": 0.0, "fused": True}, ref)):
        out, result = am.rewrite(module, with_report=True, **kw)
        assert len(result.rewritten) == 1 and "fused via" in " ".join(result.report.sites[0].notes), result.left
        np.testing.assert_allclose(_run(out, ins), expect, rtol=1e-5, atol=1e-5, err_msg=str(kw))
    assert np.abs(ref - want).max() > 1e-3  # SSMax really differs from the original here


def test_attention_op_nonpad_probabilities_output_under_ssmax(tmp_path: Path) -> None:
    """``qk_matmul_output`` mode 3 beside the loop nest takes ``L_b`` too: with SSMax(s=0, b=1) the probabilities and
    ``Y`` equal the onnx reference (keys ``j >= L_b`` and above the aligned diagonal at exactly 0)."""
    from onnx.reference import ReferenceEvaluator

    f32 = onnx.TensorProto.FLOAT
    node = onnx.helper.make_node("Attention", ["Q", "K", "V", "", "", "", "L"], ["Y", "", "", "P"], is_causal=1,
                                 qk_matmul_output_mode=3)
    shapes = {"Q": [2, 2, 3, 8], "K": [2, 2, 6, 8], "V": [2, 2, 6, 8]}
    graph = onnx.helper.make_graph(
        [node], "nonpad_probs", [onnx.helper.make_tensor_value_info(n, f32, s) for n, s in shapes.items()]
        + [onnx.helper.make_tensor_value_info("L", onnx.TensorProto.INT64, [2])],
        [onnx.helper.make_tensor_value_info("Y", f32, [2, 2, 3, 8]), onnx.helper.make_tensor_value_info("P", f32, [2, 2, 3, 6])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 24)])
    onnx.save(model, tmp_path / "probs.onnx")
    rng = np.random.default_rng(0)
    ins = [rng.standard_normal(s).astype(np.float32) for s in shapes.values()] + [np.array([4, 6], np.int64)]
    want = ReferenceEvaluator(model).run(None, dict(zip("QKVL", ins)))
    got = am.compile(am.rewrite(am.import_(tmp_path / "probs.onnx"), to="ssmax", s=0.0, b=1.0))(*ins)
    assert isinstance(got, list | tuple) and len(got) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got[1])[0, :, :, 4:] == 0).all()  # batch entry 0 holds 4 keys
