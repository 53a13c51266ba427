"""``--workers N``: N proxy processes sharing the data and admin ports (``SO_REUSEPORT``).

The parent is a small supervisor: it spawns the workers (fresh interpreters, ``spawn``
start method), forwards ``SIGHUP`` (reload) and ``SIGTERM``/``SIGINT`` (drain) to them,
restarts a worker that dies unexpectedly, and exits 0 once all have drained.

Metrics are aggregated across workers with prometheus-client's multiprocess mode: the
parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before any worker imports
prometheus-client, so whichever worker answers ``GET /metrics`` reports the sum of all.
Per-process state stays per process (circuit breakers, route stats in ``/admin/status``,
the memory state backend): with more than one worker use ``state.backend: redis`` so
budgets, quotas, cache and canary weights are shared (the supervisor warns otherwise).
``POST /admin/reload`` reaches one worker; it validates the file and asks the supervisor
to reload every worker (``RP_SUPERVISOR_PID``).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from proxy.loader import LoadedConfig

SUPERVISOR_ENV = "RP_SUPERVISOR_PID"
_RESTART_BACKOFF_S = 1.0


def _worker_main(path: str, listen: str | None, admin_listen: str | None, level: str) -> None:
    """Entry point of one worker process."""
    import asyncio

    from proxy import accesslog
    from proxy.cli import _install_uvloop, serve
    from proxy.loader import load_config

    accesslog.configure(level)
    _install_uvloop()
    loaded = load_config(path)
    raise SystemExit(asyncio.run(serve(loaded, listen, admin_listen, reuse_port=True)))


class Supervisor:
    def __init__(self, loaded: LoadedConfig, workers: int, listen: str | None,
                 admin_listen: str | None, level: str) -> None:
        self.loaded = loaded
        self.count = workers
        self.args = (loaded.path, listen, admin_listen, level)
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.stopping = False
        self.reload_requested = False

    def _spawn(self) -> BaseProcess:
        proc = self.ctx.Process(target=_worker_main, args=self.args, daemon=False)
        proc.start()
        return proc

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="rp-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        if self.loaded.config.state.backend == "memory":
            print("warning: --workers > 1 with state.backend: memory — budgets, quotas, cache "
                  "and canary weights are per worker; use state.backend: redis to share them",
                  file=sys.stderr)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.procs = [self._spawn() for _ in range(self.count)]
            print(f"resilience-proxy supervisor {os.getpid()}: {self.count} workers",
                  file=sys.stderr, flush=True)
            self._watch()
            return self._drain()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _watch(self) -> None:
        from prometheus_client import multiprocess

        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                self._signal_all(signal.SIGHUP)
            for i, proc in enumerate(self.procs):
                if not proc.is_alive() and not self.stopping:
                    assert proc.pid is not None
                    multiprocess.mark_process_dead(proc.pid)
                    print(f"worker {proc.pid} exited ({proc.exitcode}); restarting",
                          file=sys.stderr, flush=True)
                    time.sleep(_RESTART_BACKOFF_S)
                    self.procs[i] = self._spawn()
            time.sleep(0.1)

    def _signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    def _drain(self) -> int:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.loaded.config.server.drain_timeout + 5.0
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        failed = 0
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
                failed += 1
        return 0 if failed == 0 else 1


def run_workers(loaded: LoadedConfig, workers: int, listen: str | None,
                admin_listen: str | None, level: str = "info") -> int:
    return Supervisor(loaded, workers, listen, admin_listen, level).run()


def request_fleet_reload() -> bool:
    """In a worker: ask the supervisor to reload every worker. False when not supervised."""
    pid = os.environ.get(SUPERVISOR_ENV)
    if not pid or os.getppid() != int(pid):
        return False
    os.kill(int(pid), signal.SIGHUP)
    return True
