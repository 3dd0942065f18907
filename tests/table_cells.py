"""The variant x IR table: every hand-written variant and every HF corpus family, run the same way in every IR.

One ``Variant`` is a module with positional tensor inputs and what it must give: the exact number of sites,
how many of them fuse (the rest carry ``blocker`` in their reason) and, for hand-written variants, the
``semantics`` call it means.  ``run_cell`` runs the four checks of one (variant, IR) cell and returns, per check,
``None`` (passed) or the failure's one-line message, so the test can assert an expected exception's reason
and ``benchmarks/variant_table.py`` can print the same table.  Exports and imports are cached in a ``Table``.

The checks, the same in every IR:
- ``found``: exactly ``sites`` sites, ``fused`` of them fusable and the others blocked by ``blocker``;
- ``fused``: the fused rewrite rewrites exactly those and equals the original (fp32: 1e-5 in torch,
  1e-4 in onnxruntime and through the MLIR JIT, which the repository's validation uses);
- ``ssmax_id``: SSMax with ``s=0, b=1`` equals the original;
- ``ssmax``: SSMax with ``s=0.43`` equals ``semantics`` (fx, hand-written; HF families: the fused and the
  in-graph SSMax agree and change the model) and, in the other IRs, the fx SSMax module's output.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnpass import semantics
from tests import attention_modules as M
from tests import gap_modules as G
from tests import hf_corpus as hc

CHECKS = ("found", "fused", "ssmax_id", "ssmax")
IRS = ("fx", "onnx-ts", "onnx-dynamo", "mlir", "mlir-onnx")
S_SSMAX = 0.43
B, H, S, D = 2, 4, 9, 8


@dataclass(frozen=True)
class Variant:
    """One row: how to build it and what every IR must find in it."""

    name: str
    build: Callable[[], tuple[torch.nn.Module, tuple]]
    sites: int = 1
    fused: int | None = None  # sites that fuse; None: all of them
    blocker: str | None = None  # a word each unfusable site's reason holds
    sem: Callable[..., torch.Tensor] | None = None  # sem(ssmax_s=...) -> what the module means; None: HF family
    irs: tuple[str, ...] = IRS[:4]
    facts: dict[str, Any] = field(default_factory=dict)  # site attribute -> value, on every site in every IR
    onnx_target: str = "ort"  # the fused ONNX op: onnxruntime's MultiHeadAttention has no softcap, opset 23 does
    # IR -> (what every check's failure holds, why the cell is "n/a"): the IR cannot take the model at all for a
    # reason outside attnpass (an exporter without the op); the test holds every check to that failure
    not_applicable: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def n_fused(self) -> int:
        return self.sites if self.fused is None else self.fused


# ------------------------------------------------------------------ hand-written variants

def _qkv(sq: int = S, sk: int = S, hk: int = H, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, sq, D, generator=g), torch.randn(B, hk, sk, D, generator=g), torch.randn(B, hk, sk, D, generator=g)


def _keep(sk: int = S) -> torch.Tensor:
    keep = torch.ones(B, sk, dtype=torch.bool)
    keep[1, sk - 3:] = False
    return keep


def _sem(args: tuple, q_factor: torch.Tensor | None = None, **kw: Any) -> Callable[..., torch.Tensor]:
    """``semantics.attention`` in float64 on the variant's own q, k, v (q times a run-time scale if any)."""

    def run(**extra: Any) -> torch.Tensor:
        q, k, v = (x.double() for x in args[:3])
        if q_factor is not None:
            q = q * q_factor.double()
        dkw = {key: val.double() if isinstance(val, torch.Tensor) and val.is_floating_point() else val for key, val in kw.items()}
        return semantics.attention(q, k, v, **dkw, **extra).float()

    return run


def _hand(name: str, module: torch.nn.Module, args: tuple, q_factor: torch.Tensor | None = None,
          sem: dict | None = None, **kw: Any) -> Variant:
    module = module.eval()
    return Variant(name, lambda: (module, args), sem=_sem(args, q_factor, **(sem or {})), irs=IRS, **kw)


