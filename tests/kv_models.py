"""Tiny one-layer decoders around each decode-time ONNX attention op, built with ``onnx.helper``, and their
reference in torch (``attnpass.semantics``).

Every model maps ``input_ids [B, S]`` through an embedding, Q/K/V projections, the attention op, an output
projection with a residual and an LM head to ``logits [B, S, V]``, and returns the op's KV cache so a decode
loop can feed it back.  ``feeds`` builds one step's inputs from the cache and the lengths, for each op the way
an onnxruntime generation loop does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from attnpass import semantics

H, KH, VOCAB = 2, 1, 13
D = 16  # onnxruntime's GroupQueryAttention rotary wants a head size that is a multiple of 16
E = H * D
F = TensorProto.FLOAT


@dataclass
class Weights:
    """One layer's weights (float32, seeded): what the ONNX model and the torch reference share."""

    seed: int = 0
    kv_heads: int = KH
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        kvd = self.kv_heads * D
        shapes = {"emb": (VOCAB, E), "wq": (E, E), "wk": (E, kvd), "wv": (E, kvd), "wo": (E, E), "wlm": (E, VOCAB)}
        for name, shape in shapes.items():
            self.arrays[name] = (rng.standard_normal(shape) * (1.0 if name == "emb" else 0.6)).astype(np.float32)
        self.arrays["bqkv"] = (rng.standard_normal(E + 2 * kvd) * 0.1).astype(np.float32)

    def init(self, *names: str) -> list[onnx.TensorProto]:
        return [onnx.numpy_helper.from_array(self.arrays[n], n) for n in names]


def _head_nodes(o: str) -> list[onnx.NodeProto]:
    """``o [B, S, E]`` -> residual -> ``logits``."""
    return [helper.make_node("MatMul", [o, "wo"], ["proj"]), helper.make_node("Add", ["proj", "x"], ["hid"]),
            helper.make_node("MatMul", ["hid", "wlm"], ["logits"])]


def _vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes: list, inputs: list, outputs: list[str], inits: list, opsets: dict[str, int]) -> onnx.ModelProto:
    ranks = {"logits": 3, "present": 5}
    elem = {i.name: i.type.tensor_type.elem_type for i in inputs}
    outs = [_vi(n, elem.get(n.replace("present", "past"), F), [f"{n}_{i}" for i in range(ranks.get(n, 4))]) for n in outputs]
    graph = helper.make_graph(nodes, "decoder", [_vi("input_ids", TensorProto.INT64, ["batch", "seq"]), *inputs], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], ir_version=10)


def _embed() -> onnx.NodeProto:
    return helper.make_node("Gather", ["emb", "input_ids"], ["x"])


MAX_POS = 32


def rotary_tables() -> tuple[np.ndarray, np.ndarray]:
    """``cos``/``sin`` caches ``[MAX_POS, D / 2]`` (base 10000), as GroupQueryAttention's ``do_rotary`` reads them."""
    inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    ang = np.arange(MAX_POS)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """Half-split rotary on ``[B, H, S, D]`` at positions ``0 .. S-1``."""
    cos, sin = (torch.from_numpy(t[: x.shape[-2]]) for t in rotary_tables())
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def gqa_model(w: Weights, packed: bool = False, window: int = -1, rotary: bool = False, fp16: bool = False) -> onnx.ModelProto:
    """``GroupQueryAttention`` with ``past_key``/``past_value``, ``seqlens_k`` and ``total_sequence_length``
    (``rotary``: ``do_rotary`` with ``cos``/``sin`` caches; ``fp16``: the op and its cache in float16)."""
    nodes = [_embed()]
    if packed:
        w.arrays["wqkv"] = np.concatenate([w.arrays["wq"], w.arrays["wk"], w.arrays["wv"]], axis=1)
        nodes.append(helper.make_node("MatMul", ["x", "wqkv"], ["qkv"]))
        qkv, inits = ["qkv", "", ""], ["wqkv"]
    else:
        nodes += [helper.make_node("MatMul", ["x", f"w{t}"], [t]) for t in "qkv"]
        qkv, inits = ["q", "k", "v"], ["wq", "wk", "wv"]
    attrs = {"num_heads": H, "kv_num_heads": w.kv_heads, **({"local_window_size": window} if window > 0 else {})}
    rope: list[str] = []
    if rotary:
        w.arrays["cos_cache"], w.arrays["sin_cache"] = rotary_tables()
        attrs["do_rotary"], rope, inits = 1, ["cos_cache", "sin_cache"], [*inits, "cos_cache", "sin_cache"]
    out, elem = "o", F
    if fp16:
        nodes += [helper.make_node("Cast", [t], [f"{t}16"], to=TensorProto.FLOAT16) for t in qkv if t]
        qkv, out, elem = [f"{t}16" if t else "" for t in qkv], "o16", TensorProto.FLOAT16
        nodes.append(helper.make_node("Cast", ["o16"], ["o"], to=F))
    nodes.insert(len(nodes) - int(fp16), helper.make_node(
        "GroupQueryAttention", [*qkv, "past_key", "past_value", "seqlens_k", "total_sequence_length", *rope],
        [out, "present_key", "present_value"], domain="com.microsoft", **attrs))
    cache = [_vi(n, elem, ["batch", w.kv_heads, "past", D]) for n in ("past_key", "past_value")]
    lens = [_vi("seqlens_k", TensorProto.INT32, ["batch"]), _vi("total_sequence_length", TensorProto.INT32, [])]
    return _model(nodes + _head_nodes("o"), cache + lens, ["logits", "present_key", "present_value"],
                  w.init("emb", *inits, "wo", "wlm"), {"": 21, "com.microsoft": 1})


