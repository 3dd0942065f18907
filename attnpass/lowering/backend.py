"""torch.compile backend ``"attnpass"``: rewrite attention in dynamo's graph, then compile the rest.

Options (``torch.compile(m, backend="attnpass", options={...})``):
``rewrite``: ``"fuse"`` (default) or ``"ssmax"``; ``s``/``b``/``train_len`` for SSMax, fused into
``attnpass::attention`` where the site allows unless ``fused=False``;
``inner``: ``"inductor"`` (default) or ``"eager"`` for what runs the rewritten graph.
The graph is rewritten at torch level, before AOT autograd splits forward from backward, so
training sees the op's own backward.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from torch import fx

from attnpass import semantics
from attnpass.lowering import ops  # noqa: F401  (the op must exist before graphs use it)
from attnpass.rewrite import fx as fx_rewrite

_KNOWN = {"rewrite", "s", "b", "train_len", "inner", "fused"}

#: Site reports of the graphs this backend rewrote, newest last (dynamo may split a model in several).
#: Kept here rather than on the GraphModule: Inductor pickles the graph for its cache key.
reports: deque = deque(maxlen=256)


def attnpass_backend(gm: fx.GraphModule, example_inputs: list[Any], **options: Any) -> Any:
    """Dynamo backend entry point (also reachable through the ``torch_dynamo_backends`` entry point)."""
    opts = dict(options.pop("options", None) or {}, **options)
    unknown = set(opts) - _KNOWN
    if unknown:
        raise ValueError(f"attnpass backend: unknown options {sorted(unknown)}; known: {sorted(_KNOWN)}")
    rewrite = opts.get("rewrite", "fuse")
    if rewrite == "fuse":
        gm, report = fx_rewrite.fuse(gm)
    elif rewrite == "ssmax":
        s = opts.get("s")
        if opts.get("train_len") is not None:
            s = semantics.s_for_train_len(int(opts["train_len"]))
        gm, report = fx_rewrite.to_ssmax(gm, s=semantics.DEFAULT_S if s is None else float(s), b=opts.get("b"),
                                      fused=bool(opts.get("fused", True)))
    else:
        raise ValueError(f"attnpass backend: rewrite must be 'fuse' or 'ssmax', got {rewrite!r}")
    reports.append(report)
    inner = opts.get("inner", "inductor")
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    raise ValueError(f"attnpass backend: inner must be 'inductor' or 'eager', got {inner!r}")


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "attnpass" not in _BACKENDS:
        register_backend(name="attnpass")(attnpass_backend)


_register()