def hand_written() -> list[Variant]:
    q, k, v = _qkv()
    keep = _keep()
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    causal_pad = semantics.causal_allowed(S, S) & keep[:, None, None, :]
    qg, kg, vg = _qkv(hk=2)
    qc, kc, vc = _qkv(sq=5, sk=11)
    cross_mask = torch.where(_keep(11), 0.0, float("-inf"))[:, None, None, :] + 0.1 * torch.randn(
        1, H, 5, 11, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    bias = 0.5 * torch.randn(B, H, S, S, generator=g)
    temp = torch.linspace(0.2, 0.6, H).reshape(H, 1, 1)
    temp_in = torch.rand(H, 1, 1, generator=g) + 0.5
    cap = 5.0
    return [
        _hand("causal_tril", M.CausalTril(), (q, k, v), sem=dict(is_causal=True), facts=dict(causal=True)),
        _hand("padded_additive", M.PaddedAdditive(), (q, k, v, keep), sem=dict(attn_mask=additive)),
        _hand("gqa_where", M.GQARepeatInterleave(), (qg, kg, vg, causal_pad), sem=dict(attn_mask=causal_pad, enable_gqa=True),
              facts=dict(gqa=True)),
        _hand("cross_einsum", M.CrossEinsum(), (qc, kc, vc, cross_mask), sem=dict(attn_mask=cross_mask)),
        _hand("baddbmm_3d", M.Baddbmm3D(), (q, k, v, bias), sem=dict(attn_mask=bias)),
        _hand("softcap_prescaled", M.SoftcapPrescaled(cap), (q, k, v), sem=dict(is_causal=True, softcap=cap),
              facts=dict(causal=True, softcap=cap), onnx_target="onnx23"),
        _hand("sdpa_mask", M.SDPACall(), (q, k, v, causal_pad), sem=dict(attn_mask=causal_pad)),
        _hand("sdpa_causal", M.SDPACausal(), (q, k, v), sem=dict(is_causal=True), facts=dict(causal=True)),
        _hand("inplace_div_add", G.InplaceDivAddMask(), (q, k, v, additive), sem=dict(attn_mask=additive)),
        _hand("inplace_methods", G.InplaceMethods(), (q, k, v, causal_pad), sem=dict(attn_mask=causal_pad)),
        _hand("inplace_div_method", G.InplaceDivMethod(), (q, k, v, bias), sem=dict(attn_mask=bias)),
        _hand("bmm_view_scale", G.Bmm3DViewNoMask(), (q, k, v)),
        _hand("bmm_3d_padding", G.Bmm3DMasked(), (q, k, v, additive.expand(B, H, S, S).reshape(B * H, S, S)),
              sem=dict(attn_mask=additive)),
        # fairseq / MBart: the padding mask added in a [B, H, S, S] view of the [B*H, S, S] scores
        _hand("bmm_view4d_mask", G.Bmm3DView4DMask(), (q, k, v, additive), sem=dict(attn_mask=additive)),
        _hand("bmm_3d_causal_bias", G.Bmm3DMasked(causal=True), (q, k, v, bias[0, 0]),
              sem=dict(attn_mask=bias[0, 0].masked_fill(~semantics.causal_allowed(S, S), float("-inf")))),
        # a [H, 1, 1] factor constant along S_q and S_k moves onto q: (q * t) . k == t * (q . k)
        _hand("tensor_scale_param", G.TensorScale(H), (q, k, v), q_factor=temp, sem=dict(scale=1.0)),
        _hand("tensor_scale_input", G.TensorScaleInput(), (q, k, v, temp_in), q_factor=1.0 / temp_in, sem=dict(scale=1.0)),
        _hand("constant_added", G.ConstantAdded(), (q, k, v)),
        _hand("sliding_window", G.SlidingWindow(3), (q, k, v),
              sem=dict(attn_mask=(torch.arange(S)[None, :] <= torch.arange(S)[:, None])
                        & (torch.arange(S)[None, :] > torch.arange(S)[:, None] - 3))),
        # the cell that must NOT fuse: the probabilities are also an output (output_attentions)
        _hand("returns_probs", M.ReturnsProbs(), (q, k, v), fused=0, blocker="also used"),
    ]


# ------------------------------------------------------------------ HF corpus families

class Flat(torch.nn.Module):
    """Positional inputs only (exporters name them in0, in1, ...), the main output only."""

    def __init__(self, model: torch.nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        n = len(xs) - len(self.keys)
        return hc.output_tensor(self.model(*xs[:n], **dict(zip(self.keys, xs[n:]))))


def _hf_builder(family: str) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    def build() -> tuple[torch.nn.Module, tuple]:
        torch.manual_seed(0)
        model, args, kwargs = getattr(hc, family)()
        if family == "mixtral":  # the default grouped_mm experts call aten.histc, which torch-mlir cannot lower
            model.set_experts_implementation("batched_mm")
        return Flat(model.eval(), list(kwargs)).eval(), tuple(args) + tuple(kwargs.values())

    return build


#: family -> exact sites (T5: encoder self, decoder self and cross per layer; seq2seq: one layer each)
HF_SITES = {"bert": 2, "gpt2": 2, "llama": 2, "t5": 6, "vit": 2, "mixtral": 2, "gemma2": 2, "llama_sdpa": 2,
            "falcon": 2, "bart": 3, "whisper": 3, "gpt_neox": 2, "phi": 2, "qwen2": 2, "mistral": 2,
            "clip_text": 2, "distilbert": 2}
_GQA = dict(gqa=True, kv_heads=2)
HF_FACTS = {"gemma2": dict(softcap=50.0, **_GQA), "gpt2": dict(causal=True), "llama": dict(causal=True, **_GQA),
            "mixtral": dict(causal=True, **_GQA), "llama_sdpa": _GQA, "qwen2": _GQA, "mistral": _GQA,
            "falcon": dict(kv_heads=1), "bert": dict(kv_heads=4)}


#: family -> IR -> (failure, why n/a): Whisper's own code calls ``torch.diff``, which the TorchScript exporter lacks
HF_NOT_APPLICABLE = {"whisper": {"onnx-ts": ("Exporting the operator 'aten::diff'",
                                             "the torchscript exporter cannot export aten::diff")}}


def hf_families() -> list[Variant]:
    return [Variant(f"hf_{name}", _hf_builder(name), sites=n, facts=HF_FACTS.get(name, {}),
                    onnx_target="onnx23" if name == "gemma2" else "ort", not_applicable=HF_NOT_APPLICABLE.get(name, {}))
            for name, n in HF_SITES.items()]


def not_applicable_text(v: Variant, ir: str, got: dict[str, str | None]) -> str | None:
    """``n/a (why)`` for a cell the IR cannot take, when every check failed for that reason; else None."""
    na = v.not_applicable.get(ir)
    if na is None or not all(msg is not None and na[0] in msg for msg in got.values()):
        return None
    return f"n/a ({na[1]})"


def variants() -> list[Variant]:
    return hand_written() + hf_families()


# ------------------------------------------------------------------ running one cell

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:1000] if text else ''}"


