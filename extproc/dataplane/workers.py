"""Several sidecar processes on one address (``extproc serve --workers N``), and their supervisor.

One Python process handles requests on one core at a time, so a host with more cores runs more
processes. They share the listening address through ``SO_REUSEPORT`` (set in
``server.GRPC_OPTIONS``): the kernel spreads Envoy's connections over them, and each worker is a
whole sidecar of its own: its Redis connection, live routing, telemetry writer and heartbeat
(instance ``<name>-w<i>``). Assignment is a pure function of the experiment and the key, so which
worker answers does not matter.

What cannot be shared is refused or split up: a Unix socket has one owner (refused: run one
sidecar per socket, or listen on TCP), port 0 would give each worker a different port (refused),
and worker ``i`` serves ``/metrics`` on the given port plus ``i`` (Prometheus scrapes each; the
per-worker series add up, like those of separate replicas).

The parent only supervises. It restarts a worker that dies after it has served (with a growing
delay while it keeps dying young), forwards SIGTERM/SIGINT to the workers, waits for them to
drain, and exits 0. A worker that dies before it ever served is a configuration problem (port
taken, unreadable certificate): the parent then stops the others and exits 1 instead of
restarting it forever. Workers are started fresh (``spawn``, never ``fork``: gRPC does not survive
a fork) with the parent's experiment object, so a restarted worker routes exactly like the others
even if the file changed on disk meanwhile; and each asks the kernel for SIGTERM when the parent
dies, so none outlives a killed supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from extproc.config import Experiment
from extproc.dataplane.server import Sidecar, SidecarSettings, run_sidecar
from extproc.logs import LogSetup

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # the server's own drain is 2 s, then telemetry flushes for up to 2 s
MAX_RESTART_DELAY_S = 10.0
HEALTHY_RUN_S = 30.0  # a worker that served this long starts over with no delay when it dies
_PR_SET_PDEATHSIG = 1


def problem(listen: str, workers: int) -> str | None:
    """Why ``workers`` processes cannot share ``listen``; None when they can."""
    if workers <= 1:
        return None
    if listen.startswith("unix:"):
        return (
            f"--workers {workers}: a Unix socket cannot be shared by several processes; "
            "run one sidecar per socket, or listen on host:port"
        )
    if listen.rpartition(":")[2] == "0":
        return f"--workers {workers}: port 0 would give each worker a port of its own"
    return None


def worker_settings(settings: SidecarSettings, index: int, parent_pid: int) -> SidecarSettings:
    """Worker ``index``'s settings: its own instance name and its own metrics port."""
    base = settings.instance or f"{socket.gethostname()}-{parent_pid}"
    metrics = settings.metrics
    if metrics is not None:
        host, _, port = metrics.rpartition(":")
        if int(port) != 0:
            metrics = f"{host}:{int(port) + index}"
    return replace(settings, instance=f"{base}-w{index}", metrics=metrics)


def _exit_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel send SIGTERM when the supervisor dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the request above took effect
        os._exit(0)


def _worker_main(
    experiment: Experiment | None,
    settings: SidecarSettings,
    log_setup: LogSetup,
    parent_pid: int,
    ready: Connection,
) -> None:
    _exit_with_parent(parent_pid)
    log_setup.apply()

    def on_ready(_where: str) -> None:
        ready.send(True)
        ready.close()

    run_sidecar(Sidecar(experiment, settings), ready=on_ready)


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    ready: Connection | None  # None once it has reported ready (or its pipe broke)
    started: float
    served: bool = False


class Supervisor:
    """Starts the workers, restarts the ones that die, stops them all on SIGTERM/SIGINT."""

    def __init__(
        self,
        experiment: Experiment | None,
        settings: SidecarSettings,
        workers: int,
        log_setup: LogSetup,
    ) -> None:
        self.experiment = experiment
        self.settings = settings
        self.count = workers
        self.log_setup = log_setup
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.delays: dict[int, float] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False

    def _start(self, index: int) -> None:
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_main,
            args=(
                self.experiment,
                worker_settings(self.settings, index, os.getpid()),
                self.log_setup,
                os.getpid(),
                send,
            ),
            name=f"extproc-sidecar-w{index}",
        )
        proc.start()
        send.close()  # the worker holds the only write end: its death shows as end of file
        self.workers[index] = _Worker(index, proc, receive, time.monotonic())
        log.info("worker %d started (pid %s)", index, proc.pid)

    def _on_ready(self, w: _Worker) -> None:
        assert w.ready is not None
        with contextlib.suppress(EOFError):  # it died before it was ready: handled by the caller
            w.served = bool(w.ready.recv())
        w.ready.close()
        w.ready = None

    def _on_exit(self, w: _Worker) -> bool:
        """Schedule a restart; False if the worker never served (a configuration problem)."""
        w.process.join()
        del self.workers[w.index]
        if w.ready is not None:  # it may have reported ready just before it died
            self._on_ready(w)  # the pipe is at end of file now: this never blocks
        code = w.process.exitcode
        if not w.served:
            log.error("worker %d exited with %s before it served; stopping", w.index, code)
            return False
        lived = time.monotonic() - w.started
        delay = 0.0
        if lived < HEALTHY_RUN_S:
            delay = min(max(2 * self.delays.get(w.index, 0.0), 0.5), MAX_RESTART_DELAY_S)
        self.delays[w.index] = delay
        self.restart_at[w.index] = time.monotonic() + delay
        log.warning("worker %d exited with %s; restarting in %.1fs", w.index, code, delay)
        return True

    def _stop_all(self) -> None:
        for w in self.workers.values():
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self.workers.values():
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.warning("worker %d did not stop in time; killing it", w.index)
                w.process.kill()
                w.process.join()
            if w.ready is not None:
                w.ready.close()
        self.workers.clear()

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (exit 0) or a worker that cannot start (exit 1)."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            self.stopping = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        ok = True
        try:
            for i in range(self.count):
                self._start(i)
            while not self.stopping and ok:
                now = time.monotonic()
                for i, at in list(self.restart_at.items()):
                    if at <= now:
                        del self.restart_at[i]
                        self._start(i)
                timeout = max(0.0, min(self.restart_at.values()) - now) if self.restart_at else None
                watched: list[Connection | socket.socket | int] = [wake_r]
                for w in self.workers.values():
                    watched.append(w.process.sentinel)
                    if w.ready is not None:
                        watched.append(w.ready)
                got = wait(watched, timeout)
                if wake_r in got:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                for w in list(self.workers.values()):
                    if w.ready is not None and w.ready in got:
                        self._on_ready(w)
                    if w.process.sentinel in got:
                        ok = self._on_exit(w) and ok
        finally:
            self._stop_all()
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            wake_r.close()
            wake_w.close()
        log.info("all workers stopped")
        return 0 if ok else 1
