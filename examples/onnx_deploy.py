"""An HF model exported, rewritten and served with onnxruntime.

GPT-2 (built from its config class, random weights: no download) goes through
``attnpass.export`` (checked in onnxruntime against torch eager), then ``attnpass.onnx.rewrite``
to fused attention and to SSMax (each validated before it is written), and is then served:
greedy decoding with plain onnxruntime sessions, compared token by token with torch (for SSMax,
with the same conversion done in torch by ``attnpass.hf.to_ssmax``: one meaning, two runtimes).

Run:  python examples/onnx_deploy.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers as T

import attnpass
import attnpass.hf
from attnpass import onnx as attnpass_onnx
from attnpass import validate as val


def greedy(step, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """Decode without a cache: the whole sequence each step (what a stateless ONNX graph serves)."""
    for _ in range(new_tokens):
        logits = step(ids)
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="where to keep the .onnx files (default: a temp dir)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    layers, dim, prompt, new = (1, 32, 8, 3) if args.smoke else (4, 128, 32, 16)
    cfg = T.GPT2Config(vocab_size=256, n_embd=dim, n_layer=layers, n_head=4, n_positions=256,
                       attn_implementation="eager", use_cache=False, bos_token_id=1, eos_token_id=2)
    model = T.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(3, 256, (2, prompt), generator=torch.Generator().manual_seed(0))
    seq = torch.export.Dim("seq", min=2, max=255)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        src = out / "gpt2.onnx"
        exported = attnpass.export(model, (ids,), None, src, dynamic_shapes=({1: seq},))
        print(f"exported: max |ORT - torch| = {exported.max_abs:.2e}")
        results = {}
        paths = {"original": src}
        for to in ("fused", "ssmax"):
            dst = out / f"gpt2.{to}.onnx"
            res = attnpass_onnx.rewrite(src, dst, to=to, **({"train_len": prompt} if to == "ssmax" else {}))
            paths[to] = dst
            print(f"--to {to}: {len(res.rewritten)}/{len(res.report.sites)} sites rewritten, written to {dst.name}")
        # SSMax is a different model on purpose: its torch twin is the same conversion done in torch
        ssmax_model = attnpass.hf.to_ssmax(copy.deepcopy(model), train_len=prompt)
        with torch.no_grad():
            ref = {"plain": greedy(lambda x: model(torch.from_numpy(x)).logits.numpy(), ids.numpy(), new),
                   "ssmax": greedy(lambda x: ssmax_model(torch.from_numpy(x)).logits.numpy(), ids.numpy(), new)}
        print(f"{'model':10} {'tokens == torch twin':>21} {'ms/step':>9}")
        for name, path in paths.items():
            sess = val.session(path)
            input_name = sess.get_inputs()[0].name
            t0 = time.perf_counter()
            tokens = greedy(lambda x, sess=sess, n=input_name: sess.run(None, {n: x})[0], ids.numpy(), new)
            ms = (time.perf_counter() - t0) / new * 1e3
            same = bool((tokens == ref["ssmax" if name == "ssmax" else "plain"]).all())
            results[name] = {"same_as_torch": same, "ms_per_step": ms}
            print(f"{name:10} {str(same):>21} {ms:9.2f}")
    return results


if __name__ == "__main__":
    main()
