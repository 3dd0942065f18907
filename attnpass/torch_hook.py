"""Register ``torch.ops.attnpass.attention`` (and ``softmax_topk``) as soon as torch is loaded, without loading torch ourselves.

``import attnpass`` must stay light (the CLI's ``--help`` should not wait for torch), yet code that
calls ``torch.ops.attnpass.attention`` after ``import torch, attnpass`` (in either order) expects the
op to exist.  If torch is already loaded the op is registered at once; otherwise right after torch's
own module has executed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Wraps torch's loader so the op module is imported right after torch finishes loading."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _register() -> None:
    import attnpass.lowering.ops  # noqa: F401  (defines the attention op)
    import attnpass.lowering.topk_ops  # noqa: F401  (defines the softmax_topk op)


def install() -> None:
    if "torch" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorch())
