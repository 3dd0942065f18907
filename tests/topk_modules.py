"""Hand-written softmax -> selection modules: the cases the top-k pass must rewrite, and those it must leave.

Shared by the fx, ONNX and MLIR top-k tests.  ``REWRITE`` maps a name to (module factory, input factory, the
site's form, k, renormalised); ``LEAVE`` maps a name to (module factory, input factory, a word of the reason).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(1))


class Router(torch.nn.Module):
    """Mixtral's router: gate, float32 softmax over the experts, top-2, renormalised, cast back."""

    def __init__(self, hidden: int = 16, experts: int = 8, k: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.k = k

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(h)
        p = F.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(p, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w.to(h.dtype), idx


class GatherGate(Router):
    """DeepSeek-style gate: the top-k indices only, the weights gathered back from the probabilities, renormalised."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.gate(h).softmax(dim=-1)
        _, idx = torch.topk(scores, k=self.k, dim=-1)
        w = scores.gather(-1, idx)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20), idx


class ClassHead(torch.nn.Module):
    """Classification head at inference: the top-5 classes and their probabilities."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(x, dim=-1).topk(5, dim=-1)


class Greedy(torch.nn.Module):
    """Greedy decoding's pick: ``argmax(softmax(logits))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(torch.softmax(x, dim=-1), dim=-1)


class MaxProb(torch.nn.Module):
    """A confidence score: the largest probability of each row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1).amax(dim=-1, keepdim=True)


class SharedProbs(torch.nn.Module):
    """The full probabilities are also used: fusing would still have to write them."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.softmax(x, dim=-1)
        return p.topk(3, dim=-1)[0], p * 2.0


class AxesDiffer(torch.nn.Module):
    """Top-k over another axis than the softmax's: not one row's selection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1).topk(2, dim=0)[0]


class Smallest(torch.nn.Module):
    """The k least likely entries: not what the fused op computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1).topk(2, dim=-1, largest=False)[0]


REWRITE: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], torch.Tensor], str, int | None, bool]] = {
    "router": (Router, _x(6, 16), "topk", 2, True),
    "gather_gate": (GatherGate, _x(6, 16), "topk", 2, True),
    "head": (ClassHead, _x(3, 40), "topk", 5, False),
    "greedy": (Greedy, _x(3, 40), "argmax", None, False),
    "maxprob": (MaxProb, _x(3, 40), "max", None, False),
}

LEAVE: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], torch.Tensor], str]] = {
    "shared": (SharedProbs, _x(3, 40), "used elsewhere"),
    "axes": (AxesDiffer, _x(3, 40), "axes differ"),
    "smallest": (Smallest, _x(3, 40), "smallest"),
}
