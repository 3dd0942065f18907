"""SSMax's relatives already in a model, through fx, ONNX and MLIR: named with their parameters, never
scaled twice, replaced when asked (equal to SSMax on the same model without the old scaling), fitted."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)
import transformers

import attnpass
import attnpass.mlir as am
import attnpass.onnx as aonnx
from attnpass.cli import main
from attnpass.errors import NothingRewritten
from attnpass.passes import relatives
from tests import relative_models as R
from tests.attention_modules import CausalTril

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

L4_DEFAULT = ("llama4_temperature", {"attn_scale": 0.1, "floor_scale": 8192.0})
M3_DEFAULT = ("llama_4_scaling", {"beta": 0.1, "original_max_position_embeddings": 16384.0})
L4_SMALL = ("llama4_temperature", {"attn_scale": 0.1, "floor_scale": 2.0})
M3_SMALL = ("llama_4_scaling", {"beta": 0.2, "original_max_position_embeddings": 3.0})
QWEN = ("qwen_logn", {"seq_length": 4.0})
S = 0.3


def _relatives(report) -> list[tuple[str, dict[str, float]]]:
    out = []
    for site in report.sites:
        assert site.relative is not None, f"{site.name}: no relative found ({site.notes})"
        out.append((site.relative.family, {k: pytest.approx(v, rel=1e-5) for k, v in site.relative.params.items()}))
    return out


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[torch.nn.Module, tuple]]:
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0))
    out = {"l4": (R.llama4(**R.SMALL_L4), (R.ids(),)), "m3": (R.ministral3(**R.SMALL_M3), (R.ids(),)),
           "qwen": (R.QwenLogn().eval(), (x,))}
    l4_plain = R.llama4(False, **R.SMALL_L4)
    l4_plain.load_state_dict(out["l4"][0].state_dict())
    out["l4_plain"] = (l4_plain, (R.ids(),))
    return out


@pytest.fixture(scope="module")
def onnx_files(models, tmp_path_factory) -> dict[str, str]:
    """Dynamo with a dynamic sequence (the factor stays an expression), static (folded to a table), TorchScript."""
    d = tmp_path_factory.mktemp("relatives_onnx")
    files = {}
    for name, dynamic in (("l4", True), ("m3", True), ("m3_static", False)):
        model, args = models[name.split("_")[0]]
        files[name] = str(d / f"{name}.onnx")
        shapes = ({1: torch.export.Dim.DYNAMIC},) if dynamic else None
        torch.onnx.export(model, args, files[name], dynamo=True, opset_version=18, input_names=["ids"], dynamic_shapes=shapes)
    files["qwen"] = str(d / "qwen.onnx")
    torch.onnx.export(models["qwen"][0], models["qwen"][1], files["qwen"], dynamo=False, opset_version=17, input_names=["x"])
    return files


@pytest.fixture(scope="module")
def mlir_modules(models) -> dict[str, object]:
    return {name: am.import_(*models[name]) for name in ("l4", "m3", "qwen")}


def _reference(models, **kw) -> torch.Tensor:
    """SSMax on the same Llama 4 weights with temperature tuning off: what replacing the tuning must give."""
    plain, args = models["l4_plain"]
    gm = attnpass.to_ssmax(plain, args, **kw)
    with torch.no_grad():
        return gm(*args)


# ------------------------------------------------------------------ named, with the recovered parameters

@pytest.mark.parametrize("name, build, expected", [
    ("llama4_defaults", lambda: R.llama4(), L4_DEFAULT),
    ("ministral3_defaults", lambda: R.ministral3(), M3_DEFAULT),
    ("llama4_small", lambda: R.llama4(**R.SMALL_L4), L4_SMALL),
    ("ministral3_small", lambda: R.ministral3(**R.SMALL_M3), M3_SMALL),
])
def test_fx_names_hf_relatives_with_their_parameters(name: str, build, expected) -> None:
    """The defaults (steps at 8192 / 16384 positions) are recovered from a 7-token trace: the factor is read as a
    formula of the position, not from its values at the traced positions."""
    rep = attnpass.find(build(), (R.ids(),))
    assert len(rep.sites) == 2 and _relatives(rep) == [expected] * 2
    assert all(f"q scaled by {s.relative.describe()}" in s.notes for s in rep.sites)


def test_fx_names_qwen_logn_and_not_a_switched_off_or_plain_scaling(models) -> None:
    rep = attnpass.find(*models["qwen"])
    assert _relatives(rep) == [QWEN]
    assert rep.sites[0].summary()["relative"]["params"] == {"seq_length": 4.0}
    assert all(s.relative is None for s in attnpass.find(R.ministral3(beta=0.0), (R.ids(),)).sites)  # 1 + 0 * log(...)
    assert attnpass.find(*models["l4_plain"]).sites[0].relative is None


@pytest.mark.parametrize("name, expected, how", [
    ("l4", L4_SMALL, "expression"), ("m3", M3_SMALL, "expression"), ("m3_static", M3_SMALL, "table"), ("qwen", QWEN, "table")])
def test_onnx_names_relatives(onnx_files, name: str, expected, how: str) -> None:
    rep = aonnx.find(onnx_files[name])
    assert rep.sites and _relatives(rep) == [expected] * len(rep.sites)
    tabled = ["constant table" in n for s in rep.sites for n in s.relative.notes]
    assert all(tabled) if how == "table" else not any(tabled)


@pytest.mark.parametrize("name, expected", [("l4", L4_SMALL), ("m3", M3_SMALL), ("qwen", QWEN)])
def test_mlir_names_relatives(mlir_modules, name: str, expected) -> None:
    rep = am.find(mlir_modules[name])
    assert rep.sites and _relatives(rep) == [expected] * len(rep.sites)


# ------------------------------------------------------------------ refused, replaced, fitted

def test_fx_refuses_to_stack_then_replaces(models) -> None:
    model, args = models["l4"]
    refused = attnpass.to_ssmax(model, args, s=S)
    assert refused.attnpass_result.rewritten == [] and all("already scaled by Llama 4" in why
                                                          for why in refused.attnpass_result.left.values())
    replaced = attnpass.to_ssmax(model, args, s=S, replace_existing=True)
    assert replaced.attnpass_result.rewritten == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(replaced(*args), _reference(models, s=S), rtol=1e-5, atol=1e-5)
        assert (replaced(*args) - model(*args)).abs().max() > 1e-3  # the rewrite did change the model


def test_onnx_refuses_to_stack_then_replaces(models, onnx_files, tmp_path) -> None:
    src, ids = onnx_files["l4"], models["l4"][1][0]
    with pytest.raises(NothingRewritten, match="already scaled"):  # refused at every site: nothing written
        aonnx.rewrite(src, tmp_path / "refused.onnx", s=S)
    assert not (tmp_path / "refused.onnx").exists()
    out = tmp_path / "replaced.onnx"
    res = aonnx.rewrite(src, out, s=S, replace_existing=True)
    assert res.rewritten == [0, 1] and all(any(n.startswith("replaced Llama 4") for n in s.notes) for s in res.report.sites)
    sess = ort.InferenceSession(str(out))
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, _reference(models, s=S).numpy(), rtol=1e-4, atol=1e-5)


def test_mlir_refuses_to_stack_then_replaces(models, mlir_modules) -> None:
    mod, args = mlir_modules["l4"], models["l4"][1]
    _, refused = am.rewrite(mod, s=S, with_report=True)
    assert refused.rewritten == [] and all("already scaled" in why for why in refused.left.values())
    out, res = am.rewrite(mod, s=S, with_report=True, replace_existing=True)
    assert res.rewritten == [0, 1]
    got = am.compile(out, opt_level=0)(*args)
    got = got[0] if isinstance(got, tuple | list) else got
    torch.testing.assert_close(torch.as_tensor(got), _reference(models, s=S), rtol=1e-4, atol=1e-5)


def test_fit_existing_is_the_least_squares_ssmax(models) -> None:
    model, args = models["l4"]
    rel = attnpass.find(model, args).sites[0].relative
    positions = relatives.fit_positions(rel)
    s, b, rms, worst = relatives.fit_ssmax(rel, positions)
    target = 1 + 0.1 * np.log1p(np.floor((positions + 1) / 2))
    slope, intercept = np.polyfit(np.log(positions + 1), target, 1)
    assert (s, b) == (pytest.approx(slope, rel=1e-6), pytest.approx(intercept, rel=1e-6))
    assert rms == pytest.approx(np.sqrt(np.mean((s * np.log(positions + 1) + b - target) ** 2)), rel=1e-6) and worst >= rms
    gm = attnpass.to_ssmax(model, args, fit_existing=True)
    assert all(f"s={s:.6g}, b={b:.6g}" in s_.notes[-1] for s_ in gm.attnpass_report.sites)
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), _reference(models, s=s, b=b), rtol=1e-5, atol=1e-5)


def test_fit_of_the_production_llama4_tuning() -> None:
    """Llama 4's shipped tuning (floor_scale 8192, attn_scale 0.1) as SSMax: how close the best (s, b) gets."""
    rel = attnpass.find(R.llama4(), (R.ids(),)).sites[0].relative
    s, b, rms, worst = relatives.fit_ssmax(rel, relatives.fit_positions(rel))
    assert 0 < s < 0.2 and 0.5 < b < 1.0 and rms < 0.05 and worst < 0.5  # the worst at n = 1 (b vs 1)
    print(f"Llama 4 tuning (attn_scale=0.1, floor_scale=8192) ~ SSMax s={s:.5f} b={b:.5f} "
          f"over 0..{8 * 8192 - 1}: rms {rms:.4f}, max {worst:.4f}")


