"""cache: not yet implemented."""

from __future__ import annotations

from proxy.context import RouteContext


def build_route(ctx: RouteContext) -> None:
    return None
