"""attnpass: find softmax-in-attention in model graphs; rewrite it to SSMax or to fused attention.

Public API (kept small): ``find``, ``to_ssmax``, ``fuse``, ``attention``, ``ssmax_attention``, and the
request/answer types ``RewriteSpec`` / ``RewriteResult``; ``attnpass.onnx`` and ``attnpass.mlir`` load on first use.
``softmax_topk`` is softmax followed by top-k in one pass (MoE routers, sampling heads).
Importing the package registers ``torch.ops.attnpass.attention``, ``torch.ops.attnpass.softmax_topk`` and the ``"attnpass"``
torch.compile backend.
"""

from attnpass import hf_hook as _hf_hook
from attnpass.api import find, fuse, to_ssmax
from attnpass.lowering import backend as _backend  # noqa: F401  (registers the compile backend)
from attnpass.lowering.ops import attention
from attnpass.lowering.topk_ops import softmax_topk
from attnpass.result import RewriteResult
from attnpass.semantics import ssmax_attention
from attnpass.spec import RewriteSpec

_hf_hook.install()

__all__ = ["find", "to_ssmax", "fuse", "attention", "ssmax_attention", "softmax_topk", "RewriteSpec", "RewriteResult", "export", "validate",
           "onnx", "mlir"]

#: Sub-modules reached as attributes without importing them up front (onnx/onnxruntime, torch-mlir).
_LAZY_MODULES = ("onnx", "mlir")


def __getattr__(name: str):
    """``export``, ``validate`` and the ``onnx`` / ``mlir`` namespaces load their heavy dependencies on first use only."""
    if name == "export":
        from attnpass.lowering.onnx_export import export

        return export
    if name == "validate":
        from attnpass.validate import validate

        return validate
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"attnpass.{name}")
    raise AttributeError(f"module 'attnpass' has no attribute {name!r}")
__version__ = "0.1.0"
