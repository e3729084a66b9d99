"""A commented sample ``project.yml``, offered by ``flare provision`` when there is none.

As NVIDIA FLARE's ``provision`` does: with no ``-p`` and no ``project.yml`` in the current
folder, ``flare provision`` asks whether to write this sample (``--sample PATH`` writes it
without asking), to be edited and provisioned.
"""

from __future__ import annotations

import sys
from pathlib import Path

SAMPLE_PROJECT = """\
# A federation in NVIDIA FLARE's project.yml format (api_version 3), for `flare provision`.
# Edit the names, organisations and host names, then:
#   flare provision -p project.yml -w workspace
# Kits go to workspace/<name>/prod_00/ (a later run writes prod_01, ... from the same root CA).
api_version: 3
name: example_project
description: Two sites train one model without sharing their data

participants:
  # The server identity is the Airflow side: its kit becomes an Airflow connection
  # (`flare kit import-connection`), and it runs the relay the sites dial out to, at
  # host_names[0]:fed_learn_port (`startup/start.sh` in its kit). Two or more servers
  # give two or more relays (high availability).
  - name: airflow-server
    type: server
    org: lead_org
    fed_learn_port: 8002
    host_names: [airflow.example.com]

  # Each site runs an agent (`flare-agent`) on its own machine. By default the agent
  # dials out to the relays and opens no port; `connect: listen` makes it serve at
  # agent_host:agent_port instead (a site on the Airflow side's LAN).
  - name: site-1
    type: client
    org: org_1
  - name: site-2
    type: client
    org: org_2
    # connect: listen
    # agent_host: 10.0.0.12
    # agent_port: 8102
    # enable_byoc: true      # the site may run an app's custom code (also local/site.yaml)

  # Admins use `flare status`, `flare abort`, `flare shutdown` with their kit. Roles:
  #   project_admin  status, abort on every site, shutdown
  #   org_admin, lead  status, abort on the sites of their own org
  #   member         status only
  - name: admin@lead_org.example.com
    type: admin
    org: lead_org
    role: project_admin
  - name: it@org_1.example.com
    type: admin
    org: org_1
    role: org_admin
"""


class SampleExists(FileExistsError):
    """The sample would overwrite a file."""


def write_sample(path: str | Path) -> Path:
    """Write the sample to ``path``; :class:`SampleExists` rather than overwrite anything."""
    path = Path(path)
    if path.exists():
        raise SampleExists(f"{path} exists; not overwriting it with the sample project")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SAMPLE_PROJECT, encoding="utf-8")
    return path


def offer_sample(project_file: Path) -> int:
    """``flare provision`` found no project file: offer the sample on a terminal; exit code."""
    print(f"error: no project file {project_file} here.", file=sys.stderr)
    if not sys.stdin.isatty():
        print("Write a commented sample with: flare provision --sample project.yml", file=sys.stderr)
        return 2
    answer = input(f"Write a commented sample project to {project_file}? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        print("Nothing written.")
        return 2
    print(f"Wrote {write_sample(project_file)}: edit it, then run flare provision -p {project_file}")
    return 0
