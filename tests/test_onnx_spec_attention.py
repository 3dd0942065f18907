"""The ONNX spec's own ``Attention`` test cases, as the op and expanded into its function body.

The onnx package builds these models for its backend tests (``onnx.backend.test.case.node.attention``):
each ``export_*`` makes the op model and, from the schema's function body, the ``_expanded`` model.
For each: the site is found; the expanded body fuses (validated in onnxruntime against the original on the
case's own inputs) or is reported "not fusable" with the reason; SSMax with ``s=0, b=1`` equals the original.
The op itself is an already-fused site: SSMax applies by scaling Q, with a KV cache too: ``n`` is counted over
the past and the new keys (``past_key``) or up to ``nonpad_kv_seqlen``, and the op's SSMax output at a real ``s``
must equal ``semantics`` on the whole cache (``test_kv_cache_op_ssmax_equals_semantics``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import attnpass.onnx as aonnx
from attnpass import semantics

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
    # SSMax multiplies the capped scores: the op's Q cannot carry the factor, its function body takes SSMax instead
    # (``test_softcap_op_takes_ssmax_in_its_body``)
    Spec("attention_softcap", target="onnx23"),
    Spec("attention_3d_softcap", target="onnx23"),
    Spec("attention_with_past_and_present"),
    Spec("attention_gqa_with_past_and_present"),
    Spec("attention_4d_causal_with_past_and_present"),
    Spec("attention_3d_gqa_with_past_and_present"),
    Spec("attention_3d_diff_head_sizes_with_past_and_present"),
    Spec("attention_diff_head_sizes_with_past_and_present_mask3D"),
    Spec("attention_local_window_with_past"),
    Spec("attention_gqa_with_past_and_present_fp16"),
    Spec("attention_4d_causal_nonpad_batch_prefill"),
    Spec("attention_4d_causal_nonpad_continued_prefill"),
    Spec("attention_4d_gqa_causal_nonpad_decode"),
    Spec("attention_4d_causal_nonpad_attn_mask_composition"),
    Spec("attention_4d_causal_nonpad_negative_offset_structural_empty"),
    Spec("attention_4d_diff_heads_mask4d_padded_kv", op_runs=False),
    Spec("attention_with_qk_matmul"),
    Spec("attention_with_qk_matmul_softmax", expanded_blocker="(a graph output)", mlir_op_left=("probabilities",)),
    Spec("attention_24_qk_matmul_output_mode3_softmax_precision", expanded_blocker="(a graph output)",
         mlir_op_left=("probabilities",)),
    Spec("attention_local_window"),
    Spec("attention_bidirectional_window"),
    # a window makes the op count its own keys and it soft-caps: SSMax goes into its function body (its
    # qk_matmul_output, read, does not block: ``test_windowed_op_with_read_qk_output_takes_ssmax``); MLIR does
    # not fuse the op, its probabilities being an output (mode 3)
    Spec("attention_local_window_gqa_rank4_mask", expanded_blocker="(a graph output)",
         mlir_op_left=("probabilities",)),
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
    # force: a site left unfused would otherwise write nothing (NothingRewritten); the reason is what is checked
    fused = aonnx.rewrite(path, tmp_path / "fused.onnx", to="fused", target=spec.target, inputs=feeds, force=True, **tol)
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
    ident = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds, force=True, **tol)
    if spec.op_ssmax_left is None:
        assert len(ident.rewritten) == 1 and ident.validation.passed
    else:
        assert len(ident.rewritten) == 0 and spec.op_ssmax_left in ident.left[0]


def _op_reference(model: onnx.ModelProto, feeds: dict, s: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """The standard ``Attention`` op with its KV cache in ``semantics`` terms, and which output rows have keys.

    The keys are ``past_key`` then ``K``; ``is_causal`` is aligned after the past (``j <= P + i``), or to the end of
    ``nonpad_kv_seqlen`` (``j <= L_b - S + i``, keys ``j < L_b``), as onnxruntime computes them; a sliding window
    around the same position.
    """
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    names = list(node.input) + [""] * (7 - len(node.input))
    x = {i: torch.from_numpy(feeds[n]).double() if n else None for i, n in enumerate(names[:6])}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    q, k, v = x[0], x[1], x[2]
    three_d = q.dim() == 3
    if three_d:
        hq, hkv = attrs["q_num_heads"], attrs["kv_num_heads"]
        q, k, v = (t.reshape(*t.shape[:2], h, -1).transpose(1, 2) for t, h in ((q, hq), (k, hkv), (v, hkv)))
    if x[4] is not None:
        k, v = torch.cat([x[4], k], 2), torch.cat([x[5], v], 2)
    sq, t = q.shape[2], k.shape[2]
    i, j = torch.arange(sq)[:, None], torch.arange(t)[None]
    allowed = torch.ones(q.shape[0], 1, sq, t, dtype=torch.bool)
    nonpad = feeds[names[6]] if names[6] else None
    if nonpad is not None:
        lens = torch.from_numpy(nonpad).long()[:, None, None, None]
        allowed = allowed & (j < lens)
    pos = i + (lens - sq if nonpad is not None else (x[4].shape[2] if x[4] is not None else 0))
    if attrs.get("is_causal", 0):
        allowed = allowed & (j <= pos)
    if attrs.get("left_window_size", -1) >= 0:
        allowed = allowed & (j >= pos - attrs["left_window_size"])
    if attrs.get("right_window_size", -1) >= 0:
        allowed = allowed & (j <= pos + attrs["right_window_size"])
    bias = torch.zeros(())
    mask = x[3]
    if names[3]:
        m = torch.from_numpy(feeds[names[3]])
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            allowed, bias = allowed & (m.double() > semantics.MASKED_BELOW), m.double()
    mask = torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=torch.float64))
    out = semantics.ssmax_attention(q, k, v, mask, scale=attrs.get("scale"), s=s, b=b, softcap=attrs.get("softcap") or None,
                                    enable_gqa=True)
    rows = allowed.expand(*out.shape[:3], t).any(-1)
    if three_d:
        out, rows = out.transpose(1, 2).reshape(*out.shape[:1], sq, -1), rows.any(1)[..., None]
    else:
        rows = rows[..., None]
    return out.numpy(), rows.numpy()


KV_SPECS = [s for s in SPECS if s.op_runs and s.op_ssmax_left is None and any(w in s.export for w in ("past", "nonpad", "window"))]


@pytest.mark.parametrize("spec", KV_SPECS, ids=lambda s: s.export)
def test_kv_cache_op_ssmax_equals_semantics(spec: Spec, tmp_path: Path) -> None:
    path, feeds, tol = _case(spec, False, tmp_path)
    model = onnx.load(str(path))
    ref0, rows = _op_reference(model, feeds, 0.0, 1.0)
    atol = tol.get("atol", 1e-5)
    from attnpass.validate import run

    y0 = run(path, feeds)[model.graph.output[0].name]
    np.testing.assert_allclose(np.where(rows, y0, 0), np.where(rows, ref0, 0), atol=atol, rtol=tol.get("rtol", 1e-4))
    res = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.7, bias=0.3, inputs=feeds, **tol)
    assert len(res.rewritten) == 1
    y = run(tmp_path / "ssmax.onnx", feeds)[model.graph.output[0].name]
    want, _ = _op_reference(model, feeds, 0.7, 0.3)
    np.testing.assert_allclose(np.where(rows, y, 0), np.where(rows, want, 0), atol=atol, rtol=tol.get("rtol", 1e-4))


def test_windowed_op_with_read_qk_output_takes_ssmax(tmp_path: Path) -> None:
    """The windowed GQA case without its softcap: SSMax scales the op's Q although its ``qk_matmul_output`` (mode 3,
    the probabilities) is a graph output; that output is then the SSMax probabilities, the ones ``Y`` is made of."""
    spec = next(s for s in SPECS if s.export == "attention_local_window_gqa_rank4_mask")
    path, feeds, _ = _case(spec, False, tmp_path)
    model = onnx.load(str(path))
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "softcap"]
    del node.attribute[:]
    node.attribute.extend(kept)
    onnx.save(model, path)
    from attnpass.validate import run

    ref0, rows = _op_reference(model, feeds, 0.0, 1.0)
    y0 = run(path, feeds)[model.graph.output[0].name]
    np.testing.assert_allclose(np.where(rows, y0, 0), np.where(rows, ref0, 0), atol=1e-5, rtol=1e-4)
    ident = aonnx.rewrite(path, tmp_path / "id.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds)
    assert ident.rewritten == [0] and ident.validation.passed, ident.left
    res = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.7, bias=0.3, inputs=feeds)
    assert res.rewritten == [0], res.left
    got = run(tmp_path / "ssmax.onnx", feeds)
    y, probs = (got[o.name] for o in model.graph.output)
    want, _ = _op_reference(model, feeds, 0.7, 0.3)
    np.testing.assert_allclose(np.where(rows, y, 0), np.where(rows, want, 0), atol=1e-5, rtol=1e-4)
    v = np.repeat(feeds["V"], probs.shape[1] // feeds["V"].shape[1], axis=1)
    np.testing.assert_allclose(probs @ v, y, atol=1e-5, rtol=1e-4)  # the output is the probabilities Y is made of
    assert not np.allclose(probs, run(path, feeds)[model.graph.output[1].name], atol=1e-3)  # and they changed


SOFTCAP_SPECS = [s for s in SPECS if any(a.name == "softcap" for a in _build(s)[0].model.graph.node[0].attribute)]


def test_softcap_specs_are_the_three_cases() -> None:
    assert [s.export for s in SOFTCAP_SPECS] == ["attention_softcap", "attention_3d_softcap", "attention_local_window_gqa_rank4_mask"]


def test_softcap_factor_on_q_would_be_wrong() -> None:
    """Why the op is not scaled on Q: SSMax multiplies the capped scores (``semantics.attention``), a factor on Q
    would be capped with them."""
    q, k, v = (torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    on_q = semantics.attention(q * 1.5, k, v, softcap=2.0)  # what a factor of 1.5 on Q would compute
    assert not torch.allclose(on_q, semantics.attention(q, k, v, softcap=2.0, ssmax_s=1.5 / math.log(k.shape[-2])), atol=1e-3)


@pytest.mark.parametrize("spec", SOFTCAP_SPECS, ids=lambda s: s.export)
def test_softcap_op_takes_ssmax_in_its_body(spec: Spec, tmp_path: Path) -> None:
    """A soft-capping ``Attention`` op is replaced by its schema function body and SSMax'd there: the result equals
    ``semantics`` (the factor after the cap) and the SSMax of the onnx package's own expanded model; without SSMax
    (a plain fuse) the op stays."""
    from attnpass.validate import run

    path, feeds, _ = _case(spec, False, tmp_path)
    expanded, _, _ = _case(spec, True, tmp_path)
    model = onnx.load(str(path))
    res = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.7, bias=0.3, inputs=feeds)
    assert res.rewritten == [0], res.left
    assert any("function body" in n for n in res.sites[0].notes), res.sites[0].notes
    assert "Attention" not in {n.op_type for n in onnx.load(str(tmp_path / "ssmax.onnx")).graph.node}
    got = run(tmp_path / "ssmax.onnx", feeds)
    want, rows = _op_reference(model, feeds, 0.7, 0.3)
    y = got[model.graph.output[0].name]
    np.testing.assert_allclose(np.where(rows, y, 0), np.where(rows, want, 0), atol=1e-5, rtol=1e-4)
    exp = aonnx.rewrite(expanded, tmp_path / "exp_ssmax.onnx", to="ssmax", s=0.7, bias=0.3, inputs=feeds)
    assert exp.rewritten == [0], exp.left
    ref = run(tmp_path / "exp_ssmax.onnx", feeds)
    for o in model.graph.output:  # every output (qk_matmul_output too) as the expanded body's SSMax gives it
        np.testing.assert_allclose(got[o.name], ref[o.name], atol=1e-6, rtol=1e-5)
    if len(model.graph.output) > 1:  # mode 3: the probabilities Y is made of, the SSMax ones
        probs = got[model.graph.output[1].name]
        v = np.repeat(feeds["V"], probs.shape[1] // feeds["V"].shape[1], axis=1)
        np.testing.assert_allclose(probs @ v, y, atol=1e-5, rtol=1e-4)
    fused = aonnx.rewrite(path, tmp_path / "fused.onnx", to="fused", target="onnx23", inputs=feeds, force=True)
    assert fused.rewritten == [] and "already fused" in fused.left[0]
    assert [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node] == ["Attention"]


@pytest.mark.parametrize("export", ["attention_gqa_with_past_and_present", "attention_3d_diff_head_sizes_with_past_and_present",
                                    "attention_4d_gqa_causal_nonpad_decode"])
def test_softcap_op_with_kv_cache_takes_ssmax_in_its_body(export: str, tmp_path: Path) -> None:
    """A KV-cache case given a softcap: its body counts ``n`` over the past and new keys (or up to ``nonpad_kv_seqlen``)
    as the op does, and ``present_key`` / ``present_value`` stay the op's (the past and new keys, unscaled)."""
    from attnpass.validate import run

    spec = next(s for s in SPECS if s.export == export)
    path, feeds, _ = _case(spec, False, tmp_path)
    model = onnx.load(str(path))
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("softcap", 1.5))
    onnx.save(model, path)
    before = run(path, feeds)
    res = aonnx.rewrite(path, tmp_path / "ssmax.onnx", to="ssmax", s=0.7, bias=0.3, inputs=feeds)
    assert res.rewritten == [0] and any("function body" in n for n in res.sites[0].notes), res.left
    got = run(tmp_path / "ssmax.onnx", feeds)
    want, rows = _op_reference(model, feeds, 0.7, 0.3)
    y = model.graph.output[0].name
    np.testing.assert_allclose(np.where(rows, got[y], 0), np.where(rows, want, 0), atol=1e-5, rtol=1e-4)
    assert not np.allclose(got[y], before[y], atol=1e-4)
    presents = [o.name for o in model.graph.output[1:]]
    assert presents == ([] if "nonpad" in export else ["present_key", "present_value"])
    for name in presents:  # as the op gives them: the past and the new keys / values
        np.testing.assert_array_equal(got[name], before[name])
