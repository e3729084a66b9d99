"""``flare poc``: a proof-of-concept federation on this machine, prepared, started, stopped, removed.

    flare poc prepare -n 2 [-w poc-workspace] [--listen] [--no-data] [--allow-custom-code]
    flare poc start [-w WORKSPACE] [PARTICIPANT ...]
    flare poc stop  [-w WORKSPACE] [PARTICIPANT ...]
    flare poc clean [-w WORKSPACE]

See :mod:`flare_provider.poc.workspace` for what the workspace holds.
"""

from __future__ import annotations

import argparse
import os
import sys

WORKSPACE_ENV = "FLARE_POC_WORKSPACE"
DEFAULT_WORKSPACE = "poc-workspace"


def _workspace(args: argparse.Namespace):
    from .workspace import PocWorkspace

    return PocWorkspace.load(args.workspace)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .workspace import prepare_workspace

    ws = prepare_workspace(args.workspace, args.num_sites, project=args.project,
                           connect="listen" if args.listen else "outbound", digits_data=not args.no_data,
                           allow_custom_code=args.allow_custom_code)
    print(f"Prepared {ws.project!r} in {ws.root}: sites {', '.join(ws.sites)}; relay {ws.server} on "
          f"127.0.0.1:{ws.servers[ws.server]}; admin {ws.admin} (project_admin)")
    print(f"Kits: {ws.server_kit.parent}")
    if not args.no_data:
        print("Each site has a non-IID share of the digits data in its kit's data/ (examples/apps/digits trains on it).")
    print(f"Next: {ws.root / 'start.sh'} (or flare poc start -w {ws.root}), then {ws.root / 'admin.sh'} status")
    print(f"Airflow: flare kit import-connection {ws.server_kit}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    ws = _workspace(args)
    for line in ws.start(args.participants):
        print(line)
    print(f"Running: {', '.join(f'{n} (pid {p})' for n, p in ws.running().items())}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    ws = _workspace(args)
    said = ws.stop(args.participants)
    for line in said:
        print(line)
    if not said:
        print("nothing was running")
    left = ws.running()
    if left and not args.participants:
        print(f"still running: {left}", file=sys.stderr)
        return 1
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    ws = _workspace(args)
    ws.clean()
    print(f"Removed {ws.root}")
    return 0


def _run(command):
    def run(args: argparse.Namespace) -> int:
        from .workspace import PocError

        try:
            return command(args)
        except PocError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    poc = sub.add_parser("poc", help="a proof-of-concept federation on this machine: prepare, start, stop, clean")
    poc = poc.add_subparsers(dest="poc_command", required=True)
    default = os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE)
    help_ws = f"the workspace folder (default: ${WORKSPACE_ENV} or ./{DEFAULT_WORKSPACE})"

    p = poc.add_parser("prepare", help="provision N loopback sites, a relay and an admin, with start/stop scripts")
    p.add_argument("-n", "--num-sites", type=int, default=2, help="how many sites (default 2)")
    p.add_argument("-w", "--workspace", default=default, help=help_ws + "; must be new or empty")
    p.add_argument("--project", default="poc", help="the project's name (default poc)")
    p.add_argument("--listen", action="store_true",
                   help="sites listen on loopback ports instead of dialling out to the relay")
    p.add_argument("--no-data", action="store_true", help="do not give the sites shares of the digits data")
    p.add_argument("--allow-custom-code", action="store_true", help="let every site run an app's custom code (BYOC)")
    p.set_defaults(func=_run(cmd_prepare))

    for name, func, what in (("start", cmd_start, "start the relay, then the sites' agents; wait until they answer"),
                             ("stop", cmd_stop, "stop the sites' agents, then the relay")):
        s = poc.add_parser(name, help=what)
        s.add_argument("participants", nargs="*", metavar="PARTICIPANT", help="only these (default: all)")
        s.add_argument("-w", "--workspace", default=default, help=help_ws)
        s.set_defaults(func=_run(func))

    c = poc.add_parser("clean", help="delete the workspace (refused while anything in it runs)")
    c.add_argument("-w", "--workspace", default=default, help=help_ws)
    c.set_defaults(func=_run(cmd_clean))
