"""The fused loop nest's schedule: query blocks, each visiting only the key tiles its rows may attend.

Structure: with enough query rows the loop nest is a loop over query blocks around the loop over key tiles, the
key loop's bounds computed per block (causal: up to the block's diagonal; window: from the block's first row minus
the left window), constants when nothing can be skipped.  Numerics: against ``kernels/reference.py`` for causal,
non-causal, GQA, masks, SSMax and windows (the ONNX ``Attention`` op's window attributes), sizes that make several
blocks and a partial first / last key tile.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
from onnx import TensorProto, helper

import attnpass.mlir as am
from attnpass.kernels import reference
from attnpass.rewrite.mlir.fused import FusedSpec, fused_func, query_block
from tests.test_mlir_builders import _func, _ops

warnings.filterwarnings("ignore")
F = torch.nn.functional


def _spec(s_q=256, s_k=256, tile=32, causal=False, window=None) -> FusedSpec:
    return FusedSpec(batch=(1, 2), s_q=s_q, s_k=s_k, d=8, dv=8, q_shape=(1, 2, s_q, 8), k_shape=(1, 2, s_k, 8),
                     v_shape=(1, 2, s_k, 8), k_transposed=False, k_groups=1, v_groups=1, scale=0.125, softcap=None,
                     causal=causal, masks=[], tile=tile, window=window)


_ALIVE: list = []  # parsed modules the returned ops point into (freed modules would leave dangling ops)


def _loops(text: str) -> list[tuple[int, object]]:
    mod, f = _func(text, "attn")
    _ALIVE.append(mod)
    return [(depth, o) for name, depth, o in _ops(f) if name in ("scf.for", "scf.forall")]


def test_causal_blocks_bound_the_key_loop_by_the_diagonal() -> None:
    text = fused_func("attn", _spec(causal=True))
    (d0, blocks), (d1, keys) = _loops(text)
    assert (d0, d1) == (0, 1) and query_block(_spec()) == 64
    assert blocks.name == "scf.forall" and keys.name == "scf.for", "query blocks in parallel, key tiles in order"
    # one head's block per iteration: 2 heads x 4 blocks of 64 rows
    assert str(blocks).split("(", 2)[2].startswith("8)")
    assert [str(r.type) for r in keys.results] == ["tensor<1x1x64xf32>", "tensor<1x1x64xf32>", "tensor<1x1x64x8xf32>"]
    upper = keys.operands[1].owner
    assert upper.name == "arith.minsi", "the key loop ends at min(S_k, tile-rounded q0 + block), not at S_k"
    assert "tensor.parallel_insert_slice" in text and "x256x256x" not in text  # no S_q x S_k tensor


def test_non_causal_blocks_visit_every_key_tile_with_constant_bounds() -> None:
    text = fused_func("attn", _spec())
    (_, _), (_, keys) = _loops(text)
    assert [o.owner.name for o in keys.operands[:3]] == ["arith.constant"] * 3


def test_left_window_starts_the_key_loop_at_the_block_minus_the_window() -> None:
    text = fused_func("attn", _spec(causal=True, window=(40, -1)))
    (_, _), (_, keys) = _loops(text)
    assert keys.operands[0].owner.name == "arith.muli", "lower bound: floor((q0 - left) / tile) * tile"


def test_few_rows_stay_one_block_per_head_in_parallel() -> None:
    """Too few rows for blocks (decode, short prompts): the parallel loop runs over the heads alone."""
    assert query_block(_spec(s_q=100)) is None
    (d0, heads), (d1, keys) = _loops(fused_func("attn", _spec(s_q=100)))
    assert (d0, d1, heads.name) == (0, 1, "scf.forall") and str(heads).split("(", 2)[2].startswith("2)")
    assert str(keys.results[2].type) == "tensor<1x1x100x8xf32>"
    one = dataclasses.replace(_spec(s_q=100), batch=(1, 1), q_shape=(1, 1, 100, 8), k_shape=(1, 1, 256, 8),
                              v_shape=(1, 1, 256, 8))
    assert [o.name for _, o in _loops(fused_func("attn", one))] == ["scf.for"], "one head, one block: no parallel loop"


class _Sdpa(torch.nn.Module):
    def __init__(self, causal: bool, gqa: bool = False):
        super().__init__()
        self.causal, self.gqa = causal, gqa

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=self.gqa)


@pytest.mark.parametrize("causal,gqa,masked,s_k", [(True, False, False, 200), (False, True, False, 256),
                                                   (False, False, True, 208), (True, True, False, 192)])
def test_blocked_loop_nest_equals_the_reference(causal: bool, gqa: bool, masked: bool, s_k: int) -> None:
    """192 query rows (3 blocks of 64) over tiles of 32 keys; 200 and 208 keys end in a partial tile."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 192, 16, generator=g)
    k, v = (torch.randn(1, 2 if gqa else 4, s_k, 16, generator=g) for _ in range(2))
    args = [q, k, v]
    mask = None
    if masked:
        mask = torch.randn(1, 1, 192, s_k, generator=g)
        mask[..., 150:] = torch.finfo(torch.float32).min
        args.append(mask)
    module = am.import_(_Sdpa(causal, gqa), tuple(args))
    # SDPA's is_causal is top-left (key j <= query i); the reference's is bottom-right, so it gets the mask
    ref_mask = mask if not causal else torch.arange(s_k)[None, :] <= torch.arange(192)[:, None]
    want, _ = reference.attention_forward(q, k, v, attn_mask=ref_mask, enable_gqa=gqa)
    fused, result = am.rewrite(module, to="fused", tile=32, with_report=True)
    assert "fused via" in " ".join(result.report.sites[0].notes)
    np.testing.assert_allclose(am.compile(fused, opt_level=0)(*args).numpy(), want.numpy(), rtol=1e-5, atol=2e-6)
    s = torch.tensor([0.6, 0.5, 0.4, 0.3])
    want, _ = reference.attention_forward(q, k, v, attn_mask=ref_mask, enable_gqa=gqa, ssmax_s=s)
    ssmax = am.rewrite(module, to="ssmax", s=s.tolist(), fused=True, tile=32)
    np.testing.assert_allclose(am.compile(ssmax, opt_level=0)(*args).numpy(), want.numpy(), rtol=1e-5, atol=2e-6)


