"""The ``flare`` command: provisioning, startup kits and operating a federation, without Airflow.

    flare provision -p project.yml -w WORKSPACE [--add-site NAME] [--password [PW]] [--sample PATH]
    flare kit verify DIR [--root-fingerprint SHA256]
    flare kit unpack PACKAGE [-d DEST] [--password PW]
    flare kit import-connection SERVER_KIT [--overwrite] [--root-fingerprint SHA256]
    flare status --kit KIT [--timeout SECONDS]
    flare abort SITE TASK_ID | --run RUN --federation NAME [SITE]  [--kit ADMIN_KIT]
    flare shutdown SITE [--yes] [--kit ADMIN_KIT]
    flare runs list --store URI | flare runs download RUN [--round N] [-o DIR] --store URI
    flare model export MODEL | --store URI --run RUN [--round N]  -o model.pt
    flare poc prepare -n N [-w WORKSPACE] | flare poc start | stop | clean [-w WORKSPACE]
    flare relay start --kit DIR [--host H] [--port N] [--root-fingerprint SHA256]
    flare approve [APP --version DIGEST [--reject]] --kit SITE_KIT [--list]
    flare simulate APP_DIR -w WORKSPACE -n SITES -r ROUNDS [--data DIR] [-t THREADS] [--gpus auto|none|0,1]

Admin commands (status, abort, shutdown) take their kit from ``--kit`` or ``$FLARE_KIT``
(the proof-of-concept workspace's ``admin.sh`` sets it); the agents decide by its role.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .admin import add_parsers as add_admin_parsers
from .admin.site_commands import KIT_ENV
from .poc.command import add_parser as add_poc_parser
from .provisioning import (
    GENERATE,
    KitVerificationError,
    ProjectError,
    WorkspaceStateError,
    load_project,
    provision,
    require_valid,
    verify_folder,
)
from .provisioning.kits import CONNECTIONS_FILE, SERVER_CONFIG, STARTUP
from .provisioning.packages import PackageError, is_encrypted, unpack

if TYPE_CHECKING:
    from .relay.tls import TlsIdentity

PASSWORD_ENV = "FLARE_KIT_PASSWORD"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(x.rstrip() for x in [fmt.format(*headers), line, *(fmt.format(*map(str, r)) for r in rows)])


def cmd_provision(args: argparse.Namespace) -> int:
    from .admin.sample_project import SampleExists, offer_sample, write_sample

    if args.sample:
        try:
            print(f"Wrote a commented sample project to {write_sample(args.sample)}: edit it, then flare provision -p {args.sample}")
        except SampleExists as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.project_file is None:  # no -p: project.yml here, or the offer of a sample
        if not Path("project.yml").is_file():
            return offer_sample(Path("project.yml"))
        args.project_file = "project.yml"
    project = load_project(args.project_file)
    for warning in project.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    password = GENERATE if args.password == "" else args.password
    result = provision(project, args.workspace, add_sites=args.add_site or (), password=password)
    root_note = "created" if result.created_root else "reused"
    print(f"Provisioned {project.name!r} into {result.prod_dir}")
    print(f"Root CA ({root_note}) SHA-256 fingerprint: {result.root_fingerprint}")
    rows = []
    for p in project.participants:
        row = [p.name, p.type, p.org, "new" if p.name in result.issued else "kept", str(result.packages[p.name])]
        if result.passwords:
            row.append(result.passwords[p.name])
        rows.append(row)
    headers = ["participant", "type", "org", "certificate", "package"]
    if result.passwords:
        headers.append("password")
    print(_table(rows, headers))
    if result.passwords:
        print("\nThe passwords above are shown only now and stored nowhere: hand each to its participant.")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if (folder / STARTUP).is_dir():  # accept the kit folder as well as its startup/
        folder = folder / STARTUP
    report = verify_folder(folder, args.root_fingerprint)
    if report.ok:
        print(f"OK: {folder} is intact and signed by the project's root CA")
        return 0
    for problem in report.problems():
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1


def cmd_unpack(args: argparse.Namespace) -> int:
    package = Path(args.package)
    password = args.password or os.environ.get(PASSWORD_ENV)
    if password is None and package.is_file() and is_encrypted(package.read_bytes()[:16]):
        if not sys.stdin.isatty():
            raise PackageError(f"{package} is protected: pass --password or set {PASSWORD_ENV}")
        password = getpass.getpass(f"password for {package.name}: ")
    kit = unpack(package, args.dest, password)
    print(f"Unpacked {package} to {kit}")
    verified = cmd_verify(argparse.Namespace(dir=str(kit), root_fingerprint=args.root_fingerprint))
    if verified != 0:  # a kit that does not verify is not left where an agent could be started from it
        import shutil

        shutil.rmtree(kit, ignore_errors=True)
        print(f"error: removed {kit}: the package does not verify", file=sys.stderr)
    return verified


def cmd_status(args: argparse.Namespace) -> int:
    """Ask every site of a server or admin kit for its status, all at once; exit 1 if any is down."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # the table says why a site failed; no C-level log lines
    from .client import (  # needs grpc, which provisioning does not
        AgentError,
        KitError,
        load_caller_kit,
    )

    try:
        kit = load_caller_kit(args.kit)
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Federation {kit.project!r}, asking as {kit.name!r} ({kit.kind})")
    results = kit.site_statuses(timeout=args.timeout)
    rows = []
    for site, result in results.items():
        address = kit.sites[site].address if kit.sites[site].connect == "listen" else "via relays"
        if not isinstance(result, AgentError) and result.attachments:  # the site's own view of its relays
            address = ", ".join(f"{a.relay}:{'attached' if a.attached else 'detached'}" for a in result.attachments)
        if isinstance(result, AgentError):
            rows.append([site, address, result.code.name.lower(), "", "", "", "", "", "", result.details])
            continue
        # an app version the site holds for approval, or refuses, says so next to its name
        apps = ", ".join(f"{a.name}@{a.version[:12]}" + ("" if a.consent_status in ("", "allowed") else f" ({a.consent_status})")
                         for a in result.apps) or "-"
        gpus = ",".join(map(str, result.gpus)) or "cpu"
        counts = result.task_counts
        data = result.data_version[:12] or "-"
        rows.append([site, address, "up", result.version, gpus, apps, data, counts.get("running", 0), counts.get("queued", 0),
                     ""])
    headers = ["site", "address", "state", "version", "gpus", "apps", "data", "running", "queued", "problem"]
    print(_table(rows, headers))
    return 0 if all(not isinstance(r, AgentError) for r in results.values()) else 1


