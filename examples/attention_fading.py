"""Attention fading: max attention weight and entropy vs context length, softmax vs SSMax.

Two views of the same effect (arXiv 2501.19399, Fig. 1):
  1. the paper's synthetic vector: one logit stands out by a fixed margin among ``n`` noise
     logits; softmax's weight on it falls like ``1/n``, SSMax's does not;
  2. a real trained model converted with ``train_len=L``: the one-layer retriever of
     ``key_retrieval.py``, trained at 16 pairs; we read the query row's weight on the key it must
     retrieve at growing context lengths. At ``L`` both agree exactly; beyond it SSMax stays sharper.

Run:  python examples/attention_fading.py [--smoke] [--out examples/figures]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attnpass import semantics


def synthetic(lengths: list[int], s_values: list[float], margin: float = 3.0, draws: int = 256) -> dict:
    """Max weight and entropy of softmax / SSMax over ``n`` logits, one of which leads by ``margin``.

    Every variant sees the same draws, so the curves differ only by the normalisation.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for label, s in [("softmax", None)] + [(f"SSMax s={s:g}", s) for s in s_values]:
        maxw, ent = [], []
        for n in lengths:
            z = torch.randn(draws, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            z[:, 0] += margin
            if s is not None:
                z = z * semantics.ssmax_factor(torch.tensor(float(n), dtype=torch.float64), s)
            p = torch.softmax(z, -1)
            maxw.append(p[:, 0].mean().item())
            ent.append((-(p * p.clamp_min(1e-300).log()).sum(-1)).mean().item())
        out[label] = {"max": maxw, "entropy": ent}
    return out


def converted_model(lengths: list[int], train_pairs: int, steps: int) -> dict:
    """A one-layer retriever trained at ``train_pairs``, then SSMax-converted with ``train_len``.

    We read the query row's weight on the key it must retrieve, at growing context lengths: the
    same logits normalised by softmax (the trained model) and by SSMax (the converted model; for a
    one-layer model its logits are exactly these).
    """
    import argparse

    try:
        from examples.key_retrieval import Retriever, batch, train
    except ImportError:  # run as a script: this folder is on sys.path
        from key_retrieval import Retriever, batch, train

    args = argparse.Namespace(train_pairs=train_pairs, keys=1024, values=16, steps=steps, batch=64, lr=3e-3)
    torch.manual_seed(0)
    model = Retriever(args.keys, args.values, layers=1)
    train(model, args, seed=0)
    train_len = train_pairs + 1
    s = semantics.s_for_train_len(train_len)
    stats: dict[str, list[tuple[float, float]]] = {"softmax (trained)": [], f"SSMax (converted, train_len={train_len})": []}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in lengths:
            keys, vals, _ = batch(n, 256, args.keys, args.values, gen)
            target = (keys[:, :-1] == keys[:, -1:]).float()  # where the queried key sits
            z = model.query_logits(keys, vals)[0]
            for label, factor in zip(stats, (1.0, semantics.ssmax_factor(torch.tensor(float(n + 1)), s).item())):
                p = torch.softmax(z * factor, -1)
                on_target = (p[..., :-1] * target[:, None]).sum(-1).amax(1).mean().item()  # best head
                entropy = (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().item()
                stats[label].append((on_target, entropy))
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=Path("examples/figures"))
    args = p.parse_args(argv)
    syn_lengths = [2 ** i for i in range(1, 9 if args.smoke else 17)]
    model_lengths = [16, 64] if args.smoke else [16, 32, 64, 128, 256, 512, 1024]
    syn = synthetic(syn_lengths, [0.3, 0.43, 0.6])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread beats two
    try:
        real = converted_model(model_lengths, train_pairs=16, steps=30 if args.smoke else 600)
    finally:
        torch.set_num_threads(threads)
    print("synthetic vector (margin 3): max weight on the leading logit")
    print("n       " + "  ".join(f"{k:>14}" for k in syn))
    for i, n in enumerate(syn_lengths):
        print(f"{n:<7d} " + "  ".join(f"{syn[k]['max'][i]:14.4f}" for k in syn))
    print("retriever trained at 16 pairs, query row: weight on the queried key (best head) / entropy")
    for i, n in enumerate(model_lengths):
        print(f"{n:<7d} " + "  ".join(f"{k}: {v[i][0]:.4f} / {v[i][1]:.3f}" for k, v in real.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(syn, syn_lengths, real, model_lengths, args.out / ("attention_fading_smoke.png" if args.smoke else "attention_fading.png"))


def _plot(syn: dict, syn_lengths: list[int], real: dict, model_lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for label, v in syn.items():
        axes[0].plot(syn_lengths, v["max"], label=label)
        axes[1].plot(syn_lengths, v["entropy"], label=label)
    axes[0].set_title("synthetic: weight on the leading logit")
    axes[1].set_title("synthetic: entropy (nats)")
    for label, v in real.items():
        axes[2].plot(model_lengths, [x[0] for x in v], "o-", label=label)
    axes[2].set_xlabel("context pairs")
    axes[2].set_title("trained retriever: weight on the queried key")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length n")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
