"""A warm process that forks task workers, so a task starts in milliseconds.

Starting ``python -m site_agent.worker`` afresh costs a new interpreter and its imports
(hundreds of milliseconds, every task of every round). Instead the agent keeps one
launcher process that has imported the worker already; for each task it forks a child
that runs :func:`site_agent.worker.task_runner.main`. The launcher is single-threaded,
so forking it is safe, unlike forking the agent with its gRPC threads.

The agent talks to it over a Unix socket pair (``SOCK_SEQPACKET``: one JSON message per
packet, file descriptors passed alongside):

- agent -> launcher ``{"op": "start", "task_dir", "cwd", "env"}`` with the worker's log
  file and progress pipe; the launcher answers ``{"op": "started", "pid"}`` or
  ``{"op": "error", "error"}``;
- launcher -> agent ``{"op": "exited", "pid", "returncode"}`` when a worker ends. The
  worker stays a zombie, its process id reserved, until the agent says
  ``{"op": "reap", "pid"}``: the agent may still signal its process group until then.

Each worker is a session leader (its process id is its group's id). If the agent dies,
the launcher ends every worker's group and exits; a worker whose launcher died ends
itself (``--parent-pid``).
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_MAX_MESSAGE = 1 << 20
_ENDED = "the worker launcher ended"


class LauncherError(RuntimeError):
    """The launcher could not start a worker."""


class WorkerLauncher:
    """The agent's side: starts the launcher process on first use and again if it dies. Thread-safe."""

    def __init__(self, env: dict[str, str], cwd: Path, preload: tuple[str, ...] = (), python: str | Path | None = None):
        self._env = env
        self._python = str(python or sys.executable)  # site.yaml python: a prepared environment for the apps
        self._cwd = cwd
        self._preload = preload
        self._lock = threading.Lock()  # one request at a time, so replies match requests
        self._exits = threading.Condition()
        self._returncodes: dict[int, int] = {}
        self._running: set[int] = set()
        self._process: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._replies: list[dict] = []
        self._closed = False

    def start_worker(self, task_dir: Path, cwd: Path, env: dict[str, str], log_fd: int, progress_fd: int) -> int:
        """Fork a worker for ``task_dir``; returns its process id."""
        request = json.dumps({"op": "start", "task_dir": str(task_dir), "cwd": str(cwd), "env": env}).encode()
        with self._lock:
            for attempt in (1, 2):  # a launcher that died since the last task is started again
                if self._closed:
                    raise LauncherError("the agent is shutting down")
                sock = self._connection()
                with self._exits:
                    self._replies.clear()
                try:
                    socket.send_fds(sock, [request], [log_fd, progress_fd])
                    reply = self._next_reply()
                except OSError:
                    reply = {"op": "error", "error": _ENDED}
                if reply["op"] == "started":
                    return int(reply["pid"])
                if reply["error"] != _ENDED or attempt == 2:
                    raise LauncherError(reply["error"])
                self._discard()
        raise AssertionError("unreachable")

    def has_exited(self, pid: int) -> bool:
        with self._exits:
            return pid in self._returncodes

    def wait(self, pid: int) -> int:
        """The worker's return code (negative: the signal that killed it), once it has ended."""
        with self._exits:
            while pid not in self._returncodes:
                self._exits.wait()
            return self._returncodes[pid]

    def reap(self, pid: int) -> None:
        """Let the launcher reap an ended worker: its process id may be reused from now on."""
        with self._exits:
            self._returncodes.pop(pid, None)
            self._running.discard(pid)
            sock = self._sock
        if sock is not None:
            try:
                sock.send(json.dumps({"op": "reap", "pid": pid}).encode())
            except OSError:
                pass  # the launcher is gone, and with it the zombie

    def close(self) -> None:
        """Stop the launcher (after the agent has ended its workers)."""
        with self._lock:
            self._closed = True
            sock, process = self._sock, self._process
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)  # the launcher sees the end and exits
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # ---- the launcher process -------------------------------------------------

    def _connection(self) -> socket.socket:
        if self._sock is not None and self._process is not None and self._process.poll() is None:
            return self._sock
        self._discard()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [self._python, "-m", "site_agent.runtime.launcher", str(theirs.fileno()), *self._preload],
                cwd=self._cwd, env=self._env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
            )
        except OSError as exc:
            ours.close()
            raise LauncherError(f"cannot start the worker launcher: {exc}") from None
        finally:
            theirs.close()
        self._sock = ours
        threading.Thread(target=self._listen, args=(ours,), name="worker-launcher", daemon=True).start()
        log.info("worker launcher running in process %d", self._process.pid)
        return ours

    def _discard(self) -> None:
        """Forget a launcher that ended (or misbehaves): the next task starts a new one."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._process = None

    def _next_reply(self) -> dict:
        with self._exits:
            while not self._replies:
                self._exits.wait()
            return self._replies.pop(0)

    def _listen(self, sock: socket.socket) -> None:
        """Replies and exits from the launcher; when it ends, its workers are gone too."""
        while True:
            try:
                data = sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            with self._exits:
                if not data:
                    for pid in self._running:  # it killed them (or they ended themselves) as it died
                        self._returncodes.setdefault(pid, -signal.SIGKILL)
                    self._running.clear()
                    if sock is self._sock:  # not a launcher replaced already
                        self._replies.append({"op": "error", "error": _ENDED})
                    self._exits.notify_all()
                    return
                message = json.loads(data)
                if message["op"] == "exited":
                    self._returncodes[message["pid"]] = message["returncode"]
                else:
                    if message["op"] == "started":
                        self._running.add(message["pid"])
                    self._replies.append(message)
                self._exits.notify_all()


def _preload(modules: list[str]) -> None:
    """Import what every task would otherwise import again (the worker; PyTorch by default)."""
    from ..worker import task_runner  # noqa: F401

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a module that cannot load is the task's problem, later
            print(f"worker launcher: not preloading {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _serve(sock: socket.socket) -> None:
    """The launcher's loop: fork workers on request, report their exits, reap them when told."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the agent, which stops the workers itself
    children: set[int] = set()
    reported: set[int] = set()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select()
    try:
        while True:
            ready, _, _ = select.select([sock, wake_read], [], [], 1.0)
            if wake_read in ready:
                os.read(wake_read, 4096)
            for pid in sorted(children - reported):
                returncode = _exit_status(pid)
                if returncode is not None:
                    reported.add(pid)
                    sock.send(json.dumps({"op": "exited", "pid": pid, "returncode": returncode}).encode())
            if sock not in ready:
                continue
            data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 2)
            if not data:
                return  # the agent is gone or closed us
            message = json.loads(data)
            if message["op"] == "reap":
                pid = message["pid"]
                if pid in reported:
                    os.waitpid(pid, 0)
                    children.discard(pid)
                    reported.discard(pid)
            elif message["op"] == "start":
                try:
                    pid = _fork_worker(message, fds, sock)
                except OSError as exc:
                    sock.send(json.dumps({"op": "error", "error": f"cannot start the worker process: {exc}"}).encode())
                else:
                    children.add(pid)
                    sock.send(json.dumps({"op": "started", "pid": pid}).encode())
                finally:
                    for fd in fds:
                        os.close(fd)
    finally:
        for pid in children:  # the agent died or stopped: no worker outlives it
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _fork_worker(message: dict, fds: list[int], sock: socket.socket) -> int:
    log_fd, progress_fd = fds
    launcher_pid = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # The child: become the worker. Nothing here may return into the launcher's loop.
    code = 1
    try:
        os.setsid()
        sock.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.chdir(message["cwd"])
        os.environ.clear()
        os.environ.update(message["env"])
        torch = sys.modules.get("torch")
        if torch is not None:  # preloaded: its thread pool was sized by the launcher's environment
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        from ..worker import task_runner

        code = task_runner.main([message["task_dir"], "--progress-fd", str(progress_fd), "--parent-pid", str(launcher_pid)])
    except BaseException:  # noqa: BLE001 - report anything, then leave without the launcher's clean-up
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _exit_status(pid: int) -> int | None:
    """A child's return code once it has ended (negative: killed by that signal), leaving it unreaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -signal.SIGKILL
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def main(argv: list[str] | None = None) -> None:
    fd, *modules = argv if argv is not None else sys.argv[1:]
    sock = socket.socket(fileno=int(fd))
    _preload(modules)
    # What the launcher holds now every worker shares, untouched: frozen, the garbage
    # collector of a worker never walks it. Otherwise the first full collection in a task
    # (any allocation may set it off) walked every object of PyTorch: about 100 ms, and
    # each page it touched copied into the worker.
    gc.collect()
    gc.freeze()
    _serve(sock)


if __name__ == "__main__":
    main()
