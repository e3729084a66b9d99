"""Reading and validating an NVIDIA FLARE style ``project.yml`` (api_version 2 and 3).

Everything is checked before anything is written: a bad file raises
:class:`ProjectError` naming the file, the participant and the field.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_API_VERSIONS = (2, 3)
DEFAULT_AGENT_PORT = 8102
DEFAULT_FED_LEARN_PORT = 8002
DEFAULT_ADMIN_PORT = 8003
# How a site's agent is reached: it dials out to the relays (no inbound port at the site),
# or, on a LAN where the Airflow side can reach it, it listens on its agent_port.
CONNECT_MODES = ("outbound", "listen")
DEFAULT_CONNECT = "outbound"
# NVIDIA FLARE's overseer picks the active server of an HA pair; here nothing needs one.
OVERSEER_NOTE = "Airflow's scheduler plays the overseer's part (retries and failover)"

# Admin roles as NVIDIA FLARE names them, with the aliases its versions used.
ADMIN_ROLES = {"project_admin": "project_admin", "proj_admin": "project_admin", "super": "project_admin",
               "org_admin": "org_admin", "lead": "lead", "member": "member"}

# A name becomes a certificate CN (at most 64 characters) and a folder name.
# \Z, not $: "$" also matches before a final newline, which must not reach a file name.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
_HOST_RE = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.-]{0,252})\Z")
# An org becomes a certificate's O (at most 64 characters, RFC 5280): printable text only.
_ORG_MAX = 64
_MAX_GPUS = 1024  # more GPU ids than any machine has: a typo, not a site

# Builders whose job this project does; any other builder path is reported as ignored.
HONOURED_BUILDERS = {
    "WorkspaceBuilder": "workspace layout (prod_NN, state/)", "TemplateBuilder": "kit templates",
    "StaticFileBuilder": "kit configuration and scripts", "CertBuilder": "certificates",
    "SignatureBuilder": "startup kit signatures", "DistributionBuilder": "kit zip packages",
}

# client_components / server_components are YAML anchor holders in NVIDIA FLARE's
# examples; what they carry is read where participants use them.
_KNOWN_TOP_LEVEL = {"api_version", "name", "description", "participants", "builders", "client_components", "server_components"}
# Keys NVIDIA FLARE knows that this project has no use for: a warning, never an error.
_FLARE_TOP_LEVEL = {"config_folder", "custom_folder"}
_OVERSEER_TOP_LEVEL = {"overseer", "ha_mode"}
_COMMON_KEYS = {"name", "type", "org"}
_PARTICIPANT_KEYS = {
    "server": _COMMON_KEYS | {"fed_learn_port", "admin_port", "host_names", "default_host", "enable_byoc"},
    "client": _COMMON_KEYS | {"agent_host", "agent_port", "connect", "enable_byoc", "components", "listening_host"},
    "admin": _COMMON_KEYS | {"role", "roles"},
}
_FLARE_PARTICIPANT_KEYS = {"components", "listening_host", "default_host", "connection_security", "scheme", "protocol"}


class ProjectError(ValueError):
    """A project.yml that cannot be provisioned; the message names file, participant and field."""


@dataclass(frozen=True)
class Participant:
    name: str
    type: str  # "server", "client" or "admin"
    org: str
    role: str | None = None  # admins only
    host_names: tuple[str, ...] = ()  # names and addresses the participant is reached at
    fed_learn_port: int | None = None
    admin_port: int | None = None
    agent_host: str | None = None
    agent_port: int | None = None
    enable_byoc: bool = False
    gpus: tuple[int, ...] = ()
    connect: str | None = None  # clients only: one of CONNECT_MODES

    @property
    def relay_host(self) -> str:
        """Where sites reach this server's relay: its first host name (``default_host`` when
        ``host_names`` is empty), else its participant name."""
        return self.host_names[0] if self.host_names else self.name

    @property
    def subject_alt_names(self) -> tuple[str, ...]:
        names = [self.name, *self.host_names]
        if self.agent_host:
            names.append(self.agent_host)
        return tuple(dict.fromkeys(names))  # de-duplicated, order kept


@dataclass(frozen=True)
class Builder:
    path: str
    args: dict[str, Any]

    @property
    def short_name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def honoured(self) -> bool:
        return self.short_name in HONOURED_BUILDERS


@dataclass(frozen=True)
class Project:
    name: str
    description: str
    api_version: int
    participants: tuple[Participant, ...]
    builders: tuple[Builder, ...] = ()
    docker_image: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def servers(self) -> tuple[Participant, ...]:
        """Every server participant, in project order: each is an Airflow-side identity and a relay."""
        return tuple(p for p in self.participants if p.type == "server")

    @property
    def server(self) -> Participant:
        """The first server participant (its org is the root CA's; older kits name only it)."""
        return self.servers[0]

    @property
    def clients(self) -> tuple[Participant, ...]:
        return tuple(p for p in self.participants if p.type == "client")

    @property
    def admins(self) -> tuple[Participant, ...]:
        return tuple(p for p in self.participants if p.type == "admin")

    def participant(self, name: str) -> Participant:
        for p in self.participants:
            if p.name == name:
                return p
        raise ProjectError(f"project {self.name!r} has no participant named {name!r}")


def check_name(value: Any, where: str) -> str:
    """A participant or project name: usable as a certificate CN and as one path component."""
    if not isinstance(value, str) or not value:
        raise ProjectError(f"{where}: 'name' must be a non-empty string")
    if "/" in value or "\\" in value or ".." in value or not _NAME_RE.match(value):
        raise ProjectError(
            f"{where}: name {value!r} cannot be a certificate CN and a file name "
            "(use 1-64 letters, digits, '.', '_', '@', '-'; no path separators or '..')"
        )
    return value


def load_project(path: str | Path) -> Project:
    """Read and validate ``path``; raises :class:`ProjectError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{path}: cannot read project file: {exc}") from exc
    return parse_project(text, source=str(path))


def parse_project(text: str, source: str = "project.yml") -> Project:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProjectError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise ProjectError(f"{source}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise ProjectError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ProjectError(f"{source}: expected a YAML mapping at the top level, got {type(doc).__name__}")
    return _ProjectParser(doc, source).parse()


class _ProjectParser:
    def __init__(self, doc: dict[str, Any], source: str):
        self.doc = doc
        self.source = source
        self.warnings: list[str] = []

    def fail(self, where: str, message: str) -> ProjectError:
        return ProjectError(f"{self.source}: {where}: {message}")

    def parse(self) -> Project:
        doc = self.doc
        api_version = doc.get("api_version", 3)
        if api_version not in SUPPORTED_API_VERSIONS:
            raise self.fail("api_version", f"{api_version!r} is not supported (use 2 or 3)")
        if "name" not in doc:
            raise self.fail("name", "missing: the project needs a name")
        name = check_name(doc["name"], f"{self.source}: project")
        description = doc.get("description") or ""
        if not isinstance(description, str):
            raise self.fail("description", "must be a string")
        for key in doc:
            if key in _OVERSEER_TOP_LEVEL:
                self.warnings.append(f"top-level key {key!r} ignored: {OVERSEER_NOTE}")
            elif key in _FLARE_TOP_LEVEL:
                self.warnings.append(f"top-level key {key!r} is an NVIDIA FLARE setting this project does not use")
            elif key not in _KNOWN_TOP_LEVEL:
                self.warnings.append(f"unknown top-level key {key!r} ignored")

        participants = self.parse_participants(doc.get("participants"))
        builders, docker_image = self.parse_builders(doc.get("builders"))
        return Project(
            name=name,
            description=description,
            api_version=api_version,
            participants=participants,
            builders=builders,
            docker_image=docker_image,
            warnings=tuple(self.warnings),
        )

    def parse_participants(self, raw: Any) -> tuple[Participant, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.fail("participants", "must be a non-empty list")
        result: list[Participant] = []
        seen: set[str] = set()
        for index, item in enumerate(raw):
            where = f"participants[{index}]"
            if not isinstance(item, dict):
                raise self.fail(where, "each participant must be a mapping")
            name = check_name(item.get("name"), f"{self.source}: {where}")
            where = f"participant {name!r}"
            if name in seen:
                raise self.fail(where, "duplicate participant name")
            seen.add(name)
            kind = item.get("type")
            if kind == "overseer":
                self.warnings.append(f"{where}: overseer participants are not needed, {OVERSEER_NOTE}; ignored")
                continue
            if not isinstance(kind, str) or kind not in _PARTICIPANT_KEYS:
                raise self.fail(f"{where}: type", f"unknown participant type {kind!r} (use server, client or admin)")
            for key in item:
                if key not in _PARTICIPANT_KEYS[kind]:
                    note = "an NVIDIA FLARE setting this project does not use" if key in _FLARE_PARTICIPANT_KEYS else "unknown"
                    self.warnings.append(f"{where}: key {key!r} is {note}; ignored")
            org = item.get("org")
            if not isinstance(org, str) or not org.strip():
                raise self.fail(f"{where}: org", "missing: every participant needs an org")
            if len(org) > _ORG_MAX or not org.isprintable():
                raise self.fail(
                    f"{where}: org", f"{org!r} cannot be a certificate's organization (1-{_ORG_MAX} printable characters)"
                )
            result.append(getattr(self, f"parse_{kind}")(item, name, org, where))

        servers = [p for p in result if p.type == "server"]
        if not servers:
            raise self.fail("participants", "no participant of type 'server' (the Airflow side's identity)")
        self.check_relay_addresses(servers)
        return tuple(result)

    def check_relay_addresses(self, servers: list[Participant]) -> None:
        """Two relays on one host and port could not both listen; sites would reach only one."""
        taken: dict[tuple[str, int], str] = {}
        for server in servers:
            address = (server.relay_host, server.fed_learn_port)
            if address in taken:
                raise self.fail(
                    f"participant {server.name!r}: fed_learn_port",
                    f"{server.relay_host}:{server.fed_learn_port} is already the relay address of "
                    f"{taken[address]!r}; give each server its own host name or port",
                )
            taken[address] = server.name

    def port(self, item: dict[str, Any], key: str, where: str, default: int) -> int:
        value = item.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(f"{where}: {key}", f"bad port {value!r} (an integer from 1 to 65535)")
        return value

    def host(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"bad host name {value!r}")
        try:
            ipaddress.ip_address(value)
            if "%" not in value:  # a scope zone means something on one machine only
                return value
        except ValueError:
            pass
        if not _HOST_RE.match(value) or ".." in value:  # also refuses an IPv6 scope (fe80::1%eth0)
            raise self.fail(where, f"bad host name {value!r}")
        return value

    def flag(self, item: dict[str, Any], key: str, where: str) -> bool:
        value = item.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(f"{where}: {key}", f"must be true or false, got {value!r}")
        return value

    def parse_server(self, item, name, org, where) -> Participant:
        hosts = item.get("host_names", [])
        if not isinstance(hosts, list):
            raise self.fail(f"{where}: host_names", "must be a list of host names")
        host_names = tuple(self.host(h, f"{where}: host_names") for h in hosts)
        if "default_host" in item:
            host_names += (self.host(item["default_host"], f"{where}: default_host"),)
        return Participant(
            name=name,
            type="server",
            org=org,
            host_names=host_names,
            fed_learn_port=self.port(item, "fed_learn_port", where, DEFAULT_FED_LEARN_PORT),
            admin_port=self.port(item, "admin_port", where, DEFAULT_ADMIN_PORT),
            enable_byoc=self.flag(item, "enable_byoc", where),
        )

    def parse_client(self, item, name, org, where) -> Participant:
        agent_host = self.host(item.get("agent_host", name), f"{where}: agent_host")
        return Participant(
            name=name,
            type="client",
            org=org,
            agent_host=agent_host,
            agent_port=self.port(item, "agent_port", where, DEFAULT_AGENT_PORT),
            enable_byoc=self.flag(item, "enable_byoc", where),
            gpus=self.client_gpus(item.get("components"), where),
            connect=self.connect_mode(item, where),
        )

    def connect_mode(self, item: dict[str, Any], where: str) -> str:
        value = item.get("connect", DEFAULT_CONNECT)
        if value not in CONNECT_MODES:
            raise self.fail(
                f"{where}: connect",
                "must be outbound (the agent dials the relays) or listen (the agent serves on "
                f"agent_port), got {value!r}",
            )
        return value

    def client_gpus(self, components: Any, where: str) -> tuple[int, ...]:
        """GPU ids from NVIDIA FLARE's ``components.resource_manager.args.resources.gpu``."""
        if components is None:
            return ()
        if not isinstance(components, dict):
            raise self.fail(f"{where}: components", "must be a mapping")
        manager = components.get("resource_manager") or {}
        args = manager.get("args") or {} if isinstance(manager, dict) else {}
        resources = args.get("resources") if isinstance(args, dict) else None
        if resources is None:
            if isinstance(args, dict) and "num_of_gpus" in args:
                count = args["num_of_gpus"]
                if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _MAX_GPUS:
                    raise self.fail(f"{where}: components.resource_manager.args.num_of_gpus", f"bad GPU count {count!r}")
                return tuple(range(count))
            return ()
        gpus = resources.get("gpu", []) if isinstance(resources, dict) else None
        if not isinstance(gpus, list) or any(
            isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < _MAX_GPUS for g in gpus
        ):
            raise self.fail(
                f"{where}: components.resource_manager.args.resources.gpu",
                f"must be a list of GPU ids (integers from 0 to {_MAX_GPUS - 1}), got {gpus!r}",
            )
        return tuple(gpus)

    def parse_admin(self, item, name, org, where) -> Participant:
        role = item.get("role")
        if role is None and isinstance(item.get("roles"), list) and item["roles"]:
            role = item["roles"][0]
        if role is None:
            raise self.fail(f"{where}: role", "missing: an admin needs a role (project_admin, org_admin, lead or member)")
        if not isinstance(role, str) or role not in ADMIN_ROLES:
            raise self.fail(f"{where}: role", f"unknown role {role!r} (use project_admin, org_admin, lead or member)")
        return Participant(name=name, type="admin", org=org, role=ADMIN_ROLES[role])

    def parse_builders(self, raw: Any) -> tuple[tuple[Builder, ...], str | None]:
        if raw is None:
            return (), None
        if not isinstance(raw, list):
            raise self.fail("builders", "must be a list")
        builders: list[Builder] = []
        docker_image = None
        for index, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise self.fail(f"builders[{index}]", "each builder needs a 'path'")
            args = item.get("args") or {}
            if not isinstance(args, dict):
                raise self.fail(f"builders[{index}] ({item['path']}): args", "must be a mapping")
            builder = Builder(path=item["path"], args=args)
            builders.append(builder)
            if not builder.honoured:
                self.warnings.append(f"builder {builder.path} ignored: its job is not part of this project")
                continue
            image = args.get("docker_image")
            if image:
                if not isinstance(image, str):
                    raise self.fail(f"builders[{index}] ({builder.path}): docker_image", "must be an image name")
                docker_image = image
            for key in args:
                if key == "overseer_agent":
                    self.warnings.append(f"builder {builder.short_name}: overseer_agent ignored: {OVERSEER_NOTE}")
        return tuple(builders), docker_image
