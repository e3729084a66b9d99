"""The files of a participant's startup kit: ``<participant>/startup`` (signed) and ``local/``.

Each writer adds one part of a kit; the provisioning steps (:mod:`.steps`) call them in order:
the identity first, then the files of the participant's kind, the signature last.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from string import Template

from .certs import Identity
from .project import Participant, Project
from .signature import ROOT_CA_FILE, sign_folder

STARTUP = "startup"
LOCAL = "local"
SITE_SETTINGS = "site.yaml"
AGENT_CONFIG = "agent.json"
SERVER_CONFIG = "server.json"
ADMIN_CONFIG = "admin.json"
CONNECTIONS_FILE = "connections.json"
CONNECTION_TYPE = "flare"


def cert_file(name: str) -> str:
    return f"{name}.crt"


def key_file(name: str) -> str:
    return f"{name}.key"


def connection_id(project_name: str) -> str:
    """The Airflow connection id of a federation's server identity."""
    return "flare_" + re.sub(r"[^A-Za-z0-9_]", "_", project_name)


def _template(name: str) -> Template:
    return Template(resources.files(__package__).joinpath("templates", name).read_text())


def _write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask must not widen or narrow what we asked for


def _write_json(path: Path, doc: dict, mode: int = 0o644) -> None:
    _write(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", mode)


def site_endpoints(project: Project) -> dict[str, dict]:
    """Every site as caller kits list it; ``connect`` says whether it is reached through the
    relays (``outbound``) or at ``host:port`` (``listen``)."""
    return {
        c.name: {"host": c.agent_host, "port": c.agent_port, "org": c.org, "gpus": list(c.gpus), "connect": c.connect}
        for c in project.clients
    }


def relay_endpoints(project: Project) -> list[dict]:
    """Every server participant's relay, in project order, as ``RelayEndpoint.from_dict`` reads it."""
    return [{"name": s.name, "host": s.relay_host, "port": s.fed_learn_port} for s in project.servers]


def _relay_list(project: Project) -> str:
    """The relays for a human: ``server1 (host:8002), server2 (host:8102)``."""
    return ", ".join(f"{r['name']} ({r['host']}:{r['port']})" for r in relay_endpoints(project))


def _write_scripts(startup: Path, values: dict, **script: str) -> None:
    """``start.sh`` and ``stop.sh``: one pair of templates for a site's agent and a server's relay."""
    for name in ("start.sh", "stop.sh"):
        _write(startup / name, _template(name).substitute(values, **script), 0o755)


def write_identity(kit_dir: Path, participant: Participant, identity: Identity, root: Identity) -> None:
    """Create ``kit_dir/startup`` with the participant's certificate and key and the root CA."""
    startup = kit_dir / STARTUP
    startup.mkdir(parents=True)
    _write(startup / cert_file(participant.name), identity.cert_pem)
    _write(startup / key_file(participant.name), identity.key_pem, 0o600)
    _write(startup / ROOT_CA_FILE, root.cert_pem)


def sign_kit(kit_dir: Path, root: Identity) -> None:
    """Sign the kit's ``startup/`` as it is now; any later change there is caught."""
    sign_folder(kit_dir / STARTUP, root)


def _common_values(project: Project, participant: Participant, root: Identity) -> dict[str, str]:
    """What every kit's templates are filled with."""
    return {
        "project": project.name,
        "org": participant.org,
        "root_fingerprint": root.fingerprint,
        "site": participant.name,
    }


def write_client_kit(kit_dir: Path, project: Project, site: Participant, root: Identity) -> None:
    """A site's agent configuration, scripts and readme in ``startup/``, its settings in ``local/``."""
    startup = kit_dir / STARTUP
    config = {
        "project": project.name,
        "site": site.name,
        "org": site.org,
        "server": project.server.name,  # kits from before several servers name only this one
        "servers": [s.name for s in project.servers],
        "relays": relay_endpoints(project),
        "listen_host": "0.0.0.0",
        "port": site.agent_port,
        "agent_host": site.agent_host,
        "cert": cert_file(site.name),
        "key": key_file(site.name),
        "root_ca": ROOT_CA_FILE,
        "root_fingerprint": root.fingerprint,
    }
    _write_json(startup / AGENT_CONFIG, config)
    values = {
        **_common_values(project, site, root),
        "port": site.agent_port,
        "agent_host": site.agent_host,
        "docker_image": project.docker_image,
        "relays": _relay_list(project),
    }
    _write_scripts(startup, values, what=f"site agent of {site.name}", process="agent", command="flare-agent start",
                   after_stop="Running tasks are recorded so the server can re-attach or retry.")
    docker_line = ""
    if project.docker_image:
        _write(startup / "docker.sh", _template("docker.sh").substitute(values), 0o755)
        docker_line = f"Docker:  DATA_DIR=/path/to/data startup/docker.sh   (image {project.docker_image})\n"
    if site.connect == "listen":
        reach = (f"The Airflow side reaches this agent at {site.agent_host}:{site.agent_port} (gRPC, mutual TLS).\n"
                 "Open that port to the Airflow workers and triggerer only.")
    else:
        reach = (f"The agent dials out to the relays {_relay_list(project)}\n"
                 "and keeps those connections open; the Airflow side reaches it through them (gRPC,\n"
                 "mutual TLS end to end). The site opens no inbound port: allow outbound TCP to the\n"
                 "relays only, through an HTTP proxy if the site needs one (see local/site.yaml).")
    readme = _template("readme_client.txt").substitute(values, docker_line=docker_line, reach=reach)
    _write(startup / "readme.txt", readme)

    local = kit_dir / LOCAL
    local.mkdir()
    settings = _template("site.yaml").substitute(
        site=site.name,
        data_dir="data",
        gpus=json.dumps(list(site.gpus)),
        allow_custom_code="true" if site.enable_byoc else "false",
        work_dir="work",
        connect=site.connect,
        port=site.agent_port,
    )
    _write(local / SITE_SETTINGS, settings)


def write_server_kit(kit_dir: Path, project: Project, server: Participant, identity: Identity, root: Identity) -> None:
    """The server's configuration, its Airflow connection (private key included) and readme."""
    startup = kit_dir / STARTUP
    sites = site_endpoints(project)
    config = {
        "project": project.name,
        "server": server.name,
        "org": server.org,
        "cert": cert_file(server.name),
        "key": key_file(server.name),
        "root_ca": ROOT_CA_FILE,
        "root_fingerprint": root.fingerprint,
        "sites": sites,
        "relays": relay_endpoints(project),
        # Where this server's own relay listens (`flare relay start`, startup/start.sh): "::" is
        # every address of its machine, IPv6 and IPv4 (IPv4 alone where the machine has no IPv6).
        "relay": {"host": "::", "port": server.fed_learn_port},
    }
    _write_json(startup / SERVER_CONFIG, config)
    conn_id = connection_id(project.name)
    connection = {
        conn_id: {
            "conn_type": CONNECTION_TYPE,
            "description": f"Server identity {server.name!r} of federation {project.name!r}",
            # The private key goes into the masked password field; the rest is public.
            "login": server.name,
            "password": identity.key_pem.decode(),
            "extra": json.dumps(
                {
                    "project": project.name,
                    "cert_pem": identity.cert_pem.decode(),
                    "root_ca_pem": root.cert_pem.decode(),
                    "sites": sites,
                    "relays": relay_endpoints(project),
                }
            ),
        }
    }
    _write_json(startup / CONNECTIONS_FILE, connection, 0o600)
    values = {**_common_values(project, server, root), "server": server.name, "port": server.fed_learn_port}
    _write_scripts(startup, values, what=f"relay {server.name}", process="relay", command="flare relay start",
                   after_stop="The sites keep trying to attach and come back once it runs again.", relays="")
    others = [s.name for s in project.servers if s.name != server.name]
    # With several servers (HA) every site attaches to every relay; Airflow needs only one
    # of the server kits and reaches a site through whichever relay answers.
    ha_note = (
        f"\nThe sites attach to the other relays too ({', '.join(others)}). Import one server\n"
        "kit's connection: Airflow reaches a site through whichever relay answers.\n"
        if others
        else ""
    )
    _write(
        startup / "readme.txt",
        _template("readme_server.txt").substitute(values, conn_id=conn_id, ha_note=ha_note),
    )


def write_admin_kit(kit_dir: Path, project: Project, admin: Participant, root: Identity) -> None:
    """An admin's configuration (role and the sites it may call) and readme."""
    startup = kit_dir / STARTUP
    config = {
        "project": project.name,
        "admin": admin.name,
        "org": admin.org,
        "role": admin.role,
        "server": project.server.name,
        "cert": cert_file(admin.name),
        "key": key_file(admin.name),
        "root_ca": ROOT_CA_FILE,
        "root_fingerprint": root.fingerprint,
        "sites": site_endpoints(project),
        "relays": relay_endpoints(project),
    }
    _write_json(startup / ADMIN_CONFIG, config)
    _write(
        startup / "readme.txt",
        _template("readme_admin.txt").substitute(
            _common_values(project, admin, root),
            admin=admin.name,
            role=admin.role,
            admin_kit_hint=f"<path to>/{admin.name}",
        ),
    )
