"""The admin plane (``server.admin_listen``): health, metrics, status and operator actions.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers); everything else
needs ``Authorization: Bearer <admin_token>`` when a token is configured. The decision is
made on the route the router resolved, not on the path's spelling, so no case, encoding,
dot-segment or double-slash trick reaches an action without the token, and an unknown path
is a 401 too (nothing to probe). Mutations are POST only (a GET answers 405), and a browser
cannot be made to send one: a POST whose ``Origin`` is not this host, or whose
``Sec-Fetch-Site`` says another site, is refused (403). Without a token, a POST is accepted
only for a ``Host`` that is an IP address or ``localhost``, so a DNS-rebinding page cannot
reach the actions through a name it controls.

``GET /admin/`` is the live status page (``proxy/static/status.html``): a static page with no
data in it, served without the token so that a browser can open it; it asks for the token,
keeps it in the tab's sessionStorage and sends it as the Bearer header on every read of
``/admin/status``, so every number it shows is still behind the token.

Policies expose what the admin plane acts on through the runtime's registry:

- ``circuit[provider]``: ``state_name() -> "closed"|"open"|"half_open"``, ``reset()``
- ``canary[route]``: ``status() -> {"weight", "state"}``, ``async set_weight(w)``,
  ``async rollback()``, ``async report() -> dict``
- ``budget[name]``: ``async status() -> list[dict]`` (one entry per key)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from yarl import URL

from proxy.errors import ProxyError
from proxy.request import SERVER_NAME

if TYPE_CHECKING:
    from proxy.server import ProxyServer

SERVER_KEY = web.AppKey("server", object)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _error(status: int, type_: str, message: str, **extra: Any) -> web.Response:
    return _json({"error": {"type": type_, "message": message, **extra}}, status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS_PAGE_PATH = "/admin/"
STATUS_PAGE_FILE = Path(__file__).with_name("static") / "status.html"
#: routes anyone who reaches the admin listener may read (probes, scrapers, the static page)
OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", STATUS_PAGE_PATH})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _route_of(request: web.Request) -> str | None:
    """The canonical path of the route the router resolved (None: no route matched)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def _is_local_host(host: str) -> bool:
    """``Host`` is an IP address or ``localhost`` (with or without a port)."""
    name = URL(f"http://{host}").host if host else None
    if not name:
        return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _cross_site(request: web.Request) -> bool:
    """A browser sent this on behalf of another page (CSRF): ``Sec-Fetch-Site`` says so, or
    ``Origin`` names another host than the one the request was sent to."""
    if request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    try:
        return origin == "null" or URL(origin).raw_authority.lower() != request.host.lower()
    except ValueError:
        return True


def _status_page_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """The status page, read once; its CSP allows only its own inline script and style
    (by hash) and fetches to this origin: no external asset can load."""
    html = STATUS_PAGE_FILE.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                        for m in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))

    headers = {
        "content-security-policy": f"default-src 'none'; script-src {hashes('script')}; "
        f"style-src {hashes('style')}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "cache-control": "no-store", "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer", "x-frame-options": "DENY",
    }
    body = html.encode()

    async def status_page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers=headers)

    return status_page


def admin_app(server: ProxyServer) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = server.loaded.config.server.admin_token
        if _route_of(request) not in OPEN_ROUTES:
            if token:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return _error(401, "unauthorized", "admin token required")
            elif request.method not in _SAFE_METHODS and not _is_local_host(request.host):
                return _error(403, "forbidden", "without server.admin_token, admin actions "
                              "are accepted only for a Host that is an IP address or localhost")
        if request.method not in _SAFE_METHODS and _cross_site(request):
            return _error(403, "forbidden", "admin actions are not accepted from a web page")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = _error(exc.status, "method_not_allowed" if exc.status == 405 else "not_found"
                          if exc.status == 404 else "bad_request", exc.reason)
            if "Allow" in exc.headers:  # a 405 says which methods would do
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        except ProxyError as exc:
            return _error(exc.status, exc.type, exc.message)

    app = web.Application(middlewares=[guard], client_max_size=1024**2)
    app.on_response_prepare.append(_server_header)
    app[SERVER_KEY] = server
    h = _Handlers(server)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get(STATUS_PAGE_PATH, _status_page_handler())
    app.router.add_get("/admin/status", h.status)
    app.router.add_post("/admin/reload", h.reload)
    app.router.add_post("/admin/canary/{route}", h.canary_weight)
    app.router.add_post("/admin/canary/{route}/rollback", h.canary_rollback)
    app.router.add_get("/admin/canary/{route}/report", h.canary_report)
    app.router.add_post("/admin/circuit/{provider}/reset", h.circuit_reset)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["server"] = SERVER_NAME  # not aiohttp's version banner


