"""torch.compile backend ``"attnpass"``: rewrite attention in dynamo's graph, then compile the rest.

Options (``torch.compile(m, backend="attnpass", options={...})``):
``rewrite``: ``"fused"`` (default; ``"fuse"`` is accepted too) or ``"ssmax"``; ``s``/``b``/``train_len`` for SSMax, fused into
``attnpass::attention`` where the site allows unless ``fused=False``;
``inner``: ``"inductor"`` (default) or ``"eager"`` for what runs the rewritten graph;
``topk``: with ``rewrite="fused"``, also fuse softmax -> top-k / max / argmax (routers, heads; default True).
The graph is rewritten at torch level, before AOT autograd splits forward from backward, so
training sees the op's own backward.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from torch import fx

from attnpass.lowering import ops, topk_ops  # noqa: F401  (the ops must exist before graphs use them)
from attnpass.result import RewriteResult
from attnpass.rewrite import fx as fx_rewrite
from attnpass.spec import RewriteSpec

_KNOWN = {"rewrite", "s", "b", "train_len", "inner", "fused", "topk"}

#: ``RewriteResult`` of each graph this backend rewrote, newest last (dynamo may split a model in several).
#: Kept here rather than on the GraphModule: Inductor pickles the graph for its cache key.
reports: deque = deque(maxlen=256)


def attnpass_backend(gm: fx.GraphModule, example_inputs: list[Any], **options: Any) -> Any:
    """Dynamo backend entry point (also reachable through the ``torch_dynamo_backends`` entry point)."""
    opts = dict(options.pop("options", None) or {}, **options)
    unknown = set(opts) - _KNOWN
    if unknown:
        raise ValueError(f"attnpass backend: unknown options {sorted(unknown)}; known: {sorted(_KNOWN)}")
    rewrite = opts.get("rewrite", "fused")
    if rewrite not in ("fuse", "fused", "ssmax"):
        raise ValueError(f"attnpass backend: rewrite must be 'fused' or 'ssmax', got {rewrite!r}")
    spec = RewriteSpec.of(rewrite, s=opts.get("s"), b=opts.get("b"), train_len=opts.get("train_len"),
                          fused=rewrite == "ssmax" and bool(opts.get("fused", True)))
    gm, done = fx_rewrite.emitted(gm, spec.resolve(), topk=None if opts.get("topk", True) else False)
    reports.append(RewriteResult(done.report, spec, dict(done.left), ir="fx"))
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
