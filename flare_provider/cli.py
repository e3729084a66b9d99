"""The ``flare`` command: provisioning and startup kits, without Airflow.

    flare provision -p project.yml -w WORKSPACE [--add-site NAME] [--password [PW]]
    flare kit verify DIR [--root-fingerprint SHA256]
    flare kit unpack PACKAGE [-d DEST] [--password PW]
    flare status --kit KIT [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from .provisioning import (
    GENERATE,
    ProjectError,
    WorkspaceStateError,
    load_project,
    provision,
    verify_folder,
)
from .provisioning.kits import STARTUP
from .provisioning.packages import PackageError, is_encrypted, unpack

PASSWORD_ENV = "FLARE_KIT_PASSWORD"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(x.rstrip() for x in [fmt.format(*headers), line, *(fmt.format(*map(str, r)) for r in rows)])


def cmd_provision(args: argparse.Namespace) -> int:
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
    return cmd_verify(argparse.Namespace(dir=str(kit), root_fingerprint=args.root_fingerprint))


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
        address = kit.sites[site].address
        if isinstance(result, AgentError):
            rows.append([site, address, result.code.name.lower(), "", "", "", "", "", result.details])
            continue
        apps = ", ".join(f"{a.name}@{a.version[:12]}" for a in result.apps) or "-"
        gpus = ",".join(map(str, result.gpus)) or "cpu"
        counts = result.task_counts
        rows.append([site, address, "up", result.version, gpus, apps, counts.get("running", 0), counts.get("queued", 0), ""])
    headers = ["site", "address", "state", "version", "gpus", "apps", "running", "queued", "problem"]
    print(_table(rows, headers))
    return 0 if all(not isinstance(r, AgentError) for r in results.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flare", description="Federated learning on Apache Airflow")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("provision", help="write signed startup kits from a project.yml")
    p.add_argument("-p", "--project-file", default="project.yml", help="NVIDIA FLARE style project.yml")
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

    st = sub.add_parser("status", help="show every site's agent: reachable or not, version, GPUs, apps, tasks")
    st.add_argument("--kit", required=True, help="a server or admin kit folder")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each site (default 5)")
    st.set_defaults(func=cmd_status)
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
