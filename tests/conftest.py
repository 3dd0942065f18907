"""Deselect ``gpu``-marked tests where there is no CUDA device (each has a CPU twin that still runs), and group the
tests for pytest-xdist.

``make test`` runs the suite on every core (``-n auto --dist loadgroup``).  A group is one test module, so that
module-scoped fixtures (an export, a compiled kernel) are made once; the two modules that are most of the suite's
time, the variant table and the ONNX corpus, are split by their first parameter (a variant, a model family), whose
cells share their exports through caches filled on first use, so no worker waits on one long module.
"""

from __future__ import annotations

import pytest
import torch

#: module -> the parameter whose value names a test's xdist group within that module
SPLIT_BY = {"test_variant_table.py": "variant", "test_onnx_corpus.py": "name"}


def _group(item: pytest.Item) -> str:
    module = item.path.name
    param = SPLIT_BY.get(module)
    spec = getattr(item, "callspec", None)
    if param and spec is not None and param in spec.params:
        value = spec.params[param]
        return f"{module}:{getattr(value, 'name', value)}"
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_group(item)))
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
