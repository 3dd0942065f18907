"""transformers integration: attn_implementation="attnpass" / "attnpass_ssmax", generation, save/load."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import attnpass
import attnpass.errors
from attnpass import hf
from tests import hf_corpus as C

FAMILIES = ["bert", "gpt2", "llama", "t5", "vit", "mixtral", "gemma2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_implementation_equals_eager(name: str) -> None:
    torch.manual_seed(0)
    model, args, kwargs = getattr(C, name)()
    model.eval()
    with torch.no_grad():
        ref = C.output_tensor(model(*args, **kwargs))
        model.set_attn_implementation(hf.FUSED)
        out = C.output_tensor(model(*args, **kwargs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_ssmax_with_s0_b1_equals_eager_and_s_trains(name: str) -> None:
    torch.manual_seed(0)
    model, args, kwargs = getattr(C, name)()
    model.eval()
    with torch.no_grad():
        ref = C.output_tensor(model(*args, **kwargs))
    hf.to_ssmax(model, s=0.0, b=1.0)
    out = C.output_tensor(model(*args, **kwargs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    grads = [m.ssmax_s.grad for _, m in hf.attention_modules(model)]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _llm() -> T.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_key_value_heads=2, **{**C._decoder_common(), "use_cache": True})
    return T.LlamaForCausalLM(cfg).eval()


def test_implementation_name_is_known_to_transformers_after_import() -> None:
    cfg = T.LlamaConfig(num_key_value_heads=2, **{**C._decoder_common(), "attn_implementation": "attnpass"})
    model = T.LlamaModel(cfg)
    assert model.config._attn_implementation == "attnpass"


def test_generation_with_kv_cache_equals_eager() -> None:
    model = _llm()
    ids = torch.randint(3, C.VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation uses
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, **kw)
    model.set_attn_implementation(hf.FUSED)
    out = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


def test_ssmax_decode_steps_see_the_right_n() -> None:
    """Cached decoding must give the logits a full recompute gives: n is the number of keys, not 1 or 2."""
    model = hf.to_ssmax(_llm(), s=0.43)
    ids = torch.randint(3, C.VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefix = model(ids[:, :6], use_cache=True)
        cache, step_logits = prefix.past_key_values, []
        for t in range(6, 9):
            o = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            step_logits.append(o.logits[:, -1])
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, 6:9], rtol=1e-4, atol=1e-5)


def test_ssmax_matches_the_fx_rewrite() -> None:
    """The HF route and the graph route are one meaning (semantics.py)."""
    model = _llm()
    ids = torch.randint(3, C.VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    gm = attnpass.to_ssmax(model.model, (ids,), {"attention_mask": mask, "use_cache": False}, s=0.3)
    with torch.no_grad():
        via_fx = C.output_tensor(gm(ids, attention_mask=mask, use_cache=False))
        hf.to_ssmax(model, s=0.3)
        via_hf = C.output_tensor(model.model(ids, attention_mask=mask, use_cache=False))
    torch.testing.assert_close(via_hf[0], via_fx[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_hf[1, :5], via_fx[1, :5], rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trips_trained_s(tmp_path) -> None:
    model = hf.to_ssmax(_llm(), train_len=64)
    with torch.no_grad():
        for i, (_, m) in enumerate(hf.attention_modules(model)):
            m.ssmax_s.add_(0.01 * (i + 1) * torch.arange(m.ssmax_s.numel()))
    ids = torch.randint(3, C.VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(T.LlamaForCausalLM, tmp_path).eval()
    for (_, a), (_, b) in zip(hf.attention_modules(model), hf.attention_modules(loaded)):
        torch.testing.assert_close(a.ssmax_s, b.ssmax_s)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref)


def test_ssmax_without_conversion_is_a_clear_error() -> None:
    model = _llm()
    model.set_attn_implementation(hf.SSMAX)
    with pytest.raises(attnpass.errors.AttnpassError, match="to_ssmax"):
        model(torch.tensor([[3, 4, 5]]))
