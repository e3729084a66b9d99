"""Tasks run as several ranks of PyTorch distributed (gloo on CPU), with real workers and real PyTorch."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from runtime_support import (
    EXAMPLE_APPS,
    SITE,
    bundle_file,
    new_store,
    provision_federation,
    wait_finished,
    wait_pid_gone,
    wait_until,
)
from safetensors.torch import load_file

from flare_provider.client import AgentError
from flare_provider.federation.communicator import SiteCommunicator, TaskOrder
from flare_provider.federation.records import InFlight, RunSpec
from site_agent.datasets.digits import write_site_partitions
from site_agent.errors import InvalidTaskError, TaskRejected
from site_agent.runtime.scheduler import cpu_limit
from site_agent.runtime.task_manager import TaskManager
from site_agent.runtime.task_records import TaskSpec
from site_agent.site_settings import parse_site_settings
from site_agent.trainers.pytorch import ClassifierTrainer
from site_agent.worker.weights import save_weights

DIGITS_ARGS = yaml.safe_load((EXAMPLE_APPS / "digits" / "app.yaml").read_text())["trainer"]["args"]
# Two ranks sum each batch's gradient in two parts and add them: float32 rounding, nothing more.
ATOL, RTOL = 1e-5, 1e-4

RANK_TRAINER = '''
"""Records what each rank sees, then trains slowly (or fails) as the round config says."""
import json, os, time
import torch.distributed as dist
from site_agent.trainer import Trainer, TrainResult


class RankProbe(Trainer):
    def train(self, weights, ctx):
        record = {"rank": ctx.rank, "world_size": ctx.world_size, "pid": os.getpid(), "pgid": os.getpgrp(),
                  "joined": dist.is_initialized() and dist.get_rank() == ctx.rank,
                  "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}
        folder = ctx.data_dir / "ranks"
        folder.mkdir(exist_ok=True)
        (folder / f"{ctx.task_id}-{ctx.rank}.json").write_text(json.dumps(record))
        if ctx.config.get("fail_rank") == ctx.rank:
            raise RuntimeError(f"rank {ctx.rank} gives up")
        steps = int(ctx.config.get("steps", 1))
        for i in range(steps):
            time.sleep(float(ctx.config.get("sleep", 0.0)))
            ctx.report((i + 1) / steps, step=i + 1, rank=ctx.rank)
        return TrainResult({k: v + 1 + ctx.rank for k, v in weights.items()}, num_samples=5 + ctx.rank,
                           metrics={"rank": ctx.rank})
'''


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return provision_federation(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def store(fed, tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    app = base / "rank_probe"
    (app / "custom").mkdir(parents=True)
    (app / "app.yaml").write_text("name: rank_probe\ntrainer:\n  path: rank_trainer.RankProbe\n")
    (app / "custom" / "rank_trainer.py").write_text(textwrap.dedent(RANK_TRAINER))
    store = new_store(fed, base / "apps")
    store.deploy(bundle_file(fed, EXAMPLE_APPS / "digits", base / "digits.zip"))
    store.deploy(bundle_file(fed, app, base / "rank_probe.zip"))
    return store


@pytest.fixture
def tasks(store, tmp_path):
    """A CPU site that runs custom code, whose data folder holds one digits partition (all of the pool)."""
    (tmp_path / "site" / "data").mkdir(parents=True)
    settings = parse_site_settings({"data_dir": "data", "work_dir": "work", "gpus": [], "allow_custom_code": True},
                                   tmp_path / "site")
    write_site_partitions([settings.data_dir], non_iid=False, seed=0)
    manager = TaskManager(settings, store, SITE)
    manager.start()
    yield manager
    manager.close()


def weights_file(path: Path) -> Path:
    save_weights(path, ClassifierTrainer(**DIGITS_ARGS).initial_weights())
    return path


def rank_records(tasks: TaskManager, task_id: str, world_size: int, timeout: float = 60) -> list[dict]:
    folder = Path(tasks.settings.data_dir) / "ranks"
    paths = [folder / f"{task_id}-{rank}.json" for rank in range(world_size)]
    deadline = time.monotonic() + timeout
    while not all(p.is_file() for p in paths):
        assert time.monotonic() < deadline, f"not every rank of {task_id} started"
        time.sleep(0.05)
    return [json.loads(p.read_text()) for p in paths]


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def wait_group_empty(pgid: int, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return group_members(pgid)


def test_two_ranks_train_the_same_weights_as_one(tasks, tmp_path):
    # 1437 samples, batches of 30: the last batch (27) splits 14/13 between the ranks
    config = {"epochs": 1, "batch_size": 30, "lr": 0.1}
    for task_id, processes in (("one-rank", 1), ("two-ranks", 2)):
        tasks.submit(TaskSpec(task_id, "digits", None, 1, config=config, num_processes=processes),
                     weights_file(tmp_path / f"{task_id}.safetensors"))
    one, two = (wait_finished(tasks, t, timeout=180) for t in ("one-rank", "two-ranks"))
    assert one.status == two.status == "succeeded", (one.error, two.error)
    assert two.num_samples == one.num_samples > 1000  # the whole site's samples, not a rank's share
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert two.metrics[name] == pytest.approx(one.metrics[name], rel=RTOL, abs=ATOL), name
    single, double = (load_file(tasks.result_file(t)[0]) for t in ("one-rank", "two-ranks"))
    initial = ClassifierTrainer(**DIGITS_ARGS).initial_weights()
    assert single.keys() == double.keys() == initial.keys()
    for name in single:
        assert not torch.allclose(single[name], initial[name], atol=1e-3)  # it trained
        torch.testing.assert_close(double[name], single[name], atol=ATOL, rtol=RTOL)

    # an evaluation as two ranks: each rank scores its share, the metrics are the site's
    save_weights(tmp_path / "trained.safetensors", single)
    tasks.submit(TaskSpec("eval-2", "digits", None, 2, kind="evaluate", num_processes=2), tmp_path / "trained.safetensors")
    evaluated = wait_finished(tasks, "eval-2", timeout=120)
    assert evaluated.status == "succeeded", evaluated.error
    assert evaluated.metrics["accuracy"] == pytest.approx(one.metrics["val_accuracy"], abs=ATOL)


def test_ranks_get_their_environment_and_only_rank_0_reports(tasks, tmp_path):
    tasks.submit(TaskSpec("probe-2", "rank_probe", None, 1, config={"steps": 2}, num_processes=2),
                 weights_file(tmp_path / "w.safetensors"))
    done = wait_finished(tasks, "probe-2")
    assert done.status == "succeeded", done.error
    records = rank_records(tasks, "probe-2", 2)
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 and r["joined"] for r in records)
    assert records[0]["pgid"] == records[1]["pgid"] != records[0]["pid"]  # both in the task's group, led by the supervisor
    for rank, record in enumerate(records):
        env = record["env"]
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == (str(rank), "2", str(rank), "127.0.0.1")
        assert int(env["MASTER_PORT"]) > 0 and env["MASTER_PORT"] == records[0]["env"]["MASTER_PORT"]
    assert done.num_samples == 5 and done.metrics["rank"] == 0  # rank 0's result; rank 1's is discarded
    initial, result = ClassifierTrainer(**DIGITS_ARGS).initial_weights(), load_file(tasks.result_file("probe-2")[0])
    assert all(torch.equal(result[k], initial[k] + 1) for k in initial)  # rank 1 would have added 2


def test_a_failing_rank_fails_the_task_naming_it(tasks, tmp_path):
    tasks.submit(TaskSpec("fail-1", "rank_probe", None, 1, config={"fail_rank": 1, "steps": 50, "sleep": 0.2},
                          num_processes=2), weights_file(tmp_path / "w.safetensors"))
    done = wait_finished(tasks, "fail-1")
    assert done.status == "failed"
    assert done.error.startswith("rank 1 of 2 failed: RuntimeError: rank 1 gives up"), done.error
    assert not done.result_available
    pgid = rank_records(tasks, "fail-1", 2)[0]["pgid"]
    assert wait_group_empty(pgid) == []


def test_a_killed_rank_ends_every_rank_and_fails_the_task(tasks, tmp_path):
    tasks.submit(TaskSpec("kill-1", "rank_probe", None, 1, config={"steps": 300, "sleep": 0.1}, num_processes=2),
                 weights_file(tmp_path / "w.safetensors"))
    records = rank_records(tasks, "kill-1", 2)
    pgid = records[0]["pgid"]
    assert pgid == tasks.worker_pid("kill-1")
    assert set(group_members(pgid)) >= {pgid, records[0]["pid"], records[1]["pid"]}
    os.kill(records[1]["pid"], signal.SIGKILL)
    done = wait_finished(tasks, "kill-1")
    assert done.status == "failed"
    assert done.error.startswith("rank 1 of 2 was killed by SIGKILL"), done.error
    assert "other ranks were stopped" in done.error
    assert wait_pid_gone(records[0]["pid"]) and wait_group_empty(pgid) == []


def test_abort_ends_every_rank(tasks, tmp_path):
    tasks.submit(TaskSpec("abort-2", "rank_probe", None, 1, config={"steps": 300, "sleep": 0.1}, num_processes=2),
                 weights_file(tmp_path / "w.safetensors"))
    records = rank_records(tasks, "abort-2", 2)
    wait_until(tasks, "abort-2", ("running",))
    state = tasks.abort("abort-2")
    assert state.status == "aborted", state.error
    pgid = records[0]["pgid"]
    assert all(wait_pid_gone(r["pid"]) for r in records) and wait_group_empty(pgid) == []


def test_process_counts_a_site_cannot_run_are_refused(tasks, tmp_path):
    too_many = cpu_limit() + 1
    with pytest.raises(TaskRejected, match=f"asks for {too_many} processes.*at most {cpu_limit()}"):
        tasks.submit(TaskSpec("many", "rank_probe", None, 1, num_processes=too_many), weights_file(tmp_path / "a"))
    with pytest.raises(InvalidTaskError, match="num_processes must be a whole number >= 1"):
        tasks.submit(TaskSpec("none", "rank_probe", None, 1, num_processes=0), weights_file(tmp_path / "b"))
    # batch_size must split evenly between the ranks
    tasks.submit(TaskSpec("odd", "digits", None, 1, config={"batch_size": 31}, num_processes=2), weights_file(tmp_path / "c"))
    done = wait_finished(tasks, "odd")
    assert done.status == "failed" and "batch_size 31 must be a multiple of the task's 2 ranks" in done.error


def test_a_real_agent_runs_the_ranks_a_submission_asks_for(federation, agent, tmp_path):
    """Over gRPC (mutual TLS): num_processes travels from the client to the worker, and is checked there."""
    write_site_partitions([agent.kit / "data"], non_iid=False, seed=0)
    with federation.client("site-1") as client:
        client.deploy_app(federation.bundle("digits"))
        weights = weights_file(tmp_path / "w.safetensors")
        too_many = cpu_limit() + 1
        with pytest.raises(AgentError) as refused:
            client.submit_task("grpc-many", "digits", weights, 1, num_processes=too_many)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"asks for {too_many} processes" in refused.value.details
        with pytest.raises(AgentError) as invalid:
            client.submit_task("grpc-zero", "digits", weights, 1, num_processes=0)
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT

        # batch_size 31 cannot be split between 2 ranks: the worker's refusal proves it ran as two
        config = {"epochs": 1, "batch_size": 31}
        client.submit_task("grpc-2", "digits", weights, 1, config=config, num_processes=2)
        *_, odd = client.watch_task("grpc-2", timeout=120)
        assert odd.status == "failed" and "the task's 2 ranks" in odd.error, odd.error
        # as a workflow sends it: a run's num_processes goes into each site's order
        run = RunSpec(federation="fed", run_id="r1", app_name="digits", sites=("site-1",), num_rounds=1,
                      min_clients=1, num_processes=2)
        order = TaskOrder("digits", weights, "train", {**config, "batch_size": 32}, num_processes=run.num_processes)
        flight = InFlight(1, {"site-1": "grpc-2b"}, time.time(), time.time() + 120)
        sites = SiteCommunicator(None, tmp_path, client_factory=lambda site: client)
        sites.send(flight, {"site-1": order})
        assert flight.dropped == {}
        *_, done = client.watch_task("grpc-2b", timeout=120)
        assert done.status == "succeeded", done.error
        assert done.num_samples > 1000
        client.fetch_result("grpc-2b", tmp_path / "result.safetensors")
        assert load_file(tmp_path / "result.safetensors").keys() == ClassifierTrainer(**DIGITS_ARGS).initial_weights().keys()


def test_a_run_asks_for_a_whole_number_of_processes():
    base = dict(federation="fed", run_id="r1", app_name="digits", sites=("a",), num_rounds=1, min_clients=1)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="num_processes must be a whole number >= 1"):
            RunSpec(**base, num_processes=bad)
    assert RunSpec(**base).config_hash != RunSpec(**base, num_processes=2).config_hash
