"""Helpers for the rounds tests (imported by name; conftest modules cannot be)."""

from __future__ import annotations


def deploy_app(fed, app_dir) -> str:
    """Deploy ``app_dir`` to every site of ``fed`` with the server identity; returns its version."""
    from flare_provider.client import load_caller_kit
    from flare_provider.wire.bundles import build_bundle

    kit = load_caller_kit(fed.server_kit)
    bundle = build_bundle(app_dir, kit.cert_pem, kit.key_pem)
    versions = set()
    for site in fed.sites:
        with kit.client(site) as client:
            versions.add(client.deploy_app(bundle)[0].version)
    (version,) = versions
    return version


def trainings(fed, site: str) -> dict[str, int]:
    """How many times each train task was started by ``site``'s agent (from its log)."""
    import re

    counts: dict[str, int] = {}
    for match in re.finditer(r"task (\S+) running in process", fed.agent(site).log_path.read_text()):
        task_id = match.group(1)
        if not task_id.endswith(("-initialize", "-evaluate")):
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts
