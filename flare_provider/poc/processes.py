"""Child processes of a local deployment, each with its own log file, and bounded waits.

A :class:`Service` is a long-running process in a session (process group) of its own, so
a terminal's Ctrl-C does not reach it and stopping it reaches what it started. Stopping
is SIGTERM to the group, a grace period, then SIGKILL to whatever is left of the group
and of the process tree (children that made groups of their own included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")

START_TIMEOUT = 120.0  # seconds for a service to become ready
SHUTDOWN_GRACE = 10.0  # seconds a service has for a clean exit before it is killed
REAP_TIMEOUT = 20.0  # seconds to wait for a killed process to be gone


class ProcessError(RuntimeError):
    """A child process failed, exited, or did not reach a state in time; the message says where its log is."""


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for an error message."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(what: str, probe: Callable[[], T], timeout: float, interval: float = 0.2,
             details: Callable[[], str] | None = None) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout`` s.

    ``probe`` may raise to give up early (a process it depends on has exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ProcessError(f"{what}: not within {timeout:.0f} s" + (f"\n{details()}" if details else ""))
        time.sleep(interval)


def run_logged(argv: Sequence[str], log_path: Path, *, env: dict[str, str], timeout: float,
               cwd: str | Path | None = None) -> None:
    """Run a command to completion with its output appended to ``log_path``; raise unless it exits 0."""
    what = " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv[:4]))
    with open(log_path, "ab") as log:
        try:
            code = subprocess.run(
                list(argv), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=timeout, start_new_session=True, cwd=cwd,
            ).returncode
        except subprocess.TimeoutExpired:
            raise ProcessError(f"{what} did not finish in {timeout:.0f} s; see {log_path}") from None
    if code != 0:
        raise ProcessError(f"{what} failed (exit {code}); see {log_path}:\n{tail(log_path)}")


class Service:
    """A long-running child process with a log file ``<log_dir>/<name>.log``.

    ``ready(service)`` says when it is ready to be used. ``start()`` may be called again
    after ``kill()`` or ``stop()``: the log is appended to.
    """

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path,
                 ready: Callable[["Service"], bool] | None = None, cwd: str | Path | None = None):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.log_path = Path(log_dir) / f"{name}.log"
        self.ready = ready
        self.proc: subprocess.Popen | None = None
        self._log_start = 0

    def start(self) -> "Service":
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.cwd)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def check(self) -> None:
        """Raise if the process has exited."""
        if not self.alive:
            code = self.proc.returncode if self.proc else None
            raise ProcessError(f"{self.name} exited with {code}; see {self.log_path}:\n{tail(self.log_path, 25)}")

    def is_ready(self) -> bool:
        self.check()
        return self.ready is None or bool(self.ready(self))

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        wait_for(f"{self.name} ready", self.is_ready, timeout, interval=0.5, details=lambda: tail(self.log_path))

    def processes(self) -> list[psutil.Process]:
        """The main process and all its descendants, whatever group they are in."""
        if not self.alive:
            return []
        try:
            main = psutil.Process(self.proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def runs(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to this service."""
        return any(p.pid == pid for p in self.processes())

    def kill(self) -> None:
        """SIGKILL the whole tree at once, as when the machine under it dies."""
        _signal_all(self.processes(), signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(REAP_TIMEOUT)

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        stop_all([self], grace)

    def log_text(self) -> str:
        """What the process wrote since it was last started."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")


def stop_all(services: Sequence[Service], grace: float = SHUTDOWN_GRACE) -> None:
    """SIGTERM every service's group at once (a clean shutdown), then SIGKILL what is left of them."""
    trees = {service: service.processes() for service in services}  # before children are re-parented
    running = [service for service, tree in trees.items() if tree]
    for service in running:
        _signal_group(service.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs([p for tree in trees.values() for p in tree], timeout=grace)
    _signal_all(alive, signal.SIGKILL)
    for service in running:
        _signal_group(service.pid, signal.SIGKILL)  # stragglers of a group whose leader is gone
    for service in services:
        if service.proc is not None:
            service.proc.wait(REAP_TIMEOUT)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    psutil.wait_procs(procs, timeout=REAP_TIMEOUT)
