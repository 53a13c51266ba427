"""Retry (issue #3): not yet implemented — one attempt per tier."""

from __future__ import annotations

from proxy.context import AttemptContext


def build_attempt(ctx: AttemptContext) -> None:
    return None
