"""Every malformed project.yml is refused with a message naming the problem, and nothing is written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from flare_provider.cli import main as flare
from flare_provider.provisioning import ProjectError, load_project, parse_project

GOOD = """
api_version: 3
name: demo
participants:
  - {name: server1, type: server, org: lead}
  - {name: site-1, type: client, org: a}
  - {name: admin@lead.example, type: admin, org: lead, role: project_admin}
"""


def with_participant(extra: str) -> str:
    return GOOD + textwrap.indent(textwrap.dedent(extra).strip(), "  ") + "\n"


BAD_PROJECTS = {
    "not YAML": ("name: [unclosed\n  participants: {", "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "expected a YAML mapping"),
    "missing name": (GOOD.replace("name: demo\n", ""), "name: missing"),
    "no server": (GOOD.replace("  - {name: server1, type: server, org: lead}\n", ""), "no participant of type 'server'"),
    "two relays on one address": (
        with_participant("- {name: server2, type: server, org: lead, host_names: [server1]}"),
        "'server2': fed_learn_port: server1:8002 is already the relay address of 'server1'",
    ),
    "bad connect": (
        with_participant("- {name: site-2, type: client, org: a, connect: inbound}"), "'site-2': connect: must be"
    ),
    "duplicate names": (with_participant("- {name: site-1, type: client, org: b}"), "participant 'site-1': duplicate"),
    "unknown type": (with_participant("- {name: x1, type: worker, org: a}"), "unknown participant type 'worker'"),
    "bad port": (with_participant("- {name: site-2, type: client, org: a, agent_port: 70000}"), "agent_port: bad port 70000"),
    "port not a number": (GOOD.replace("org: lead}", "org: lead, fed_learn_port: http}", 1), "fed_learn_port: bad port"),
    "path separator in name": (with_participant("- {name: ../evil, type: client, org: a}"), "cannot be a certificate CN"),
    "slash in name": (with_participant("- {name: a/b, type: client, org: a}"), "cannot be a certificate CN"),
    "name too long": (with_participant(f"- {{name: {'x' * 65}, type: client, org: a}}"), "cannot be a certificate CN"),
    "admin without role": (with_participant("- {name: ops@a.example, type: admin, org: a}"), "'ops@a.example': role: missing"),
    "admin with unknown role": (with_participant("- {name: ops@a.example, type: admin, org: a, role: god}"), "unknown role 'god'"),
    "participant without org": (with_participant("- {name: site-2, type: client}"), "'site-2': org: missing"),
    "no participants": ("api_version: 3\nname: demo\n", "participants: must be a non-empty list"),
    "unsupported api_version": (GOOD.replace("api_version: 3", "api_version: 9"), "api_version"),
    "bad gpu list": (
        with_participant(
            """
            - name: site-2
              type: client
              org: a
              components: {resource_manager: {args: {resources: {gpu: [0, "one"]}}}}
            """
        ),
        "resources.gpu: must be a list of GPU ids",
    ),
    "bad host name": (with_participant("- {name: site-2, type: client, org: a, agent_host: 'bad host'}"), "bad host name"),
    "enable_byoc not a flag": (with_participant("- {name: site-2, type: client, org: a, enable_byoc: maybe}"), "enable_byoc"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROJECTS))
def test_bad_project_is_refused_and_nothing_written(case: str, tmp_path: Path, capsys):
    text, expected = BAD_PROJECTS[case]
    project_file = tmp_path / "project.yml"
    project_file.write_text(text)
    workspace = tmp_path / "workspace"

    with pytest.raises(ProjectError) as excinfo:
        load_project(project_file)
    assert expected in str(excinfo.value)
    assert str(project_file) in str(excinfo.value)

    assert flare(["provision", "-p", str(project_file), "-w", str(workspace)]) == 2
    assert expected in capsys.readouterr().err
    assert not workspace.exists()


def test_unreadable_file_is_named(tmp_path: Path):
    missing = tmp_path / "nope.yml"
    with pytest.raises(ProjectError, match=f"{missing}: cannot read project file"):
        load_project(missing)
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProjectError, match="cannot read project file"):
        load_project(binary)


def test_flare_keys_we_do_not_use_are_warnings(sample_project_file: Path):
    text = sample_project_file.read_text() + textwrap.dedent(
        """
          - path: nvflare.lighter.impl.he.HEBuilder
            args: {poly_modulus_degree: 8192}
        overseer: {}
        """
    )
    text = text.replace(
        "  - name: hospital-b\n", "  - name: overseer\n    type: overseer\n    org: lead_lab\n  - name: hospital-b\n"
    )
    project = parse_project(text)
    assert [p.name for p in project.clients] == ["hospital-a", "hospital-b", "hospital-c"]
    joined = "\n".join(project.warnings)
    assert "HEBuilder ignored" in joined
    assert "overseer participants are not needed, Airflow's scheduler plays the overseer's part" in joined
    assert "top-level key 'overseer' ignored: Airflow's scheduler plays the overseer's part" in joined


def test_sample_project_settings_are_honoured(sample_project_file: Path):
    project = load_project(sample_project_file)
    assert project.warnings == ()
    a = project.participant("hospital-a")
    assert (a.agent_host, a.agent_port, a.enable_byoc, a.gpus) == ("fl.hospital-a.example", 8102, True, (0, 1))
    b = project.participant("hospital-b")
    assert (b.enable_byoc, b.gpus) == (False, ())
    assert project.docker_image == "flare-agent:latest"
    assert project.participant("admin@lead-lab.example").role == "project_admin"
    assert project.server.host_names == ("airflow.lead-lab.example",)


def test_defaults_and_api_version_2_roles():
    project = parse_project(
        textwrap.dedent(
            """
            api_version: 2
            name: legacy
            participants:
              - {name: server, type: server, org: o}
              - {name: site, type: client, org: o}
              - {name: boss@o.example, type: admin, org: o, roles: [super]}
            """
        )
    )
    site = project.participant("site")
    assert (site.agent_host, site.agent_port) == ("site", 8102)
    assert (project.server.fed_learn_port, project.server.admin_port) == (8002, 8003)
    assert project.participant("boss@o.example").role == "project_admin"
