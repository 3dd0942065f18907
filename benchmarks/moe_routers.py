"""MoE routers fused vs not: a whole Mixtral-style forward, and the router block alone.

Two graphs of the same exported model, rewritten by the same ``attnpass.fuse`` pass (attention fused in
both), differ only in the routers: ``softmax -> topk -> w / w.sum()`` kept, or replaced by one
``attnpass::softmax_topk(renormalize=True)`` call.  The ratio is eager-kept time / fused time from the same
alternating rounds (best round each), so host drift cancels; > 1 means the fused routers are faster.

Run:  python benchmarks/moe_routers.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers as T  # noqa: E402

import attnpass  # noqa: E402, F401  (registers the ops)
from attnpass.api import _as_graph  # noqa: E402
from attnpass.rewrite import fx as fx_rewrite  # noqa: E402
from attnpass.spec import RewriteSpec  # noqa: E402
from tests.topk_modules import Router  # noqa: E402


def rounds(fns: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Best wall time of each function over ``n`` alternating rounds (one warm-up call each first)."""
    best = {k: float("inf") for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(n):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t)
    return best


def both(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, int]:
    """The model exported twice and fused twice: routers kept, routers fused (attention fused in both)."""
    spec = RewriteSpec("fused").resolve()
    kept, _ = fx_rewrite.emitted(_as_graph(model, args, kwargs), spec, topk=False)
    fused, done = fx_rewrite.emitted(_as_graph(model, args, kwargs), spec)
    n = sum(1 for t in done.report.topk if t.fusable)
    return kept, fused, n


def whole_model(tokens: int, hidden: int, experts: int, k: int, n: int) -> str:
    cfg = T.MixtralConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=k,
                          attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    model = T.MixtralModel(cfg).eval()
    ids = torch.randint(0, 1000, (1, tokens))
    kept, fused, routers = both(model, (ids,), {})
    with torch.inference_mode():
        a, b = kept(ids), fused(ids)
    same = torch.allclose(a[0] if isinstance(a, tuple) else a.last_hidden_state,
                          b[0] if isinstance(b, tuple) else b.last_hidden_state, atol=1e-5)
    t = rounds({"kept": lambda: kept(ids), "fused": lambda: fused(ids)}, n)
    return (f"| Mixtral-style 2 layers, {tokens} tokens, hidden {hidden}, {experts} experts, top-{k} | {routers} | "
            f"{t['kept'] * 1e3:.2f} | {t['fused'] * 1e3:.2f} | {t['kept'] / t['fused']:.2f}x | {'yes' if same else 'NO'} |")


def router_block(tokens: int, experts: int, k: int, n: int) -> str:
    torch.manual_seed(0)
    m = Router(hidden=256, experts=experts, k=k).eval()
    x = torch.randn(tokens, 256)
    kept, fused, routers = both(m, (x,), {})
    with torch.inference_mode():
        same = all(torch.equal(p, q) if p.dtype == torch.int64 else torch.allclose(p, q, atol=1e-6)
                   for p, q in zip(kept(x), fused(x)))
    t = rounds({"kept": lambda: kept(x), "fused": lambda: fused(x)}, n)
    return (f"| router block, {tokens} tokens x {experts} experts, top-{k} | {routers} | {t['kept'] * 1e3:.3f} | "
            f"{t['fused'] * 1e3:.3f} | {t['kept'] / t['fused']:.2f}x | {'yes' if same else 'NO'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few rounds (a smoke run)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    n = 3 if args.quick else 20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {n} alternating rounds\n")
    print("| case | routers fused | kept ms | fused ms | kept / fused | same output |")
    print("|---|---|---|---|---|---|")
    router_shapes = [(512, 8, 2)] if args.quick else [(4096, 8, 2), (4096, 64, 8), (4096, 256, 8)]
    for tokens, experts, k in router_shapes:
        print(router_block(tokens, experts, k, n), flush=True)
    model_shapes = [(64, 64, 8, 2)] if args.quick else [(512, 128, 8, 2), (512, 128, 64, 8)]
    for tokens, hidden, experts, k in model_shapes:
        print(whole_model(tokens, hidden, experts, k, n), flush=True)


if __name__ == "__main__":
    main()
