"""The task manager: real child processes running a real (custom-code) trainer from a signed bundle."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from runtime_support import (
    REPO,
    SITE,
    pid_alive,
    probe_weights,
    read_events,
    site_settings,
    submit,
    wait_finished,
    wait_pid_gone,
    wait_until,
)
from safetensors.numpy import load_file

from site_agent.errors import InvalidTaskError, NoResultError, TaskRejected, UnknownAppError, UnknownTaskError
from site_agent.runtime.task_manager import TaskManager
from site_agent.runtime.task_records import TaskSpec
from site_agent.worker.task_runner import RESULT_KIND_KEY


def test_training_task_writes_a_checked_result(tasks, tmp_path):
    state, created = submit(tasks, "run1:r0:hospital-a", tmp_path, config={"steps": 3})
    assert created and state.status in ("queued", "running") and state.seq >= 1
    assert not (tmp_path / "run1:r0:hospital-a.safetensors").exists()  # moved into the task folder
    done = wait_finished(tasks, state.task_id)
    assert done.status == "succeeded", done.error
    assert (done.num_samples, done.metrics, done.progress) == (7, {"score": 1.5}, 1.0)  # the trainer's final metrics
    assert done.result_available and done.started_at and done.finished_at >= done.started_at
    path, _ = tasks.result_file(state.task_id)
    assert {k: v.tolist() for k, v in load_file(path).items()} == {"w": [[1.0] * 3] * 2, "b": [1.0] * 3}
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()[RESULT_KIND_KEY] == "weights"


def test_progress_is_streamed_with_increasing_seq(tasks, tmp_path):
    state, _ = submit(tasks, "stream", tmp_path, config={"steps": 4, "sleep": 0.8})
    seen = []
    while state.status not in ("succeeded", "failed"):
        nxt = tasks.wait("stream", state.seq, 30)
        assert nxt.seq > state.seq
        state = nxt
        seen.append((state.progress, state.history[-1].step if state.history else None))  # the step travels with the curve
    assert state.status == "succeeded"
    steps = [(progress, step) for progress, step in seen if step is not None and progress < 1]
    assert len(steps) >= 2 and all(progress == step / 4 for progress, step in steps)  # metrics travel with progress
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    before = time.monotonic()
    assert tasks.wait("stream", state.seq, 0.3).seq == state.seq  # nothing new: returns at the timeout
    assert time.monotonic() - before >= 0.25


def test_submit_is_idempotent(tasks, tmp_path):
    first, created = submit(tasks, "same-id", tmp_path, config={"sleep": 0.5})
    second, created_again = submit(tasks, "same-id", tmp_path, config={"sleep": 0.5})
    assert created and not created_again
    assert second.task_id == first.task_id and second.created_at == first.created_at
    assert (tmp_path / "same-id.safetensors").exists()  # the repeated submit's weights were left alone
    wait_finished(tasks, "same-id")
    third, created_third = submit(tasks, "same-id", tmp_path)
    assert not created_third and third.status == "succeeded"
    starts = [e for e in read_events(tasks.settings.data_dir) if e["event"] == "start" and e["task_id"] == "same-id"]
    assert len(starts) == 1


def test_trainer_exception_fails_only_that_task(tasks, tmp_path):
    bad, _ = submit(tasks, "raises", tmp_path, config={"fail": "site data is corrupt"})
    good, _ = submit(tasks, "fine", tmp_path)
    failed = wait_finished(tasks, bad.task_id)
    assert failed.status == "failed"
    assert failed.error == "RuntimeError: site data is corrupt"
    assert not failed.result_available
    with pytest.raises(NoResultError, match="failed: RuntimeError"):
        tasks.result_file(bad.task_id)
    assert "Traceback" in (tasks.root / "raises" / "worker.log").read_text()  # details stay at the site
    assert wait_finished(tasks, good.task_id).status == "succeeded"


def test_a_crashing_worker_fails_its_task(tasks, tmp_path):
    state, _ = submit(tasks, "segfault", tmp_path, config={"crash": True})
    done = wait_finished(tasks, state.task_id)
    assert (done.status, done.error) == ("failed", "the worker process was killed by SIGSEGV")
    assert submit(tasks, "after-crash", tmp_path)[0].status in ("queued", "running")
    assert wait_finished(tasks, "after-crash").status == "succeeded"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"nan": True}, "tensor 'b' holds NaN or infinite values"),
        ({"drop": True}, r"do not match the global model: missing \['b'\]"),
    ],
)
def test_bad_weights_from_a_trainer_fail_the_task(tasks, tmp_path, config, message):
    state, _ = submit(tasks, "bad-weights", tmp_path, config=config)
    done = wait_finished(tasks, state.task_id)
    assert done.status == "failed"
    assert done.error is not None and __import__("re").search(message, done.error), done.error
    assert not (tasks.root / "bad-weights" / "result.safetensors").exists()


def test_abort_kills_the_worker_and_its_process_group(tasks, tmp_path):
    state, _ = submit(tasks, "long", tmp_path, config={"sleep": 120, "steps": 120, "grandchild": True})
    wait_until(tasks, state.task_id, ("running",))
    pid = tasks.worker_pid(state.task_id)
    deadline = time.monotonic() + 30
    while not any(e["event"] == "grandchild" for e in read_events(tasks.settings.data_dir)):
        assert time.monotonic() < deadline, "the trainer never started its child process"
        time.sleep(0.05)
    grandchild = next(e["child_pid"] for e in read_events(tasks.settings.data_dir) if e["event"] == "grandchild")
    assert pid_alive(pid) and pid_alive(grandchild)
    aborted = tasks.abort(state.task_id)
    assert aborted.status == "aborted"
    assert wait_pid_gone(pid) and wait_pid_gone(grandchild)
    assert tasks.worker_pid(state.task_id) is None
    with pytest.raises(NoResultError):
        tasks.result_file(state.task_id)
    assert tasks.abort(state.task_id).status == "aborted"  # again: nothing changes


def test_abort_of_a_queued_task(make_manager, tmp_path):
    tasks = make_manager(max_concurrent_cpu_tasks=1)
    submit(tasks, "blocker", tmp_path, config={"sleep": 30, "steps": 30})
    queued, _ = submit(tasks, "waiting", tmp_path)
    assert tasks.get("waiting").status == "queued"
    assert tasks.abort("waiting").status == "aborted"
    tasks.abort("blocker")
    assert [e for e in read_events(tasks.settings.data_dir) if e["task_id"] == "waiting"] == []


def test_acknowledged_results_are_deleted(tasks, tmp_path):
    state, _ = submit(tasks, "ack", tmp_path)
    wait_finished(tasks, "ack")
    path, _ = tasks.result_file("ack")
    assert path.is_file()
    tasks.acknowledge("ack")
    assert not path.exists()
    assert not tasks.get("ack").result_available
    with pytest.raises(NoResultError, match="already acknowledged"):
        tasks.result_file("ack")
    tasks.acknowledge("ack")  # a retried acknowledge is harmless
    again, created = submit(tasks, "ack", tmp_path)
    assert not created and again.status == "succeeded"  # never trained twice


def test_evaluate_task_reports_metrics(tasks, tmp_path):
    state, _ = submit(tasks, "eval", tmp_path, kind="evaluate")
    done = wait_finished(tasks, "eval")
    assert done.status == "succeeded", done.error
    assert done.metrics == {"mean_weight": 0.0} and done.num_samples == 3
    assert not done.result_available
    with pytest.raises(NoResultError, match="evaluate task"):
        tasks.result_file("eval")


def test_bad_requests_are_refused_clearly(fed, tasks, make_manager, probe_store, tmp_path):
    with pytest.raises(UnknownAppError, match="no app named 'missing'"):
        tasks.submit(TaskSpec("t1", "missing", None, 0), probe_weights(tmp_path / "w1"))
    with pytest.raises(InvalidTaskError, match="task_id must be"):
        tasks.submit(TaskSpec("../escape", "probe", None, 0), probe_weights(tmp_path / "w2"))
    with pytest.raises(InvalidTaskError, match="kind must be one of"):
        tasks.submit(TaskSpec("t2", "probe", None, 0, kind="predict"), probe_weights(tmp_path / "w3"))
    with pytest.raises(InvalidTaskError, match="config must be plain JSON"):
        tasks.submit(TaskSpec("t3", "probe", None, 0, config={"x": object()}), probe_weights(tmp_path / "w4"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not tensors at all")
    with pytest.raises(InvalidTaskError, match="not a readable safetensors file"):
        tasks.submit(TaskSpec("t4", "probe", None, 0), garbage)
    with pytest.raises(TaskRejected, match="asks for 1 GPU"):
        tasks.submit(TaskSpec("t5", "probe", None, 0, num_gpus=1), probe_weights(tmp_path / "w5"))
    with pytest.raises(UnknownTaskError, match="no task 'nope'"):
        tasks.get("nope")
    assert [s.task_id for s in tasks.list()] == []
    assert sorted(p.name for p in tasks.root.iterdir()) == []  # nothing half-created


def test_custom_code_needs_the_sites_opt_in(make_manager, tmp_path):
    closed_site = make_manager(allow_custom_code=False)
    weights = probe_weights(tmp_path / "w.safetensors")
    with pytest.raises(TaskRejected, match="brings custom code and site 'hospital-a' does not allow it"):
        closed_site.submit(TaskSpec("byoc", "probe", None, 0), weights)
    assert weights.exists() and closed_site.list() == []


def test_gpu_tasks_queue_for_the_gpu_and_fall_back_to_cpu(make_manager, tmp_path):
    import torch

    tasks = make_manager(gpus=(0,))
    first, _ = submit(tasks, "gpu-1", tmp_path, config={"sleep": 2.5})
    second, _ = submit(tasks, "gpu-2", tmp_path, config={"sleep": 0.5})
    wait_until(tasks, "gpu-1", ("running",))
    assert tasks.get("gpu-2").status == "queued"  # the only GPU is busy
    assert tasks.get("gpu-1").gpus == [0]
    with pytest.raises(TaskRejected, match="asks for 2 GPU"):
        submit(tasks, "gpu-greedy", tmp_path, num_gpus=2)
    assert wait_finished(tasks, "gpu-1").status == "succeeded"
    done = wait_finished(tasks, "gpu-2")
    assert done.status == "succeeded" and done.gpus == [0]
    events = read_events(tasks.settings.data_dir)
    spans = {t: [e["time"] for e in events if e["task_id"] == t and e["event"] in ("start", "end")] for t in ("gpu-1", "gpu-2")}
    assert spans["gpu-1"][1] <= spans["gpu-2"][0]  # never on the GPU at the same time
    expected_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert {(e["cuda_visible_devices"], e["device"]) for e in events} == {("0", expected_device)}


def test_cpu_tasks_are_bounded_and_see_no_gpu(make_manager, tmp_path):
    tasks = make_manager(max_concurrent_cpu_tasks=1)
    for name in ("cpu-1", "cpu-2"):
        submit(tasks, name, tmp_path, config={"sleep": 0.6})
    assert tasks.get("cpu-2").status == "queued"
    for name in ("cpu-1", "cpu-2"):
        assert wait_finished(tasks, name).status == "succeeded"
    events = read_events(tasks.settings.data_dir)
    end_1 = next(e["time"] for e in events if e["task_id"] == "cpu-1" and e["event"] == "end")
    start_2 = next(e["time"] for e in events if e["task_id"] == "cpu-2" and e["event"] == "start")
    assert end_1 <= start_2
    assert {(e["cuda_visible_devices"], e["device"]) for e in events} == {("", "cpu")}


def test_results_survive_a_restart(probe_store, tmp_path):
    settings = site_settings(tmp_path / "site")
    first = TaskManager(settings, probe_store, SITE)
    first.start()
    submit(first, "kept", tmp_path)
    assert wait_finished(first, "kept").status == "succeeded"
    first.close()

    second = TaskManager(settings, probe_store, SITE)
    second.start()
    try:
        state = second.get("kept")
        assert state.status == "succeeded" and state.result_available and state.num_samples == 7
        path, _ = second.result_file("kept")
        assert load_file(path)["b"].tolist() == [1.0] * 3
    finally:
        second.close()


@pytest.mark.parametrize("damage", ["cut short", "bytes changed"])
def test_a_result_damaged_while_the_agent_was_down_is_not_served(probe_store, tmp_path, damage):
    """The worker does not flush its result to disk; a power cut may leave less, or other
    bytes, than it wrote. The agent checks the file against the XXH3-128 and size the worker
    recorded, and fails the task (to be run again) rather than serve it."""
    settings = site_settings(tmp_path / "site")
    first = TaskManager(settings, probe_store, SITE)
    first.start()
    submit(first, "hit", tmp_path)
    submit(first, "spared", tmp_path)
    assert wait_finished(first, "hit").status == "succeeded" and wait_finished(first, "spared").status == "succeeded"
    result, _ = first.result_file("hit")
    first.close()

    data = result.read_bytes()
    if damage == "cut short":
        result.write_bytes(data[: len(data) // 2])
    else:  # same size, the last bytes zeroed: what a file whose tail never reached the disk reads as
        result.write_bytes(data[:-8] + bytes(8))
    second = TaskManager(settings, probe_store, SITE)
    second.start()
    try:
        state = second.get("hit")
        assert (state.status, state.result_available) == ("failed", False)
        assert "lost when the site's machine went down" in state.error and "run again" in state.error
        with pytest.raises(NoResultError, match="lost when the site's machine went down"):
            second.result_file("hit")
        assert not result.exists()
        kept = second.get("spared")  # a result that is whole is served as before
        assert kept.status == "succeeded" and kept.result_available
        assert load_file(second.result_file("spared")[0])["b"].tolist() == [1.0] * 3
    finally:
        second.close()


def test_close_records_running_tasks_as_stopped(probe_store, tmp_path):
    tasks = TaskManager(site_settings(tmp_path / "site"), probe_store, SITE)
    tasks.start()
    submit(tasks, "cut-short", tmp_path, config={"sleep": 60, "steps": 60})
    wait_until(tasks, "cut-short", ("running",))
    pid = tasks.worker_pid("cut-short")
    tasks.close()
    state = tasks.get("cut-short")
    assert (state.status, state.error) == ("failed", "agent stopped during the task")
    assert wait_pid_gone(pid)


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from site_agent.runtime.app_store import AppStore
    from site_agent.runtime.task_manager import TaskManager
    from site_agent.runtime.task_records import TaskSpec
    from site_agent.site_settings import SiteSettings
    from site_agent.worker.weights import save_weights

    store_root, root_ca, base = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3])
    settings = SiteSettings(data_dir=base / "data", work_dir=base / "work", gpus=(), allow_custom_code=True,
                            max_concurrent_cpu_tasks=1)
    tasks = TaskManager(settings, AppStore(store_root, root_ca, "airflow-server"), "hospital-a")
    tasks.start()
    for task_id, config in (("running-at-crash", {"sleep": 120, "steps": 120}), ("queued-at-crash", {})):
        weights = base / f"{task_id}.safetensors"
        save_weights(weights, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)})
        tasks.submit(TaskSpec(task_id, "probe", None, 0, config=config), weights)
    while tasks.get("running-at-crash").status != "running":
        time.sleep(0.05)
    print(tasks.worker_pid("running-at-crash"), flush=True)
    time.sleep(600)
    """
)


