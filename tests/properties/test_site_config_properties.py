"""What ``flare-agent start`` reads first: ``local/site.yaml`` and the kit's ``startup/agent.json``.

Either settings come back, or the site's own error (``SettingsError``, ``ConfigError``)
names the file and the field; nothing in the kit changes.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

from hostile_support import broken_bytes, examples, hostile_values, json_safe, yaml_text
from hypothesis import example, given
from hypothesis import strategies as st

from site_agent.errors import SettingsError
from site_agent.kit_config import AgentConfig, ConfigError, load_agent_config
from site_agent.site_settings import SiteSettings, load_site_settings

GOOD_SETTINGS = {"data_dir": "data", "work_dir": "work", "gpus": [0], "allow_custom_code": False,
                 "max_concurrent_cpu_tasks": 2, "preload_modules": ["torch"], "connect": "outbound",
                 "proxy": "http://proxy.example:3128", "no_proxy": "relay.lan, 10.0.0.0/8"}
GOOD_AGENT = {"project": "demo", "site": "site-1", "org": "a", "server": "server1", "servers": ["server1"],
              "listen_host": "0.0.0.0", "port": 8102, "cert": "site-1.crt", "key": "site-1.key", "root_ca": "rootCA.pem",
              "relays": [{"name": "server1", "host": "relay.example", "port": 8002}]}


def kit_with(relative: str, raw: bytes) -> Path:
    kit = Path(tempfile.mkdtemp(prefix="kit-prop-"))
    (kit / relative).parent.mkdir(parents=True)
    (kit / relative).write_bytes(raw)
    return kit


def listing(kit: Path) -> dict[str, bytes]:
    return {p.relative_to(kit).as_posix(): p.read_bytes() for p in sorted(kit.rglob("*")) if p.is_file()}


def load_settings(raw: bytes, *named: str) -> None:
    kit = kit_with("local/site.yaml", raw)
    before = listing(kit)
    try:
        try:
            settings = load_site_settings(kit)
        except SettingsError as exc:
            assert str(kit / "local" / "site.yaml") in str(exc), exc
            for name in named:
                assert name in str(exc), f"{name!r} not named in {exc}"
        else:
            assert isinstance(settings, SiteSettings)
            assert settings.data_dir.is_absolute() and settings.work_dir.is_absolute()
        assert listing(kit) == before
    finally:
        shutil.rmtree(kit, ignore_errors=True)


@examples(150)
@given(field=st.sampled_from(sorted(GOOD_SETTINGS)), value=hostile_values())
@example(field="data_dir", value="a\x00b").via("was ValueError: embedded null byte")
@example(field="work_dir", value="/" + "x" * 5000)
@example(field="preload_modules", value=["torch\n"]).via("a trailing newline (was accepted)")
@example(field="proxy", value="http://[::1")
@example(field="proxy", value="http://h:99999")
@example(field="no_proxy", value="relay.lan:99999")
@example(field="no_proxy", value=["relay.lan", 8002])
@example(field="gpus", value=[0, 0])
def test_one_hostile_setting_is_named(field, value):
    doc = copy.deepcopy(GOOD_SETTINGS)
    doc[field] = value
    load_settings(yaml_text(doc).encode("utf-8"), field)


@examples(80)
@given(doc=hostile_values(max_leaves=10))
@example(doc={1: "a", "b": 2}).via("unknown keys of two types (was TypeError: '<' not supported)")
@example(doc={None: 1, "data_dir": "d"})
def test_any_yaml_document_gives_settings_or_a_settings_error(doc):
    load_settings(yaml_text(doc).encode("utf-8"))


@examples(60)
@given(raw=broken_bytes)
def test_broken_site_yaml_bytes_are_refused_naming_the_file(raw):
    load_settings(raw)


def load_config(raw: bytes, *named: str) -> None:
    kit = kit_with("startup/agent.json", raw)
    before = listing(kit)
    try:
        try:
            config = load_agent_config(kit)
        except ConfigError as exc:
            assert str(kit / "startup" / "agent.json") in str(exc), exc
            for name in named:
                assert name in str(exc), f"{name!r} not named in {exc}"
        else:
            assert isinstance(config, AgentConfig)
            for path in (config.cert_file, config.key_file, config.root_ca_file):
                assert path.parent == kit / "startup" and path.name not in ("", ".", ".."), path
            assert all(isinstance(r.host, str) and 1 <= r.port <= 65535 for r in config.relays)
        assert listing(kit) == before
    finally:
        shutil.rmtree(kit, ignore_errors=True)


@examples(150)
@given(field=st.sampled_from(sorted(GOOD_AGENT)), value=hostile_values().map(json_safe))
@example(field="cert", value="..").via("was accepted: the startup folder's parent")
@example(field="key", value="a\x00b").via("was ValueError: embedded null byte at start")
@example(field="relays", value=[{"name": "r", "host": "h", "port": float("inf")}]).via("was OverflowError")
@example(field="relays", value=[{"name": "r", "host": "h", "port": 70000}]).via("was accepted")
@example(field="relays", value=[{"name": ["r"], "host": None, "port": 1}]).via("was accepted as 'None'")
def test_one_hostile_agent_json_field_is_named(field, value):
    doc = copy.deepcopy(GOOD_AGENT)
    doc[field] = value
    load_config(json.dumps(doc).encode(), field)


@examples(60)
@given(doc=hostile_values(max_leaves=10).map(json_safe))
def test_any_json_document_gives_a_config_or_a_config_error(doc):
    load_config(json.dumps(doc).encode())


@examples(60)
@given(raw=broken_bytes)
def test_broken_agent_json_bytes_are_refused_naming_the_file(raw):
    load_config(raw)