def _as_list(out: Any) -> list[np.ndarray]:
    if isinstance(out, dict):
        return [np.asarray(x) for x in out.values()]
    if isinstance(out, list | tuple):
        return [np.asarray(x.detach() if isinstance(x, torch.Tensor) else x) for x in out]
    return [np.asarray(out.detach() if isinstance(out, torch.Tensor) else out)]


def close(got: Any, want: Any, rtol: float, atol: float, what: str) -> None:
    """Every output of ``got`` equals ``want``'s within fp32 tolerance; raises with the worst difference."""
    got_l, want_l = _as_list(got), _as_list(want)
    assert len(got_l) == len(want_l), f"{what}: {len(got_l)} outputs, want {len(want_l)}"
    for a, b in zip(got_l, want_l):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


class Table:
    """Caches what cells share: the built module, its eager and fx SSMax outputs, exports and imports."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="variant_table_"))
        self._built: dict[str, tuple] = {}
        self._ref: dict[str, dict[str, Any]] = {}
        self._onnx: dict[tuple[str, str], Path] = {}

    def built(self, v: Variant) -> tuple[torch.nn.Module, tuple, Any]:
        """(module, inputs, eager output), built once per variant."""
        if v.name not in self._built:
            module, args = v.build()
            with torch.no_grad():
                self._built[v.name] = (module, args, module(*args))
        return self._built[v.name]

    def exported(self, v: Variant) -> Any:
        if "ep" not in self._ref.setdefault(v.name, {}):
            module, args, _ = self.built(v)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._ref[v.name]["ep"] = torch.export.export(module, args, strict=False)
        return self._ref[v.name]["ep"]

    def fx_ssmax(self, v: Variant) -> Any:
        """The fx SSMax module's output at ``s=0.43``: the reference the other IRs are held to."""
        if "ssmax" not in self._ref.setdefault(v.name, {}):
            import attnpass

            _, args, _ = self.built(v)
            with torch.no_grad():
                self._ref[v.name]["ssmax"] = attnpass.to_ssmax(self.exported(v), s=S_SSMAX)(*args)
        return self._ref[v.name]["ssmax"]

    def onnx(self, v: Variant, exporter: str) -> Path:
        key = (v.name, exporter)
        if key not in self._onnx:
            module, args, _ = self.built(v)
            path = self.root / f"{v.name}_{exporter}.onnx"
            # the TorchScript exporter prints the whole graph to stdout when an op cannot be exported
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), dynamo=exporter == "dynamo",
                                  opset_version=18 if exporter == "dynamo" else 17,
                                  input_names=[f"in{i}" for i in range(len(args))],
                                  **({"verbose": False} if exporter == "dynamo" else {}))
            self._onnx[key] = path
        return self._onnx[key]


