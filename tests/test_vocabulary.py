"""One vocabulary: every old spelling of a rewrite request becomes the same ``RewriteSpec``, every entry
point answers with a ``RewriteResult``, and every command spells the rewrite flags the same way."""

from __future__ import annotations

import json
import math

import pytest
import torch

import attnpass
from attnpass import semantics
from attnpass.cli import build_parser
from attnpass.commands.flags import spec_from_args
from attnpass.errors import AttnpassError
from attnpass.result import RewriteResult, json_safe
from attnpass.spec import RewriteSpec, SpecError
from tests import attention_modules as M

FUSED_SSMAX = RewriteSpec("fused", s=0.5, b=0.1, fused_ssmax=True)


@pytest.mark.parametrize("spelling", [
    dict(to="ssmax", fused=True),        # attnpass.to_ssmax(fused=True), mlir.rewrite(to="ssmax", fused=True)
    dict(to="fused", ssmax=True),        # onnx.rewrite(to="fused", ssmax=True)
    dict(to="fuse", ssmax=True),         # the backend's "fuse"
    dict(to="fused"),                    # s / b given: SSMax implied (the ONNX rule)
])
def test_old_spellings_map_to_one_spec(spelling: dict) -> None:
    assert RewriteSpec.of(s=0.5, b=0.1, **spelling) == FUSED_SSMAX
    assert FUSED_SSMAX.label == "fused+ssmax" and FUSED_SSMAX.ssmax


def test_plain_spellings() -> None:
    assert RewriteSpec.of("fuse") == RewriteSpec("fused") and not RewriteSpec("fused").ssmax
    assert RewriteSpec.of("fused", s=0.5, ssmax=False) == RewriteSpec("fused", s=0.5)
    assert RewriteSpec.of("ssmax").s_value == semantics.DEFAULT_S and RewriteSpec("ssmax").label == "ssmax"


def test_train_len_resolved_in_the_spec() -> None:
    spec = RewriteSpec.of("ssmax", train_len=512)
    assert spec.s_value == pytest.approx(1 / math.log(512)) and spec.s is None
    assert RewriteSpec("ssmax", s=(0.1, 0.2)).s_value == (0.1, 0.2)
    assert RewriteSpec("ssmax", s=[0.1, 0.2]).s == (0.1, 0.2)  # lists frozen into tuples: hashable
    hash(RewriteSpec("ssmax", s=[0.1, 0.2]))


@pytest.mark.parametrize("kwargs, words", [
    (dict(to="flash"), "unknown rewrite"),
    (dict(to="ssmax", s=0.4, train_len=64), "either s or train_len"),
    (dict(to="ssmax", train_len=1), "train_len must be >= 2"),
    (dict(to="ssmax", s=float("nan")), "finite"),
    (dict(to="fused", fused=True), "fused=True goes with to='ssmax'"),
    (dict(to="fused", target="trt"), "unknown target"),
])
def test_bad_requests_are_both_error_kinds(kwargs: dict, words: str) -> None:
    with pytest.raises(SpecError, match=words) as info:
        RewriteSpec.of(**kwargs)
    assert isinstance(info.value, AttnpassError) and isinstance(info.value, ValueError)


def test_fx_result_names_the_sites_left_alone() -> None:
    """The fx result reads the emitter's plans, as ONNX's does: an unfusable site is left with the reason."""
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    fused = attnpass.fuse(M.ReturnsProbs().eval(), (q, k, v))
    res = fused.attnpass_result
    assert res.rewritten == [] and "also used" in res.left[0]
    ss = attnpass.to_ssmax(M.ReturnsProbs().eval(), (q, k, v), fused=True).attnpass_result
    assert "SSMax applied unfused" in ss.left[0]
    assert attnpass.to_ssmax(M.ReturnsProbs().eval(), (q, k, v)).attnpass_result.rewritten == [0]


