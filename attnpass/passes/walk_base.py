"""What every part of the matcher shares: the adapter, the "not attention" signal and tiny accessors."""

from __future__ import annotations

from typing import Any

from attnpass.passes.kinds import Adapter, Kind


class NoMatch(Exception):
    """Raised inside the walk: this softmax is not attention (the message says why)."""


class WalkBase:
    """The adapter plus the one-line questions the walker, the proofs and the operand finder ask."""

    def __init__(self, adapter: Adapter):
        self.a = adapter

    def _rank(self, v: Any) -> int | None:
        s = self.a.shape(v)
        return None if s is None else len(s)

    def _producer_kind(self, v: Any) -> tuple[Any, Kind]:
        p = self.a.producer(v)
        return p, (Kind.OTHER if p is None else self.a.kind(p))

    def _const(self, v: Any) -> float | None:
        return self.a.constant(v)

    def _in(self, node: Any, i: int = 0) -> Any:
        return self.a.inputs(node)[i]
