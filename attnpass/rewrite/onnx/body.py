"""SSMax on a standard ``Attention`` op that cannot take the factor on its Q: the op replaced by its own function body.

A soft-capping op computes ``softcap * tanh(scale * q k^T / softcap)``; SSMax multiplies the *capped* scores
(``semantics.attention``), and a factor on Q would be capped along with them.  The ONNX schema defines the op as a
function of standard ops (the body the onnx package expands for its ``*_expanded`` backend tests); in that body
the softmax input is visible, so the matcher finds an explicit site there and the explicit SSMax emitter scales
the scores after the cap.  The op is only replaced when that site takes SSMax: the body is inserted next to the
op, matched and planned, and removed again (the op kept) when it does not.  ``present_key`` / ``present_value`` /
``qk_matmul_output`` come out of the body as the op would give them (``qk_matmul_output`` then from the SSMax
scores or probabilities, as with an op that takes the factor on Q).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import onnx_ir as ir

from attnpass.passes.onnx import OnnxAdapter, _domain
from attnpass.passes.plan import Action, Capabilities, RewriteSpec, plan_for
from attnpass.passes.site import AttentionSite, Form, Notes


def expandable(site: AttentionSite) -> bool:
    """A standard ``Attention`` op that cannot take the factor on its Q (soft-capping, so far the only reason): its
    function body may take SSMax instead.  ``com.microsoft`` ops have no schema function and stay as they are."""
    node = site.softmax
    return (site.form is Form.FUSED_OP and site.ssmax_blocker is not None and isinstance(node, ir.Node)
            and (_domain(node), node.op_type) == ("", "Attention"))


def ssmax_through_body(model: ir.Model, site: AttentionSite, spec: RewriteSpec, caps: Capabilities, notes: Notes) -> str | None:
    """Replace the op of ``site`` by its function body and SSMax the site found there; None when done, else why not
    (and then the model is as it was)."""
    why = _through_body(model, site, spec, caps, notes)
    return None if why is None else f"its ONNX function body does not take SSMax either: {why}"


def _through_body(model: ir.Model, site: AttentionSite, spec: RewriteSpec, caps: Capabilities, notes: Notes) -> str | None:
    from attnpass.passes.match import Matcher
    from attnpass.rewrite.onnx.ssmax import ssmax_explicit

    node = site.softmax
    graph = node.graph
    if graph is None:
        return "the op is not in a graph"
    body = _function_body(model, node)
    if isinstance(body, str):
        return body
    nodes, outputs = _instantiate(node, *body, f"attnpass/body_{site.index}/")
    used = [(old, new) for old, new in zip(node.outputs, outputs) if old.uses() or old.is_graph_output()]
    if any(new is None for _, new in used):
        return "it does not compute every output of the op the model reads"
    graph.insert_before(node, nodes)
    _infer_shapes(node, nodes, model.opset_imports[""])
    ad = _BodyAdapter(model, nodes)
    inner = Matcher(ad).find().sites
    plan = plan_for(replace(inner[0], index=site.index), replace(spec, to="ssmax", fused_ssmax=False).resolve(), caps, ad) \
        if len(inner) == 1 else None
    if plan is None or plan.action is not Action.SSMAX:
        graph.remove(nodes, safe=True)  # safe: the body's reads of the op's inputs go with it
        return "no attention site found in it" if not inner else "more than one site in it" if len(inner) > 1 \
            else plan.reason or "left"  # type: ignore[union-attr]
    for old, new in used:
        new.type, new.shape = old.type or new.type, old.shape or new.shape
    ir.convenience.replace_all_uses_with([o for o, _ in used], [n for _, n in used], replace_graph_outputs=True)
    names = [o.name for o, _ in used]
    graph.remove(node, safe=True)
    for (_, new), name in zip(used, names):
        new.name = name
    notes.add(site, f"{node.op_type} replaced by its ONNX function body, where SSMax scales the scores ({site.ssmax_blocker})")
    ssmax_explicit(model, ad, plan, notes)
    return None


class _BodyAdapter(OnnxAdapter):
    """The adapter with the matcher's search limited to the body's nodes (walks still follow values anywhere): a
    model with one soft-capping op per layer is then not searched once per layer."""

    def __init__(self, model: ir.Model, nodes: list[ir.Node]):
        super().__init__(model)
        self._only = nodes

    def nodes(self) -> Iterable[ir.Node]:
        return iter(self._only)


def _function_body(model: ir.Model, node: ir.Node) -> tuple[ir.Function, dict[str, Any]] | str:
    """The schema's function body of ``node`` at the model's opset, specialised to its attributes and input types,
    and the schema's attribute defaults (the body refers to attributes the node may not set)."""
    import onnx
    import onnx.defs

    version = model.opset_imports.get("", None)
    if version is None:
        return "the model imports no default-domain opset"
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
    except onnx.defs.SchemaError:
        return f"no ONNX schema for {node.op_type} at opset {version}"
    types = []
    for v in node.inputs:
        if v is None:
            types.append(onnx.TypeProto())
        elif v.type is None or v.shape is None:
            return f"the type or rank of input {v.name!r} is not known (the function body depends on them)"
        else:
            types.append(ir.serde.serialize_value(v).type)
    proto_node = ir.serde.serialize_node(node)
    versions = [x for x in schema.context_dependent_function_opset_versions if x <= version]
    plain = [x for x in schema.function_opset_versions if x <= version]
    fn = onnx.FunctionProto()
    try:
        if versions:
            fn.ParseFromString(schema.get_context_dependent_function_with_opset_version(
                max(versions), proto_node.SerializeToString(), [t.SerializeToString() for t in types]))
        elif plain:
            fn.ParseFromString(schema.get_function_with_opset_version(max(plain)))
        else:
            return f"the ONNX schema of {node.op_type} at opset {version} defines no function body"
    except Exception as e:  # the builder refuses an inconsistent node: the op stays, the reason says why
        return f"the ONNX function body of {node.op_type} could not be built: {str(e).splitlines()[0][:160]}"
    if any(i.domain not in ("", "ai.onnx") or i.version != version for i in fn.opset_import):
        return "the function body needs another opset than the model's"
    # the builder only computes the outputs the node asks for: the others are left unnamed (None) for ``_instantiate``
    made = {o for n in fn.node for o in n.output} | set(fn.input)
    positions = [i for i, o in enumerate(fn.output) if o in made]
    kept = [fn.output[i] for i in positions]
    del fn.output[:]
    fn.output.extend(kept)
    body = ir.serde.deserialize_function(fn)
    body.meta["positions"] = positions
    defaults = {name: a.default_value for name, a in schema.attributes.items()
                if a.default_value is not None and a.default_value.type != onnx.AttributeProto.UNDEFINED}
    return body, defaults


