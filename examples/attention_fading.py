"""Attention fading: max attention weight and entropy vs context length, softmax vs SSMax.

Two views of the same effect (arXiv 2501.19399, Fig. 1):
  1. the paper's synthetic vector: one logit stands out by a fixed margin among ``n`` noise
     logits; softmax's weight on it falls like ``1/n``, SSMax's does not;
  2. a real architecture converted with ``attnpass.hf.to_ssmax(train_len=L)``: a tiny LLaMA built
     from its config class, whose last query row we read at growing context lengths. At ``L``
     both agree exactly; beyond it SSMax stays sharper.

Run:  python examples/attention_fading.py [--smoke] [--out examples/figures]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from attnpass import hf, semantics


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


def converted_model(lengths: list[int], train_len: int) -> dict:
    """Last-row attention statistics of a tiny LLaMA's first layer, softmax vs after SSMax conversion."""
    import transformers as T
    from transformers import AttentionInterface

    stats: dict[str, list[tuple[float, float]]] = {"softmax": [], f"SSMax (train_len={train_len})": []}
    captured: dict[str, torch.Tensor] = {}

    def probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
        """Records layer 0's queries/keys, then computes what eager attention computes."""
        if "q" not in captured:
            captured["q"], captured["k"], captured["scale"] = query, key, scaling
        rep = query.shape[1] // key.shape[1]
        out = semantics.attention(query, key, value, attention_mask, is_causal=attention_mask is None and query.shape[2] > 1,
                                  scale=scaling, enable_gqa=rep > 1)
        return out.transpose(1, 2), None

    AttentionInterface.register("attnpass_fading_probe", probe)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=max(lengths), attn_implementation="attnpass_fading_probe")
    model = T.LlamaModel(cfg).eval()
    s = semantics.s_for_train_len(train_len)
    for n in lengths:
        captured.clear()
        ids = torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            model(ids)
        q, k = captured["q"][:, :, -1:], captured["k"]
        z = (q @ k.transpose(-2, -1)) * captured["scale"]
        for label, factor in (("softmax", 1.0), (f"SSMax (train_len={train_len})", s * math.log(n))):
            p = torch.softmax(z * factor, -1)
            stats[label].append((p.amax(-1).mean().item(), (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().item()))
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=Path("examples/figures"))
    args = p.parse_args(argv)
    syn_lengths = [2 ** i for i in range(1, 9 if args.smoke else 17)]
    model_lengths = [64, 128] if args.smoke else [64, 128, 256, 512, 1024, 2048]
    syn = synthetic(syn_lengths, [0.3, 0.43, 0.6])
    real = converted_model(model_lengths, train_len=64)
    hf.register()
    print("synthetic vector (margin 3): max weight on the leading logit")
    print("n       " + "  ".join(f"{k:>14}" for k in syn))
    for i, n in enumerate(syn_lengths):
        print(f"{n:<7d} " + "  ".join(f"{syn[k]['max'][i]:14.4f}" for k in syn))
    print("tiny LLaMA, layer 0, last query row: max weight / entropy")
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
    axes[2].set_title("tiny LLaMA (converted): last-row max weight")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length n")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
