"""A task run as several ranks of PyTorch distributed: one per GPU, or several processes on CPU.

When the agent gives a task ``world_size`` > 1 (``worker.json``), the worker process it
started becomes the task's *rank supervisor*. It does no training itself:

- it forks one child per rank, each in the task's process group (so the agent's signals
  to the group reach every rank), with ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``,
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and, on a GPU task, ``CUDA_VISIBLE_DEVICES``
  naming that rank's GPU alone; each rank runs the task as the single worker would, after
  joining the process group (:func:`join_process_group`: NCCL on GPUs, gloo on CPU);
- each rank talks to it over a pipe of its own; rank 0's progress goes on to the agent,
  the other ranks' progress is dropped, and every rank's failure message is kept;
- it is the ranks' watchdog: as soon as one rank exits with an error or is killed, it
  kills the others and fails the task with a message naming that rank and why; a result
  rank 0 may already have written is then deleted, as the task did not succeed.

Rank 0 alone writes the result; the other ranks' results are discarded. If the supervisor
dies, each rank notices (its parent is gone) and ends the whole group; if the launcher
dies, the supervisor does the same.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAX_LINE = 1 << 20
_POLL_S = 0.1

# Runs the task as one rank: (progress fd, rank, world size) -> exit code.
RankRunner = Callable[[int, int, int], int]


@dataclass(frozen=True)
class RankExit:
    rank: int
    returncode: int  # negative: killed by that signal


def world_size_of(job: dict[str, Any]) -> int:
    """The ranks the agent gave this task (``worker.json``'s ``world_size``; 1 when absent)."""
    value = job.get("world_size", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"worker.json: world_size must be a whole number >= 1, got {value!r}")
    return value


def rank_environment(rank: int, world_size: int, port: int, gpus: list[int]) -> dict[str, str]:
    """The environment PyTorch distributed reads (``init_method="env://"``) for one rank."""
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),  # one machine: the local rank is the rank
        "LOCAL_WORLD_SIZE": str(world_size),
    }
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[rank])  # this rank's GPU alone, as cuda:0
    else:  # the task's share of the cores, split between its ranks
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            share = str(max(1, int(threads) // world_size))
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = share
    return env


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (rank 0 takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- inside a rank ----------------------------------------------------------------


def rank_of_environment() -> tuple[int, int]:
    """(rank, world size) of this process, from the environment the supervisor gave it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device: str) -> None:
    """Join the task's process group (before the trainer is built): NCCL on a GPU, else gloo."""
    import torch
    import torch.distributed as dist

    rank, world_size = rank_of_environment()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    # PyTorch's default timeout for collectives: a rank that dies is the watchdog's to notice, not theirs
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)


def leave_process_group() -> None:
    """Leave the process group, if this process joined one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- the supervisor -----------------------------------------------------------------


def supervise(task_dir: Path, world_size: int, gpus: list[int], channel_fd: int | None,
              parent_pid: int | None, run_rank: RankRunner) -> int:
    """Run the task as ``world_size`` ranks and wait for them; returns the worker's exit code.

    ``run_rank`` runs in each forked rank; ``channel_fd`` is the agent's progress pipe.
    """
    if gpus and len(gpus) != world_size:
        raise ValueError(f"worker.json: {world_size} ranks need one GPU each, the task has {gpus}")
    port = free_port()
    supervisor_pid = os.getpid()
    pipes: dict[int, int] = {}  # read end -> rank
    children: dict[int, int] = {}  # pid -> rank
    for rank in range(world_size):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            for fd in pipes:
                os.close(fd)
            _become_rank(rank, world_size, port, gpus, write_fd, channel_fd, supervisor_pid, run_rank)
        os.close(write_fd)
        pipes[read_fd] = rank
        children[pid] = rank
    # Threads only after the forks: a forked child of a threaded process may inherit held locks.
    if parent_pid is not None:
        threading.Thread(target=watch_parent, args=(parent_pid,), daemon=True).start()
    agent = os.fdopen(channel_fd, "w", buffering=1) if channel_fd is not None else None
    watchdog = _Watchdog(children, pipes, agent)
    failure = watchdog.run()
    if failure is None:
        _send(agent, {"event": "finished"})
        return 0
    paths_dir = Path(task_dir)
    for name in ("result.json", "result.safetensors"):  # rank 0 may have finished: not a result of a failed task
        (paths_dir / name).unlink(missing_ok=True)
    _send(agent, {"event": "failed", "error": failure})
    print(f"task failed: {failure}", file=sys.stderr, flush=True)
    return 1


class _Watchdog:
    """Follows the ranks: relays rank 0's progress, keeps failure messages, ends all ranks when one fails."""

    def __init__(self, children: dict[int, int], pipes: dict[int, int], agent):
        self.children = dict(children)
        self.world_size = len(children)
        self.pipes = dict(pipes)
        self.buffers = dict.fromkeys(pipes, b"")
        self.agent = agent
        self.errors: dict[int, str] = {}  # rank -> the message it reported

    def run(self) -> str | None:
        """Wait for every rank; None when all succeeded, else why the task failed."""
        first: RankExit | None = None
        while self.children:
            self._read(_POLL_S)
            ended = self._reap()
            failed = [e for e in ended if e.returncode != 0]
            if failed and first is None:
                # A rank killed by a signal is the cause; peers it leaves behind fail on their own afterwards.
                first = min(failed, key=lambda e: (e.returncode >= 0, e.rank))
                self._kill_others()
        self._read(0.0)
        while self.pipes:  # what the ranks wrote before they ended (grandchildren may hold a pipe open)
            if not self._read(0.0):
                break
        return None if first is None else self._describe(first)

    def _read(self, timeout: float) -> bool:
        if not self.pipes:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select(list(self.pipes), [], [], timeout)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                os.close(fd)
                del self.pipes[fd]
                continue
            *lines, self.buffers[fd] = (self.buffers[fd] + chunk).split(b"\n")
            if len(self.buffers[fd]) > _MAX_LINE:
                self.buffers[fd] = b""
            for line in lines:
                self._on_line(self.pipes[fd], line)
        return bool(ready)

    def _on_line(self, rank: int, line: bytes) -> None:
        try:
            message = json.loads(line)
            event = message["event"]
        except (ValueError, KeyError, TypeError):
            return
        if event == "failed":
            self.errors.setdefault(rank, str(message.get("error")))
        elif event == "finished":
            pass  # the supervisor says so once every rank has
        elif rank == 0:
            _send(self.agent, message)

    def _reap(self) -> list[RankExit]:
        ended = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            rank = self.children.pop(pid, None)
            if rank is not None:
                ended.append(RankExit(rank, os.waitstatus_to_exitcode(status)))
        return ended

    def _kill_others(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _describe(self, ended: RankExit) -> str:
        self._read(0.0)  # a message the rank wrote just before it ended
        who = f"rank {ended.rank} of {self.world_size}"
        if ended.rank in self.errors:
            why = f"{who} failed: {self.errors[ended.rank]}"
        elif ended.returncode < 0:
            name = signal.Signals(-ended.returncode).name
            hint = " (out of memory?)" if -ended.returncode == signal.SIGKILL else ""
            why = f"{who} was killed by {name}{hint}"
        else:
            why = f"{who} exited with status {ended.returncode} (see worker.log)"
        return f"{why}; the task's other ranks were stopped" if self.world_size > 1 else why


def _send(agent, message: dict) -> None:
    if agent is None:
        return
    try:
        agent.write(json.dumps(message, allow_nan=True) + "\n")
    except BrokenPipeError:  # the agent is gone; nobody will collect this task
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _become_rank(rank: int, world_size: int, port: int, gpus: list[int], write_fd: int, channel_fd: int | None,
                 supervisor_pid: int, run_rank: RankRunner) -> None:
    """The forked child: become rank ``rank`` and run the task. Never returns."""
    code = 1
    try:
        if channel_fd is not None:
            os.close(channel_fd)  # only the supervisor speaks to the agent
        os.environ.update(rank_environment(rank, world_size, port, gpus))
        threads = os.environ.get("OMP_NUM_THREADS")
        torch = sys.modules.get("torch")
        if torch is not None and threads and threads.isdigit():  # preloaded: sized for the whole task
            torch.set_num_threads(int(threads))
        threading.Thread(target=watch_parent, args=(supervisor_pid,), daemon=True).start()
        code = run_rank(write_fd, rank, world_size)
    except BaseException:  # noqa: BLE001 - report anything, then leave without the supervisor's clean-up
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def watch_parent(parent_pid: int) -> None:
    """End this process group once ``parent_pid`` (the process that started this one) has died."""
    while True:
        if os.getppid() != parent_pid:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        time.sleep(0.5)
