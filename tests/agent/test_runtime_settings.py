"""Site settings from a real kit's local/site.yaml, and clear errors for bad ones."""

from __future__ import annotations

import shutil

import pytest
from runtime_support import OTHER_SITE, SITE, provision_federation

from site_agent.errors import SettingsError
from site_agent.site_settings import load_site_settings, site_settings_path


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return provision_federation(tmp_path_factory.mktemp("workspace"))


def test_settings_of_provisioned_kits(fed):
    kit = fed.kits[SITE]
    settings = load_site_settings(kit)
    assert settings.data_dir == (kit / "data").resolve()
    assert settings.work_dir == (kit / "work").resolve()
    assert settings.gpus == (0, 1)  # from the site's resource manager in project.yml
    assert settings.allow_custom_code is True  # enable_byoc: true
    assert settings.max_concurrent_cpu_tasks == 2
    assert settings.preload_modules == ("torch",)
    other = load_site_settings(fed.kits[OTHER_SITE])
    assert (other.gpus, other.allow_custom_code) == ((), False)


def test_site_edits_are_honoured(fed, tmp_path):
    kit = shutil.copytree(fed.kits[OTHER_SITE], tmp_path / "kit")
    site_settings_path(kit).write_text(
        "data_dir: /srv/data\nwork_dir: ../agent-work\ngpus: [3]\nallow_custom_code: true\nmax_concurrent_cpu_tasks: 4\n"
        "preload_modules: [torch, torchvision.models]\n"
    )
    settings = load_site_settings(kit)
    assert str(settings.data_dir) == "/srv/data"
    assert settings.work_dir == (tmp_path / "agent-work").resolve()
    assert (settings.gpus, settings.allow_custom_code, settings.max_concurrent_cpu_tasks) == ((3,), True, 4)
    assert settings.preload_modules == ("torch", "torchvision.models")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data_dir: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("work_dir: work\n", "'data_dir' is required"),
        ("data_dir: d\nwork_dir: w\ngpus: 0\n", "'gpus' must be a list"),
        ("data_dir: d\nwork_dir: w\ngpus: [0, -1]\n", "non-negative integer GPU ids"),
        ("data_dir: d\nwork_dir: w\ngpus: [1, 1]\n", "lists a GPU more than once"),
        ("data_dir: d\nwork_dir: w\nallow_custom_code: 'yes'\n", "'allow_custom_code' must be true or false"),
        ("data_dir: d\nwork_dir: w\nmax_concurrent_cpu_tasks: 0\n", "'max_concurrent_cpu_tasks' must be"),
        ("data_dir: d\nwork_dir: w\npreload_modules: torch\n", "'preload_modules' must be a list of module names"),
        ("data_dir: d\nwork_dir: w\npreload_modules: ['os; rm']\n", "'preload_modules' must be a list of module names"),
        ("data_dir: d\nwork_dir: w\nallow_custom_cod: true\n", r"unknown setting\(s\) \['allow_custom_cod'\]"),
    ],
)
def test_bad_settings_name_file_and_field(fed, tmp_path, text, message):
    kit = shutil.copytree(fed.kits[OTHER_SITE], tmp_path / "kit")
    site_settings_path(kit).write_text(text)
    with pytest.raises(SettingsError, match=message) as caught:
        load_site_settings(kit)
    assert str(site_settings_path(kit).resolve()) in str(caught.value)


def test_missing_settings_file(tmp_path):
    with pytest.raises(SettingsError, match="site.yaml: site settings file is missing"):
        load_site_settings(tmp_path)
