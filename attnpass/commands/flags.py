"""The rewrite flags every command spells the same way, and the one place they become a ``RewriteSpec``.

``--to ssmax|fused``, ``--s``, ``--bias``, ``--train-len``, ``--ssmax`` (fused SSMax), ``--replace-existing`` /
``--fit-existing`` (a Q already scaled by a relative of SSMax).  Older
spellings stay accepted but hidden from ``--help``: ``--b`` for ``--bias``, ``--to fuse`` for
``--to fused``, and ``--to ssmax --fused`` for ``--to fused --ssmax``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from attnpass.spec import ALIASES, RewriteSpec


def add_rewrite_flags(p: argparse.ArgumentParser, choices: Sequence[str] = ("ssmax", "fused"), default: str | None = None,
                      required: bool = False, fused_alias: bool = False) -> None:
    """Add the shared rewrite flags to ``p``; ``choices`` may add "none" (commands that can skip the rewrite)."""
    shown = "|".join(choices)
    p.add_argument("--to", choices=(*choices, *ALIASES), default=default, required=required, metavar=shown,
                   help=f"the rewrite: {shown}" + (f" (default {default})" if default else ""))
    p.add_argument("--s", type=_param, default=None, help="SSMax s: one value, or one per head as S0,S1,... (default 0.43)")
    p.add_argument("--bias", type=_param, default=None, help="SSMax b: one value, or one per head (default: none)")
    p.add_argument("--b", dest="bias", type=_param, default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-len", type=int, default=None, help="SSMax s = 1/log(L): the model is unchanged at length L")
    p.add_argument("--ssmax", action="store_true",
                   help="with --to fused: SSMax inside the fused op (implied by --s, --train-len or --bias)")
    p.add_argument("--replace-existing", action="store_true",
                   help="a Q already scaled by a relative of SSMax (Llama 4 temperature tuning, llama_4_scaling, Qwen-1 "
                        "log-n, an earlier SSMax) is left alone unless given: that scaling is then replaced by SSMax")
    p.add_argument("--fit-existing", action="store_true",
                   help="replace such a scaling by the SSMax (s, b) closest to it (least squares over positions)")
    if fused_alias:
        p.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)


def _param(text: str) -> float | tuple[float, ...]:
    """``0.4`` (every head) or ``0.2,0.4,0.6`` (one value per head, the order of the heads)."""
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers (one per head), got {text!r}") from None
    return vals if "," in text else vals[0]


def spec_from_args(args: argparse.Namespace, target: str = "ort") -> RewriteSpec:
    """The request the flags describe (``--to none`` is the caller's to handle before this)."""
    return RewriteSpec.of(args.to, s=args.s, b=args.bias, train_len=args.train_len, ssmax=args.ssmax or None,
                          fused=bool(getattr(args, "fused", False)), target=target,
                          replace_existing=bool(getattr(args, "replace_existing", False)),
                          fit_existing=bool(getattr(args, "fit_existing", False)))


__all__ = ["add_rewrite_flags", "spec_from_args"]