def _window_model(path, s: int, left: int, right: int, causal: int) -> str:
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, s, 8]) for n in ("Q", "K", "V", "Y")]
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=causal, left_window_size=left,
                            right_window_size=right)
    model = helper.make_model(helper.make_graph([node], "w", info[:3], info[3:]), opset_imports=[helper.make_opsetid("", 25)])
    model.ir_version = 13  # what onnx writes for opset 25 (the window attributes)
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize("left,right,causal", [(40, -1, 1), (50, 70, 0)])
def test_window_blocks_equal_the_reference(left: int, right: int, causal: int, tmp_path) -> None:
    s = 256
    path = _window_model(tmp_path / "w.onnx", s, left, right, causal)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, s, 8, generator=g) for _ in range(3))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    keep = (j >= i - left) & ((j <= i + right) if right >= 0 else True) & ((j <= i) if causal else True)
    want, _ = reference.attention_forward(q, k, v, attn_mask=keep)
    fused = am.rewrite(am.import_(path), to="fused", tile=32)
    got = am.compile(fused, opt_level=0)(q.numpy(), k.numpy(), v.numpy())
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("elem", ["bf16", "f16"])
def test_half_inputs_are_widened_once_and_the_output_narrowed(elem: str) -> None:
    """bf16 / f16 operands: widened to f32 on entry (3 converts), f32 inside, the output narrowed once; run through a
    wrapper that rounds f32 inputs to the half type, equal to the reference on the rounded inputs."""
    from attnpass.lowering import mlir as lowering
    from attnpass.rewrite.mlir import builders as bl

    sp = dataclasses.replace(_spec(s_q=128, s_k=96, causal=True), elem=elem)
    body = fused_func("attn", sp)
    assert body.count("arith.extf") == 3 and body.count("arith.truncf") == 1 and "xf32>" in body
    t = bl.Ssa()
    shapes = {"q": (1, 2, 128, 8), "k": (1, 2, 96, 8), "v": (1, 2, 96, 8)}
    out_shape = (1, 2, 128, 8)
    f32_args = ", ".join(f"%{n}: {bl.tensor_type(s, 'f32')}" for n, s in shapes.items())
    t.emit(f"func.func @f({f32_args}) -> {bl.tensor_type(out_shape, 'f32')} {{", 1)
    halves = [bl.convert(t, f"%{n}", s, "f32", elem, 2) for n, s in shapes.items()]
    types = ", ".join(bl.tensor_type(s, elem) for s in shapes.values())
    o = t.op("o", f"func.call @attn({', '.join(halves)}) : ({types}) -> {bl.tensor_type(out_shape, elem)}", 2)
    wide = bl.convert(t, o, out_shape, elem, "f32", 2)
    t.emit(f"return {wide} : {bl.tensor_type(out_shape, 'f32')}")
    t.emit("}", 1)
    fn = lowering.compile_module("module {\n" + t.text() + "\n" + body + "\n}", from_linalg=True, func_name="f", opt_level=0)
    g = torch.Generator().manual_seed(3)
    dt = torch.bfloat16 if elem == "bf16" else torch.float16
    q, k, v = (torch.randn(*s, generator=g) for s in shapes.values())
    got = torch.from_numpy(np.asarray(fn(q.numpy(), k.numpy(), v.numpy())))
    keep = torch.arange(96)[None, :] <= torch.arange(128)[:, None]
    want, _ = reference.attention_forward(*(x.to(dt).float() for x in (q, k, v)), attn_mask=keep, scale=0.125)
    assert torch.equal(got, got.to(dt).float()), "the output is rounded to the half type"
    step = 2.0 ** -7 if elem == "bf16" else 2.0 ** -10  # one rounding of the f32 result
    torch.testing.assert_close(got, want, rtol=step, atol=step)


