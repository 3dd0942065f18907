"""attnpass: find softmax-in-attention in model graphs; rewrite it to SSMax or to fused attention.

Public API (kept small): ``find``, ``to_ssmax``, ``fuse``, ``attention``, ``ssmax_attention``.
Importing the package registers ``torch.ops.attnpass.attention`` and the ``"attnpass"``
torch.compile backend.
"""

from attnpass.api import find, fuse, to_ssmax
from attnpass.lowering import backend as _backend  # noqa: F401  (registers the compile backend)
from attnpass.lowering.ops import attention
from attnpass.semantics import ssmax_attention

__all__ = ["find", "to_ssmax", "fuse", "attention", "ssmax_attention"]
__version__ = "0.1.0"