def ms_attention_model(w: Weights, past: bool = True, mask_rank: int = 2) -> onnx.ModelProto:
    """``com.microsoft.Attention`` (packed QKV weights and bias), ``mask_index`` (``[B, T]`` key mask or ``[B]``
    key lengths); ``past``: a GPT-2 style decoder (``unidirectional``, ``past`` -> ``present``), else BERT style."""
    assert w.kv_heads == H
    w.arrays["wqkv"] = np.concatenate([w.arrays["wq"], w.arrays["wk"], w.arrays["wv"]], axis=1)
    node = helper.make_node("Attention", ["x", "wqkv", "bqkv", "attention_mask", *(["past"] if past else [])],
                            ["o", *(["present"] if past else [])], domain="com.microsoft", num_heads=H, unidirectional=int(past))
    ins = [_vi("attention_mask", TensorProto.INT32, ["batch", "total"][:mask_rank])]
    ins += [_vi("past", F, [2, "batch", H, "past_len", D])] if past else []
    return _model([_embed(), node, *_head_nodes("o")], ins, ["logits", "present"][: 1 + past],
                  w.init("emb", "wqkv", "bqkv", "wo", "wlm"), {"": 21, "com.microsoft": 1})


def _bhsd(src: str, dst: str, heads: int) -> list[onnx.NodeProto]:
    shape = helper.make_node("Constant", [], [f"{dst}_shape"], value=helper.make_tensor(f"{dst}_s", TensorProto.INT64, [4], [0, 0, heads, D]))
    return [shape, helper.make_node("Reshape", [src, f"{dst}_shape"], [f"{dst}_r"]),
            helper.make_node("Transpose", [f"{dst}_r"], [dst], perm=[0, 2, 1, 3])]


def _bse(src: str, dst: str) -> list[onnx.NodeProto]:
    shape = helper.make_node("Constant", [], [f"{dst}_shape"], value=helper.make_tensor(f"{dst}_s", TensorProto.INT64, [3], [0, 0, E]))
    return [helper.make_node("Transpose", [src], [f"{dst}_t"], perm=[0, 2, 1, 3]), shape,
            helper.make_node("Reshape", [f"{dst}_t", f"{dst}_shape"], [dst])]


def attention_past_model(w: Weights, opset: int = 23, mask: bool = False) -> onnx.ModelProto:
    """The standard ``Attention(is_causal=1)`` with ``past_key``/``past_value`` -> ``present_key``/``present_value``;
    ``mask``: a bool key-padding ``attention_mask [B, T]`` expanded to ``[B, 1, S, T]``."""
    nodes = [_embed(), *[helper.make_node("MatMul", ["x", f"w{t}"], [f"{t}3"]) for t in "qkv"]]
    nodes += _bhsd("q3", "q4", H) + _bhsd("k3", "k4", w.kv_heads) + _bhsd("v3", "v4", w.kv_heads)
    ins = [_vi(n, F, ["batch", w.kv_heads, "past", D]) for n in ("past_key", "past_value")]
    m = ""
    if mask:
        ins.append(_vi("attention_mask", TensorProto.BOOL, ["batch", "total"]))
        nodes += [helper.make_node("Shape", ["q4"], ["bhs"], start=0, end=3),
                  helper.make_node("Shape", ["attention_mask"], ["t1"], start=1, end=2),
                  helper.make_node("Concat", ["bhs", "t1"], ["mshape"], axis=0),
                  helper.make_node("Constant", [], ["ax12"], value=helper.make_tensor("ax", TensorProto.INT64, [2], [1, 2])),
                  helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
                  helper.make_node("Expand", ["m4", "mshape"], ["m4full"])]
        m = "m4full"
    nodes.append(helper.make_node("Attention", ["q4", "k4", "v4", m, "past_key", "past_value"], ["y", "present_key", "present_value"],
                                  is_causal=1))
    nodes += _bse("y", "o")
    return _model(nodes + _head_nodes("o"), ins, ["logits", "present_key", "present_value"],
                  w.init("emb", "wq", "wk", "wv", "wo", "wlm"), {"": opset})


