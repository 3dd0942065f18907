"""Attention sites found: attnpass's walker vs Inductor's ``fuse_attention`` patterns, same modules.

For every hand-written variant (``tests/attention_modules.py``) and every HF corpus model
(``tests/hf_corpus.py``), counts the sites ``attnpass.find`` reports and the attention
replacements Inductor's pattern matcher makes when compiling the same module for inference
(``counters["inductor"]["fuse_attention"]``).  Prints a table; no timing involved.

Run:  python benchmarks/pattern_coverage.py [--no-inductor]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnpass  # noqa: E402
from tests import attention_modules as M  # noqa: E402
from tests import hf_corpus as C  # noqa: E402


def variants() -> dict[str, tuple[torch.nn.Module, tuple, dict, int]]:
    B, H, S, D = 2, 4, 9, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    kg, vg = (torch.randn(B, 2, S, D, generator=g) for _ in range(2))
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, -3:] = False
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool)) & keep[:, None, None, :]
    return {
        "causal tril + masked_fill(-inf)": (M.CausalTril(), (q, k, v), {}, 1),
        "additive finfo.min padding + dropout": (M.PaddedAdditive(), (q, k, v, keep), {}, 1),
        "GQA repeat_interleave + where(bool)": (M.GQARepeatInterleave(), (q, kg, vg, allowed), {}, 1),
        "einsum cross-attention, fp32 upcast": (M.CrossEinsum(), (q, k, v, torch.zeros(1, 1, S, S)), {}, 1),
        "baddbmm 3-D with bias": (M.Baddbmm3D(), (q, k, v, torch.zeros(B, H, S, S)), {}, 1),
        "tanh soft-cap, q pre-scaled, triu": (M.SoftcapPrescaled(), (q, k, v), {}, 1),
        "classifier + MoE router (not attention)": (M.NotAttention(D), (q, k, v), {}, 0),
    }


def inductor_count(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        torch.compile(model)(*args, **kwargs)
    return int(counters["inductor"]["fuse_attention"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-inductor", action="store_true", help="only attnpass's counts (fast)")
    args = p.parse_args(argv)
    rows = []
    cases = dict(variants())
    for name, (builder, expected) in C.CORPUS.items():
        model, a, kw = builder()
        cases[f"HF {name}"] = (model, a, kw, expected)
    for name, (model, a, kw, expected) in cases.items():
        model.eval()
        ours = len(attnpass.find(model, a, kw).sites)
        theirs = "-" if args.no_inductor else inductor_count(model, a, kw)
        rows.append((name, expected, ours, theirs))
        print(f"{name:42} expected {expected:2d}   attnpass {ours:2d}   inductor {theirs}", flush=True)
    total = sum(r[1] for r in rows)
    print(f"\ntotal attention sites: {total}; attnpass found {sum(r[2] for r in rows)}; "
          f"inductor fused {'-' if args.no_inductor else sum(r[3] for r in rows)}")


if __name__ == "__main__":
    main()
