"""The site's own settings: ``<kit>/local/site.yaml``, which the site's IT may edit.

They are outside the signed ``startup/`` folder on purpose: where the data lives,
which GPUs the agent may use and whether apps may bring their own code are the
site's decisions, not the federation's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flare_provider.provisioning.kits import LOCAL, SITE_SETTINGS

from .consent.policy import ConsentConfigError, CustomCodePolicy, parse_custom_code
from .errors import SettingsError
from .privacy import PrivacyConfigError, PrivacyPolicy, parse_policy
from .runtime.metric_series import MetricsPolicy, parse_metrics_policy

_REQUIRED = ("data_dir", "work_dir")
_KNOWN = {"data_dir", "work_dir", "gpus", "allow_custom_code", "max_concurrent_cpu_tasks", "preload_modules", "connect",
          "proxy", "no_proxy", "relay_data", "privacy", "share_local_model", "data_version"}
_KNOWN |= {"metrics"}  # docs/tracking.md: which training-curve metrics leave the site, how many points
_KNOWN |= {"custom_code", "python"}  # docs/apps.md, "What a site accepts"
CONNECT_MODES = ("outbound", "listen")
RELAY_DATA_MODES = ("plain", "tls")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")  # \Z: no final newline


@dataclass(frozen=True)
class SiteSettings:
    """What the agent needs from ``site.yaml``; paths are absolute."""

    data_dir: Path
    work_dir: Path
    gpus: tuple[int, ...]  # GPU ids this agent may use; () = CPU only
    allow_custom_code: bool  # BYOC opt-in, off by default
    max_concurrent_cpu_tasks: int = 2
    # imported once by the worker launcher, so that tasks do not import them each time
    preload_modules: tuple[str, ...] = ("torch",)
    # outbound: attach to the kit's relays and open no port; listen: serve on the kit's port (a LAN);
    # None (a kit from before relays): outbound when the kit lists relays
    connect: str | None = None
    proxy: str | None = None  # http://[user:password@]host:port for dialling out; default $https_proxy
    # relays dialled directly although ``proxy`` is set (a no_proxy list); the environment's
    # no_proxy goes with $https_proxy only (site_agent/relay_proxies.py)
    no_proxy: str | None = None
    # plain: a path's data connection is TCP carrying only the end-to-end TLS session (fastest);
    # tls: wrapped in TLS to the relay as well, for proxies that let nothing else through
    relay_data: str = "plain"
    # the filters every result goes through before it leaves the site (docs/privacy.md)
    privacy: PrivacyPolicy = PrivacyPolicy()
    # whether the server may keep this site's last local model and send it to the other
    # sites for cross-site evaluation (docs/cross_site_eval.md); off by default
    share_local_model: bool = False
    # which apps' custom code runs here (allow-list, signers, approval); from custom_code or
    # allow_custom_code (docs/apps.md, "What a site accepts")
    custom_code: CustomCodePolicy = CustomCodePolicy()
    # the interpreter workers run in (a prepared environment with the apps' requirements);
    # None: the agent's own
    python: Path | None = None
    # the version of the site's data as the site states it (docs/assets.md); None: the agent
    # reports a digest of the data folder's listing instead
    data_version: str | None = None
    # which reported metrics travel with a task's state, and how thinned (docs/tracking.md)
    metrics: MetricsPolicy = MetricsPolicy()

    def __post_init__(self) -> None:
        if self.allow_custom_code and not self.custom_code.may_run_any:  # settings built without custom_code
            object.__setattr__(self, "custom_code", CustomCodePolicy(allow_all=True))


def site_settings_path(kit_dir: Path) -> Path:
    return Path(kit_dir) / LOCAL / SITE_SETTINGS


def load_site_settings(kit_dir: Path) -> SiteSettings:
    """Read ``<kit_dir>/local/site.yaml``; relative paths are taken from ``kit_dir``.

    Raises :class:`SettingsError` naming the file and the field at fault.
    """
    kit_dir = Path(kit_dir).resolve()
    path = site_settings_path(kit_dir)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{path}: site settings file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read site settings: {exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise SettingsError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    return parse_site_settings(doc, kit_dir, source=str(path))


def parse_site_settings(doc: Any, base_dir: Path, source: str = "site.yaml") -> SiteSettings:
    """Validate a parsed ``site.yaml`` document; see :func:`load_site_settings`."""
    if not isinstance(doc, dict):
        raise SettingsError(f"{source}: expected a mapping of settings, found {type(doc).__name__}")
    unknown = sorted(set(doc) - _KNOWN, key=repr)  # keys may be numbers or null as well
    if unknown:
        raise SettingsError(f"{source}: unknown setting(s) {unknown}; known settings are {sorted(_KNOWN)}")
    for name in _REQUIRED:
        if doc.get(name) in (None, ""):
            raise SettingsError(f"{source}: '{name}' is required (a folder path)")
    return SiteSettings(
        data_dir=_path(doc["data_dir"], base_dir, "data_dir", source),
        work_dir=_path(doc["work_dir"], base_dir, "work_dir", source),
        gpus=_gpus(doc.get("gpus"), source),
        allow_custom_code=_bool(doc.get("allow_custom_code", False), "allow_custom_code", source),
        max_concurrent_cpu_tasks=_positive_int(doc.get("max_concurrent_cpu_tasks", 2), "max_concurrent_cpu_tasks", source),
        preload_modules=_modules(doc.get("preload_modules", list(SiteSettings.preload_modules)), source),
        connect=_choice(doc.get("connect"), CONNECT_MODES, "connect", source) if doc.get("connect") is not None else None,
        proxy=_proxy(doc.get("proxy"), source),
        no_proxy=_no_proxy(doc.get("no_proxy"), doc.get("proxy"), source),
        relay_data=_choice(doc.get("relay_data", "plain"), RELAY_DATA_MODES, "relay_data", source),
        privacy=_privacy(doc.get("privacy"), source),
        share_local_model=_bool(doc.get("share_local_model", False), "share_local_model", source),
        custom_code=_custom_code(doc.get("custom_code"), doc.get("allow_custom_code", False), source),
        python=_python(doc.get("python"), base_dir, source),
        data_version=data_version_setting(doc, source),
        metrics=parse_metrics_policy(doc.get("metrics"), source),
    )


def data_version_setting(doc: Any, source: str = "site.yaml") -> str | None:
    """``data_version`` of a parsed ``site.yaml``: text (a number is taken as its text), or None."""
    value = doc.get("data_version") if isinstance(doc, dict) else None
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SettingsError(f"{source}: 'data_version' must be text such as '2026-03' or a number, found {value!r}")
    text = str(value).strip()
    if not text or len(text) > 200 or any(ord(c) < 32 for c in text):
        raise SettingsError(f"{source}: 'data_version' must be one line of at most 200 characters, found {value!r}")
    return text


def _path(value: Any, base_dir: Path, field: str, source: str) -> Path:
    if not isinstance(value, str) or "\x00" in value:
        raise SettingsError(f"{source}: '{field}' must be a folder path, found {value!r}")
    try:
        path = Path(value).expanduser()
        return (path if path.is_absolute() else Path(base_dir) / path).resolve()
    except (OSError, RuntimeError) as exc:  # a name too long, a loop of links
        raise SettingsError(f"{source}: '{field}' is not a usable folder path: {exc}") from None


def _gpus(value: Any, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SettingsError(f"{source}: 'gpus' must be a list of GPU ids such as [0, 1] (or [] for CPU only), found {value!r}")
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in value):
        raise SettingsError(f"{source}: 'gpus' must hold non-negative integer GPU ids, found {value!r}")
    if len(set(value)) != len(value):
        raise SettingsError(f"{source}: 'gpus' lists a GPU more than once: {value!r}")
    return tuple(value)


def _modules(value: Any, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) and _MODULE_NAME.match(m) for m in value):
        raise SettingsError(f"{source}: 'preload_modules' must be a list of module names such as [torch], found {value!r}")
    return tuple(value)


def _choice(value: Any, choices: tuple[str, ...], field: str, source: str) -> str:
    if value not in choices:
        raise SettingsError(f"{source}: '{field}' must be one of {', '.join(choices)}, found {value!r}")
    return value


def _proxy(value: Any, source: str) -> str | None:
    if value in (None, ""):
        return None
    from flare_provider.relay.dial import HttpProxy

    if not isinstance(value, str):
        raise SettingsError(f"{source}: 'proxy' must be a URL such as http://proxy.example:3128, found {value!r}")
    try:
        HttpProxy.from_url(value)
    except ValueError as exc:
        raise SettingsError(f"{source}: 'proxy': {exc}") from None
    return value


def _no_proxy(value: Any, proxy: Any, source: str) -> str | None:
    """A no_proxy list as text (``a, b`` or a YAML list), checked entry by entry."""
    if value in (None, "", []):
        return None
    from .relay_proxies import NoProxy

    if isinstance(value, list) and all(isinstance(entry, str) for entry in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise SettingsError(f"{source}: 'no_proxy' must be a list of hosts such as [relay.lan, 10.0.0.0/8] "
                            f"or text 'relay.lan, 10.0.0.0/8', found {value!r}")
    if proxy in (None, ""):
        raise SettingsError(f"{source}: 'no_proxy' names relays to reach without the proxy set by 'proxy', "
                            f"and there is no 'proxy' here (the environment's https_proxy goes with its own no_proxy)")
    try:
        NoProxy.parse(value)
    except ValueError as exc:
        raise SettingsError(f"{source}: 'no_proxy': {exc}") from None
    return value


def _privacy(value: Any, source: str) -> PrivacyPolicy:
    try:
        return parse_policy(value, f"{source}: privacy")
    except PrivacyConfigError as exc:
        raise SettingsError(str(exc)) from None


def _custom_code(value: Any, allow_custom_code: Any, source: str) -> CustomCodePolicy:
    try:
        return parse_custom_code(value, allow_custom_code is True, source)
    except ConsentConfigError as exc:
        raise SettingsError(str(exc)) from None


def _python(value: Any, base_dir: Path, source: str) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise SettingsError(f"{source}: 'python' must be the path of a Python interpreter, found {value!r}")
    # not resolved: a virtual environment's bin/python is a link, and its target is another environment
    path = Path(value).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.is_file() or not os.access(path, os.X_OK):
        raise SettingsError(f"{source}: 'python' must name a Python interpreter to run tasks with "
                            f"(e.g. /opt/venv/bin/python); {path} is not an executable file")
    return path


def _bool(value: Any, field: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{source}: '{field}' must be true or false, found {value!r}")
    return value


def _positive_int(value: Any, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError(f"{source}: '{field}' must be a whole number of at least 1, found {value!r}")
    return value
