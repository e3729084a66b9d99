"""``flare provision`` without a project.yml offers a commented sample; kits are numbered from prod_00."""

from __future__ import annotations

import io
import json

import yaml

from flare_provider.cli import main as flare
from flare_provider.provisioning import load_project, provision


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_project_file_a_sample_is_offered_and_provisions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # Not on a terminal: say how to get the sample, write nothing.
    assert flare(["provision"]) == 2
    assert "flare provision --sample project.yml" in capsys.readouterr().err
    assert not (tmp_path / "project.yml").exists()
    # On a terminal, "no" writes nothing, "y" writes it.
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert flare(["provision"]) == 2
    assert not (tmp_path / "project.yml").exists()
    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert flare(["provision"]) == 0
    text = (tmp_path / "project.yml").read_text()
    assert text.startswith("# A federation in NVIDIA FLARE's project.yml format")
    assert "role: project_admin" in text and "# connect: listen" in text
    # The sample provisions as it is, from the current folder's project.yml.
    assert flare(["provision", "-w", "ws"]) == 0
    project = yaml.safe_load(text)["name"]
    kits = tmp_path / "ws" / project / "prod_00"
    assert {p.name for p in kits.iterdir() if p.is_dir()} == {
        "airflow-server", "site-1", "site-2", "admin@lead_org.example.com", "it@org_1.example.com"}


def test_sample_flag_writes_without_asking_and_never_overwrites(tmp_path, capsys):
    target = tmp_path / "conf" / "project.yml"
    assert flare(["provision", "--sample", str(target)]) == 0
    assert load_project(target).warnings == ()
    target.write_text("mine")
    assert flare(["provision", "--sample", str(target)]) == 2
    assert "exists; not overwriting" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_a_workspace_numbered_from_prod_01_keeps_counting(tmp_path):
    project_file = tmp_path / "project.yml"
    assert flare(["provision", "--sample", str(project_file)]) == 0
    project = load_project(project_file)
    first = provision(project, tmp_path / "ws")
    assert first.prod_dir.name == "prod_00"
    assert provision(project, tmp_path / "ws").prod_dir.name == "prod_01"
    # A workspace from before the count began at 00: its first kits are prod_01, recorded as such.
    old = tmp_path / "old"
    provision(project, old)
    project_dir = old / project.name
    (project_dir / "prod_00").rename(project_dir / "prod_01")
    state_file = project_dir / "state" / "state.json"
    state = json.loads(state_file.read_text())
    state["last_prod"] = 1
    for record in state["participants"].values():
        record["prod"] = 1
    state_file.write_text(json.dumps(state))
    # Adding a site there reuses the others' certificates from prod_01 and writes prod_02.
    doc = yaml.safe_load(project_file.read_text())
    doc["participants"].append({"name": "site-3", "type": "client", "org": "org_3"})
    project_file.write_text(yaml.safe_dump(doc))
    added = provision(load_project(project_file), old, add_sites=["site-3"])
    assert added.prod_dir.name == "prod_02" and "site-3" in added.issued and "site-1" not in added.issued