class RelayKitError(ValueError):
    """A folder that is no usable server kit for a relay."""


def _relay_settings(kit: Path, args: argparse.Namespace) -> tuple[str, TlsIdentity, str, int]:
    """(name, TLS identity, host, port) of a verified server kit's relay; the flags win over server.json."""
    from .relay.listen import EVERY_ADDRESS
    from .relay.tls import TlsIdentity  # TLS only when a relay runs

    config_path = kit / STARTUP / SERVER_CONFIG
    startup = config_path.parent
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        listen = config.get("relay") or {}
        port = args.port if args.port is not None else listen.get("port")
        if port is None:
            raise RelayKitError(f"{config_path} names no relay port (a kit from before relays): pass --port")
        identity = TlsIdentity(
            (startup / config["cert"]).read_bytes(),
            (startup / config["key"]).read_bytes(),
            (startup / config["root_ca"]).read_bytes(),
        )
        identity.context(server_side=True)  # a bad certificate or key is named here, not as a listening error
        host = args.host or listen.get("host") or EVERY_ADDRESS
        if not isinstance(host, str):
            raise RelayKitError(f"{config_path}: the relay's host must be an address or host name, found {host!r}")
        return config["server"], identity, host, int(port)
    except RelayKitError:
        raise
    except FileNotFoundError as exc:
        if not config_path.is_file():
            raise RelayKitError(f"{config_path} not found: a relay starts from a server participant's kit") from None
        raise RelayKitError(f"{config_path}: {exc.filename} is missing") from None
    except KeyError as exc:
        raise RelayKitError(f"{config_path}: {exc} is missing") from None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise RelayKitError(f"{config_path}: unusable ({type(exc).__name__}: {exc})") from None


def cmd_import_connection(args: argparse.Namespace) -> int:
    """Verify a server kit, then have Airflow import its connection (``airflow connections import``)."""
    import subprocess

    kit = Path(args.kit)
    try:
        require_valid(kit / STARTUP, args.root_fingerprint)  # the connection carries the server's key: only from a kit that verifies
    except KitVerificationError as exc:
        print(f"error: refusing to import the connection: {exc}", file=sys.stderr)
        return 1
    connections = kit / STARTUP / CONNECTIONS_FILE
    if not connections.is_file():
        print(f"error: {connections} is missing: is {kit} a server kit?", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "airflow", "connections", "import", *(["--overwrite"] if args.overwrite else []),
               str(connections)]
    return subprocess.run(command).returncode


