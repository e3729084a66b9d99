"""NVIDIA FLARE's HA sample (an overseer and two servers) provisioned as it is and trained
through both relays, with the servers' names mapped to this machine in /etc/hosts."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "project-ha.yml"
RUNNER = Path(__file__).with_name("ha_sample_run.py")


def test_the_ha_sample_trains_through_either_relay(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 server1 server2\n")
    # A private mount namespace: /etc/hosts changes for this run only, as a site's IT would edit it.
    script = (f"mount --bind {shlex.quote(str(hosts))} /etc/hosts && "
              f"exec {shlex.quote(sys.executable)} {shlex.quote(str(RUNNER))} {shlex.quote(str(EXAMPLE))} "
              f"{shlex.quote(str(tmp_path / 'federation'))}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RUNNER.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert any("overseer" in w and "Airflow's scheduler plays the overseer's part" in w for w in result["warnings"])
    assert result["attached"] == {"server1": ["site-1", "site-2"], "server2": ["site-1", "site-2"]}
    assert result["rounds"] == [["site-1", "site-2"], ["site-1", "site-2"]]  # the second with server1 down
    assert result["after_kill"] == ["site-1", "site-2"]
