"""bf16 tensors across the calling convention of the lowering pipeline, as their bits in i16.

``refback-munge-calling-conventions`` (the ABI of the JIT's entry point and of the native library) takes memrefs of
f16, f32, f64 and integers, not bf16.  A public function with bf16 arguments or results is renamed (and made
private) and called from a wrapper of the original name that takes and returns those tensors as i16, converted by
``arith.bitcast`` (a bit-for-bit reinterpretation, no rounding).  The inliner folds the wrapper away; the fused loop
nest then widens the bf16 values to f32 once, as it does inside a model.  Callers pass and get the bits
(``torch.Tensor.view(torch.int16)`` / ``view(torch.bfloat16)``; ``JitFunction`` does it for them).
"""

from __future__ import annotations

import re
from typing import Any

_BF16 = re.compile(r"tensor<([^>]*)xbf16>|tensor<bf16>")
PASS = "func.func(convert-elementwise-to-linalg)"  # the wrapper's tensor bitcasts as linalg.generic


def _as_bits(ty: str) -> str:
    return ty.replace("bf16>", "i16>") if ty.endswith("bf16>") else ty


def _types(text: str) -> list[str]:
    """The top-level types of ``(t1, t2, ...)`` or of a single type."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "<(["
        depth -= ch in ">)]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def signature(func: Any) -> tuple[list[str], list[str]]:
    """Argument and result types of a ``func.func`` op, as text."""
    ins, _, outs = str(func.attributes["function_type"].value).partition(") -> ")
    return _types(ins + ")"), _types(outs)


def bf16_results(module: Any, name: str) -> list[bool]:
    """Which results of the public function ``name`` of a linalg module are bf16 tensors."""
    for op in module.body.operations:
        if op.operation.name == "func.func" and op.operation.attributes["sym_name"].value == name:
            return [t.endswith("xbf16>") or t == "tensor<bf16>" for t in signature(op.operation)[1]]
    return []


def wrap(module: Any) -> bool:
    """Give every public function of the linalg ``module`` with bf16 tensors at its boundary an i16 wrapper (in
    place); returns whether any was wrapped."""
    from torch_mlir import ir

    wrappers = []
    with module.context:
        for op in list(module.body.operations):
            f = op.operation
            if f.name != "func.func" or "sym_visibility" in f.attributes or not f.regions[0].blocks:
                continue
            ins, outs = signature(f)
            if not any(_BF16.fullmatch(t) for t in ins + outs):
                continue
            name = f.attributes["sym_name"].value
            inner = name + "_bf16_body"
            f.attributes["sym_name"] = ir.StringAttr.get(inner)
            f.attributes["sym_visibility"] = ir.StringAttr.get("private")
            wrappers.append(_wrapper(name, inner, ins, outs))
            # the wrappers parse on their own: the renamed function declared there, dropped on the way in
            wrappers.append(f"  func.func private @{inner}({', '.join(ins)}) -> ({', '.join(outs)})")
        if wrappers:
            extra = ir.Module.parse("module {\n" + "\n".join(wrappers) + "\n}")
            for op in list(extra.body.operations):
                if op.operation.regions[0].blocks:
                    module.body.append(op.operation)
    return bool(wrappers)


def _wrapper(name: str, inner: str, ins: list[str], outs: list[str]) -> str:
    lines = [f"  func.func @{name}({', '.join(f'%a{i}: {_as_bits(t)}' for i, t in enumerate(ins))}) -> "
             f"({', '.join(_as_bits(t) for t in outs)}) {{"]
    args = []
    for i, t in enumerate(ins):
        if _as_bits(t) != t:
            lines.append(f"    %b{i} = arith.bitcast %a{i} : {_as_bits(t)} to {t}")
            args.append(f"%b{i}")
        else:
            args.append(f"%a{i}")
    lines.append(f"    %r:{len(outs)} = func.call @{inner}({', '.join(args)}) : ({', '.join(ins)}) -> ({', '.join(outs)})")
    res = []
    for i, t in enumerate(outs):
        if _as_bits(t) != t:
            lines.append(f"    %o{i} = arith.bitcast %r#{i} : {t} to {_as_bits(t)}")
            res.append(f"%o{i}")
        else:
            res.append(f"%r#{i}")
    lines.append(f"    return {', '.join(res)} : {', '.join(_as_bits(t) for t in outs)}")
    lines.append("  }")
    return "\n".join(lines)
