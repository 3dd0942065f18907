"""attnpass: find softmax-in-attention in model graphs; rewrite it to SSMax or to fused attention.

Public API (kept small): ``find``, ``to_ssmax``, ``fuse``, ``attention``, ``ssmax_attention``, and the
request/answer types ``RewriteSpec`` / ``RewriteResult``; ``attnpass.onnx`` and ``attnpass.mlir`` load on first use.
``softmax_topk`` is softmax followed by top-k in one pass (MoE routers, sampling heads).

Every name loads on first use, so ``import attnpass`` (and ``attnpass --help``) does not pay for torch.
``torch.ops.attnpass.attention`` and ``torch.ops.attnpass.softmax_topk`` are registered as soon as torch is loaded (now, if it already is, else
right after ``import torch``); the ``"attnpass"`` torch.compile backend is found through the
``torch_dynamo_backends`` entry point, and registered here too once the backend module is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

from attnpass import hf_hook as _hf_hook
from attnpass import torch_hook as _torch_hook

__version__ = "0.1.0"

__all__ = ["find", "to_ssmax", "fuse", "attention", "ssmax_attention", "softmax_topk", "RewriteSpec", "RewriteResult", "export", "validate",
           "onnx", "mlir"]

#: Public name -> (module, attribute); ``None`` as the attribute means the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    "find": ("attnpass.api", "find"),
    "to_ssmax": ("attnpass.api", "to_ssmax"),
    "fuse": ("attnpass.api", "fuse"),
    "attention": ("attnpass.lowering.ops", "attention"),
    "ssmax_attention": ("attnpass.semantics", "ssmax_attention"),
    "softmax_topk": ("attnpass.lowering.topk_ops", "softmax_topk"),
    "RewriteSpec": ("attnpass.spec", "RewriteSpec"),
    "RewriteResult": ("attnpass.result", "RewriteResult"),
    "export": ("attnpass.lowering.onnx_export", "export"),
    "validate": ("attnpass.validate", "validate"),
    "onnx": ("attnpass.onnx", None),
    "mlir": ("attnpass.mlir", None),
}


def __getattr__(name: str) -> Any:
    """Each public name imports its module (and that module's dependencies) the first time it is read."""
    if name not in _LAZY:
        raise AttributeError(f"module 'attnpass' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    if module_name != f"{__name__}.{name}" or attr is None:
        # later reads are plain attribute reads: a router calls softmax_topk per token.  Not ``validate``: that
        # name is also a submodule, which ``from attnpass import validate`` inside the package must keep finding
        # (the module is callable as the function, ``attnpass.validate``'s docstring says why)
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


_torch_hook.install()
_hf_hook.install()
