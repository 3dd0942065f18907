"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class AttnpassError(Exception):
    """Bad input or an unsafe request. The message names the file or node and what is wrong."""


class NoAttentionFound(AttnpassError):
    """The model holds no attention site: not a failure of the tool, but nothing to write."""


class NothingRewritten(NoAttentionFound):
    """Attention was found but the rewrite changed none of it (``--to fused`` with no fusable site): an
    unchanged copy is as useless as one of a model without attention, so it is treated the same way."""
