"""One table for every IR: each hand-written variant and each HF corpus family through torch.fx, ONNX (TorchScript
and dynamo exporters), MLIR from torch and (hand-written variants) MLIR from the TorchScript ONNX export.

Every cell runs the same four checks (``tests/table_cells.py``): sites found, fused equals the original, SSMax
with ``s=0, b=1`` equals the original, SSMax with ``s=0.43`` equals ``semantics`` (fx) or the fx SSMax module
(other IRs).  ``returns_probs`` is the cell that must not fuse, in every IR.  A cell an IR cannot take yet is
an entry of ``EXPECTED`` with the reason its failure must give: when the reason changes, or the check starts
passing, the cell fails and the entry must be updated, so the table never drifts from what the code does.
"""

from __future__ import annotations

import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

from tests import table_cells as tc

NO_HEADS = "the number of heads is not known statically"
MHA_ONE_KV = "Input 'query' and 'key' shall have same dim 2"
NO_CAUSAL = "causal = False, want True"
NO_GQA = "gqa = False, want True"

#: (variant, IR) -> {check: a string its failure message must hold}
EXPECTED: dict[tuple[str, str], dict[str, str]] = {
    # 3-D scores (heads folded into the batch): ONNX's fused ops need a head count
    # GPT-NeoX from TorchScript: the head count hides behind a -1 reshape
    # multi-query (1 KV head): the MultiHeadAttention emitter does not repeat K/V to the query heads
    # HF sdpa exports: Q and K each pre-scaled by sqrt(scale) hide the K/V repetition (both exporters)
}

VARIANTS = tc.variants()
CELLS = [(v, ir) for v in VARIANTS for ir in v.irs]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tc.Table:
    """Exports, imports and fx references shared by every cell of a variant."""
    return tc.Table(tmp_path_factory.mktemp("variant_table"))


@pytest.mark.parametrize("variant,ir", CELLS, ids=[f"{v.name}-{ir}" for v, ir in CELLS])
def test_cell(table: tc.Table, variant: tc.Variant, ir: str) -> None:
    got = tc.run_cell(table, variant, ir)
    expected = EXPECTED.get((variant.name, ir), {})
    if ir in variant.not_applicable:  # n/a (e.g. Whisper from TorchScript: no aten::diff): every check fails for it
        expected = dict.fromkeys(tc.CHECKS, variant.not_applicable[ir][0])
    problems = []
    for check in tc.CHECKS:
        why, msg = expected.get(check), got[check]
        if why is None and msg is not None:
            problems.append(f"{check} failed: {msg}")
        elif why is not None and msg is None:
            problems.append(f"{check} passes now: remove its expected exception ({why!r})")
        elif why is not None and why not in msg:
            problems.append(f"{check} fails with another reason: {msg} (expected {why!r})")
    assert not problems, problems


def test_expected_exceptions_name_real_cells() -> None:
    cells = {(v.name, ir) for v, ir in CELLS}
    assert set(EXPECTED) <= cells, set(EXPECTED) - cells
    assert all(ir in v.irs for v in VARIANTS for ir in v.not_applicable)
    assert all(set(checks) <= set(tc.CHECKS) for checks in EXPECTED.values())


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.sem is not None], ids=lambda v: v.name)
def test_hand_written_module_means_what_semantics_says(variant: tc.Variant) -> None:
    """Guards the table itself: each module and its ``semantics`` description agree before any rewrite."""
    module, args = variant.build()
    with torch.no_grad():
        out = module(*args)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, variant.sem(), rtol=1e-5, atol=2e-5)


def test_a_wrong_expectation_fails_its_cell(table: tc.Table) -> None:
    """The checks can fail: the same module claimed to have two sites, or to be blocked, fails ``found``."""
    (v,) = [v for v in VARIANTS if v.name == "causal_tril"]
    wrong = tc.Variant(v.name, v.build, sites=2, sem=v.sem)
    assert "1 sites, want 2" in tc.run_cell(table, wrong, "fx")["found"]
    wrong = tc.Variant(v.name, v.build, fused=0, blocker="x", sem=v.sem)
    got = tc.run_cell(table, wrong, "fx")
    assert "1 fusable, want 0" in got["found"] and "1 fused, want 0" in got["fused"]


def test_not_applicable_reads_na_only_for_its_own_reason() -> None:
    """The table prints ``n/a`` for Whisper from TorchScript only while every check fails for the exporter's reason."""
    (v,) = [v for v in VARIANTS if v.name == "hf_whisper"]
    marker = v.not_applicable["onnx-ts"][0]
    failed = dict.fromkeys(tc.CHECKS, f"RuntimeError: {marker} to ONNX opset version 17 is not supported")
    assert tc.not_applicable_text(v, "onnx-ts", failed) == "n/a (the torchscript exporter cannot export aten::diff)"
    assert tc.not_applicable_text(v, "onnx-ts", {**failed, "ssmax": None}) is None
    assert tc.not_applicable_text(v, "onnx-ts", {**failed, "found": "AssertionError: 2 sites, want 3"}) is None
    assert tc.not_applicable_text(v, "onnx-dynamo", failed) is None
