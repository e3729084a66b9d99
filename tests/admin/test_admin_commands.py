"""``flare status``, ``abort`` and ``shutdown`` against real agents, each admin with its own kit.

The roles are the agent's to enforce (site_agent/service/auth.py): a project_admin aborts
anywhere and shuts agents down; an org_admin or lead aborts on its own org's sites; a
member reads status. A refusal must say it is one, and why.
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest

from flare_provider.cli import main as flare
from flare_provider.client import AgentError, load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.wire.tensors import dump_bytes


def weights() -> bytes:
    return dump_bytes({"w": np.zeros(8, dtype=np.float32)})


def submit_slow(fed, site: str, task_id: str, seconds: float = 60.0) -> None:
    with fed.client(site) as client:
        client.submit_task(task_id, "slow_plus_one", weights(), 1, config={"sleep_s": seconds})


def task_status(fed, site: str, task_id: str) -> str:
    with fed.client(site) as client:
        return client.get_task(task_id).status


def kit(fed, admin: str) -> str:
    return str(fed.kits[admin])


def test_every_admin_reads_status(role_federation, capsys):
    fed = role_federation
    assert flare(["status", "--kit", kit(fed, "viewer@site-1")]) == 0
    out = capsys.readouterr().out
    assert "asking as 'viewer@site-1' (admin)" in out
    assert out.count(" up ") == 2


def test_a_project_admin_aborts_a_task_by_id(role_federation, capsys):
    fed = role_federation
    task_id = f"admin-{uuid.uuid4().hex[:8]}"
    submit_slow(fed, "site-2", task_id)
    assert flare(["abort", "site-2", task_id, "--kit", kit(fed, "boss@lead")]) == 0
    assert f"site-2: task {task_id}: aborted" in capsys.readouterr().out
    assert task_status(fed, "site-2", task_id) == "aborted"


def test_a_member_may_not_abort_and_is_told_so(role_federation, capsys):
    fed = role_federation
    task_id = f"member-{uuid.uuid4().hex[:8]}"
    submit_slow(fed, "site-1", task_id)
    assert flare(["abort", "site-1", task_id, "--kit", kit(fed, "viewer@site-1")]) == 1
    err = capsys.readouterr().err
    assert "refused: admin 'viewer@site-1' is not allowed to do this on site-1" in err
    assert "admin role 'member' may not abort" in err
    assert task_status(fed, "site-1", task_id) in ("queued", "running")  # untouched
    assert flare(["abort", "site-1", task_id, "--kit", kit(fed, "it@site-1")]) == 0  # its own org's site
    assert task_status(fed, "site-1", task_id) == "aborted"


def test_org_scoped_admins_abort_only_on_their_orgs_sites(role_federation, capsys):
    fed = role_federation
    task_id = f"org-{uuid.uuid4().hex[:8]}"
    submit_slow(fed, "site-2", task_id)
    assert flare(["abort", "site-2", task_id, "--kit", kit(fed, "it@site-1")]) == 1
    err = capsys.readouterr().err
    assert "refused:" in err and "may abort tasks only on sites of that org" in err and "'org-site-2'" in err
    assert flare(["abort", "site-2", task_id, "--kit", kit(fed, "chief@site-2")]) == 0  # a lead of site-2's org
    assert task_status(fed, "site-2", task_id) == "aborted"


def test_abort_of_a_run_stops_its_tasks_on_every_site_and_nothing_else(role_federation, capsys):
    fed = role_federation
    spec = RunSpec(federation="admin-fed", run_id=f"run-{uuid.uuid4().hex[:6]}", app_name="slow_plus_one",
                   sites=fed.sites, num_rounds=1, min_clients=2)
    other = f"other-{uuid.uuid4().hex[:8]}"
    for site in fed.sites:
        submit_slow(fed, site, spec.task_id(1, site))
    submit_slow(fed, "site-1", other)
    assert flare(["abort", "--run", spec.run_id, "--federation", "admin-fed", "--kit", kit(fed, "boss@lead")]) == 0
    out = capsys.readouterr().out
    for site in fed.sites:
        assert f"{site}: task {spec.task_id(1, site)}: aborted" in out
        assert task_status(fed, site, spec.task_id(1, site)) == "aborted"
    assert task_status(fed, "site-1", other) in ("queued", "running")
    assert flare(["abort", "site-1", other, "--kit", kit(fed, "boss@lead")]) == 0

    # An org_admin aborting a run everywhere: its own org's site aborts, the other refuses.
    second = RunSpec(federation="admin-fed", run_id=f"run-{uuid.uuid4().hex[:6]}", app_name="slow_plus_one",
                     sites=fed.sites, num_rounds=1, min_clients=2)
    for site in fed.sites:
        submit_slow(fed, site, second.task_id(1, site))
    capsys.readouterr()
    assert flare(["abort", "--run", second.run_id, "--federation", "admin-fed", "--kit", kit(fed, "it@site-1")]) == 1
    captured = capsys.readouterr()
    assert f"site-1: task {second.task_id(1, 'site-1')}: aborted" in captured.out
    assert f"site-2: task {second.task_id(1, 'site-2')}: refused:" in captured.err
    assert task_status(fed, "site-2", second.task_id(1, "site-2")) in ("queued", "running")
    assert flare(["abort", "--run", second.run_id, "--federation", "admin-fed", "site-2", "--kit", kit(fed, "boss@lead")]) == 0

    assert flare(["abort", "--run", "x", "--kit", kit(fed, "boss@lead")]) == 2
    assert "--run needs --federation" in capsys.readouterr().err


def test_shutdown_asks_first_and_is_for_project_admins_only(role_federation, capsys, monkeypatch):
    fed = role_federation
    # Without a terminal and without --yes, nothing happens.
    assert flare(["shutdown", "site-2", "--kit", kit(fed, "boss@lead")]) == 2
    assert "needs a confirmation: pass --yes" in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert flare(["shutdown", "site-2", "--kit", kit(fed, "boss@lead")]) == 1
    assert "Not shut down." in capsys.readouterr().out
    assert fed.agent("site-2").alive

    assert flare(["shutdown", "site-2", "--yes", "--kit", kit(fed, "chief@site-2")]) == 1
    assert "refused:" in capsys.readouterr().err and fed.agent("site-2").alive
    assert flare(["shutdown", "site-1", "--yes", "--kit", kit(fed, "it@site-1")]) == 1
    assert "admin role 'org_admin' may not shutdown" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", Terminal("yes\n"))
    assert flare(["shutdown", "site-2", "--kit", kit(fed, "boss@lead")]) == 0
    assert "site-2: agent shutting down" in capsys.readouterr().out
    assert fed.agent("site-2").proc.wait(30) == 0
    with pytest.raises(AgentError):
        with load_caller_kit(fed.kits["boss@lead"]).client("site-2", timeout=2.0) as client:
            client.status()
    fed.agent("site-2").start()  # for whatever runs after


def test_admin_commands_name_a_missing_kit_or_site(role_federation, capsys, monkeypatch):
    monkeypatch.delenv("FLARE_KIT", raising=False)
    assert flare(["abort", "site-1", "t"]) == 2
    assert "no kit: pass --kit" in capsys.readouterr().err
    assert flare(["shutdown", "site-9", "--yes", "--kit", kit(role_federation, "boss@lead")]) == 2
    assert "site 'site-9' is not in the admin kit" in capsys.readouterr().err
