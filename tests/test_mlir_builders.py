"""Structure of the MLIR the rewrites emit, builder by builder, and the fused / SSMax functions they compose.

Each named builder is wrapped in a public function, parsed with the package's torch-mlir context
(the parser verifies it), checked for the ops its formula needs, and JIT-run against numpy.
The composed functions are checked for the shape of the online-softmax loop nest.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

from attnpass.lowering import mlir as lowering  # noqa: E402
from attnpass.passes.match import MaskTerm  # noqa: E402
from attnpass.rewrite.mlir import builders as bl  # noqa: E402
from attnpass.rewrite.mlir.fused import FusedSpec, fused_func  # noqa: E402
from attnpass.rewrite.mlir.ssmax import KeyMasks, SsmaxParams, ssmax_func  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def _ops(op, depth=0, out=None):
    """Every op under ``op`` as (name, loop depth in scf.for / scf.forall, the op)."""
    out = [] if out is None else out
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                o = inner.operation
                out.append((o.name, depth, o))
                _ops(o, depth + (o.name in ("scf.for", "scf.forall")), out)
    return out


def _func(text: str, name: str):
    mod = lowering.parse(text, "generated function")
    funcs = [op.operation for op in mod.body.operations if op.operation.attributes["sym_name"].value == name]
    assert len(funcs) == 1
    return mod, funcs[0]


def _wrap(args: str, result_ty: str, build) -> str:
    """A public ``@f(args) -> result_ty`` whose body is one builder call."""
    t = bl.Ssa()
    t.emit(f"func.func @f({args}) -> {result_ty} {{", 1)
    r = build(t)
    t.emit(f"return {r} : {result_ty}")
    t.emit("}", 1)
    return t.text()


def _run(text: str, *arrays: np.ndarray) -> np.ndarray:
    return lowering.compile_module(text, from_linalg=True, func_name="f", opt_level=0)(*arrays)


def _generics(func) -> list:
    return [o for name, _, o in _ops(func) if name == "linalg.generic"]


def _iterators(generic) -> list[str]:
    return re.findall(r"#linalg\.iterator_type<(\w+)>", str(generic.attributes["iterator_types"]))


def _body_ops(generic) -> set[str]:
    return {name for name, _, _ in _ops(generic)}


RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ one builder at a time

def test_reduce_max_is_a_row_reduction_and_computes_the_running_max():
    text = _wrap("%x: tensor<3x8xf32>, %m: tensor<3xf32>", "tensor<3xf32>", lambda t: bl.reduce_max(
        t, ["i", "j"], bl.Operand("%x", (3, 8), "(i, j)"), bl.Operand("%m", (3,), "(i)"), 2))
    _, f = _func(text, "f")
    (g,) = _generics(f)
    assert _iterators(g) == ["parallel", "reduction"] and "arith.maximumf" in _body_ops(g)
    x, m = RNG.standard_normal((3, 8), dtype=np.float32), np.array([-np.inf, 0.0, 5.0], np.float32)
    np.testing.assert_array_equal(_run(text, x, m), np.maximum(m, x.max(-1)))


def test_reduce_sum_adds_the_row_to_the_carried_normaliser():
    text = _wrap("%x: tensor<3x8xf32>, %l: tensor<3xf32>", "tensor<3xf32>", lambda t: bl.reduce_sum(
        t, ["i", "j"], bl.Operand("%x", (3, 8), "(i, j)"), bl.Operand("%l", (3,), "(i)"), 2))
    _, f = _func(text, "f")
    (g,) = _generics(f)
    assert _iterators(g) == ["parallel", "reduction"] and "arith.addf" in _body_ops(g)
    x, lv = RNG.standard_normal((3, 8), dtype=np.float32), np.array([1.0, 2.0, 0.0], np.float32)
    np.testing.assert_allclose(_run(text, x, lv), lv + x.sum(-1), rtol=1e-6, atol=1e-6)  # reassociated sum


def test_exp_sub_uses_zero_base_for_a_row_that_saw_no_key():
    text = _wrap("%x: tensor<2x4xf32>, %m: tensor<2xf32>", "tensor<2x4xf32>", lambda t: bl.exp_sub(
        t, ["i", "j"], bl.Operand("%x", (2, 4), "(i, j)"), bl.Operand("%m", (2,), "(i)"), (2, 4), 2))
    _, f = _func(text, "f")
    (g,) = _generics(f)
    assert _iterators(g) == ["parallel", "parallel"]
    # exp as arithmetic (math.floor, fma, a bit-built 2^k), no libm call: LLVM vectorises the loop
    assert {"arith.subf", "math.floor", "math.fma", "arith.bitcast", "arith.cmpf", "arith.select"} <= _body_ops(g)
    assert "math.exp" not in _body_ops(g)
    x = np.array([[0.0, 1.0, -1.0, 2.0], [-np.inf] * 4], np.float32)
    m = np.array([2.0, -np.inf], np.float32)
    got = _run(text, x, m)
    np.testing.assert_allclose(got[0], np.exp(x[0] - 2.0), rtol=1e-6)
    np.testing.assert_array_equal(got[1], np.zeros(4, np.float32))  # exp(-inf - 0), not NaN


def test_exp_poly_is_within_two_ulp_of_exp_and_exact_at_the_edges():
    """The loop nest's exp over the range it sees (``x <= 0``): 2 ulp of float64's exp, -inf and the underflow
    range give exactly 0 (a removed key adds nothing), NaN stays NaN."""
    text = _wrap("%x: tensor<4096xf32>", "tensor<4096xf32>", lambda t: bl.generic(
        t, ["i"], [bl.Operand("%x", (4096,), "(i)")], bl.Operand(bl.empty(t, (4096,), 2), (4096,), "(i)"), ["parallel"],
        lambda a, i: bl.exp_poly(t, a[0], i), 2))
    x = -np.geomspace(1e-8, 87.0, 4090).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, -87.5, -1e30, -np.inf, np.nan])])
    got = _run(text, x)
    want = np.exp(x[:4092].astype(np.float64))
    ulp = np.abs(got[:4092] - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 2.0, (ulp.max(), x[np.argmax(ulp)])
    np.testing.assert_array_equal(got[4092:5], 0.0)
    assert np.isnan(got[-1])


def test_rescale_broadcasts_the_row_factor():
    text = _wrap("%a: tensor<2x3x5xf32>, %f: tensor<2x3xf32>", "tensor<2x3x5xf32>", lambda t: bl.rescale(
        t, ["b", "i", "e"], bl.Operand("%a", (2, 3, 5), "(b, i, e)"), bl.Operand("%f", (2, 3), "(b, i)"), (2, 3, 5), 2))
    a, f = RNG.standard_normal((2, 3, 5), dtype=np.float32), RNG.standard_normal((2, 3), dtype=np.float32)
    np.testing.assert_allclose(_run(text, a, f), a * f[..., None], rtol=1e-6)


def test_matmul_tile_reduces_over_the_named_dim_with_fastmath():
    def build(t):
        acc = bl.Operand(bl.fill(t, (4, 6), "0.0", 2), (4, 6), "(i, j)")
        return bl.matmul_tile(t, ["i", "j", "e"], bl.Operand("%q", (4, 3), "(i, e)"),
                              bl.Operand("%k", (6, 3), "(j, e)"), acc, "e", 2)

    text = _wrap("%q: tensor<4x3xf32>, %k: tensor<6x3xf32>", "tensor<4x6xf32>", build)
    _, f = _func(text, "f")
    (g,) = _generics(f)
    assert _iterators(g) == ["parallel", "parallel", "reduction"]
    assert "fastmath<reassoc,contract>" in str(g)
    q, k = RNG.standard_normal((4, 3), dtype=np.float32), RNG.standard_normal((6, 3), dtype=np.float32)
    np.testing.assert_allclose(_run(text, q, k), q @ k.T, rtol=1e-5, atol=1e-6)


def test_divide_rows_gives_zero_for_an_empty_row_and_keeps_nan():
    text = _wrap("%a: tensor<3x2xf32>, %l: tensor<3xf32>", "tensor<3x2xf32>", lambda t: bl.divide_rows(
        t, ["i", "e"], bl.Operand("%a", (3, 2), "(i, e)"), bl.Operand("%l", (3,), "(i)"), (3, 2), 2))
    a = np.array([[2.0, 4.0], [0.0, 0.0], [np.nan, 1.0]], np.float32)
    got = _run(text, a, np.array([2.0, 0.0, 1.0], np.float32))
    np.testing.assert_array_equal(got[:2], [[1.0, 2.0], [0.0, 0.0]])
    assert np.isnan(got[2, 0]) and got[2, 1] == 1.0


def test_causal_and_mask_bodies_inside_a_generic():
    term = MaskTerm("bool", None, None, attend_when=False)  # True marks a removed key
    mask = bl.MaskIn(term, "%mk", (4, 4), "i1")

    def build(t):
        def body(a, i):
            _, ok = bl.mask_body(t, [mask], [a[1]], i)
            ok = bl.both(t, ok, bl.causal_test(t, 0, 1, None, i), i)
            return t.op("x", f"arith.select {ok}, {a[0]}, {bl.constant(t, -math.inf, i)} : f32", i)

        out = bl.Operand(bl.empty(t, (4, 4), 2), (4, 4), "(i, j)")
        return bl.generic(t, ["i", "j"], [bl.Operand("%x", (4, 4), "(i, j)"), bl.Operand("%mk", (4, 4), "(i, j)", "i1")],
                          out, [bl.PAR, bl.PAR], body, 2)

    text = _wrap("%x: tensor<4x4xf32>, %mk: tensor<4x4xi1>", "tensor<4x4xf32>", build)
    _, f = _func(text, "f")
    (g,) = _generics(f)
    assert {"linalg.index", "arith.cmpi", "arith.xori", "arith.andi"} <= _body_ops(g)
    x = RNG.standard_normal((4, 4), dtype=np.float32)
    removed = np.zeros((4, 4), bool)
    removed[2, 0] = True
    want = np.where(np.tril(np.ones((4, 4), bool)) & ~removed, x, -np.inf)
    np.testing.assert_array_equal(_run(text, x, removed), want)


def test_tensor_type_never_prints_none():
    assert bl.tensor_type((None, 6), "f32") == "tensor<?x6xf32>"
    assert "None" not in bl.tensor_type((2, None, None), "i1")


# ------------------------------------------------------------------ the composed functions

def _spec(s_q=40, s_k=48, tile=16, causal=False, ssmax=None, masks=()):
    return FusedSpec(batch=(1, 2), s_q=s_q, s_k=s_k, d=8, dv=8, q_shape=(1, 2, s_q, 8), k_shape=(1, 2, s_k, 8),
                     v_shape=(1, 2, s_k, 8), k_transposed=False, k_groups=1, v_groups=1, scale=0.125, softcap=None,
                     causal=causal, masks=list(masks), tile=tile, ssmax=ssmax)


def test_fused_function_is_one_loop_over_key_tiles_carrying_three_states():
    text = fused_func("attn", _spec())
    _, f = _func(text, "attn")
    ops = _ops(f)
    loops = [o for name, _, o in ops if name == "scf.for"]
    assert len(loops) == 1
    (loop,) = loops
    # one head per iteration of the parallel loop around it
    assert [str(r.type) for r in loop.results] == ["tensor<1x1x40xf32>", "tensor<1x1x40xf32>", "tensor<1x1x40x8xf32>"]
    at = next(depth for name, depth, _ in ops if name == "scf.for") + 1
    in_loop = [o for name, depth, o in ops if depth == at and name == "linalg.generic"]
    reductions = [g for g in in_loop if _iterators(g)[-1] == "reduction" and "arith.maximumf" in _body_ops(g)]
    assert len(reductions) == 1, "one max reduction per tile"
    assert sum("fastmath<reassoc,contract>" in str(g) for g in in_loop) == 2, "Q K^T and P V"
    assert sum("math.fma" in _body_ops(g) for g in in_loop) == 2, "p = exp(z - m') and alpha = exp(m - m')"
    assert not re.search(r"tensor<[0-9x]*40x48x", text), "no S_q x S_k tensor"
    # not causal: no index test (no row index read); the only indices read are the reduced dims', where the matmuls
    # and the row max / sum take their start value (``builders.matmul_from`` / ``reduce_from``)
    idx = re.findall(r"(%\w+) = linalg.index (\d)", text)
    assert idx and all(d != "2" and f"arith.cmpi eq, {n}, " in text for n, d in idx), idx


def test_fused_tail_tile_is_emitted_after_the_loop():
    text = fused_func("attn", _spec(s_k=40, tile=16))  # 2 full tiles + 8
    _, f = _func(text, "attn")
    ops = _ops(f)
    at = next(depth for name, depth, _ in ops if name == "scf.for")  # inside the parallel loop over the heads
    after = [o for name, depth, o in ops if depth == at and name == "linalg.generic"]
    assert any("tensor<1x1x40x8xf32>" in str(g.results[0].type) and _iterators(g)[-2:] == ["reduction", "parallel"]
               for g in after), "the tail's P V matmul runs outside the loop"


def test_causal_fused_holds_the_index_comparison_against_the_tile_offset():
    text = fused_func("attn", _spec(causal=True))
    _, f = _func(text, "attn")
    cmp = [o for name, depth, o in _ops(f) if name == "arith.cmpi"]
    first = [o for o in cmp if "arith.cmpi eq" in str(o)]  # the reductions' start test (``builders.first_step``)
    assert len(first) == 3, "Q K^T (register blocks; P V's 8 columns are none), the row max and sum start at index 0"
    cmp = [o for o in cmp if o not in first]
    assert cmp and all("ule" in str(o) for o in cmp)
    assert any(name == "arith.addi" and depth == 1 for name, depth, _ in _ops(f)), "j0 + j inside the loop"


def test_fused_ssmax_holds_the_log_factor_before_the_loop():
    ss = SsmaxParams(heads=2, s=[0.5, 0.7], b=[0.1, 0.2])
    text = fused_func("attn", _spec(causal=True, ssmax=ss))
    _, f = _func(text, "attn")
    ops = _ops(f)
    logs = [depth for name, depth, _ in ops if name == "math.log"]
    assert logs == [0], "one log, outside the key loop"
    loop_index = next(i for i, (name, _, _) in enumerate(ops) if name == "scf.for")
    assert next(i for i, (name, _, _) in enumerate(ops) if name == "math.log") < loop_index


def test_ssmax_function_numerics_with_a_padding_bias():
    term = MaskTerm("additive", None, None)
    bias = np.zeros((1, 1, 1, 6), np.float32)
    bias[..., 4:] = np.finfo(np.float32).min
    ss = SsmaxParams(heads=2, s=[0.5, 2.0], b=[0.0, 0.25])
    mask = bl.MaskIn(term, "%m0", (1, 1, 1, 6), "f32")
    text = ssmax_func("f", (1, 2, 3, 6), [mask], KeyMasks(counted=(bl.MaskIn(term, "%n0", (1, 1, 1, 6), "f32"),)), ss)
    text = text.replace("func.func private @f", "func.func @f")
    _, f = _func(text, "f")
    assert "math.log" in {name for name, _, _ in _ops(f)}
    x = RNG.standard_normal((1, 2, 3, 6), dtype=np.float32)
    got = _run(text, x, bias, bias)
    fac = np.array([0.5, 2.0])[:, None] * math.log(4) + np.array([0.0, 0.25])[:, None]
    want = np.where(bias > -1e30, x * fac[None, :, :, None].astype(np.float32), np.finfo(np.float32).min)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ssmax_counts_n_from_key_factors_causal_range_and_row_flags():
    """``n`` from a KeyPlan: causal is an index range (no tensor read), a row flag zeroes its rows."""
    term = MaskTerm("bool", None, None)
    flag = np.array([True, False, True]).reshape(1, 1, 3, 1)
    ss = SsmaxParams(heads=1, s=[1.0], b=[0.0])
    keys = KeyMasks(rows=(bl.MaskIn(term, "%r0", (1, 1, 3, 1), "i1"),), causal=True)
    text = ssmax_func("f", (1, 1, 3, 5), [], keys, ss).replace("func.func private @f", "func.func @f")
    x = RNG.standard_normal((1, 1, 3, 5), dtype=np.float32)
    got = _run(text, x, flag)
    n = np.minimum(np.arange(3) + 1, 5) * flag.reshape(3)
    want = x * np.log(np.maximum(n, 1)).astype(np.float32)[None, None, :, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