def cmd_relay_start(args: argparse.Namespace) -> int:
    """Serve a server participant's relay until SIGTERM or Ctrl-C."""
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    kit = Path(args.kit).resolve()
    try:
        # Nothing from the kit is used before its signature checks out.
        require_valid(kit / STARTUP, args.root_fingerprint)
    except KitVerificationError as exc:
        print(f"error: refusing to start the relay: {exc}", file=sys.stderr)
        return 1
    try:
        name, identity, host, port = _relay_settings(kit, args)
    except RelayKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .relay.server import run_relay

    try:
        run_relay(name, identity, host, port)
    except OSError as exc:  # the port is taken or the address is not this machine's
        from .relay.dial import host_port

        print(f"error: relay {name} cannot listen on {host_port(host, port)}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from site_agent.consent.command import run  # the site's side: loaded only when run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flare", description="Federated learning on Apache Airflow")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("provision", help="write signed startup kits from a project.yml")
    p.add_argument("-p", "--project-file", help="NVIDIA FLARE style project.yml (default: ./project.yml; "
                   "without one, a sample is offered)")
    p.add_argument("--sample", metavar="PATH", help="write a commented sample project.yml to PATH and stop")
    p.add_argument("-w", "--workspace", default="workspace", help="workspace folder (kits go to WORKSPACE/<project>/prod_NN)")
    p.add_argument("--add-site", action="append", metavar="NAME", help="issue only this client site (repeatable); others keep their kits")
    p.add_argument(
        "--password",
        nargs="?",
        const="",
        default=None,
        metavar="PW",
        help="protect the packages: with PW, one password for all; alone, a generated one per participant",
    )
    p.set_defaults(func=cmd_provision)

    kit = sub.add_parser("kit", help="check or open startup kits").add_subparsers(dest="kit_command", required=True)
    v = kit.add_parser("verify", help="check a kit's signature: exit 1 naming each changed, missing or added file")
    v.add_argument("dir", help="a kit folder or its startup/ folder")
    v.add_argument("--root-fingerprint", help="expected SHA-256 fingerprint of the project's root CA")
    v.set_defaults(func=cmd_verify)
    u = kit.add_parser("unpack", help="open a kit package (zip or protected) and verify it")
    u.add_argument("package")
    u.add_argument("-d", "--dest", default=".", help="folder to unpack into (default: current folder)")
    u.add_argument("--password", help=f"password of a protected package (or set {PASSWORD_ENV}; asked for on a terminal)")
    u.add_argument("--root-fingerprint", help="expected SHA-256 fingerprint of the project's root CA")
    u.set_defaults(func=cmd_unpack)
    c = kit.add_parser("import-connection", help="verify a server kit, then import its Airflow connection (needs Airflow)")
    c.add_argument("kit", help="a server participant's kit folder")
    c.add_argument("--overwrite", action="store_true", help="replace a connection of the same id")
    c.add_argument("--root-fingerprint", help="refuse a kit whose root CA has another SHA-256 fingerprint")
    c.set_defaults(func=cmd_import_connection)

    st = sub.add_parser("status", help="show every site's agent: reachable or not, version, GPUs, apps, tasks")
    st.add_argument("--kit", default=os.environ.get(KIT_ENV), required=KIT_ENV not in os.environ,
                    help=f"a server or admin kit folder (default: ${KIT_ENV})")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each site (default 5)")
    st.set_defaults(func=cmd_status)

    relay = sub.add_parser("relay", help="run a server participant's relay")
    relay = relay.add_subparsers(dest="relay_command", required=True)
    rs = relay.add_parser("start", help="verify the server kit and serve its relay (in the foreground) until SIGTERM")
    rs.add_argument("--kit", required=True, help="a server participant's kit folder")
    rs.add_argument("--host", help="address or host name to listen on (default: server.json's relay host; '::' is "
                                   "every address, IPv6 and IPv4, and 0.0.0.0 every IPv4 address)")
    rs.add_argument("--port", type=int, help="port to listen on (default: server.json's relay port: fed_learn_port)")
    rs.add_argument("--root-fingerprint", help="refuse a kit whose root CA has another SHA-256 fingerprint")
    rs.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    rs.set_defaults(func=cmd_relay_start)

    from .simulator.command import add_parser as add_simulate_parser  # argparse only; the simulator loads when run

    add_simulate_parser(sub)
    add_admin_parsers(sub)  # abort, shutdown, runs, model
    add_poc_parser(sub)

    ap = sub.add_parser("approve", help="at a site: list app versions held for approval, approve or reject one",
                        description="Approve (or reject) an app version whose custom code this site holds until "
                        "approved (local/site.yaml custom_code.require_approval). Shows the version's files first.")
    ap.add_argument("app", nargs="?", help="the app's name")
    ap.add_argument("--version", help="the version digest (as --list shows it; a unique prefix of 12+ digits will do)")
    ap.add_argument("--kit", required=True, help="this site's kit folder (its local/site.yaml names the agent's work folder)")
    ap.add_argument("--list", action="store_true", help="list every deployed version with custom code and how it stands")
    ap.add_argument("--reject", action="store_true", help="reject the version instead: it never runs here")
    ap.add_argument("--by", help="who decides, for the record (default: your login name)")
    ap.add_argument("--note", default="", help="a note kept with the decision")
    ap.set_defaults(func=cmd_approve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ProjectError, WorkspaceStateError, PackageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
