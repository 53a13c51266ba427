"""ratelimit: not yet implemented."""

from __future__ import annotations

from proxy.context import AttemptContext


def build_attempt(ctx: AttemptContext) -> None:
    return None
