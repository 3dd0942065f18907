"""Register the HF attention implementations as soon as ``transformers`` is imported, never before.

``import attnpass`` must stay fast and must not import transformers, yet
``attn_implementation="attnpass"`` must work after it whichever of the two a user imports first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers`` so that registration runs right after the module executes."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        loader.exec_module = exec_module
        return spec


def _register() -> None:
    from attnpass import hf

    hf.register()


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
