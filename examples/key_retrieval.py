"""Key-value retrieval beyond the training length: softmax vs SSMax vs SSMax converted after training.

The task isolates what SSMax is for (arXiv 2501.19399, "attention fading"): a context of ``n``
(key, value) pairs, each one token, then a query key; the model must output the query's value.
There are no positional encodings, so the only thing that changes with ``n`` is how many
distractors the softmax spreads its mass over.  We train at one ``n`` and evaluate at 1x..16x.

Three settings, as in the paper:
  softmax    the model as written (plain softmax attention);
  ssmax      the same model rewritten by ``attnpass.to_ssmax`` *before* training (``s`` trained);
  converted  the softmax-trained model rewritten after training with ``train_len`` = its training
             context, so it is unchanged at that length and sharper beyond it (no further training).

Run:  python examples/key_retrieval.py            (full size; a few minutes on 2 CPU cores)
      python examples/key_retrieval.py --smoke    (tiny sizes; what ``make test`` runs)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import attnpass


class Retriever(nn.Module):
    """Pair tokens (key + value embeddings), a query token, pre-LN attention blocks, no positions."""

    def __init__(self, keys: int, values: int, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.key_emb = nn.Embedding(keys, dim)
        self.val_emb = nn.Embedding(values + 1, dim)  # index `values` marks the query token
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "o": nn.Linear(dim, dim),
                "ln2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
            })
            for _ in range(layers)
        )
        self.heads = heads
        self.out = nn.Linear(dim, values)

    def forward(self, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        return self.out(self._run(keys, vals)[0][:, -1])

    def query_logits(self, keys: torch.Tensor, vals: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the query row's attention logits ``[B, H, S]`` (for looking at what it attends)."""
        return self._run(keys, vals)[1]

    def _run(self, keys: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.key_emb(keys) + self.val_emb(vals)
        b, s, d = x.shape
        hd = d // self.heads
        logits = []
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, s, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-2, -1) / hd ** 0.5
            logits.append(scores[:, :, -1])
            x = x + blk["o"]((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, d))
            x = x + blk["mlp"](blk["ln2"](x))
        return x, logits


def batch(n_pairs: int, size: int, keys: int, values: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``size`` contexts of ``n_pairs`` distinct keys; the last token queries one of them."""
    k = torch.argsort(torch.rand(size, keys, generator=gen), dim=1)[:, :n_pairs]
    v = torch.randint(0, values, (size, n_pairs), generator=gen)
    pick = torch.randint(0, n_pairs, (size,), generator=gen)
    rows = torch.arange(size)
    keys_in = torch.cat([k, k[rows, pick, None]], dim=1)
    vals_in = torch.cat([v, torch.full((size, 1), values)], dim=1)
    return keys_in, vals_in, v[rows, pick]


def exported(model: nn.Module, n_pairs: int, keys: int, values: int) -> torch.export.ExportedProgram:
    """Export once with a dynamic context length, so one rewritten module serves every ``n``."""
    k, v, _ = batch(n_pairs, 4, keys, values, torch.Generator().manual_seed(0))
    seq, rows = torch.export.Dim("seq", min=2, max=1 << 14), torch.export.Dim("batch", min=1, max=1 << 12)
    return torch.export.export(model, (k, v), dynamic_shapes=({0: rows, 1: seq}, {0: rows, 1: seq}), strict=False)


def train(model: nn.Module, args: argparse.Namespace, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    losses = []
    for _ in range(args.steps):
        k, v, y = batch(args.train_pairs, args.batch, args.keys, args.values, gen)
        loss = F.cross_entropy(model(k, v), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, n_pairs: int, args: argparse.Namespace, seed: int) -> float:
    gen = torch.Generator().manual_seed(10_000 + seed)
    correct = total = 0
    for _ in range(max(1, args.eval_samples // args.eval_batch)):
        k, v, y = batch(n_pairs, args.eval_batch, args.keys, args.values, gen)
        correct += (model(k, v).argmax(-1) == y).sum().item()
        total += y.numel()
    return correct / total


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out", type=Path, default=Path("examples/figures"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    # the model is tiny: one thread beats two (thread hand-off costs more than the work)
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    full = dict(train_pairs=16, keys=1024, values=16, steps=1500, batch=64, lr=3e-3, eval_samples=1024, eval_batch=128,
                factors=[1, 2, 4, 8, 16])
    smoke = dict(train_pairs=6, keys=128, values=8, steps=20, batch=16, lr=3e-3, eval_samples=32, eval_batch=32,
                 factors=[1, 4])
    for key, value in (smoke if args.smoke else full).items():
        setattr(args, key, value)
    if args.smoke:
        args.seeds = args.seeds[:1]
    train_len = args.train_pairs + 1  # the query row attends every pair and itself
    lengths = [args.train_pairs * f for f in args.factors]
    results: dict[str, dict[int, list[float]]] = {name: {n: [] for n in lengths} for name in ("softmax", "ssmax", "converted")}
    t0 = time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        plain = Retriever(args.keys, args.values)
        torch.manual_seed(seed)
        ss = attnpass.to_ssmax(exported(Retriever(args.keys, args.values), args.train_pairs, args.keys, args.values),
                               train_len=train_len, fused=True)
        train(plain, args, seed)
        train(ss, args, seed)
        conv = attnpass.to_ssmax(exported(plain, args.train_pairs, args.keys, args.values), train_len=train_len, fused=True)
        for n in lengths:
            for name, model in (("softmax", plain), ("ssmax", ss), ("converted", conv)):
                results[name][n].append(accuracy(model, n, args, seed))
    elapsed = time.time() - t0
    table = {name: {n: sum(v) / len(v) for n, v in per.items()} for name, per in results.items()}
    print(f"key retrieval, trained at {args.train_pairs} pairs, seeds {args.seeds}, {elapsed:.0f}s")
    print("pairs  " + "  ".join(f"{name:>9}" for name in table))
    for n in lengths:
        print(f"{n:5d}  " + "  ".join(f"{table[name][n]:9.3f}" for name in table))
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(table, lengths, args, args.out / ("key_retrieval_smoke.png" if args.smoke else "key_retrieval.png"))
    (args.out / ("key_retrieval_smoke.json" if args.smoke else "key_retrieval.json")).write_text(json.dumps(table, indent=1))
    return table


def _plot(table: dict, lengths: list[int], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, style in (("softmax", "o-"), ("ssmax", "s-"), ("converted", "^--")):
        ax.plot(lengths, [table[name][n] for n in lengths], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n}\n({n // args.train_pairs}x)" for n in lengths])
    ax.axhline(1 / args.values, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("context pairs (multiple of the training length)")
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(frameon=False)
    ax.set_title(f"trained at {args.train_pairs} pairs; seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