def _infer_shapes(op: ir.Node, nodes: list[ir.Node], version: int) -> None:
    """Shapes of the body's values from onnx shape inference on the body alone (the op's inputs as its inputs): the
    matcher needs the scores' rank, and a whole-model inference would be as slow as the model is large."""
    import onnx

    ins = [v for v in op.inputs if v is not None]
    graph = onnx.helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "body",
                                   [ir.serde.serialize_value(v) for v in ins], [])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", version)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info
    except Exception:  # the adapter propagates what it can itself
        return
    by_name = {vi.name: vi for vi in inferred}
    for n in nodes:
        for v in n.outputs:
            vi = by_name.get(v.name or "")
            if vi is None or not vi.type.HasField("tensor_type"):
                continue
            t = ir.serde.deserialize_value_info_proto(vi, None)
            v.type = v.type or t.type
            v.shape = v.shape or t.shape


def _instantiate(node: ir.Node, body: ir.Function, defaults: dict[str, Any], prefix: str) -> tuple[list[ir.Node], list[ir.Value | None]]:
    """Copies of the body's nodes reading the op's inputs, attribute references bound to the op's attributes (or the
    schema defaults); the values that stand for the op's outputs, in order."""
    values: dict[ir.Value, ir.Value | None] = {}
    for i, formal in enumerate(body.inputs):
        values[formal] = node.inputs[i] if i < len(node.inputs) else None
    nodes = []
    for k, n in enumerate(body):
        attrs = []
        for a in n.attributes.values():
            if a.is_ref():
                bound = node.attributes.get(a.ref_attr_name)
                if bound is None and a.ref_attr_name in defaults:
                    bound = ir.serde.deserialize_attribute(defaults[a.ref_attr_name])
                if bound is None:
                    continue  # an unset optional attribute: the body's op takes its own default
                attrs.append(ir.Attr(a.name, bound.type, bound.value))
            else:
                attrs.append(ir.Attr(a.name, a.type, a.value))
        copy = ir.Node(n.domain, n.op_type, [values.get(v) if v is not None else None for v in n.inputs], attrs,
                       num_outputs=len(n.outputs), version=n.version, name=f"{prefix}{n.name or n.op_type}_{k}")
        for old, new in zip(n.outputs, copy.outputs):
            new.name = prefix + (old.name or "out")
            values[old] = new
        nodes.append(copy)
    outputs: list[ir.Value | None] = [None] * len(node.outputs)
    for i, o in zip(body.meta["positions"], body.outputs):
        if i < len(outputs):
            outputs[i] = values.get(o)
            if outputs[i] is not None and outputs[i].producer() not in nodes:  # an input passed through: a value of its own
                nodes.append(ir.Node("", "Identity", [outputs[i]], name=f"{prefix}output_{i}"))
                outputs[i] = nodes[-1].outputs[0]
                outputs[i].name = f"{prefix}output_{i}"
    return nodes, outputs


__all__ = ["expandable", "ssmax_through_body"]
