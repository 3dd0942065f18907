"""The ONNX spec's own ``Attention`` test cases, as the op and expanded into its function body.

The onnx package builds these models for its backend tests (``onnx.backend.test.case.node.attention``):
each ``export_*`` makes the op model and, from the schema's function body, the ``_expanded`` model.
For each: the site is found; the expanded body fuses (validated in onnxruntime against the original on the
case's own inputs) or is reported "not fusable" with the reason; SSMax with ``s=0, b=1`` equals the original.
The op itself is an already-fused site: SSMax applies by scaling Q, except with a KV cache (reported).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

import attnpass.onnx as aonnx

warnings.filterwarnings("ignore")


@dataclass(frozen=True)
class Spec:
    export: str  # the onnx test case's ``export_*`` name, without the prefix
    expanded_blocker: str | None = None  # why the expanded body does not fuse (None: it fuses)
    op_ssmax_left: str | None = None  # why SSMax leaves the op alone (None: rewritten)
    op_runs: bool = True  # onnxruntime runs the op model itself
    mlir_op_left: tuple[str, ...] = ()  # why MLIR leaves the op (fused or SSMax; empty: replaced by the loop nest)
    target: str = "ort"


SPECS = [
    Spec("attention"),
    Spec("attention_3d"),
    Spec("attention_gqa"),
    Spec("attention_3d_gqa_causal"),
    Spec("attention_diff_head_sizes"),
    Spec("attention_scaled"),
    Spec("attention_causal"),
    Spec("attention_attn_mask"),
    Spec("attention_attn_4d_mask_causal"),
    Spec("attention_attn_mask_bool"),
    Spec("attention_attn_mask_bool_4d"),
    Spec("attention_gqa_attn_mask"),
    Spec("attention_softcap", target="onnx23"),
    Spec("attention_3d_softcap", target="onnx23"),
    Spec("attention_with_past_and_present", op_ssmax_left="KV cache"),
    Spec("attention_gqa_with_past_and_present", op_ssmax_left="KV cache"),
    Spec("attention_4d_diff_heads_mask4d_padded_kv", op_runs=False),
    Spec("attention_with_qk_matmul"),
    Spec("attention_with_qk_matmul_softmax", expanded_blocker="(a graph output)", mlir_op_left=("probabilities",)),
    Spec("attention_24_qk_matmul_output_mode3_softmax_precision", expanded_blocker="(a graph output)",
         mlir_op_left=("probabilities", "not f32")),  # float16: the loop nest computes in f32
    Spec("attention_local_window"),
    Spec("attention_bidirectional_window"),
    Spec("attention_local_window_gqa_rank4_mask", expanded_blocker="(a graph output)"),
    Spec("attention_causal_fp16"),
    Spec("attention_23_boolmask_fullymasked_row_nan_robustness"),
]


def _build(spec: Spec) -> list:
    """The onnx test cases (op, then expanded) one ``export_*`` makes."""
    from onnx.backend.test.case import node as cases
    from onnx.backend.test.case.node.attention import Attention

    cases._existing_names.clear()  # the registry refuses a name twice; we only read what this call adds
    before = len(cases._NodeTestCases)
    getattr(Attention, "export_" + spec.export)()
    made = cases._NodeTestCases[before:]
    assert {c.name.endswith("_expanded") for c in made} == {True, False}
    return made


def _case(spec: Spec, expanded: bool, tmp_path: Path) -> tuple[Path, dict, dict]:
    case = next(c for c in _build(spec) if c.name.endswith("_expanded") == expanded)
    path = tmp_path / f"{case.name}.onnx"
    onnx.save(case.model, path)
    feeds = {vi.name: x for vi, x in zip(case.model.graph.input, case.data_sets[0][0])}
    low = any(x.dtype in (np.float16,) for x in feeds.values())  # the dtype decides, not the case's name
    tol = dict(rtol=2e-3, atol=2e-3) if low else {}
    return path, feeds, tol


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.export)
def test_expanded_body_found_fused_and_ssmax_identity(spec: Spec, tmp_path: Path) -> None:
    path, feeds, tol = _case(spec, True, tmp_path)
    report = aonnx.find(path)
    assert len(report) == 1 and report[0].form == "explicit", (report.as_dict())
    site = report[0]
    if "gqa" in spec.export:  # Q and K are each pre-scaled by sqrt(scale): K's repetition is seen through its Mul
        assert site.gqa and site.kv_heads < site.heads, site.summary()
    fused = aonnx.rewrite(path, tmp_path / "fused.onnx", to="fused", target=spec.target, inputs=feeds, **tol)
    if spec.expanded_blocker is None:
        assert site.fusable, site.fuse_blocker
        assert len(fused.rewritten) == 1 and fused.validation.passed
    else:
        assert not site.fusable and spec.expanded_blocker in site.fuse_blocker
        assert len(fused.rewritten) == 0 and spec.expanded_blocker in fused.left[0]
    ident = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds, **tol)
    assert len(ident.rewritten) == 1 and ident.validation.passed


@pytest.mark.parametrize("spec", [s for s in SPECS if s.op_runs], ids=lambda s: s.export)
def test_op_is_a_fused_site_and_takes_ssmax(spec: Spec, tmp_path: Path) -> None:
    path, feeds, tol = _case(spec, False, tmp_path)
    report = aonnx.find(path)
    assert len(report) == 1 and report[0].form == "sdpa"
    if "gqa" in spec.export:
        assert report[0].gqa and report[0].kv_heads < report[0].heads
    ident = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds, **tol)
    if spec.op_ssmax_left is None:
        assert len(ident.rewritten) == 1 and ident.validation.passed
    else:
        assert len(ident.rewritten) == 0 and spec.op_ssmax_left in ident.left[0]
