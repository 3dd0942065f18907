"""A model through ``torch.compile(backend="attnpass")``: fused attention, then SSMax, forward and backward.

The built-in TinyGPT (causal + padding mask, fp32 softmax, GQA) is compiled three ways and
compared with eager: the rewrite happens inside dynamo's graph, so training works too.

Run:  python examples/compile_backend.py [--smoke]   (--smoke: Inductor off, tiny sizes)
"""

from __future__ import annotations

import argparse
import time

import torch

import attnpass  # noqa: F401  (registers the backend; the entry point would find it too)
from attnpass.lowering import backend
from attnpass.tiny import TinyGPT, example_inputs


def timed(fn, *args, repeat: int = 3) -> tuple[torch.Tensor, float]:
    out = fn(*args)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    seq = 64 if args.smoke else 512
    inner = "eager" if args.smoke else "inductor"
    torch.manual_seed(0)
    model = TinyGPT(layers=2, max_len=max(seq, 1024)).eval()
    ids, mask = example_inputs(seq=seq)
    with torch.no_grad():
        ref, t_eager = timed(model, ids, mask)
        print(f"TinyGPT, seq {seq}, inner compiler: {inner}")
        print(f"{'variant':34} {'max |err|':>10} {'ms':>8}")
        print(f"{'eager':34} {0.0:10.2e} {t_eager * 1e3:8.2f}")
        for label, options in (("attnpass fuse", {"inner": inner}),
                               ("attnpass ssmax s=0, b=1 (fused)", {"rewrite": "ssmax", "s": 0.0, "b": 1.0, "inner": inner}),
                               ("attnpass ssmax s=0.43 (fused)", {"rewrite": "ssmax", "s": 0.43, "inner": inner})):
            torch._dynamo.reset()
            backend.reports.clear()
            compiled = torch.compile(model, backend="attnpass", options=options)
            out, t = timed(compiled, ids, mask)
            sites = sum(len(r.sites) for r in backend.reports)
            print(f"{label:34} {(out - ref).abs().max().item():10.2e} {t * 1e3:8.2f}   ({sites} sites rewritten)")
    # training step through the compiled model: the op's backward runs
    torch._dynamo.reset()
    train_model = TinyGPT(layers=2, max_len=max(seq, 1024)).train()
    compiled = torch.compile(train_model, backend="attnpass", options={"inner": inner})
    loss = torch.nn.functional.cross_entropy(compiled(ids, mask).flatten(0, 1), ids.flatten())
    loss.backward()
    grads = sum(p.grad.abs().sum().item() for p in train_model.parameters() if p.grad is not None)
    print(f"training step through the compiled model: loss {loss.item():.3f}, |grad| sum {grads:.3f}")


if __name__ == "__main__":
    main()