def test_few_query_rows_run_one_iteration_per_head_and_equal_the_reference(monkeypatch) -> None:
    """Decode-like shapes (B=2, 4 query heads over 2 KV heads, 5 query rows, a padding mask): the parallel loop runs
    over the 8 batch x head slices, each reading its KV head, with the same bits on 1 and 3 threads."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k, v = (torch.randn(2, 2, 96, 16, generator=g) for _ in range(2))
    mask = torch.randn(2, 1, 1, 96, generator=g)
    mask[1, ..., 70:] = torch.finfo(torch.float32).min
    fused = am.rewrite(am.import_(_Sdpa(False, True), (q, k, v, mask)), to="fused", tile=32)
    assert "scf.forall (%" in str(am.lower(fused, "linalg")) and ") in (8)" in str(am.lower(fused, "linalg"))
    fn = am.compile(fused, opt_level=0)
    got = {}
    for n in (1, 3):
        monkeypatch.setenv("ATTNPASS_THREADS", str(n))
        got[n] = fn(q, k, v, mask).numpy()
    np.testing.assert_array_equal(got[1], got[3])
    want, _ = reference.attention_forward(q, k, v, attn_mask=mask, enable_gqa=True)
    np.testing.assert_allclose(got[1], want.numpy(), rtol=1e-5, atol=2e-6)


def test_the_scale_multiplies_q_once_and_plain_tiles_skip_the_logits_pass() -> None:
    """``scale (q . k) = (scale q) . k``: one multiply per element of Q before the loops, none per logit; with no mask,
    cap or factor the logits of a tile are its scores (no pass over the tile), a causal tile still masks."""
    plain, causal = fused_func("attn", _spec()), fused_func("attn", _spec(causal=True))
    for text in (plain, causal):
        head, loops = text.split("scf.forall", 1)
        assert "0.125" in head and "0.125" not in loops
    assert "arith.cmpi ule" not in plain and "arith.cmpi ule" in causal
    per_tile = [t.split("scf.for %", 1)[1].count("linalg.generic") for t in (plain, causal)]
    assert per_tile[1] == per_tile[0] + 1, "the causal tile's logits pass is the only extra one"
