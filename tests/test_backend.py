"""torch.compile(backend="attnpass"): the rewrite happens in dynamo's graph, forward and backward."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

import attnpass
from attnpass.lowering import backend
from tests import attention_modules as M
from tests.hf_corpus import llama, output_tensor

B, H, S, D = 2, 4, 9, 8


def _qkv(requires_grad: bool = False):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(B, H, S, D, generator=g).requires_grad_(requires_grad) for _ in range(3))


def _compile(module, **options):
    torch._dynamo.reset()
    backend.reports.clear()
    return torch.compile(module, backend="attnpass", options=options)


@pytest.mark.parametrize("module", [M.CausalTril(), M.SoftcapPrescaled(), M.CrossEinsum()], ids=lambda m: type(m).__name__)
def test_fuse_in_dynamo_graph_forward_and_backward(module) -> None:
    q, k, v = _qkv(requires_grad=True)
    extra = (torch.zeros(1, 1, S, S),) if isinstance(module, M.CrossEinsum) else ()
    compiled = _compile(module.eval(), inner="eager")
    out = compiled(q, k, v, *extra)
    assert sum(len(r.sites) for r in backend.reports) == 1
    ref = module(q, k, v, *extra)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    g_out = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ssmax_option_matches_semantics() -> None:
    q, k, v = _qkv()
    compiled = _compile(M.CausalTril().eval(), rewrite="ssmax", s=0.43, inner="eager")
    torch.testing.assert_close(compiled(q, k, v), attnpass.ssmax_attention(q, k, v, is_causal=True, s=0.43), rtol=1e-5, atol=2e-5)


def test_inductor_default_on_a_hf_model() -> None:
    model, args, kwargs = llama()
    model.eval()
    compiled = _compile(model)
    with torch.no_grad():
        out = output_tensor(compiled(*args, **kwargs))
        ref = output_tensor(model(*args, **kwargs))
    assert sum(len(r.sites) for r in backend.reports) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_options_are_named() -> None:
    q, k, v = _qkv()
    with pytest.raises(Exception, match="rewrite must be"):
        _compile(M.CausalTril().eval(), rewrite="nope")(q, k, v)
    with pytest.raises(Exception, match="unknown options"):
        _compile(M.CausalTril().eval(), bogus=1)(q, k, v)


def test_registered_through_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("attnpass") == "attnpass.lowering.backend:attnpass_backend"
    assert "attnpass" in torch._dynamo.list_backends()


def test_backend_works_without_importing_attnpass() -> None:
    """Through the torch_dynamo_backends entry point alone, as a user's script would reach it."""
    import subprocess
    import sys

    code = (
        "import torch, sys\n"
        "assert 'attnpass' not in sys.modules\n"
        "def f(q, k, v):\n"
        "    return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v\n"
        "q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))\n"
        "out = torch.compile(f, backend='attnpass', options={'inner': 'eager'})(q, k, v)\n"
        "torch.testing.assert_close(out, f(q, k, v))\n"
        "from attnpass.lowering import backend\n"
        "assert sum(len(r.sites) for r in backend.reports) == 1\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


@pytest.mark.parametrize("module", [M.CausalTril(64), M.PaddedAdditive()], ids=lambda m: type(m).__name__)
def test_dynamic_shapes_one_graph_many_lengths(module) -> None:
    """Under ``dynamic=True`` the scale is a run-time scalar; fused onto q, the site still fuses."""
    compiled = torch.compile(module.eval(), backend="attnpass", dynamic=True, options={"inner": "eager"})
    torch._dynamo.reset()
    backend.reports.clear()
    for s in (9, 13, 17):
        g = torch.Generator().manual_seed(s)
        args = tuple(torch.randn(2, 4, s, 8, generator=g) for _ in range(3))
        if isinstance(module, M.PaddedAdditive):
            args = args + (torch.rand(2, s, generator=g) > 0.2,)
        torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=5e-6)
    assert [len(r.sites) for r in backend.reports] == [1]


def test_demo_cli_json() -> None:
    """``attnpass demo --json``: the torch half's numbers, machine-readable, exit 0."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "attnpass.cli", "demo", "--json", "--no-onnx", "--seq", "32"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["ok"] is True and len(data["sites"]["sites"]) == 2
    by = {r["variant"]: r for r in data["torch"]}
    assert by["fused (attnpass::attention)"]["max_abs_err"] < 1e-5


def test_ssmax_with_default_inductor_trains_s() -> None:
    """The headline use: SSMax through the backend with its default inner compiler, forward and a training
    step; the backend's ``s`` gets the same gradient as the same conversion done by ``attnpass.to_ssmax``."""
    q, k, v = _qkv(requires_grad=True)
    module = M.CausalTril().eval()
    compiled = _compile(module, rewrite="ssmax", s=0.43)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, attnpass.ssmax_attention(q, k, v, is_causal=True, s=0.43), rtol=1e-5, atol=2e-5)
    out.square().sum().backward()
    (res,) = backend.reports
    (name, s_param), = res.parameters.items()
    assert name.startswith("attnpass_ssmax.s_") and s_param.grad is not None
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = attnpass.to_ssmax(module, (q2, k2, v2), s=0.43)
    ref(q2, k2, v2).square().sum().backward()
    ref_s = dict(ref.named_parameters())[name]
    assert ref_s.grad.abs().max() > 0
    torch.testing.assert_close(s_param.grad, ref_s.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-4, atol=1e-5)


def test_rewrite_vocabulary_matches_the_cli() -> None:
    """``rewrite="fused"`` (the CLI's word) is the backend's default; ``"fuse"`` stays accepted."""
    q, k, v = _qkv()
    for word in ("fused", "fuse"):
        out = _compile(M.CausalTril().eval(), rewrite=word, inner="eager")(q, k, v)
        assert backend.reports[-1].to == "fused" and backend.reports[-1].rewritten == [0]
        torch.testing.assert_close(out, attnpass.attention(q, k, v, is_causal=True), rtol=1e-5, atol=2e-6)


def test_ssmax_inductor_recompiles_on_new_lengths() -> None:
    """No ``dynamic=`` given: a new length recompiles (dynamo's automatic dynamic) and stays right."""
    module = M.CausalTril(32).eval()
    compiled = _compile(module, rewrite="ssmax", s=0.5)
    with torch.no_grad():
        for s in (9, 13, 17):
            g = torch.Generator().manual_seed(s)
            q, k, v = (torch.randn(1, 2, s, 8, generator=g) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), attnpass.ssmax_attention(q, k, v, is_causal=True, s=0.5),
                                       rtol=1e-5, atol=2e-5)
    assert 1 < len(backend.reports) <= 3 and all(r.rewritten == [0] for r in backend.reports)


def test_ssmax_inductor_dynamic_true_compiles_once() -> None:
    """``dynamic=True``: one graph (one SSMax rewrite, one Inductor compile) serves every length."""
    module = M.CausalTril(32).eval()
    torch._dynamo.reset()
    backend.reports.clear()
    compiled = torch.compile(module, backend="attnpass", dynamic=True, options={"rewrite": "ssmax", "s": 0.5})
    with torch.no_grad():
        for s in (9, 14):
            g = torch.Generator().manual_seed(s)
            q, k, v = (torch.randn(2, 2, s, 8, generator=g) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), attnpass.ssmax_attention(q, k, v, is_causal=True, s=0.5),
                                       rtol=1e-5, atol=2e-5)
    assert [r.rewritten for r in backend.reports] == [[0]]
