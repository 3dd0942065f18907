"""The MLIR adapter's ``static_value``: constant-only masks as torch-mlir imports them, evaluated with numpy."""

from __future__ import annotations

import numpy as np
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

from attnpass import mlir as am
from attnpass.passes.mlir import MlirAdapter, public_funcs

S = 6


class TrilBuffer(torch.nn.Module):
    """A ``tril`` buffer larger than the sequence (a ``dense_resource`` literal), sliced and negated."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(9, 9, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(~self.bias[:S, :S], 0.0)


class TriuFull(torch.nn.Module):
    """``triu(full(-inf), 1)``: decomposed by the import into ``arange``/``sub``/``ge``/``where``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.triu(torch.full((S, S), float("-inf")), diagonal=1)


class FromInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tril(x)


_KEEP: list[object] = []  # the imported modules outlive their adapters' IR objects


def _operand_of(module: torch.nn.Module, aten: str, index: int) -> tuple[MlirAdapter, object]:
    _KEEP.append(am.import_(module, (torch.randn(S, S),)))
    adapter = MlirAdapter(public_funcs(_KEEP[-1])[0])
    (node,) = [n for n in adapter.node_list if n.aten == aten]
    return adapter, node.operands[index]


def test_sliced_tril_buffer_is_read_from_its_resource_blob() -> None:
    adapter, cond = _operand_of(TrilBuffer(), "where", 0)
    got = adapter.static_value(cond)
    assert got is not None and got.dtype == np.bool_
    np.testing.assert_array_equal(got, ~np.tril(np.ones((S, S), dtype=bool)))


def test_decomposed_triu_of_minus_inf_is_evaluated() -> None:
    adapter, mask = _operand_of(TriuFull(), "add", 1)
    got = adapter.static_value(mask)
    np.testing.assert_array_equal(got, torch.triu(torch.full((S, S), float("-inf")), diagonal=1).numpy())


def test_a_value_computed_from_an_argument_has_no_static_value() -> None:
    adapter, mask = _operand_of(FromInput(), "add", 1)
    assert adapter.static_value(mask) is None


def test_the_element_budget_bounds_every_intermediate() -> None:
    adapter, cond = _operand_of(TrilBuffer(), "where", 0)
    assert adapter.static_value(cond, limit=S * S - 1) is None
