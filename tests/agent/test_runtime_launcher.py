"""The warm worker launcher: tasks are forked from one process that has imported the worker
(and PyTorch) already, each still its own process with its own share of the cores."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from runtime_support import (
    pid_alive,
    read_events,
    submit,
    wait_finished,
    wait_pid_gone,
    wait_until,
)

from site_agent.runtime.task_manager import TaskManager


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def start_events(tasks: TaskManager) -> dict[str, dict]:
    return {e["task_id"]: e for e in read_events(tasks.settings.data_dir) if e["event"] == "start"}


def test_tasks_fork_from_one_launcher_that_preloaded_torch(make_manager, tmp_path):
    tasks = make_manager(max_concurrent_cpu_tasks=2)
    for task_id in ("first", "second"):
        assert wait_finished(tasks, submit(tasks, task_id, tmp_path)[0].task_id).status == "succeeded"
    events = start_events(tasks)
    launcher = events["first"]["ppid"]
    assert events["second"]["ppid"] == launcher != os.getpid()
    assert parent_of(launcher) == os.getpid()  # the agent's own child
    assert events["first"]["pid"] != events["second"]["pid"]
    # PyTorch was imported before the fork, and each task still gets its own share of the cores.
    assert events["first"]["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
    # What the launcher imported is frozen for the garbage collector: a worker's collections
    # never walk PyTorch's objects (hundreds of thousands of them).
    assert events["first"]["gc_frozen"] > 100_000
    tasks.close()
    assert wait_pid_gone(launcher)


def test_nothing_preloaded_when_the_site_says_so(make_manager, tmp_path):
    tasks = make_manager(preload_modules=())
    assert wait_finished(tasks, submit(tasks, "plain", tmp_path)[0].task_id).status == "succeeded"
    assert start_events(tasks)["plain"]["torch_threads"] is None


def test_a_launcher_that_died_is_replaced(make_manager, tmp_path):
    tasks = make_manager(max_concurrent_cpu_tasks=1)
    submit(tasks, "cut", tmp_path, config={"sleep": 120, "steps": 120})
    wait_until(tasks, "cut", ("running",))
    worker = tasks.worker_pid("cut")
    launcher = parent_of(worker)
    os.kill(launcher, signal.SIGKILL)
    cut = wait_finished(tasks, "cut", timeout=30)
    assert cut.status == "failed" and "SIGKILL" in cut.error
    assert wait_pid_gone(worker)  # it noticed its launcher was gone and ended its group
    assert wait_finished(tasks, submit(tasks, "after", tmp_path)[0].task_id).status == "succeeded"
    new_launcher = start_events(tasks)["after"]["ppid"]
    assert new_launcher != launcher and pid_alive(new_launcher)
