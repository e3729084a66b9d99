"""A proof-of-concept workspace on disk, as ``flare poc`` makes it and operates it.

What ``nvflare poc prepare -n 2`` is to NVIDIA FLARE: one folder holding a whole
federation on this machine (N sites, the server side's relay, an admin), provisioned by
:func:`~flare_provider.poc.federation.prepare` on loopback::

    WORKSPACE/poc.json        what is where (read by flare poc start/stop/clean)
    WORKSPACE/project.yml     the project the kits were provisioned from
    WORKSPACE/workspace/<project>/prod_00/<participant>/   the signed kits; a site's and a
                              server's startup/ has its own start.sh and stop.sh
    WORKSPACE/start.sh, stop.sh   the whole federation: relays first, then the agents
    WORKSPACE/admin.sh        flare with the admin's kit: ./admin.sh status, abort, shutdown

Every participant runs from its own kit's ``startup/start.sh`` (log and pid file in the
kit's ``run/``), exactly as it would on a real machine; nothing here keeps a process of
its own, so ``flare poc stop`` works from any shell.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..provisioning.kits import STARTUP
from .federation import START_TIMEOUT, LocalFederation, prepare
from .processes import ProcessError, wait_for

MANIFEST = "poc.json"
_FORMAT = 1
SCRIPT_TIMEOUT = 60.0  # seconds for a kit's start.sh or stop.sh (stop.sh waits up to 30 s itself)


class PocError(RuntimeError):
    """A workspace that is not a proof-of-concept one, or a participant that would not start or stop."""


@dataclass(frozen=True)
class PocWorkspace:
    """A prepared workspace, as its ``poc.json`` describes it."""

    root: Path
    project: str
    sites: tuple[str, ...]
    servers: dict[str, int]  # server participant -> its relay's port
    admin: str
    connect: str
    kits: dict[str, Path]
    bin_dir: Path  # where flare and flare-agent are installed (the kit scripts call them by name)

    @property
    def server(self) -> str:
        return next(iter(self.servers))

    @property
    def server_kit(self) -> Path:
        return self.kits[self.server]

    @property
    def admin_kit(self) -> Path:
        return self.kits[self.admin]

    def data_dir(self, site: str) -> Path:
        return self.kits[site] / "data"

    @classmethod
    def load(cls, root: str | Path) -> "PocWorkspace":
        root = Path(root).resolve()
        path = root / MANIFEST
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != _FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            return cls(root, doc["project"], tuple(doc["sites"]), dict(doc["servers"]), doc["admin"], doc["connect"],
                       {name: root / rel for name, rel in doc["kits"].items()}, Path(doc["bin"]))
        except FileNotFoundError:
            raise PocError(f"{root} is no proof-of-concept workspace ({MANIFEST} not found): run flare poc prepare") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PocError(f"{path} is unusable ({type(exc).__name__}: {exc})") from None

    # ---- processes -----------------------------------------------------------------------

    def participants(self) -> list[str]:
        """Those with a process, in start order: the relays, then the sites."""
        return [*self.servers, *self.sites]

    def pid(self, name: str) -> int | None:
        """The live process ``name``'s start.sh started, or None."""
        pid_file = self.kits[name] / "run" / ("relay.pid" if name in self.servers else "agent.pid")
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def log_path(self, name: str) -> Path:
        return self.kits[name] / "run" / ("relay.log" if name in self.servers else "agent.log")

    def running(self) -> dict[str, int]:
        return {name: pid for name in self.participants() if (pid := self.pid(name)) is not None}

    def _script(self, name: str, script: str, *args: str) -> str:
        env = {**os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR")}
        argv = ["bash", str(self.kits[name] / STARTUP / script), *args]
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise PocError(f"{name}: {script} did not finish in {SCRIPT_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            raise PocError(f"{name}: {script} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
        return done.stdout.strip()

    def start(self, names: list[str] | None = None, timeout: float = START_TIMEOUT) -> list[str]:
        """Start the named participants (default: all), relays first; wait until each site answers."""
        names = self._known(names)
        said = []
        for name in [n for n in self.participants() if n in names]:
            if self.pid(name) is not None:
                said.append(f"{name} already running (pid {self.pid(name)})")
                continue
            loopback = ["--host", "127.0.0.1"] if name in self.servers or self.connect == "listen" else []
            said.append(self._script(name, "start.sh", *loopback))
            if name in self.servers:
                port = self.servers[name]
                wait_for(f"relay {name} accepting on port {port}", lambda p=port, n=name: self._accepts(p, n), timeout)
        sites = [n for n in names if n in self.sites]
        if sites:
            self.wait_answering(sites, timeout)
        return said

    def wait_answering(self, sites: list[str], timeout: float = START_TIMEOUT) -> None:
        """Until every site in ``sites`` answers the admin's status call (through the relays when it dials out)."""
        from ..client import load_caller_kit

        kit = load_caller_kit(self.admin_kit)

        def all_up() -> bool:
            for site in sites:
                if self.pid(site) is None:
                    raise PocError(f"the agent of {site} exited; the end of {self.log_path(site)}:\n{_tail(self.log_path(site))}")
            statuses = kit.site_statuses(timeout=2.0, sites=sites)
            return all(not isinstance(s, Exception) for s in statuses.values())

        try:
            wait_for(f"sites {', '.join(sites)} answering", all_up, timeout, interval=0.5)
        except ProcessError as exc:
            raise PocError(str(exc)) from None

    def stop(self, names: list[str] | None = None) -> list[str]:
        """Stop the named participants (default: all), sites first; each kit's stop.sh."""
        from concurrent.futures import ThreadPoolExecutor

        names = self._known(names)
        said = []
        for group in ([n for n in self.sites if n in names], [n for n in self.servers if n in names]):
            running = [n for n in group if self.pid(n) is not None]
            with ThreadPoolExecutor(max_workers=max(1, len(running))) as pool:  # each stop.sh waits for its process
                said += pool.map(lambda n: self._script(n, "stop.sh"), running)
        return said

    def clean(self) -> None:
        """Delete the workspace; refused while any participant runs."""
        running = self.running()
        if running:
            raise PocError(f"still running: {', '.join(running)}; run flare poc stop first")
        shutil.rmtree(self.root)

    def _known(self, names: list[str] | None) -> list[str]:
        if not names:
            return self.participants()
        unknown = [n for n in names if n not in self.participants()]
        if unknown:
            raise PocError(f"no participant {unknown} in this workspace (relays and sites: {self.participants()})")
        return names

    def _accepts(self, port: int, name: str) -> bool:
        if self.pid(name) is None:
            raise PocError(f"relay {name} exited; the end of {self.log_path(name)}:\n{_tail(self.log_path(name))}")
        with socket.socket() as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path) -> str:
    from .processes import tail

    return tail(path, 20)


def prepare_workspace(root: str | Path, num_sites: int, *, project: str = "poc", connect: str = "outbound",
                      digits_data: bool = True, allow_custom_code: bool = False) -> PocWorkspace:
    """Provision ``num_sites`` loopback sites, a relay and an admin under ``root`` (which must
    not exist or be empty) and write ``poc.json`` and the workspace's scripts."""
    root = Path(root).resolve()
    if root.exists() and any(root.iterdir()):
        raise PocError(f"{root} is not empty; pick a new folder, or remove it (flare poc clean) first")
    if num_sites < 1:
        raise PocError(f"a federation needs at least one site, not {num_sites}")
    if digits_data:
        try:
            import sklearn.datasets  # noqa: F401  (the digits come from scikit-learn)
        except ImportError:
            raise PocError("the sites' digits data needs scikit-learn: pip install scikit-learn, or pass --no-data") from None
    fed = prepare(root, project, num_sites, digits_data=digits_data, connect=connect)
    if allow_custom_code:
        for site in fed.sites:
            fed.set_site_settings(site, allow_custom_code=True)
    return write_manifest(fed)


def write_manifest(fed: LocalFederation) -> PocWorkspace:
    """``poc.json`` and the workspace's start.sh, stop.sh and admin.sh for a prepared federation."""
    root = fed.root.resolve()
    doc = {
        "format": _FORMAT,
        "project": fed.name,
        "sites": list(fed.sites),
        "servers": dict(fed.relay_ports),
        "admin": fed.admin,
        "connect": fed.connect,
        "kits": {name: Path(path).resolve().relative_to(root).as_posix() for name, path in fed.kits.items()},
        "bin": str(Path(sys.executable).parent),
    }
    (root / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    workspace = PocWorkspace.load(root)
    admin_kit = workspace.admin_kit.relative_to(root).as_posix()
    for name, body in _scripts(admin_kit).items():
        path = root / name
        path.write_text(body, encoding="utf-8")
        path.chmod(0o755)
    return workspace


_HEADER = """#!/usr/bin/env bash
# {what}
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export PATH="{bin}:$PATH"
"""


def _scripts(admin_kit: str) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return {
        "start.sh": _HEADER.format(what="Starts the relay, then every site's agent (or only those named: ./start.sh site-1).",
                                   bin=bin_dir) + 'exec flare poc start -w "$HERE" "$@"\n',
        "stop.sh": _HEADER.format(what="Stops every site's agent, then the relay (or only those named: ./stop.sh site-1).",
                                  bin=bin_dir) + 'exec flare poc stop -w "$HERE" "$@"\n',
        "admin.sh": _HEADER.format(what="flare as this workspace's admin (project_admin): ./admin.sh status, "
                                        "./admin.sh abort SITE TASK_ID, ./admin.sh shutdown SITE", bin=bin_dir)
        + f'export FLARE_KIT="$HERE/{admin_kit}"\nexec flare "$@"\n',
    }
