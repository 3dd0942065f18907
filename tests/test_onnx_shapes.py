"""The ONNX adapter's own shape propagation through ``Slice``, ``Concat`` and ``Reshape`` (TorchScript graphs carry no
shapes), and the symbolic size products the matchers compare."""

from __future__ import annotations

from attnpass.passes.kinds import canonical_product, divide_product
from attnpass.passes.onnx_shapes import _concat, _reshape, _slice, sym_mul


def test_slice_keeps_axes_it_does_not_touch_even_with_run_time_bounds() -> None:
    # GPT-NeoX's rotary split: the head dim is cut at a bound computed at run time; the head count survives
    assert _slice((2, 4, 7, 24), [0], ["unk__3"], [-1], None) == (2, 4, 7, None)
    assert _slice((2, 4, 7, 24), [0, 8], [8], [-1, 0], None) is None  # starts and ends do not pair up
    assert _slice((2, 4, 7, 24), [8], [2**62], [-1], [1]) == (2, 4, 7, 16)
    assert _slice((2, 4, 7, 24), [-1], [-25], [3], [-2]) == (2, 4, 7, 12)
    assert _slice(None, [0], [1], None, None) is None


def test_concat_sums_the_axis_and_takes_the_others_from_any_input() -> None:
    assert _concat([(2, 4, 7, 6), (2, None, 7, 2)], -1) == (2, 4, 7, 8)
    assert _concat([(2, 4, 7, None), (2, 4, 7, 2)], 3) == (2, 4, 7, None)
    assert _concat([(2, 4), (2, 4, 1)], 0) is None


def test_reshape_solves_minus_one_through_a_symbolic_product() -> None:
    # TorchScript's ``view(b * h, -1, d)`` of a dynamic batch: ``Mul(Gather(Shape), 3)`` reads as ``3*b``
    assert sym_mul("b", 3) == sym_mul(3, "b") == "3*b" and sym_mul(1, "b") == "b"
    assert sym_mul(-1, "b") is None and sym_mul(None, 3) is None
    assert _reshape(("b", 3, 5, 4), ["3*b", -1, 4]) == ("3*b", 5, 4)
    assert _reshape(("3*b", 5, 5), ["b", 3, 5, -1]) == ("b", 3, 5, 5)
    assert _reshape(("b", 3, 5, 4), ["c", -1, 4]) == ("c", None, 4)  # unrelated symbols: unknown, never a guess


def test_symbolic_products_compare_and_divide_canonically() -> None:
    assert canonical_product(3, "%arg3[0]") == canonical_product("%arg3[0]", "3") == "3*%arg3[0]"
    assert canonical_product("2*b", 3, "a") == "6*a*b" and canonical_product(2, 3) == "6"
    assert divide_product(["b", 3, 5, 5], ["3*b", 5]) == "5"
    assert divide_product(["b", 3, 5, 5], ["c", 5]) is None and divide_product([3, 5], [2]) is None
