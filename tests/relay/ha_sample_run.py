"""Run by test_ha_sample.py inside a mount namespace whose /etc/hosts maps server1 and server2
to 127.0.0.1, as the seed's walkthrough maps them on one machine.

Provisions ``examples/project-ha.yml`` as it is (overseer, two servers), starts both relays
and both sites, trains a round, kills relay server1, trains another round through
server2, and prints what happened as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from relay_support import APP, attached, run_rounds, wait_attached

from flare_provider.poc import LocalFederation
from flare_provider.provisioning import load_project, provision


def main(example: Path, root: Path) -> dict:
    project = load_project(example)
    result = provision(project, root / "workspace")
    sites = tuple(p.name for p in project.clients)
    fed = LocalFederation(project.name, root, dict(result.kits), {s: 0 for s in sites}, sites, result.root_fingerprint,
                          server="server1", admin="admin@lead-lab.example", connect="outbound",
                          relay_ports={s.name: s.fed_learn_port for s in project.servers})
    for site in sites:
        fed.set_site_settings(site, allow_custom_code=True, preload_modules=[])
        fed.data_dir(site).mkdir(exist_ok=True)
    try:
        fed.start_agents()
        fed.deploy_app(APP)
        both = {server: sorted(wait_attached(fed, server, sites)) for server in fed.relay_ports}
        (root / "one").mkdir()
        (root / "two").mkdir()
        first = run_rounds(fed, root / "one")
        fed.relay("server1").kill()
        second = run_rounds(fed, root / "two")
        return {
            "warnings": list(project.warnings),
            "attached": both,
            "rounds": [first.history[-1].accepted, second.history[-1].accepted],
            "after_kill": sorted(attached(fed, "server2")),
        }
    finally:
        fed.stop_agents()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
