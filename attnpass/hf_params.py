"""SSMax parameters that exist as soon as an ``attn_implementation="attnpass_ssmax"`` model is built.

An attention function registered with transformers' ``AttentionInterface`` is only called in the
forward pass, so it cannot give the model parameters: an optimizer created right after
``from_config`` / ``from_pretrained`` would never see them.  transformers has no hook for an
attention implementation to add weights, but every model ends its ``__init__`` with
``PreTrainedModel.post_init`` and initialises weights a checkpoint lacks through
``PreTrainedModel._initialize_weights``.  ``install()`` wraps those two:

* ``post_init``: when the config asks for ``attnpass_ssmax``, every attention module gets
  ``ssmax_s`` (and ``ssmax_b`` when ``b`` is set) before the weights are initialised or loaded, so
  they are ordinary parameters: in ``parameters()``, in the ``state_dict`` ``save_pretrained`` writes,
  and filled by ``from_pretrained`` from a checkpoint that has them;
* ``_initialize_weights``: a checkpoint without them (a plain pretrained model) leaves them missing;
  HF then initialises them through this hook to the value that keeps the model unchanged at its
  training length, ``s = 1/log(train_len)``.

The settings live in ``config.attnpass_ssmax`` (``s``, ``b``, ``train_len``), so they are saved in
``config.json`` with the model and a user can pass them to ``from_config`` / ``from_pretrained``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from attnpass import semantics
from attnpass.errors import AttnpassError
from attnpass.spec import RewriteSpec

log = logging.getLogger(__name__)

SSMAX = "attnpass_ssmax"
#: Attribute of a config holding the SSMax settings; ``to_ssmax`` writes the same one.
CONFIG_KEY = "attnpass_ssmax"
#: Attribute an attention module keeps its initial ``(s, b)`` in, for HF's missing-weight initialisation.
INIT_ATTR = "_attnpass_ssmax_init"
#: Config attributes that name the length a model was trained at, most specific first.
TRAIN_LEN_KEYS = ("original_max_position_embeddings", "max_position_embeddings", "n_positions", "max_seq_len",
                  "seq_length")
_installed = False


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def train_len_of(config: Any) -> int | None:
    """The training length a config states, or None.

    ``max_position_embeddings`` unless the rope parameters name the length before context extension
    (YaRN, Llama 3, Ministral 3 store it as ``original_max_position_embeddings``)."""
    cfg = _text_config(config)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if isinstance(rope, dict) and isinstance(rope.get("original_max_position_embeddings"), int):
        return int(rope["original_max_position_embeddings"])
    for key in TRAIN_LEN_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
            return value
    return None


def settings(config: Any) -> dict[str, Any]:
    """The resolved ``{"s", "b", "train_len"}`` a config asks for, written back onto the config.

    Given ``s`` wins; else ``train_len`` (given, or the config's training length) sets
    ``s = 1/log(train_len)``; a model stating no length gets ``semantics.DEFAULT_S``."""
    given = getattr(config, CONFIG_KEY, None) or {}
    if not isinstance(given, dict):
        raise AttnpassError(f"config.{CONFIG_KEY} must be a dict with s, b or train_len, got {given!r}")
    unknown = set(given) - {"s", "b", "train_len", "replace_existing"}
    if unknown:
        raise AttnpassError(f"config.{CONFIG_KEY} has unknown keys {sorted(unknown)}: use s, b, train_len, replace_existing")
    s, b, train_len = given.get("s"), given.get("b"), given.get("train_len")
    if s is None and train_len is None:
        train_len = train_len_of(config)
        if train_len is None:
            log.info("%s states no training length: SSMax starts at s=%s", type(config).__name__, semantics.DEFAULT_S)
    spec = RewriteSpec.of("ssmax", s=s, b=b, train_len=train_len if s is None else None)
    if isinstance(spec.s_value, tuple) or isinstance(spec.b, tuple):
        raise AttnpassError(f"config.{CONFIG_KEY}: s and b are one number each (per-head values are trained, not configured)")
    resolved = {"s": float(spec.s_value), "b": None if spec.b is None else float(spec.b), "train_len": train_len,
                "replace_existing": bool(given.get("replace_existing", False))}
    setattr(config, CONFIG_KEY, resolved)
    return resolved


def wants_ssmax(config: Any) -> bool:
    """Whether a model built from ``config`` uses the SSMax implementation (any sub-config asking counts)."""
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, dict):
        return SSMAX in impl.values()
    return impl == SSMAX


def heads_of(module: nn.Module, config: Any) -> int:
    """Query heads of an attention module, from the module or else its config."""
    for attr in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    cfg = getattr(module, "config", None) or _text_config(config)
    value = getattr(cfg, "num_attention_heads", None)
    if isinstance(value, int) and value > 0:
        return value
    raise AttnpassError(f"cannot tell how many heads {type(module).__name__} has")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that compute attention: innermost ``*Attention`` modules (BERT's SelfAttention, LLaMA's Attention)."""
    found = []
    for name, mod in model.named_modules():
        if "Attention" not in type(mod).__name__:
            continue
        if any("Attention" in type(child).__name__ for child in mod.modules() if child is not mod):
            continue
        found.append((name, mod))
    return found


def add_parameters(model: nn.Module, s: float, b: float | None, replace: bool = False) -> int:
    """Give every attention module per-head ``ssmax_s`` (and ``ssmax_b``); returns how many modules got them.

    Created with the model's floating dtype on the device of the module's own weights (the meta
    device while ``from_pretrained`` builds the skeleton), so loading fills them like any weight."""
    mods = attention_modules(model)
    if not mods:
        raise AttnpassError(f"no attention modules found in {type(model).__name__}")
    config = getattr(model, "config", None)
    added = 0
    for _, mod in mods:
        if hasattr(mod, "ssmax_s") and not replace:
            continue
        ref = next(mod.parameters(), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        heads = heads_of(mod, config)
        mod.register_parameter("ssmax_s", nn.Parameter(torch.full((heads,), s, device=device, dtype=dtype)))
        if b is not None:
            mod.register_parameter("ssmax_b", nn.Parameter(torch.full((heads,), b, device=device, dtype=dtype)))
        setattr(mod, INIT_ATTR, (s, b))
        added += 1
    return added


def existing_scaling(config: Any) -> str | None:
    """A relative of SSMax the config switches on (the HF twin of ``passes/relatives.py``), in words, or None."""
    cfg = _text_config(config)
    nope = [i for i, rope in enumerate(getattr(cfg, "no_rope_layers", None) or []) if not rope]
    if getattr(cfg, "attn_temperature_tuning", False) and nope:
        return (f"Llama 4 attention temperature tuning (attn_scale={cfg.attn_scale}, floor_scale={cfg.floor_scale}) "
                f"on layers {nope}")
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta"):
        return (f"llama_4_scaling (beta={rope['llama_4_scaling_beta']}, "
                f"original_max_position_embeddings={rope.get('original_max_position_embeddings')})")
    if getattr(cfg, "use_logn_attn", False):
        return "Qwen-1 log-n query scaling (use_logn_attn)"
    return None


def refuse_or_remove_existing(model: nn.Module, replace: bool) -> str | None:
    """SSMax would scale attention a second time on a model that already scales Q with the position:
    an error unless ``replace``, else that scaling is switched off (config and modules) and named."""
    config = getattr(model, "config", None)
    found = None if config is None else existing_scaling(config)
    if found is None:
        return None
    if not replace:
        raise AttnpassError(f"{type(model).__name__} already scales q by {found}: SSMax on top would scale attention "
                            f"twice; pass replace_existing=True (config.{CONFIG_KEY} = {{'replace_existing': True}}) "
                            "to replace it by SSMax")
    cfg = _text_config(config)
    for holder in (config, cfg):
        if getattr(holder, "attn_temperature_tuning", False):
            holder.attn_temperature_tuning = False
        rope = getattr(holder, "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("llama_4_scaling_beta"):
            rope["llama_4_scaling_beta"] = 0.0
        if getattr(holder, "use_logn_attn", False):
            holder.use_logn_attn = False
    for _, mod in attention_modules(model):
        for attr in ("attn_temperature_tuning", "use_logn_attn"):
            if getattr(mod, attr, False):
                setattr(mod, attr, False)
    log.info("%s: replaced %s by SSMax", type(model).__name__, found)
    return found


def _post_init(original):
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        if wants_ssmax(self.config):
            cfg = settings(self.config)
            refuse_or_remove_existing(self, cfg["replace_existing"])
            if attention_modules(self):  # a sub-model without attention (a vision tower's embedder) has none to get
                add_parameters(self, cfg["s"], cfg["b"])
        return original(self, *args, **kwargs)

    return post_init


def _initialize_weights(original):
    @functools.wraps(original)
    def initialize_weights(self, module, *args, **kwargs):
        done = getattr(module, "_is_hf_initialized", False)
        out = original(self, module, *args, **kwargs)
        init = getattr(module, INIT_ATTR, None)
        if init is not None and not done:
            from transformers import initialization

            # constant_ leaves a tensor loaded from the checkpoint (flagged _is_hf_initialized) alone
            initialization.constant_(module.ssmax_s, init[0])
            if init[1] is not None and getattr(module, "ssmax_b", None) is not None:
                initialization.constant_(module.ssmax_b, init[1])
        return out

    return initialize_weights


def install() -> None:
    """Wrap ``PreTrainedModel.post_init`` and ``_initialize_weights`` once (called by ``attnpass.hf.register``)."""
    global _installed
    if _installed:
        return
    from transformers import PreTrainedModel

    PreTrainedModel.post_init = _post_init(PreTrainedModel.post_init)
    PreTrainedModel._initialize_weights = _initialize_weights(PreTrainedModel._initialize_weights)
    _installed = True
