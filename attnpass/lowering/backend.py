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

import weakref
from collections import deque
from typing import Any

import torch
from torch import fx, nn

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
    inner = opts.get("inner", "inductor")
    if inner not in ("inductor", "eager"):
        raise ValueError(f"attnpass backend: inner must be 'inductor' or 'eager', got {inner!r}")
    gm, done = fx_rewrite.emitted(_own_copy(gm), spec.resolve(), topk=None if opts.get("topk", True) else False)
    params = _lift_ssmax_params(gm)
    _ssmax_params[:] = [ref for ref in _ssmax_params if ref() is not None]
    _ssmax_params.extend(weakref.ref(p) for p in params.values())
    reports.append(RewriteResult(done.report, spec, dict(done.left), ir="fx", parameters=dict(params)))
    if inner == "eager":
        compiled = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, [*example_inputs, *params.values()])
    if not params:
        return compiled
    extra = tuple(params.values())

    def run(*args: Any) -> Any:
        return compiled(*args, *extra)

    return run


def _own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of dynamo's graph for the rewrite to change.

    Dynamo reads its own graph's placeholders again after the backend returns, and AOT autograd
    checks a dynamo graph's inputs against the user's code; the rewritten graph (with the SSMax
    parameters as extra inputs) is ours, so it is a plain GraphModule sharing dynamo's tensors.
    """
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copied))
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)  # Inductor and AOT autograd read dynamo's metadata (compile id, input sources)
    if hasattr(gm, "_param_name_to_source"):
        out._param_name_to_source = gm._param_name_to_source
    for old, new in copied.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return out


def _lift_ssmax_params(gm: fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    """Turn the SSMax parameters the rewrite registered on ``gm`` into trailing graph inputs.

    Dynamo's graph has no parameters of its own (it lifts the model's into inputs) and AOT autograd
    asserts that every ``get_attr`` parameter has a source in the user's model: parameters created
    here have none.  As inputs they are what AOT autograd and Inductor expect, and since they are leaf
    tensors that require grad, a training step through the compiled model fills their ``.grad``.
    """
    holder = getattr(gm, fx_rewrite.SSMAX_MODULE, None)
    if holder is None:
        return {}
    getters = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(fx_rewrite.SSMAX_MODULE + ".")]
    if not getters:
        return {}
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1:]
    params: dict[str, torch.nn.Parameter] = {}
    for node in getters:
        name = str(node.target)
        param = gm.get_parameter(name)
        anchor = last_input[-1] if last_input else None
        with gm.graph.inserting_after(anchor) if anchor is not None else gm.graph.inserting_before(None):
            ph = gm.graph.placeholder(name.replace(".", "_"))
        ph.meta.update(node.meta)
        ph.meta["example_value"] = param
        ph._dynamo_source = None  # AOT autograd reads each dynamo input's source: this one is not the user's
        node.replace_all_uses_with(ph)
        gm.graph.erase_node(node)
        last_input = [ph]
        params[name] = param
    delattr(gm, fx_rewrite.SSMAX_MODULE)
    gm.recompile()
    return params


#: The SSMax parameters of each graph rewritten to SSMax, oldest first.  The compiled graph, not the user's
#: model, owns them: optimizers, DDP/FSDP and checkpoints reach them through here.  Weak references: this
#: list never keeps a compiled graph's parameters alive by itself.
_ssmax_params: list[weakref.ref] = []


def ssmax_parameters() -> list[nn.Parameter]:
    """The SSMax ``s``/``b`` parameters this backend created, in the order the graphs were compiled.

    They are not in ``model.parameters()``: give them to the optimizer, average their gradients across
    ranks yourself under DDP/FSDP, and save them beside the model.  A recompile creates new ones.
    """
    return [p for p in (ref() for ref in _ssmax_params) if p is not None]


def clear_ssmax_parameters() -> None:
    """Forget the graphs compiled so far (call with ``torch._dynamo.reset()``)."""
    _ssmax_params.clear()


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "attnpass" not in _BACKENDS:
        register_backend(name="attnpass")(attnpass_backend)


_register()