def test_fx_modules_carry_the_result() -> None:
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    fused = attnpass.fuse(M.CausalTril().eval(), (q, k, v))
    res = fused.attnpass_result
    assert isinstance(res, RewriteResult) and res.ir == "fx" and res.spec == RewriteSpec("fused")
    assert res.rewritten == [0] and not res.left and len(res) == 1 and res.sites is fused.attnpass_report.sites
    ss = attnpass.to_ssmax(M.CausalTril().eval(), (q, k, v), train_len=64, fused=True)
    assert ss.attnpass_result.spec == RewriteSpec.of("fused", train_len=64, ssmax=True)
    assert ss.attnpass_result.to == "fused+ssmax" and ss.attnpass_result.rewritten == [0]
    torch.testing.assert_close(ss(q, k, v), semantics.ssmax_attention(q, k, v, is_causal=True, s=1 / math.log(64)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="either s or train_len"):
        attnpass.to_ssmax(M.CausalTril().eval(), (q, k, v), s=0.3, train_len=64)


def test_result_json_is_strict() -> None:
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    res = attnpass.fuse(M.CausalTril().eval(), (q, k, v)).attnpass_result
    res.left[0] = "for the test"
    data = res.as_dict()
    assert data["rewritten"] == [] and data["left"] == {"0": "for the test"} and data["sites"][0]["why_left"] == "for the test"
    assert res.summary()[0]["rewritten"] is False and "0/1 site(s) rewritten to fused" == res.headline()
    json.dumps(data, allow_nan=False)
    assert json_safe({"a": [float("inf"), float("-inf"), float("nan"), 1.5]}) == {"a": ["inf", "-inf", "nan", 1.5]}


def test_backend_accepts_fused_and_fuse() -> None:
    from attnpass.lowering import backend

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    for spelling in ("fused", "fuse"):
        torch._dynamo.reset()
        backend.reports.clear()
        fn = torch.compile(M.CausalTril().eval(), backend="attnpass", options={"rewrite": spelling, "inner": "eager"})
        torch.testing.assert_close(fn(q, k, v), M.CausalTril().eval()(q, k, v), rtol=1e-5, atol=1e-5)
        assert isinstance(backend.reports[-1], RewriteResult) and backend.reports[-1].spec == RewriteSpec("fused")


# ------------------------------------------------------------------ the CLI: one spelling everywhere

COMMANDS = {
    "rewrite": ["rewrite", "m.onnx", "-o", "out.onnx"],
    "mlir": ["mlir", "m.onnx", "-o", "out.mlir"],
    "export": ["export", "pkg.mod:make", "-o", "out.onnx"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flags, spec", [
    (["--to", "ssmax", "--s", "0.5", "--bias", "0.1"], RewriteSpec("ssmax", 0.5, 0.1)),
    (["--to", "ssmax", "--train-len", "64"], RewriteSpec("ssmax", train_len=64)),
    (["--to", "fused", "--ssmax", "--s", "0.5"], RewriteSpec("fused", 0.5, fused_ssmax=True)),
    (["--to", "fused"], RewriteSpec("fused")),
    (["--to", "fuse"], RewriteSpec("fused")),
    (["--to", "ssmax", "--b", "0.1"], RewriteSpec("ssmax", b=0.1)),   # mlir's old --b, hidden everywhere
    (["--to", "ssmax", "--s", "0.2,0.4", "--bias", "1,0"], RewriteSpec("ssmax", (0.2, 0.4), (1.0, 0.0))),  # per head
])
def test_every_command_spells_the_rewrite_the_same(command: str, flags: list[str], spec: RewriteSpec) -> None:
    args = build_parser().parse_args([*COMMANDS[command], *flags, "--json"])
    assert args.json and spec_from_args(args) == spec


def test_hidden_aliases_stay_out_of_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in COMMANDS:
        text = sub.choices[name].format_help()
        assert "--bias" in text and "--ssmax" in text and "--train-len" in text
        assert "--b " not in text and "--b\n" not in text and "--rewrite" not in text and "--fused" not in text


def test_mlir_fused_alias_and_export_rewrite_alias() -> None:
    parser = build_parser()
    args = parser.parse_args(["mlir", "m.onnx", "--to", "ssmax", "--fused", "--s", "0.5"])
    assert spec_from_args(args) == RewriteSpec("fused", 0.5, fused_ssmax=True)
    args = parser.parse_args(["export", "pkg.mod:make", "-o", "x.onnx", "--rewrite", "ssmax", "--s", "0.5"])
    assert spec_from_args(args) == RewriteSpec("ssmax", 0.5)
    assert parser.parse_args(["export", "pkg.mod:make", "-o", "x.onnx"]).to == "none"
    assert parser.parse_args(["mlir", "m.onnx"]).to == "fused"
