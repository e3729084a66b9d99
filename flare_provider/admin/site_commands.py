"""``flare abort`` and ``flare shutdown``: an admin (or the server identity) acting on site agents.

The agent decides from the caller's certificate what it may do (see
``site_agent/service/auth.py``): a ``project_admin`` aborts tasks anywhere and shuts agents
down, an ``org_admin`` or ``lead`` aborts tasks on its own org's sites only, a ``member``
reads status only. These commands ask, and say plainly when a site refuses and why.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client import AgentError, CallerKit

KIT_ENV = "FLARE_KIT"  # the admin kit the commands use when --kit is not given (poc's admin.sh sets it)


class AdminError(Exception):
    """Bad input to an admin command (exit code 2); the message names the problem."""


def reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An admin command whose :class:`AdminError` is printed as ``error: ...`` with exit code 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except AdminError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def caller_kit(kit_dir: str | None) -> "CallerKit":
    """The verified kit of ``--kit`` (or ``$FLARE_KIT``)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # the messages below say why a call failed
    from ..client import KitError, load_caller_kit

    kit_dir = kit_dir or os.environ.get(KIT_ENV)
    if not kit_dir:
        raise AdminError(f"no kit: pass --kit with an admin (or server) kit folder, or set {KIT_ENV}")
    try:
        return load_caller_kit(kit_dir)
    except KitError as exc:
        raise AdminError(str(exc)) from None


def describe_failure(kit: "CallerKit", error: "AgentError") -> str:
    """What a failed call means for the person who made it: a refusal by role said as such."""
    import grpc

    if error.code == grpc.StatusCode.PERMISSION_DENIED:
        role = "the server identity" if kit.kind == "server" else f"admin {kit.name!r}"
        return f"refused: {role} is not allowed to do this on {error.site}: {error.details}"
    if error.code == grpc.StatusCode.NOT_FOUND:
        return f"not found: {error.details}"
    return f"{error.code.name.lower()}: {error.details}"


def _check_site(kit: "CallerKit", site: str) -> str:
    try:
        kit.endpoint(site)
    except KeyError as exc:
        raise AdminError(exc.args[0]) from None
    return site


@reported
def cmd_abort(args: argparse.Namespace) -> int:
    """Abort one task at one site, or every queued and running task of a run at every site."""
    from ..client import AgentError

    kit = caller_kit(args.kit)
    problems = 0  # sites whose tasks could not be listed
    if args.run is None:
        if args.site is None or args.task_id is None:
            raise AdminError("name a SITE and a TASK_ID, or a run with --run RUN --federation NAME")
        _check_site(kit, args.site)
        targets = {args.site: [args.task_id]}
    else:
        if args.task_id is not None:
            raise AdminError("give either a TASK_ID or --run, not both")
        if not args.federation:
            raise AdminError("--run needs --federation NAME (the federation the run belongs to, as its DAG names it)")
        from ..federation.records import run_key

        sites = [_check_site(kit, args.site)] if args.site else list(kit.sites)
        prefix = f"{run_key(args.federation, args.run)}-"
        targets = {}
        for site, status in kit.site_statuses(timeout=args.timeout, sites=sites).items():
            if isinstance(status, AgentError):
                print(f"{site}: cannot list its tasks: {describe_failure(kit, status)}", file=sys.stderr)
                problems += 1
                continue
            targets[site] = [t.task_id for t in status.active_tasks if t.task_id.startswith(prefix)]
        if not any(targets.values()):
            print(f"no queued or running task of run {args.run!r} ({args.federation}) on {', '.join(sites)}")
            return 1 if problems else 0
    failed = 0
    for site, task_ids in targets.items():
        for task_id in task_ids:
            with kit.client(site, timeout=args.timeout) as client:
                try:
                    state = client.abort(task_id)
                except AgentError as exc:
                    print(f"{site}: task {task_id}: {describe_failure(kit, exc)}", file=sys.stderr)
                    failed += 1
                    continue
            print(f"{site}: task {task_id}: {state.status}")
    return 1 if failed or problems else 0


@reported
def cmd_shutdown(args: argparse.Namespace) -> int:
    """Stop a site's agent cleanly, after a confirmation (``--yes`` skips it)."""
    from ..client import AgentError

    kit = caller_kit(args.kit)
    _check_site(kit, args.site)
    if not args.yes:
        if not sys.stdin.isatty():
            raise AdminError(f"shutting down {args.site}'s agent needs a confirmation: pass --yes")
        answer = input(f"Shut down the agent of site {args.site!r}? Its running tasks end. [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("Not shut down.")
            return 1
    with kit.client(args.site, timeout=args.timeout) as client:
        try:
            client.shutdown(args.reason or f"requested by {kit.name}")
        except AgentError as exc:
            print(f"{args.site}: {describe_failure(kit, exc)}", file=sys.stderr)
            return 1
    print(f"{args.site}: agent shutting down")
    return 0


def add_kit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kit", help=f"an admin (or server) kit folder (default: ${KIT_ENV})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each site (default 10)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("abort", help="abort a site's task by id, or every task of a run on every site")
    a.add_argument("site", nargs="?", help="the site (with --run: only this site)")
    a.add_argument("task_id", nargs="?", help="the task to abort")
    a.add_argument("--run", help="abort every queued and running task of this run id")
    a.add_argument("--federation", help="with --run: the federation the run belongs to")
    add_kit_argument(a)
    a.set_defaults(func=cmd_abort)

    s = sub.add_parser("shutdown", help="stop a site's agent (asks first; project_admin only)")
    s.add_argument("site")
    s.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    s.add_argument("--reason", help="why, for the site's audit log")
    add_kit_argument(s)
    s.set_defaults(func=cmd_shutdown)
