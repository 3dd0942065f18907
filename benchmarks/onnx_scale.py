"""Time and peak RSS of ``attnpass.onnx`` find + rewrite + save against model depth (and weight size).

The models are written straight with ``onnx.helper`` (no torch export, no download): an embedding
table, then per layer a pre-scaled-Q attention block with a causal additive mask, written the way the
TorchScript exporter writes it (``MatMul -> Reshape -> Transpose``, ``Mul(scale)``, ``Add(mask)``,
``Softmax``, ``MatMul``, heads merged, output projection, residual).  Weights go to one external-data
file, streamed in chunks, so building a 2 GB model never holds 2 GB.

Each (layers, variant) runs in its own process so peak RSS (``ru_maxrss``) is that run's alone.

    python benchmarks/onnx_scale.py                 # 1 / 12 / 48 layers, dim 256
    python benchmarks/onnx_scale.py --layers 1 4 --dim 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 1 << 24  # floats generated at once while streaming weights (64 MiB)


class _Weights:
    """Appends initializers to one external-data file and returns their (external) TensorProtos."""

    def __init__(self, data_path: Path, seed: int = 0) -> None:
        self.path, self.offset = data_path, 0
        self.file = open(data_path, "wb")  # noqa: SIM115  (closed by close())
        self.rng = np.random.default_rng(seed)
        self.tile = (self.rng.standard_normal(CHUNK) * 0.02).astype(np.float32)

    def add(self, name: str, shape: tuple[int, ...], value: float | None = None):
        from onnx import TensorProto

        count = int(np.prod(shape))
        left = count
        while left:
            n = min(left, CHUNK)
            block = np.full(n, value, np.float32) if value is not None else np.roll(self.tile, left % 4099)[:n]
            self.file.write(block.tobytes())
            left -= n
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(count * 4))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += count * 4
        return t

    def close(self) -> None:
        self.file.close()


def build(path: Path, layers: int, dim: int = 64, heads: int = 4, vocab: int = 1000) -> int:
    """Write a ``layers``-deep attention model to ``path`` (+ ``path.data``); returns the weight bytes."""
    import onnx
    from onnx import TensorProto, helper

    hd = dim // heads
    w = _Weights(path.with_name(path.name + ".data"))
    inits = [w.add("embed", (vocab, dim))]
    small = [
        helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, 0, heads, hd]),
        helper.make_tensor("merge_shape", TensorProto.INT64, [3], [0, 0, dim]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [hd ** -0.5]),
        helper.make_tensor("neg", TensorProto.FLOAT, [], [float(np.finfo(np.float32).min)]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embed"),
        # causal mask [S, S]: key j allowed for query i when j <= i
        helper.make_node("Shape", ["ids"], ["ids_shape"], name="ids_shape"),
        helper.make_node("Gather", ["ids_shape", "one_i"], ["seq"], name="seq", axis=0),
        helper.make_node("Range", ["zero_i", "seq", "one_i"], ["pos"], name="pos"),
        helper.make_node("Unsqueeze", ["pos", "axis1"], ["pos_col"], name="pos_col"),
        helper.make_node("LessOrEqual", ["pos", "pos_col"], ["allowed"], name="allowed"),
        helper.make_node("Where", ["allowed", "zero", "neg"], ["mask"], name="mask"),
    ]
    small += [helper.make_tensor("one_i", TensorProto.INT64, [], [1]), helper.make_tensor("zero_i", TensorProto.INT64, [], [0]),
              helper.make_tensor("axis1", TensorProto.INT64, [1], [1])]
    for i in range(layers):
        x, p = f"h{i}", f"l{i}."
        for n in ("q", "k", "v", "o"):
            inits.append(w.add(p + n, (dim, dim)))
        nodes += [helper.make_node("MatMul", [x, p + n], [p + n + "_proj"], name=p + n + "_proj") for n in "qkv"]
        nodes += [helper.make_node("Reshape", [p + n + "_proj", "heads_shape"], [p + n + "_4d"], name=p + n + "_4d")
                  for n in "qkv"]
        nodes += [
            helper.make_node("Transpose", [p + "q_4d"], [p + "q_t"], name=p + "q_t", perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", [p + "k_4d"], [p + "k_t"], name=p + "k_t", perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", [p + "v_4d"], [p + "v_t"], name=p + "v_t", perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [p + "q_t", p + "k_t"], [p + "qk"], name=p + "qk"),
            helper.make_node("Mul", [p + "qk", "scale"], [p + "scaled"], name=p + "scaled"),
            helper.make_node("Add", [p + "scaled", "mask"], [p + "masked"], name=p + "masked"),
            helper.make_node("Softmax", [p + "masked"], [p + "probs"], name=p + "softmax", axis=-1),
            helper.make_node("MatMul", [p + "probs", p + "v_t"], [p + "ctx"], name=p + "pv"),
            helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], name=p + "ctx_t", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ctx_t", "merge_shape"], [p + "merged"], name=p + "merged"),
            helper.make_node("MatMul", [p + "merged", p + "o"], [p + "out"], name=p + "o_proj"),
            helper.make_node("Add", [x, p + "out"], [f"h{i + 1}"], name=p + "residual"),
        ]
    w.close()
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["batch", "seq", dim])],
                              initializer=inits + small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="attnpass-scale")
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return w.offset


def _child(src: str, dst: str, to: str, validate: bool) -> None:
    """One measured run: find + rewrite (+ validate) + save, then this process's peak RSS."""
    import attnpass.onnx as aonnx

    t0 = time.perf_counter()
    n = len(aonnx.find(src))
    t1 = time.perf_counter()
    res = aonnx.rewrite(src, dst, to=to, validate=validate)
    t2 = time.perf_counter()
    print(json.dumps({"sites": n, "rewritten": len(res.rewritten), "find_s": t1 - t0, "rewrite_s": t2 - t1,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(src: Path, dst: Path, to: str = "fused", validate: bool = True) -> dict:
    """Run ``_child`` in a fresh interpreter and return its JSON line."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import onnx_scale; " \
           f"onnx_scale._child({str(src)!r}, {str(dst)!r}, {to!r}, {validate!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 12, 48])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--to", choices=("fused", "ssmax"), default="fused")
    ap.add_argument("--no-validate", action="store_true")
    args = ap.parse_args()
    print("| layers | weights (MB) | sites | find (s) | rewrite+validate+save (s) | s / layer | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="attnpass-scale-") as tmp:
        for layers in args.layers:
            src = Path(tmp) / f"m{layers}.onnx"
            size = build(src, layers, dim=args.dim)
            r = measure(src, Path(tmp) / f"out{layers}.onnx", args.to, not args.no_validate)
            total = r["find_s"] + r["rewrite_s"]
            print(f"| {layers} | {size / 1e6:.1f} | {r['sites']} | {r['find_s']:.2f} | {r['rewrite_s']:.2f} | "
                  f"{total / layers:.3f} | {r['peak_rss'] / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
