"""``resilience-proxy`` (and ``python -m proxy``): run | check | schema | mock."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

from proxy import accesslog
from proxy.config import Config, RouteConfig
from proxy.loader import ConfigError, LoadedConfig, json_schema, load_config
from proxy.units import format_duration

PACKAGED_DEFAULT = Path(__file__).with_name("default.yaml")


def default_config_path() -> str:
    """``-c`` > ``RP_CONFIG`` > ``config/default.yaml`` (cwd) > the packaged default."""
    env = os.environ.get("RP_CONFIG")
    if env:
        return env
    local = Path("config/default.yaml")
    return str(local if local.exists() else PACKAGED_DEFAULT)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resilience-proxy",
                                     description="A resilience sidecar for AI provider calls.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the data and admin planes")
    run.add_argument("-c", "--config", help="config file (default: $RP_CONFIG or "
                     "config/default.yaml)")
    run.add_argument("--listen", help="override server.listen (host:port)")
    run.add_argument("--admin-listen", help="override server.admin_listen (host:port)")
    run.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    run.add_argument("--log-level", default=os.environ.get("RP_LOG_LEVEL", "info"))
    check = sub.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("-c", "--config")
    sub.add_parser("schema", help="print the config file's JSON Schema")
    mock = sub.add_parser("mock", help="serve the fault-injecting mock provider")
    mock.add_argument("--listen", default="127.0.0.1:8081")
    args = parser.parse_args(argv)

    if args.command in ("schema", "check"):
        return _printing(lambda: _schema() if args.command == "schema"
                         else _check(args.config or default_config_path()))
    if args.command == "mock":
        return _mock(args.listen)
    return _run(args)


def _printing(command: Callable[[], int]) -> int:
    """Run a command that prints to stdout; a reader that stops early (``| head -1``) ends it
    quietly with status 1 instead of a BrokenPipeError traceback (the Python docs' recipe:
    point stdout at /dev/null so the interpreter's final flush cannot fail again)."""
    try:
        code = command()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _schema() -> int:
    sys.stdout.write(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _check(path: str) -> int:
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid ({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''})",
              file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(summary(loaded))
    return 0


def summary(loaded: LoadedConfig) -> str:
    """A one-screen summary of a valid config (no secrets: header values are not shown)."""
    cfg = loaded.config
    lines = [f"{loaded.path}: OK (sha256 {loaded.sha256[:12]})",
             f"listen {cfg.server.listen}, admin {cfg.server.admin_listen}, "
             f"state {cfg.state.backend}"
             + (", admin token set" if cfg.server.admin_token else "")
             + (f", {len(cfg.server.clients.keys)} client key(s)" if cfg.server.clients else ""),
             "providers:"]
    for name, p in cfg.providers.items():
        extras = [f"format={p.format}"]
        if p.headers:
            extras.append("headers: " + ", ".join(sorted(p.headers)))
        if p.rate_limit:
            extras.append(f"rate_limit {p.rate_limit.requests_per_second:g}/s")
        if p.circuit_breaker:
            cb = p.circuit_breaker
            extras.append(f"breaker {cb.failure_rate:.0%} of >={cb.min_requests} in "
                          f"{format_duration(cb.window)}")
        if p.pricing:
            extras.append(f"pricing for {len(p.pricing)} model(s)")
        if p.cost_per_request is not None:
            extras.append(f"${p.cost_per_request:g}/request")
        lines.append(f"  {name}: {p.url}  " + "; ".join(extras))
    lines.append("routes:")
    for route in cfg.routes:
        lines.extend(_route_lines(route))
    if cfg.budgets:
        lines.append("budgets:")
        for name, b in cfg.budgets.items():
            limits = [f"${b.limit_usd:g}" if b.limit_usd else "",
                      f"{b.limit_requests} requests" if b.limit_requests else ""]
            steps = ", ".join(f"{t.at:.0%} {t.action}" for t in b.thresholds)
            lines.append(f"  {name}: {' + '.join(x for x in limits if x)} per {b.window} "
                         f"({b.timezone}), per {b.per}; {steps}")
    return "\n".join(lines)


def _route_lines(route: RouteConfig) -> list[str]:
    m = route.match
    where = m.path if m.path is not None else f"{m.path_prefix}*"
    methods = ",".join(m.methods) if m.methods else "any"
    tiers = " -> ".join(
        f"{t.provider}" + (f"({t.model})" if t.model else "") + (" $$" if t.expensive else "")
        + (" [accept]" if t.accept else "") for t in route.tiers)
    out = [f"  {route.name}: {methods} {where}", f"    tiers: {tiers}"]
    t = route.timeout
    pol = [f"timeout {format_duration(t.attempt)}/{format_duration(t.total)}" if t else
           "timeout defaults (30s/120s)"]
    if route.retry:
        pol.append(f"retry x{route.retry.attempts}")
    if route.cache:
        pol.append(f"cache {format_duration(route.cache.ttl)}")
    if route.budgets:
        pol.append("budgets " + ",".join(route.budgets))
    if route.canary:
        pol.append(f"canary {route.canary.weight:g}% on {route.canary.hash_on}")
    if route.validate_:
        pol.append("validate")
    if route.redact:
        pol.append("redact " + ",".join(route.redact))
    if route.faults:
        pol.append("faults")
    if route.fallback_response:
        pol.append("fallback_response")
    out.append("    policies: " + "; ".join(pol))
    return out


def _run(args: argparse.Namespace) -> int:
    path = args.config or default_config_path()
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid config", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    accesslog.configure(args.log_level)
    _install_uvloop()
    workers = args.workers or loaded.config.server.workers
    if workers > 1:
        from proxy.workers import run_workers

        return run_workers(loaded, workers, args.listen, args.admin_listen, args.log_level)
    return asyncio.run(serve(loaded, args.listen, args.admin_listen))


async def serve(loaded: LoadedConfig, listen: str | None, admin_listen: str | None,
                reuse_port: bool = False) -> int:
    from proxy.runtime import tune_gc
    from proxy.server import ProxyServer

    server = ProxyServer(loaded)
    stop = asyncio.Event()
    await server.start(listen=listen, admin_listen=admin_listen, reuse_port=reuse_port)
    tune_gc()
    server.install_signal_handlers(stop)
    print(f"resilience-proxy serving {server.data_url} (admin {server.admin_url}) "
          f"with {loaded.path}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop()
    return 0


def _mock(listen: str) -> int:
    from proxy.mock import start_mock

    host, _, port = listen.rpartition(":")
    _install_uvloop()

    async def go() -> None:
        _, runner, url = await start_mock(host, int(port))
        print(f"mock provider serving {url}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["Config", "default_config_path", "main", "summary"]