def _check_found(v: Variant, sites: Any) -> None:
    sites = list(sites)
    assert len(sites) == v.sites, f"{len(sites)} sites, want {v.sites}"
    fusable = sum(s.fusable for s in sites)
    assert fusable == v.n_fused, f"{fusable} fusable, want {v.n_fused}: {[s.fuse_blocker for s in sites]}"
    for s in sites:
        assert s.fusable or (v.blocker or "") in (s.fuse_blocker or ""), s.fuse_blocker
        for attr, want in v.facts.items():
            assert getattr(s, attr) == want, f"fact: {attr} = {getattr(s, attr)!r}, want {want!r}"


def _run_checks(steps: dict[str, Callable[[], None]]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, step in steps.items():
        try:
            step()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - a cell records any failure as its message
            out[name] = _first_line(e)
    return out


def _fx_cell(t: Table, v: Variant) -> dict[str, Callable[[], None]]:
    import attnpass

    attn = torch.ops.attnpass.attention.default
    _, args, want = t.built(v)

    def run(gm: Any) -> Any:
        with torch.no_grad():
            return gm(*args)

    def fused() -> None:
        gm = attnpass.fuse(t.exported(v))
        n = sum(node.target == attn for node in gm.graph.nodes)
        assert n == v.n_fused, f"{n} fused, want {v.n_fused}"
        close(run(gm), want, 1e-5, 1e-5, "fused vs original")

    def ssmax_id() -> None:
        for f in (False, True):
            close(run(attnpass.to_ssmax(t.exported(v), s=0.0, b=1.0, fused=f)), want, 1e-5, 1e-5, f"SSMax(0, 1) fused={f}")

    def ssmax() -> None:
        plain = t.fx_ssmax(v)
        fused_ss = run(attnpass.to_ssmax(t.exported(v), s=S_SSMAX, fused=True))
        if v.sem is not None:
            # the first output is the attention output (returns_probs also returns the probabilities)
            close(_as_list(plain)[0], v.sem(ssmax_s=S_SSMAX), 1e-5, 2e-5, "SSMax vs semantics")
        else:  # HF: two routes to one meaning, and the model did change
            assert np.abs(_as_list(plain)[0] - _as_list(want)[0]).max() > 1e-6, "SSMax did not change the model"
        close(fused_ss, plain, 1e-5, 2e-5, "fused SSMax vs in-graph SSMax")

    return {"found": lambda: _check_found(v, attnpass.find(t.exported(v)).sites), "fused": fused,
            "ssmax_id": ssmax_id, "ssmax": ssmax}


def _onnx_cell(t: Table, v: Variant, exporter: str) -> dict[str, Callable[[], None]]:
    import attnpass.onnx as aonnx
    from attnpass.validate import run

    _, args, _ = t.built(v)
    feeds = {f"in{i}": x.numpy() for i, x in enumerate(args)}
    out = t.root / f"{v.name}_{exporter}"

    def fused() -> None:
        if v.n_fused == 0:  # nothing fusable: said with each site's reason, nothing written (like no attention)
            from attnpass.errors import NothingRewritten

            try:
                aonnx.rewrite(t.onnx(v, exporter), f"{out}_fused.onnx", to="fused", target=v.onnx_target, inputs=feeds)
            except NothingRewritten as e:
                assert (v.blocker or "") in str(e) and not Path(f"{out}_fused.onnx").exists(), str(e)
                return
            raise AssertionError("a model with nothing fusable was rewritten to fused")
        res = aonnx.rewrite(t.onnx(v, exporter), f"{out}_fused.onnx", to="fused", target=v.onnx_target, inputs=feeds)
        assert len(res.rewritten) == v.n_fused, f"{len(res.rewritten)} fused, want {v.n_fused}: {res.left}"
        assert all((v.blocker or "") in why for why in res.left.values()), res.left
        assert v.n_fused == 0 or res.validation.passed

    def ssmax_id() -> None:
        res = aonnx.rewrite(t.onnx(v, exporter), f"{out}_id.onnx", to="ssmax", s=0.0, bias=1.0, inputs=feeds)
        assert len(res.rewritten) == v.sites and res.validation.passed, res.left

    def ssmax() -> None:
        res = aonnx.rewrite(t.onnx(v, exporter), f"{out}_ssmax.onnx", to="ssmax", s=S_SSMAX, inputs=feeds)
        assert len(res.rewritten) == v.sites, res.left  # a site left alone is named, not compared
        close(run(f"{out}_ssmax.onnx", feeds), t.fx_ssmax(v), 1e-4, 1e-4, "ONNX SSMax vs fx SSMax")

    return {"found": lambda: _check_found(v, aonnx.find(t.onnx(v, exporter)).sites), "fused": fused,
            "ssmax_id": ssmax_id, "ssmax": ssmax}


def _mlir_cell(t: Table, v: Variant, source: str) -> dict[str, Callable[[], None]]:
    from attnpass import mlir as am

    module, args, want = t.built(v)
    cache: dict[str, Any] = {}

    def imported() -> Any:
        if "m" not in cache:
            cache["m"] = am.import_(module, args) if source == "torch" else am.import_(str(t.onnx(v, "torchscript")))
        return cache["m"]

    def jit(**kw: Any) -> Any:
        mod, res = am.rewrite(imported(), with_report=True, **kw)
        return res, am.compile(mod, opt_level=0)(*args)

    def fused() -> None:
        res, got = jit(to="fused")
        assert len(res.rewritten) == v.n_fused, f"{len(res.rewritten)} fused, want {v.n_fused}: {res.left}"
        assert all((v.blocker or "") in why for why in res.left.values()), res.left
        close(got, want, 1e-4, 1e-4, "MLIR fused vs original")

    def ssmax_jit(**kw: Any) -> Any:
        res, got = jit(to="ssmax", **kw)
        assert len(res.rewritten) == v.sites, res.left  # a site left alone is named, not compared
        return got

    def ssmax_id() -> None:
        close(ssmax_jit(s=0.0, b=1.0), want, 1e-4, 1e-4, "MLIR SSMax(0, 1) vs original")

    def ssmax() -> None:
        close(ssmax_jit(s=S_SSMAX), t.fx_ssmax(v), 1e-4, 1e-4, "MLIR SSMax vs fx SSMax")

    return {"found": lambda: _check_found(v, am.find(imported()).sites), "fused": fused, "ssmax_id": ssmax_id,
            "ssmax": ssmax}


def run_cell(t: Table, v: Variant, ir: str) -> dict[str, str | None]:
    """Per check: None (passed) or the failure's first line.  A failed export/import fails every check."""
    if ir == "fx":
        steps = _fx_cell(t, v)
    elif ir.startswith("onnx-"):
        steps = _onnx_cell(t, v, {"onnx-ts": "torchscript", "onnx-dynamo": "dynamo"}[ir])
    else:
        steps = _mlir_cell(t, v, "torch" if ir == "mlir" else "onnx")
    return _run_checks(steps)
