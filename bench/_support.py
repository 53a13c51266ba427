"""What the bench scripts share: real processes on 127.0.0.1 ephemeral ports, stopped by PID.

- :func:`free_port`, :func:`wait_port` (something accepts connections), :func:`wait_http`
  (a URL answers 200);
- :class:`Procs`, a context manager that owns every process a script starts and a scratch
  directory: :meth:`Procs.start` (any command, output discarded or to a log file),
  :meth:`Procs.redis` (a private ``redis-server``, never the machine's 6379, no persistence),
  :meth:`Procs.mock` (``python -m proxy mock``), :meth:`Procs.proxy` (``python -m proxy run``
  on a config text, ready once its ``/readyz`` answers 200). On exit it sends SIGTERM to each
  process still running, waits, kills what is left, and removes the directory.

Processes get this environment less every ``RP_*`` variable (a caller's ``RP_CONFIG`` or
``RP_LOG_LEVEL`` must not change a measurement), with ``PYTHONUNBUFFERED=1`` so their logs
can be read while they run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HOST = "127.0.0.1"
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0

Proc = subprocess.Popen[bytes]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once something accepts connections on ``port``; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def wait_http(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once ``GET url`` answers 200; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.05)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Redis:
    """A private redis-server; :meth:`kill` and :meth:`start` again to rehearse an outage."""

    procs: Procs
    port: int
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed")
        self.proc = self.procs.start(
            [exe, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.procs.dir), "--protected-mode", "no"])
        wait_port(self.port)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@dataclass(frozen=True)
class Mock:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass(frozen=True)
class Proxy:
    proc: Proc
    port: int
    admin_port: int
    log: Path | None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://{HOST}:{self.admin_port}"


class Procs:
    """Every process a bench script starts, and a scratch directory; see the module docstring."""

    def __init__(self, prefix: str = "rp-bench-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self, argv: list[str], log: Path | None = None) -> Proc:
        """Start ``argv`` in the repository's root; its output to ``log`` or discarded."""
        if log is None:
            proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        else:
            with log.open("wb") as out:
                proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out,
                                        stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def redis(self) -> Redis:
        """A private redis-server, started and accepting connections."""
        redis = Redis(self, free_port())
        redis.start()
        return redis

    def mock(self, log: Path | None = None, wait: bool = True) -> Mock:
        """``python -m proxy mock`` on a free port (ready once ``/mock/stats`` answers)."""
        port = free_port()
        mock = Mock(self.start([PY, "-m", "proxy", "mock", "--listen", f"{HOST}:{port}"], log),
                    port)
        if wait:
            wait_http(mock.url + "/mock/stats")
        return mock

    def proxy(self, config: str, name: str = "proxy", log: Path | None = None,
              log_level: str | None = None, wait: bool = True) -> Proxy:
        """``python -m proxy run`` on ``config`` (YAML text, written to ``<dir>/<name>.yaml``),
        data and admin planes on free ports; ready once ``/readyz`` answers 200 unless
        ``wait`` is false (start several, then :meth:`wait_ready` them)."""
        path = self.dir / f"{name}.yaml"
        path.write_text(config)
        port, admin_port = free_port(), free_port()
        argv = [PY, "-m", "proxy", "run", "-c", str(path), "--listen", f"{HOST}:{port}",
                "--admin-listen", f"{HOST}:{admin_port}"]
        if log_level is not None:
            argv += ["--log-level", log_level]
        proxy = Proxy(self.start(argv, log), port, admin_port, log)
        if wait:
            self.wait_ready(proxy)
        return proxy

    @staticmethod
    def wait_ready(*proxies: Proxy) -> None:
        for proxy in proxies:
            wait_http(proxy.admin + "/readyz")

    def stop(self, proc: Proc) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``STOP_TIMEOUT_S``."""
        self._stop([proc])

    def close(self) -> None:
        """Stop every process (all signalled first, newest first), remove the directory."""
        self._stop(self.procs[::-1])
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _stop(procs: list[Proc]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
