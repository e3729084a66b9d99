"""Two federations on one site take turns for its scarce slots instead of queueing one behind the other."""

from __future__ import annotations

import threading

from flare_provider.federation.records import RunSpec
from site_agent.runtime.scheduler import Scheduler, run_of
from site_agent.runtime.task_records import TaskRecords, TaskSpec


def run_spec(federation: str, run_id: str) -> RunSpec:
    return RunSpec(federation=federation, run_id=run_id, app_name="app", sites=("site-1",), num_rounds=3, min_clients=1)


class Site:
    """A scheduler over real task records (folders on disk), recording which task started when."""

    def __init__(self, tmp_path, gpus=(), cpu_slots=2):
        self.records = TaskRecords(tmp_path, threading.Condition(), "site-1")
        self.scheduler = Scheduler(tuple(gpus), cpu_slots, "site-1")
        self.started: list[str] = []
        self.running: dict[str, object] = {}
        self.tmp_path = tmp_path

    def submit(self, task_id: str, num_gpus: int, config: dict | None = None) -> None:
        weights = self.tmp_path / f"{task_id}.in"
        weights.write_bytes(b"w")
        spec = TaskSpec(task_id=task_id, app_name="app", app_version=None, round=1, config=config or {})
        self.scheduler.add(self.records.create(spec, "app", "v1", num_gpus, weights))

    def schedule(self) -> None:
        def start(task, gpus):
            task.state.gpus = gpus
            self.started.append(task.spec.task_id)
            self.running[task.spec.task_id] = task

        self.scheduler.start_ready(start)

    def finish(self, task_id: str) -> None:
        self.scheduler.release(self.running.pop(task_id))
        self.schedule()


def test_runs_take_turns_for_one_gpu(tmp_path):
    site = Site(tmp_path, gpus=[0])
    a, b = run_spec("fed-a", "run-1"), run_spec("fed-b", "run-1")
    for number in (1, 2, 3):  # run A's tasks all arrive before run B's
        site.submit(a.task_id(number, "site-1"), 1)
    for number in (1, 2, 3):
        site.submit(b.task_id(number, "site-1"), 1)
    site.schedule()
    while site.running:
        site.finish(next(iter(site.running)))
    assert site.started == [a.task_id(1, "site-1"), b.task_id(1, "site-1"), a.task_id(2, "site-1"),
                            b.task_id(2, "site-1"), a.task_id(3, "site-1"), b.task_id(3, "site-1")]


def test_runs_take_turns_for_cpu_slots_and_a_newcomer_goes_first(tmp_path):
    site = Site(tmp_path, cpu_slots=1)
    for i in range(3):
        site.submit(f"a{i}", 0, {"run_key": "run-a"})
    site.schedule()
    assert site.started == ["a0"]
    for i in range(2):
        site.submit(f"b{i}", 0, {"run_key": "run-b"})
    site.submit("c0", 0, {"run_key": "run-c"})
    order = []
    while site.running:
        order.append(next(iter(site.running)))
        site.finish(order[-1])
    # run-a was served last: run-b and run-c (never served) first, in arrival order; then turns.
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_a_task_waiting_for_two_gpus_is_not_starved_by_another_runs_one_gpu_tasks(tmp_path):
    site = Site(tmp_path, gpus=[0, 1])
    site.submit("b-small-1", 1, {"run_key": "b"})
    site.schedule()
    site.submit("a-big", 2, {"run_key": "a"})
    site.submit("b-small-2", 1, {"run_key": "b"})
    site.schedule()
    assert site.started == ["b-small-1"]  # GPU 1 stays free for a-big, not given to b-small-2
    site.finish("b-small-1")
    assert site.started == ["b-small-1", "a-big"] and site.running["a-big"].state.gpus == [0, 1]
    site.finish("a-big")
    assert site.started[-1] == "b-small-2"


def test_a_tasks_run_comes_from_its_config_or_its_task_id():
    spec = run_spec("fed", "manual__1")
    derived = TaskSpec(task_id=spec.task_id(4, "site-1", "evaluate"), app_name="x", app_version=None, round=4)
    assert run_of(derived) == spec.run_key
    keyed = TaskSpec(task_id="whatever", app_name="x", app_version=None, round=0, config={"run_key": "k"})
    assert run_of(keyed) == "k"
    assert run_of(TaskSpec(task_id="t-1", app_name="x", app_version=None, round=0)) == "t-1"
