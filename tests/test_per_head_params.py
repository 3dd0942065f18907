"""Per-head SSMax parameters in fx and ONNX, with the meaning MLIR gives them: ``s``/``b`` may be one value per
head (``H`` values, broadcast over ``[B, H, S_q, S_k]``), a scalar is repeated, any other count is an error.

The reference is ``semantics.attention`` with ``[H]`` tensors for ``s`` and ``b``; heads with different ``s``
differ, so a factor applied to the wrong head (or one head's value to all) fails the comparison.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import attnpass
import attnpass.onnx as aonnx
from attnpass import semantics
from attnpass.spec import SpecError, per_head
from tests import attention_modules as M

B, H, S, D = 2, 4, 7, 8
S_PER_HEAD = [0.0, 0.3, 0.8, 1.5]
B_PER_HEAD = [1.0, 0.9, 0.2, -0.1]


def _qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(B, H, S, D, generator=g) for _ in range(3))


def _want(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return semantics.attention(q, k, v, is_causal=True, ssmax_s=torch.tensor(S_PER_HEAD), ssmax_b=torch.tensor(B_PER_HEAD))


def test_per_head_rule() -> None:
    assert per_head(0.5, 3, "s") == (0.5, 0.5, 0.5)
    assert per_head((0.5,), None, "s") == (0.5,)
    assert per_head([1, 2, 3], 3, "b") == (1.0, 2.0, 3.0)
    with pytest.raises(SpecError, match="s has 2 values for 3 heads at node_7"):
        per_head([1, 2], 3, "s", "node_7")
    with pytest.raises(SpecError, match="not known"):
        per_head([1, 2], None, "s")


@pytest.mark.parametrize("module", [M.CausalTril(), M.SDPACausal()], ids=["explicit", "sdpa"])
@pytest.mark.parametrize("fused", [False, True], ids=["inplace", "fused"])
def test_fx_per_head_s_and_b(module: torch.nn.Module, fused: bool) -> None:
    q, k, v = _qkv()
    ss = attnpass.to_ssmax(module.eval(), (q, k, v), s=S_PER_HEAD, b=B_PER_HEAD, fused=fused)
    state = ss.state_dict()
    assert state["attnpass_ssmax.s_0"].tolist() == pytest.approx(S_PER_HEAD)
    assert state["attnpass_ssmax.b_0"].tolist() == pytest.approx(B_PER_HEAD)
    torch.testing.assert_close(ss(q, k, v), _want(q, k, v), rtol=1e-5, atol=1e-5)


def test_fx_wrong_count_names_the_heads() -> None:
    q, k, v = _qkv()
    with pytest.raises(SpecError, match=f"s has 3 values for {H} heads"):
        attnpass.to_ssmax(M.CausalTril().eval(), (q, k, v), s=S_PER_HEAD[:3])


@pytest.fixture(scope="module")
def causal_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("per_head") / "causal.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(M.CausalTril().eval(), _qkv(), str(path), dynamo=False, opset_version=17,
                          input_names=["q", "k", "v"])
    return path


@pytest.mark.parametrize("to", ["ssmax", "fused"])
def test_onnx_per_head_s_and_b(causal_onnx: Path, to: str, tmp_path: Path) -> None:
    q, k, v = _qkv()
    out = tmp_path / "out.onnx"
    res = aonnx.rewrite(causal_onnx, out, to=to, s=S_PER_HEAD, bias=B_PER_HEAD, ssmax=True)
    assert len(res.rewritten) == 1 and res.validation.passed
    got = ort.InferenceSession(str(out)).run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
    np.testing.assert_allclose(got, _want(q, k, v).numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_wrong_count_writes_nothing(causal_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    with pytest.raises(SpecError, match=f"b has 2 values for {H} heads"):
        aonnx.rewrite(causal_onnx, out, to="ssmax", s=0.4, bias=[0.1, 0.2])
    assert not out.exists()