class _Handlers:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, blind = self.server.ready()
        return _json({"ready": ready, "blind": blind}, 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server.deps.metrics.render(),
                            headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})

    async def status(self, request: web.Request) -> web.Response:
        rt = self.server.runtime
        loaded = rt.loaded
        canaries = rt.registry.get("canary", {})
        circuits = rt.registry.get("circuit", {})
        routes = []
        for route in rt.routes:
            entry = {"name": route.name, **route.stats.snapshot()}
            canary = canaries.get(route.name)
            entry["canary"] = canary.status() if canary is not None else {"weight": 0,
                                                                          "state": "off"}
            routes.append(entry)
        providers = [
            {"name": name, "circuit": circuits[name].state_name() if name in circuits
             else "closed"} for name in rt.providers
        ]
        budgets: list[dict[str, Any]] = []
        for budget in rt.registry.get("budget", {}).values():
            budgets.extend(await budget.status())
        return _json({
            "config": {"path": loaded.path, "sha256": loaded.sha256,
                       "loaded_at": datetime.fromtimestamp(loaded.loaded_at, UTC).isoformat()},
            "routes": routes, "providers": providers, "budgets": budgets,
            "process": self._process(),
        })

    def _process(self) -> dict[str, Any]:
        """Cheap liveness figures for soak tests and leak hunts (flat under steady load)."""
        server = self.server
        lowlevel = server.lowlevel
        return {
            "pid": os.getpid(),
            "asyncio_tasks": len(asyncio.all_tasks()),
            "client_connections": len(lowlevel.connections) if lowlevel is not None else 0,
            "in_flight": server.dataplane.in_flight if server.dataplane is not None else 0,
            "draining": server.draining,
        }

    async def reload(self, request: web.Request) -> web.Response:
        errors = await self.server.reload()
        if errors:
            return _error(400, "invalid_config", "the config file is invalid; nothing changed",
                          errors=errors)
        return _json({"reloaded": True, "sha256": self.server.loaded.sha256})

    def _canary(self, request: web.Request) -> Any:
        route = request.match_info["route"]
        canary = self.server.runtime.registry.get("canary", {}).get(route)
        if canary is None:
            raise web.HTTPNotFound(reason=f"route '{route}' has no canary")
        return canary

    async def canary_weight(self, request: web.Request) -> web.Response:
        canary = self._canary(request)
        try:
            data = orjson.loads(await request.read())
            weight = float(data["weight"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return _error(400, "bad_request", 'expected {"weight": <0..100>}')
        if not 0 <= weight <= 100:
            return _error(400, "bad_request", "weight must be in [0, 100]")
        await canary.set_weight(weight)
        return _json(canary.status())

    async def canary_rollback(self, request: web.Request) -> web.Response:
        canary = self._canary(request)
        await canary.rollback()
        return _json(canary.status())

    async def canary_report(self, request: web.Request) -> web.Response:
        route = request.match_info["route"]
        canary = self.server.runtime.registry.get("canary", {}).get(route)
        if canary is None:
            if not any(r.name == route for r in self.server.runtime.routes):
                raise web.HTTPNotFound(reason=f"no route '{route}'")
            return _json({"route": route, "weight": 0, "state": "off", "arms": {},
                          "verdict": "not_enough_data"})
        return _json(await canary.report())

    async def circuit_reset(self, request: web.Request) -> web.Response:
        name = request.match_info["provider"]
        rt = self.server.runtime
        if name not in rt.providers:
            raise web.HTTPNotFound(reason=f"no provider '{name}'")
        breaker = rt.registry.get("circuit", {}).get(name)
        if breaker is not None:
            breaker.reset()
        return _json({"provider": name, "circuit": "closed"})
