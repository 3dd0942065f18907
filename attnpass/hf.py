"""Hugging Face transformers integration: ``attn_implementation="attnpass"`` and ``"attnpass_ssmax"``.

transformers (v5) routes every model family's attention through one registry
(``AttentionInterface``) and builds masks through another (``AttentionMaskInterface``).
Registering our op in both gives every family in the corpus fused attention, and SSMax with
the right ``n`` during generation: HF hands the function the boolean mask over the whole
cache (or ``None`` when every cached key is visible), from which the op counts ``n`` per row.

SSMax needs per-head parameters on each attention module (``<attention module>.ssmax_s``, optional
``ssmax_b``).  A model built with ``attn_implementation="attnpass_ssmax"`` gets them at construction
(``hf_params``); ``to_ssmax(model)`` adds them to a model built otherwise.  Either way the settings
are recorded in ``model.config.attnpass_ssmax`` so ``save_pretrained`` keeps them, and a plain
``from_pretrained(..., attn_implementation="attnpass_ssmax")`` loads the trained values.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from attnpass import hf_params, semantics
from attnpass.errors import AttnpassError
from attnpass.lowering.ops import attention
from attnpass.spec import RewriteSpec

log = logging.getLogger(__name__)

FUSED = "attnpass"
SSMAX = "attnpass_ssmax"
_registered = False


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                       ssmax: bool = False, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The function HF calls per layer: ``[B, H, S, D]`` in, ``[B, S, H, D]`` out, no weights returned."""
    s_param = b_param = None
    if ssmax:
        s_param = getattr(module, "ssmax_s", None)
        b_param = getattr(module, "ssmax_b", None)
        if s_param is None:
            raise AttnpassError(
                f"{type(module).__name__} has no SSMax parameters: build the model with attn_implementation="
                f"'{SSMAX}' (from_config / from_pretrained) or convert it with attnpass.hf.to_ssmax(model)"
            )
    q_len = query.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    mask = attention_mask
    if position_bias is not None:
        bias = position_bias.to(query.dtype)
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, bias, torch.finfo(bias.dtype).min)
        else:
            mask = bias + mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    gqa = key.shape[1] != query.shape[1]
    if dropout > 0.0 and module.training:
        # the fused op has no dropout: train through SDPA (SSMax as a factor on q), same meaning
        if ssmax:
            out = semantics.ssmax_sdpa(query, key, value, mask, dropout, causal, scaling, gqa, s_param, b_param)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=gqa)
    else:
        out = attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, ssmax_s=s_param,
                        ssmax_b=b_param, softcap=kwargs.get("softcap"), enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def fused_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """``attn_implementation="attnpass"``: same meaning as eager attention, one fused op."""
    return _attention_forward(module, query, key, value, attention_mask, ssmax=False, **kwargs)


def ssmax_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """``attn_implementation="attnpass_ssmax"``: SSMax with the module's ``ssmax_s``/``ssmax_b``."""
    return _attention_forward(module, query, key, value, attention_mask, ssmax=True, **kwargs)


def register() -> None:
    """Register both implementations and their mask builder (HF's boolean SDPA masks) with transformers."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    hf_params.install()
    AttentionInterface.register(FUSED, fused_attention_forward)
    AttentionInterface.register(SSMAX, ssmax_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FUSED, sdpa_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SSMAX, sdpa_mask)
    _registered = True


# ------------------------------------------------------------------ converting models

attention_modules = hf_params.attention_modules


def to_ssmax(model: nn.Module, s: float | None = None, b: float | None = None, train_len: int | None = None,
             replace_existing: bool = False) -> nn.Module:
    """Convert a (pretrained) HF model's attention to SSMax in place; weights are kept, ``s`` is trainable.

    ``train_len=L`` sets ``s = 1/log(L)``: the converted model equals the original for rows that
    see exactly ``L`` keys, and sharpens attention beyond.  Existing SSMax parameters are replaced.
    The explicit route; ``attn_implementation="attnpass_ssmax"`` at construction does the same with
    ``train_len`` from the config (see ``hf_params``).  A model whose config switches on a relative of
    SSMax (Llama 4 temperature tuning, ``llama_4_scaling``, Qwen-1 log-n) is refused unless
    ``replace_existing=True``, which switches that scaling off.
    """
    register()
    spec = RewriteSpec.of("ssmax", s=s, b=b, train_len=train_len)
    s, b = float(spec.s_value), None if spec.b is None else float(spec.b)
    config = getattr(model, "config", None)
    given = getattr(config, hf_params.CONFIG_KEY, None) or {}
    hf_params.refuse_or_remove_existing(model, replace_existing or bool(given.get("replace_existing")))
    hf_params.add_parameters(model, s, b, replace=True)
    if config is not None:
        setattr(config, hf_params.CONFIG_KEY, {"s": s, "b": b, "train_len": spec.train_len,
                                               "replace_existing": replace_existing or bool(given.get("replace_existing"))})
    model.set_attn_implementation(SSMAX)
    return model


def from_pretrained(model_cls: Any, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``model_cls.from_pretrained`` choosing ``attnpass_ssmax`` when the saved config says the model was converted.

    Plain ``model_cls.from_pretrained(path, attn_implementation="attnpass_ssmax")`` restores the trained
    parameters by itself (``hf_params``); this only saves remembering the setting."""
    register()
    with open(os.path.join(path, "config.json")) as f:
        settings = json.load(f).get(hf_params.CONFIG_KEY)
    if settings is None:
        return model_cls.from_pretrained(path, **kwargs)
    return model_cls.from_pretrained(path, attn_implementation=SSMAX, **kwargs)