def attention_nonpad_model(w: Weights) -> onnx.ModelProto:
    """Opset-24 ``Attention(is_causal=1)`` over a fixed-size cache buffer: the step's K/V written in with
    ``TensorScatter`` at ``write_indices``, the valid lengths given as ``nonpad_kv_seqlen``."""
    nodes = [_embed(), *[helper.make_node("MatMul", ["x", f"w{t}"], [f"{t}3"]) for t in "qkv"]]
    nodes += _bhsd("q3", "q4", H) + _bhsd("k3", "k4", w.kv_heads) + _bhsd("v3", "v4", w.kv_heads)
    nodes += [helper.make_node("TensorScatter", [f"cache_{t}", f"{t}4", "write_indices"], [f"present_{t}"]) for t in ("k", "v")]
    nodes.append(helper.make_node("Attention", ["q4", "present_k", "present_v", "", "", "", "nonpad_kv_seqlen"], ["y"], is_causal=1))
    nodes += _bse("y", "o")
    ins = [_vi(f"cache_{t}", F, ["batch", w.kv_heads, "max_len", D]) for t in ("k", "v")]
    ins += [_vi("write_indices", TensorProto.INT64, ["batch"]), _vi("nonpad_kv_seqlen", TensorProto.INT64, ["batch"])]
    return _model(nodes + _head_nodes("o"), ins, ["logits", "present_k", "present_v"],
                  w.init("emb", "wq", "wk", "wv", "wo", "wlm"), {"": 24})


def reference_logits(w: Weights, ids: np.ndarray, s: float, b: float | None, keep: np.ndarray | None = None,
                     bias: bool = False, window: int = -1, rotary: bool = False, causal: bool = True,
                     fp16: bool = False) -> np.ndarray:
    """The same layer in torch with ``semantics.ssmax_attention`` (causal over the whole prefix; ``keep``: a
    ``[B, T]`` key-padding mask; ``window``: keys ``i - window < j <= i``; ``rotary``: Q and K rotated at their
    positions first; ``causal`` False: every key; ``fp16``: the op's inputs and output rounded to float16), the
    logits of every position."""
    a = {k: torch.from_numpy(v) for k, v in w.arrays.items()}
    x = a["emb"][torch.from_numpy(ids)]
    kvd = w.kv_heads * D
    q, k, v = x @ a["wq"], x @ a["wk"], x @ a["wv"]
    if bias:
        q, k, v = q + a["bqkv"][:E], k + a["bqkv"][E:E + kvd], v + a["bqkv"][E + kvd:]
    split = lambda t, h: t.reshape(*t.shape[:2], h, D).transpose(1, 2)  # noqa: E731
    sq = ids.shape[1]
    allowed = torch.ones(sq, sq, dtype=torch.bool).tril() if causal else torch.ones(sq, sq, dtype=torch.bool)
    if window > 0:
        allowed = allowed & ~torch.ones(sq, sq, dtype=torch.bool).tril(-window)
    if keep is not None:
        allowed = allowed & torch.from_numpy(keep)[:, None, None, :]
    if fp16:  # the op's inputs and output in float16, as the model casts them
        q, k, v = (t.half().float() for t in (q, k, v))
    q4, k4 = split(q, H), split(k, w.kv_heads)
    if rotary:
        q4, k4 = _rotate(q4), _rotate(k4)
    o = semantics.ssmax_attention(q4, k4, split(v, w.kv_heads), allowed, s=s, b=b, enable_gqa=True)
    o = o.half().float() if fp16 else o
    o = o.transpose(1, 2).reshape(*ids.shape, E)
    return ((o @ a["wo"] + x) @ a["wlm"]).numpy()
