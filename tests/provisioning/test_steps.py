"""The provisioning run as steps over one context: a failing step leaves nothing half-written."""

from __future__ import annotations

import pytest

from flare_provider.provisioning import STEPS, load_project, provision
from flare_provider.provisioning.steps import packages, publish_prod_folder

PROJECT = "hospital_federation"


class Broken(Exception):
    pass


def fail(ctx) -> None:
    raise Broken("this step fails")


def hidden_folders(project_dir):
    return [p.name for p in project_dir.iterdir() if p.name.startswith(".")]


def test_refusals_run_before_anything_is_written():
    order = [step.__name__ for step in STEPS]
    assert order.index("check_added_sites") < order.index("create_root") < order.index("open_prod_folder")
    assert order[-2:] == ["publish_prod_folder", "record_state"]


def test_a_step_failing_after_the_kits_were_written_leaves_no_prod_folder(tmp_path, sample_project_file):
    project = load_project(sample_project_file)
    first = provision(project, tmp_path)
    state = (first.prod_dir.parent / "state" / "state.json").read_text()
    steps = list(STEPS)
    steps.insert(steps.index(packages) + 1, fail)
    with pytest.raises(Broken):
        provision(project, tmp_path, steps=steps)
    project_dir = tmp_path / PROJECT
    assert sorted(p.name for p in project_dir.iterdir() if not p.name.startswith(".")) == ["prod_00", "state"]
    assert hidden_folders(project_dir) == []
    assert (project_dir / "state" / "state.json").read_text() == state  # no record of the failed run
    assert provision(project, tmp_path).prod_dir.name == "prod_01"


def test_a_step_failing_before_the_prod_folder_is_in_place_records_nothing(tmp_path, sample_project_file):
    project = load_project(sample_project_file)
    steps = list(STEPS)
    steps.insert(steps.index(publish_prod_folder), fail)
    with pytest.raises(Broken):
        provision(project, tmp_path, steps=steps)
    project_dir = tmp_path / PROJECT
    assert not (project_dir / "prod_00").exists() and hidden_folders(project_dir) == []
    assert '"last_prod": -1' in (project_dir / "state" / "state.json").read_text()
