"""MLIR (torch dialect) rewrites: SSMax and the fused online-softmax loop nest, emitted through named builders."""

from attnpass.rewrite.mlir.fused import DEFAULT_TILE
from attnpass.rewrite.mlir.sites import CAPS, describe, emit, fuse, to_ssmax

__all__ = ["CAPS", "DEFAULT_TILE", "describe", "emit", "fuse", "to_ssmax"]
