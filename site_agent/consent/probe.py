"""What an interpreter has installed: run as ``PYTHON probe.py NAME...``, prints JSON.

Standard library only, and run by path, so that it works in any interpreter a site names
for its workers (site.yaml ``python``), whatever that environment holds. The agent
evaluates an app's requirements against the answer (:mod:`.requirements`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata


def marker_environment() -> dict[str, str]:
    """The values PEP 508 markers are evaluated against, for this interpreter."""
    info = sys.implementation.version
    implementation_version = f"{info.major}.{info.minor}.{info.micro}"
    if info.releaselevel != "final":
        implementation_version += info.releaselevel[0] + str(info.serial)
    return {
        "implementation_name": sys.implementation.name,
        "implementation_version": implementation_version,
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    }


def probe(names: list[str]) -> dict:
    """The installed version of each distribution (None: not installed) and the marker environment."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "environment": marker_environment(), "python": sys.executable}


if __name__ == "__main__":
    json.dump(probe(sys.argv[1:]), sys.stdout)
