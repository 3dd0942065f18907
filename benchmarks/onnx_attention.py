"""onnxruntime CPU time and peak memory: original vs ``--to fused`` vs ``--to ssmax`` vs fused SSMax.

GPT-style (GPT-2, causal) and BERT-style (padding mask) models with random weights are exported
once (dynamo exporter, dynamic batch/sequence) and rewritten with ``attnpass.onnx.rewrite``; each
(model, variant, sequence) runs in its own process so peak RSS is that run's alone.

    python benchmarks/onnx_attention.py            # S = 512, 2048, 4096
    python benchmarks/onnx_attention.py --quick    # S = 128, 256, small models
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _child(path: str, seq: int, repeat: int) -> None:
    # onnxruntime and numpy only (no torch import), so peak RSS is the model's run
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 100, (1, seq)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, seq), np.int64)}
    sess.run(None, feeds)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"ms": best * 1e3, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _models(quick: bool, max_pos: int):
    import torch
    import transformers as t

    hidden, heads, layers = (64, 4, 1) if quick else (256, 4, 2)
    eager = {"attn_implementation": "eager"}
    gpt = t.GPT2Model(t.GPT2Config(vocab_size=100, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos,
                                   use_cache=False, **eager)).eval()
    bert = t.BertModel(t.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=hidden * 2, max_position_embeddings=max_pos, **eager)).eval()

    class W(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids, attention_mask=attention_mask).last_hidden_state

    return {"gpt-style": W(gpt), "bert-style": W(bert)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate the variants this many times and keep each one's best (the host's speed drifts)")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        _child(a.child[0], int(a.child[1]), a.repeat)
        return
    warnings.filterwarnings("ignore")
    import torch

    import attnpass.onnx as aonnx

    seqs = [128, 256] if a.quick else [512, 2048, 4096]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, m in _models(a.quick, max(seqs)).items():
            src = Path(d) / f"{name}.onnx"
            ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)
            dyn = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},) * 2
            torch.onnx.export(m, (ids, mask), str(src), dynamo=True, input_names=["input_ids", "attention_mask"],
                              dynamic_shapes=dyn, verbose=False)
            variants = {"original": src}
            for to in ("fused", "ssmax"):
                variants[to] = Path(d) / f"{name}_{to}.onnx"
                aonnx.rewrite(src, variants[to], to=to)
            variants["fused_ssmax"] = Path(d) / f"{name}_fused_ssmax.onnx"
            aonnx.rewrite(src, variants["fused_ssmax"], to="fused", ssmax=True)
            for seq in seqs:
                res: dict[str, dict[str, float]] = {}
                for r in range(a.rounds):
                    order = list(variants.items()) if r % 2 == 0 else list(reversed(variants.items()))
                    for v, p in order:
                        out = subprocess.run([sys.executable, __file__, "--child", str(p), str(seq), "--repeat", str(a.repeat)],
                                             capture_output=True, text=True, check=True)
                        got = json.loads(out.stdout.strip().splitlines()[-1])
                        best = res.setdefault(v, got)
                        best["ms"] = min(best["ms"], got["ms"])
                rows.append((name, seq, res))
    cols = ("fused", "ssmax", "fused_ssmax")
    print(f"{'model':<11} {'S':>5} {'orig ms':>9} " + " ".join(f"{c + '/orig':>16}" for c in cols)
          + f" {'orig MB':>8} " + " ".join(f"{c + ' MB/orig':>19}" for c in cols))
    for name, seq, r in rows:
        o = r["original"]
        print(f"{name:<11} {seq:>5} {o['ms']:>9.1f} " + " ".join(f"{r[c]['ms'] / o['ms']:>16.2f}" for c in cols)
              + f" {o['peak_mb']:>8.0f} " + " ".join(f"{r[c]['peak_mb'] / o['peak_mb']:>19.2f}" for c in cols))


if __name__ == "__main__":
    main()
