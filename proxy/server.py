"""The proxy process: data and admin listeners, reload, drain.

- Reload (``SIGHUP`` or ``POST /admin/reload``) is atomic: the file is validated and
  compiled into a new :class:`~proxy.runtime.Runtime` first; an invalid file changes
  nothing. Requests in flight finish on the runtime they started with, which is closed when
  its last request ends.
- Shutdown (``SIGTERM``): stop accepting, let in-flight requests finish up to
  ``drain_timeout``, flush what policies registered as ``flush`` hooks, close, exit 0.
  The whole of it is bounded: in-flight requests still running at ``drain_timeout`` are
  cancelled (within :data:`~proxy.protocol.CANCEL_GRACE_S`), and the flush and the closes
  share :data:`FINISH_S` more. A watchdog armed by the signal ends the process
  (exit 1, ``shutdown_forced``) if anything still holds it :data:`WATCHDOG_SLACK_S` after
  that (e.g. a stuck thread of the event loop's executor, which ``asyncio.run`` joins).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
from typing import Any

from aiohttp import web

from proxy import accesslog
from proxy.clock import Clock, SystemClock
from proxy.context import Deps, Keeper
from proxy.dataplane import DataPlane
from proxy.loader import ConfigError, LoadedConfig, load_config
from proxy.metrics import FLUSH_S, Metrics, status_class
from proxy.mock import MockProvider, start_mock
from proxy.protocol import CANCEL_GRACE_S, DataServer
from proxy.runtime import Runtime, build_runtime
from proxy.state.backend import StateBackend

#: seconds after the drain for the flush hooks and the closes, together
FINISH_S = 3.0
#: the watchdog's margin past drain + finish before it ends a process that did not exit
WATCHDOG_SLACK_S = 2.0
#: the admin plane's own drain (its requests are short: status, metrics, reload)
_ADMIN_DRAIN_S = 0.25


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class ProxyServer:
    """One proxy process (or worker): owns its listeners, runtime and dependencies."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        log: Any = None,
        rand: random.Random | None = None,
    ) -> None:
        self.loaded = loaded
        clock = clock or SystemClock()
        metrics = metrics or Metrics()
        log = log or accesslog.get_logger()
        state = StateBackend(loaded.config.state, metrics, log, clock)
        self.deps = Deps(clock=clock, metrics=metrics, log=log, state=state,
                         rand=rand or random.Random())
        self.keeper = Keeper()
        self.runtime: Runtime = None  # type: ignore[assignment]  # set by start()
        self.mock: MockProvider | None = None
        self._mock_runner: web.AppRunner | None = None
        self._mock_url: str | None = None
        self._admin_runner: web.AppRunner | None = None
        self.data_url = ""
        self.admin_url = ""
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: retired runtimes being closed (awaited on stop, never cancelled half-way)
        self._closing: set[asyncio.Task[None]] = set()
        #: the live runtime's background loops (registry kind ``task``)
        self._runtime_tasks: list[asyncio.Task[Any]] = []
        self.dataplane: DataPlane | None = None
        self.lowlevel: DataServer | None = None
        self.draining = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self, *, listen: str | None = None, admin_listen: str | None = None,
                    reuse_port: bool = False) -> None:
        cfg = self.loaded.config
        if any(p.url.startswith("mock://") for p in cfg.providers.values()):
            self.mock, self._mock_runner, self._mock_url = await start_mock()
        self.runtime = await build_runtime(self.loaded, self.deps, self.keeper, self._mock_url)
        self.deps.metrics.config_reloads.labels("ok").inc()
        self._publish_config_metrics()
        self._start_tasks()
        if self.deps.metrics.multiprocess:  # another worker may answer a scrape
            self.spawn(self._flush_metrics())
        self.dataplane = DataPlane(self)
        s = cfg.server
        lowlevel = self.lowlevel = DataServer(
            self.dataplane, header_read_timeout=s.header_read_timeout,
            keepalive_timeout=s.keepalive_timeout, max_header_size=s.max_header_size,
            body_cap=self._body_cap, on_rejected=self._rejected, in_flight=self._in_flight,
            log_error=self._handler_failed,
        )
        host, port = _split(listen or s.listen)
        await lowlevel.listen(host, port, reuse_port=reuse_port)
        self.data_url = _host_url(*lowlevel.address)
        from proxy.admin import admin_app

        self._admin_runner = web.AppRunner(admin_app(self), access_log=None,
                                           shutdown_timeout=_ADMIN_DRAIN_S)
        await self._admin_runner.setup()
        host, port = _split(admin_listen or s.admin_listen)
        await web.TCPSite(self._admin_runner, host, port, reuse_port=reuse_port).start()
        self.admin_url = _url(self._admin_runner)
        self.deps.log.info("started", listen=self.data_url, admin=self.admin_url,
                           config=self.loaded.path, routes=len(cfg.routes))

    async def _flush_metrics(self) -> None:
        """With --workers: this worker's deferred metric values into the shared files."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                self.deps.metrics.flush()
        finally:  # cancelled on stop, after the drain: the last requests are counted
            self.deps.metrics.flush()

    def _body_cap(self) -> int:
        """The most of a request body a connection buffers (the live config's limit)."""
        return self.runtime.loaded.config.server.max_request_body

    def _handler_failed(self) -> None:
        self.deps.log.error("handler_failed", exc_info=True)

    def _in_flight(self) -> int:
        return self.dataplane.in_flight if self.dataplane is not None else 0

    def _rejected(self, status: int, outcome: str, reason: str, peer: str | None) -> None:
        """A request the data plane never saw (its head was malformed, or too slow): one
        access-log line and one ``rp_requests_total``, route ``_none``."""
        m = self.deps.metrics
        m.requests.labels("_none", status_class(status), outcome).inc()
        m.request_duration.labels("_none").observe(
            self.loaded.config.server.header_read_timeout if outcome == "header_timeout" else 0.0)
        self.deps.log.info(
            "request", request_id=os.urandom(12).hex(), route="_none", method=None, path=None,
            status=status, outcome=outcome, provider=None, used_model=None,
            prompt_version=None, tier=None, attempts=0, cache=None, canary=None, cost_usd=None,
            tokens=None, t_queue=0.0, t_cache=0.0, t_upstream_first_byte=None,
            t_upstream_total=0.0, t_total=0.0, error=reason, peer=peer)

    async def stop(self) -> None:
        """Drain and close, bounded: in-flight requests get up to ``drain_timeout`` to finish
        (then they are cancelled), the flush hooks and the closes :data:`FINISH_S` more."""
        if self.draining:  # stopped already (or stopping)
            return
        loop = asyncio.get_running_loop()
        self.draining = True
        self.deps.log.info("draining", in_flight=self.dataplane.in_flight if self.dataplane else 0,
                           drain_timeout_s=self.loaded.config.server.drain_timeout)
        if self.lowlevel is not None:  # stops accepting, drains, cancels the rest
            await self.lowlevel.shutdown(self.loaded.config.server.drain_timeout)
        finish_by = loop.time() + FINISH_S
        await self._bounded("flush", self._run_hooks("flush"), finish_by)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await self._bounded("tasks", asyncio.gather(*self._tasks, return_exceptions=True),
                                finish_by)
        if self._admin_runner is not None:
            await self._bounded("admin", self._admin_runner.cleanup(), finish_by)
        if self.runtime is not None:
            await self._bounded("runtime", self.runtime.close(), finish_by)
        if self._closing:
            await self._bounded("retired", asyncio.gather(*self._closing,
                                                          return_exceptions=True), finish_by)
        await self._bounded("state", self.deps.state.close(), finish_by)
        if self._mock_runner is not None:
            await self._bounded("mock", self._mock_runner.cleanup(), finish_by)
        self.deps.log.info("stopped", requests_total=self.requests_total())

    async def _bounded(self, step: str, aw: Any, by: float) -> None:
        """Await ``aw`` until loop time ``by`` (at least a moment); log a step that was cut."""
        left = max(by - asyncio.get_running_loop().time(), 0.05)
        try:
            async with asyncio.timeout(left):
                await aw
        except TimeoutError:
            self.deps.log.warning("shutdown_step_cut", step=step, after_s=round(left, 3))
        except Exception as exc:
            self.deps.log.error("shutdown_step_failed", step=step, error=type(exc).__name__)

    def requests_total(self) -> int:
        """Requests this process answered: ``rp_requests_total`` summed over its labels."""
        self.deps.metrics.flush()
        return int(sum(sample.value for metric in self.deps.metrics.requests.collect()
                       for sample in metric.samples if sample.name == "rp_requests_total"))

    def install_signal_handlers(self, stop: asyncio.Event) -> None:
        """SIGHUP reloads; SIGTERM and SIGINT drain (a second SIGINT exits at once). The
        drain signals get a plain Python handler, not the loop's: it runs between two
        bytecodes of whatever the main thread is doing, so the watchdog is armed even while
        the event loop is busy (a CPU-bound request), and the loop is told to stop as soon as
        it is free."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload()))
        armed: list[bool] = []

        def terminate(signum: int, frame: Any) -> None:
            if armed and signum == signal.SIGINT:  # a second Ctrl-C: leave now
                accesslog.flush()
                os._exit(130)
            if not armed:
                armed.append(True)
                self._arm_watchdog()
            loop.call_soon_threadsafe(stop.set)

        signal.signal(signal.SIGTERM, terminate)
        signal.signal(signal.SIGINT, terminate)

    def _arm_watchdog(self) -> None:
        """Past drain + cancel grace + finish + slack, end the process (exit 1) whatever
        still holds it; a daemon thread, so a process that exits in time never waits on it."""
        limit_s = (self.loaded.config.server.drain_timeout + 2 * CANCEL_GRACE_S + FINISH_S
                   + WATCHDOG_SLACK_S)
        log = self.deps.log

        def fire() -> None:
            try:
                log.error("shutdown_forced", after_s=limit_s)
                accesslog.flush()  # the buffered access-log lines
            finally:
                os._exit(1)

        timer = threading.Timer(limit_s, fire)
        timer.daemon = True
        timer.start()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a background task the server keeps a reference to and cancels on stop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- reload

    async def reload(self) -> list[str]:
        """Re-read the config file; returns the errors ([] when it was applied)."""
        async with self._reload_lock:
            try:
                loaded = load_config(self.loaded.path)
            except ConfigError as exc:
                return self._reload_failed(exc.errors)
            if loaded.config.state != self.loaded.config.state:
                return self._reload_failed(
                    ["state: changing the state backend needs a restart"])
            if loaded.config.server.listen != self.loaded.config.server.listen or \
                    loaded.config.server.admin_listen != self.loaded.config.server.admin_listen:
                self.deps.log.warning("reload_listen_ignored",
                                      reason="listen addresses change on restart only")
            if any(p.url.startswith("mock://") for p in loaded.config.providers.values()) \
                    and self._mock_url is None:
                self.mock, self._mock_runner, self._mock_url = await start_mock()
            try:
                runtime = await build_runtime(loaded, self.deps, self.keeper, self._mock_url)
            except Exception as exc:  # a config that validates but cannot be compiled
                return self._reload_failed([f"<runtime>: {type(exc).__name__}: {exc}"])
            old, self.runtime, self.loaded = self.runtime, runtime, loaded
            old.retired = True
            if old.active == 0:
                self.close_retired(old)
            self.deps.metrics.config_reloads.labels("ok").inc()
            self._publish_config_metrics()
            self._start_tasks()
            self.deps.log.info("config_reloaded", path=loaded.path, sha256=loaded.sha256)
            return []

    def _reload_failed(self, errors: list[str]) -> list[str]:
        self.deps.metrics.config_reloads.labels("error").inc()
        self.deps.log.error("config_reload_failed", path=self.loaded.path, errors=errors)
        return errors

    def close_retired(self, runtime: Runtime) -> None:
        """Close a replaced runtime's provider sessions (its last request has ended)."""
        task = asyncio.get_running_loop().create_task(runtime.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _publish_config_metrics(self) -> None:
        for hook in self.runtime.registry.get("on_load", {}).values():
            hook()

    def _start_tasks(self) -> None:
        """Start the live runtime's background loops (registry kind ``task``: coroutine
        functions, e.g. a canary's weight refresher); the replaced runtime's are cancelled."""
        for task in self._runtime_tasks:
            task.cancel()
        self._runtime_tasks = [self.spawn(loop()) for loop in
                               self.runtime.registry.get("task", {}).values()]

    async def _run_hooks(self, kind: str) -> None:
        if self.runtime is None:
            return
        for hook in self.runtime.registry.get(kind, {}).values():
            try:
                await hook()
            except Exception as exc:
                self.deps.log.error("hook_failed", kind=kind, error=type(exc).__name__)

    # ---------------------------------------------------------------- readiness

    def ready(self) -> tuple[bool, list[str]]:
        """Ready: a config is loaded, no fail-closed feature is blind, not draining."""
        blind = sorted(self.deps.state.blind)
        return (self.runtime is not None and not blind and not self.draining), blind


def _url(runner: web.BaseRunner) -> str:
    host, port = runner.addresses[0][:2]
    return _host_url(host, port)


def _host_url(host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
