"""The ONNX adapter's own shape propagation through ``Slice`` and ``Concat`` (TorchScript graphs carry no shapes)."""

from __future__ import annotations

from attnpass.passes.onnx_shapes import _concat, _slice


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
