"""The admin plane (``server.admin_listen``): health, metrics, status and operator actions.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers); everything under
``/admin/`` needs ``Authorization: Bearer <admin_token>`` when a token is configured.
Mutations are POST only (a GET answers 405).

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

import base64
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.errors import ProxyError

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
        if token and request.path.startswith("/admin") and request.path != STATUS_PAGE_PATH:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "unauthorized", "admin token required")
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
        })

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