# ------------------------------------------------------------------ an SSMax attnpass already put there

def test_an_existing_ssmax_is_named_in_every_ir(tmp_path) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    gm = attnpass.to_ssmax(CausalTril(), (q, k, v), s=S)
    assert all(sk.reason.startswith("already SSMax (attnpass)") for sk in attnpass.find(gm).skipped)
    assert all(sk.reason.startswith("already SSMax (attnpass)") for sk in attnpass.find(gm, (q, k, v)).skipped)
    exported = torch.export.export(gm, (q, k, v), strict=False)  # the factor decomposed into ATen ops
    assert [sk.reason[:24] for sk in attnpass.find(exported).skipped] == ["already SSMax (attnpass)"]
    mlir_once = am.rewrite(am.import_(CausalTril(), (q, k, v)), s=S)
    assert [sk.reason[:24] for sk in am.find(mlir_once).skipped] == ["already SSMax (attnpass)"]
    src, once, twice = tmp_path / "m.onnx", tmp_path / "once.onnx", tmp_path / "twice.onnx"
    torch.onnx.export(CausalTril(), (q, k, v), str(src), dynamo=False, opset_version=17, input_names=["q", "k", "v"])
    aonnx.rewrite(src, once, s=S)
    rep = aonnx.find(once)
    assert [s.relative.family for s in rep.sites] == ["ssmax"]
    with pytest.raises(NothingRewritten, match=r"SSMax \(attnpass\)"):
        aonnx.rewrite(once, twice, s=S)
    res = aonnx.rewrite(once, twice, s=0.5, replace_existing=True)
    sess = ort.InferenceSession(str(twice))
    got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
    want = attnpass.ssmax_attention(q, k, v, s=torch.full((2,), 0.5), is_causal=True)
    assert res.rewritten == [0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_cli_flags(onnx_files, tmp_path, capsys) -> None:
    assert main(["rewrite", onnx_files["l4"], "-o", str(tmp_path / "a.onnx"), "--to", "ssmax", "--json"]) == 0
    refused = json.loads(capsys.readouterr().out)  # every site refused: said, like "nothing found", nothing written
    assert refused["written"] is None and "already scaled" in refused["message"]
    assert not (tmp_path / "a.onnx").exists()
    assert main(["rewrite", onnx_files["l4"], "-o", str(tmp_path / "b.onnx"), "--to", "ssmax", "--fit-existing", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rewritten"] == [0, 1] and data["spec"]["fit_existing"]
    assert all(any("fitted over positions 0..15" in n for n in s["notes"]) for s in data["sites"])
