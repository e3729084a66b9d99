"""``project.yml`` -> ``flare provision``: kits, or an error naming the file and the field, and nothing written."""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import pytest
from hostile_support import broken_bytes, examples, hostile_scalars, hostile_values, yaml_text
from hypothesis import example, given
from hypothesis import strategies as st

from flare_provider.cli import main as flare
from flare_provider.provisioning import ProjectError, load_project

GOOD = {
    "api_version": 3,
    "name": "demo",
    "participants": [
        {"name": "server1", "type": "server", "org": "lead", "host_names": ["relay.example"], "fed_learn_port": 8002},
        {"name": "site-1", "type": "client", "org": "a", "agent_host": "10.0.0.1", "agent_port": 8102,
         "connect": "listen", "enable_byoc": False,
         "components": {"resource_manager": {"args": {"resources": {"gpu": [0, 1]}}}}},
        {"name": "admin@lead", "type": "admin", "org": "lead", "role": "project_admin"},
    ],
    "builders": [{"path": "nvflare.lighter.impl.cert.CertBuilder", "args": {}}],
}
FIELDS = {  # participant index -> the fields a user may write there
    0: ["name", "type", "org", "host_names", "default_host", "fed_learn_port", "admin_port", "enable_byoc"],
    1: ["name", "type", "org", "agent_host", "agent_port", "connect", "enable_byoc", "components"],
    2: ["name", "type", "org", "role", "roles"],
}
TOP_FIELDS = ["api_version", "name", "description", "participants", "builders"]


def provision_text(text: str | bytes) -> tuple[int, str, Path, Path]:
    """``flare provision`` of ``text``: exit code, stderr, the project file, the workspace (gone after)."""
    folder = Path(tempfile.mkdtemp(prefix="project-prop-"))
    project_file = folder / "project.yml"
    project_file.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    workspace = folder / "workspace"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = flare(["provision", "-p", str(project_file), "-w", str(workspace)])
    return code, err.getvalue(), project_file, workspace


def check_outcome(code: int, err: str, project_file: Path, workspace: Path, *names: str) -> None:
    try:
        assert code in (0, 2)
        if code == 2:
            assert err.startswith("error: ") and str(project_file) in err, err
            for name in names:
                assert name in err, f"{name!r} not named in {err!r}"
            assert not workspace.exists(), "a refused project wrote into the workspace"
        else:
            assert list(workspace.glob("*/prod_00/*.zip")), "provisioning succeeded without kits"
    finally:
        import shutil

        shutil.rmtree(project_file.parent, ignore_errors=True)


SLOTS = [(index, field) for index, fields in FIELDS.items() for field in fields]


@examples(80)
@given(slot=st.sampled_from(SLOTS), value=hostile_values())
@example(slot=(1, "type"), value=["client"]).via("a list (was TypeError: unhashable type)")
@example(slot=(1, "type"), value=7)
@example(slot=(2, "role"), value=["project_admin"]).via("a list (was TypeError: unhashable type)")
@example(slot=(1, "name"), value="site-1\n").via("a trailing newline (was accepted)")
@example(slot=(1, "agent_host"), value="host\n").via("a trailing newline (was accepted)")
@example(slot=(1, "components"), value={"resource_manager": {"args": {"num_of_gpus": 10**12}}}).via("was a hang")
@example(slot=(0, "org"), value="\udcff")
@example(slot=(0, "org"), value="o" * 300)
def test_one_hostile_participant_field_is_named_or_provisions(slot, value):
    index, field = slot
    doc = copy.deepcopy(GOOD)
    doc["participants"][index][field] = value
    code, err, project_file, workspace = provision_text(yaml_text(doc))
    # A bad name cannot name its participant; any other field is named with its participant.
    named = [] if field == "name" else [field, repr(GOOD["participants"][index]["name"])]
    check_outcome(code, err, project_file, workspace, *named)


@examples(40)
@given(field=st.sampled_from(TOP_FIELDS), value=hostile_values())
@example(field="api_version", value=3.0)
@example(field="participants", value=[None, []])
def test_one_hostile_top_level_field_is_named_or_provisions(field, value):
    doc = copy.deepcopy(GOOD)
    doc[field] = value
    code, err, project_file, workspace = provision_text(yaml_text(doc))
    check_outcome(code, err, project_file, workspace, *([field] if field != "participants" or code == 2 and "participants" in err else []))


@examples(60)
@given(doc=hostile_values(max_leaves=12))
def test_any_yaml_document_provisions_or_is_refused(doc):
    code, err, project_file, workspace = provision_text(yaml_text(doc))
    check_outcome(code, err, project_file, workspace)


@examples(60)
@given(raw=broken_bytes)
def test_broken_bytes_are_refused_naming_the_file(raw):
    code, err, project_file, workspace = provision_text(raw)
    check_outcome(code, err, project_file, workspace)


@examples(40)
@given(participants=st.lists(st.fixed_dictionaries({"name": st.sampled_from(["s1", "s2", "c1", "c1", "x"]),
                                                    "type": st.sampled_from(["server", "client", "admin", "overseer"]),
                                                    "org": st.sampled_from(["o", "", "p"])},
                                                   optional={"role": st.sampled_from(["lead", "member", "god"]),
                                                             "host_names": st.lists(hostile_scalars, max_size=2),
                                                             "fed_learn_port": st.sampled_from([8002, 8002, 1, 0])}),
                                 max_size=6))
def test_duplicates_and_mixes_of_participants(participants):
    doc = {"api_version": 3, "name": "mix", "participants": participants}
    code, err, project_file, workspace = provision_text(yaml_text(doc))
    check_outcome(code, err, project_file, workspace)


def test_a_participant_type_that_is_a_list_names_the_participant_and_field(tmp_path):
    path = tmp_path / "project.yml"
    doc = copy.deepcopy(GOOD)
    doc["participants"][1]["type"] = ["client"]
    path.write_text(yaml_text(doc))
    with pytest.raises(ProjectError, match=r"participant 'site-1': type: unknown participant type \['client'\]"):
        load_project(path)