def test_restart_after_the_agent_was_killed(fed, probe_store, tmp_path):
    base = tmp_path / "site"
    (base / "data").mkdir(parents=True)
    root_ca = tmp_path / "rootCA.pem"
    root_ca.write_bytes(fed.root_ca_pem)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(probe_store.root), str(root_ca), str(base)],
        stdout=subprocess.PIPE, env=env, text=True,
    )
    try:
        ready, _, _ = select.select([agent.stdout], [], [], 60)
        assert ready, "the agent never reported its running task"
        worker_pid = int(agent.stdout.readline())
        assert pid_alive(worker_pid)
        agent.send_signal(signal.SIGKILL)  # the agent dies without any chance to clean up
        agent.wait(10)
    finally:
        agent.kill()
        agent.stdout.close()

    restarted = TaskManager(
        site_settings(base, max_concurrent_cpu_tasks=1), probe_store, SITE
    )
    restarted.start()
    try:
        crashed = restarted.get("running-at-crash")
        assert (crashed.status, crashed.error) == ("failed", "agent restarted during the task")
        assert wait_pid_gone(worker_pid)  # no orphan keeps training
        requeued = wait_finished(restarted, "queued-at-crash")
        assert requeued.status == "succeeded" and requeued.result_available
        assert crashed.seq > 1
    finally:
        restarted.close()
