"""faults: not yet implemented."""

from __future__ import annotations

from proxy.context import AttemptContext, RouteContext


def build_route(ctx: RouteContext) -> None:
    return None


def build_attempt(ctx: AttemptContext) -> None:
    return None
