"""--workers N: not yet implemented (issue #8)."""

from __future__ import annotations

import sys

from proxy.loader import LoadedConfig


def run_workers(loaded: LoadedConfig, workers: int, listen: str | None,
                admin_listen: str | None) -> int:
    print("--workers > 1 is not implemented yet", file=sys.stderr)
    return 2
