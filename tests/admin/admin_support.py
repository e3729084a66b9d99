"""Helpers for the admin and poc tests (imported by name; conftest modules cannot be)."""

from __future__ import annotations

from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "relay" / "apps" / "slow_plus_one"  # adds one after sleep_s seconds


def allow_test_app(federation, sites, **settings: object) -> None:
    """Let ``sites`` run the test apps' own code, without preloading PyTorch (they import numpy only).

    ``federation`` is anything with ``kits`` and ``data_dir(site)``: a LocalFederation or a
    PocWorkspace; ``settings`` are further ``site.yaml`` settings.
    """
    import yaml

    for site in sites:
        path = federation.kits[site] / "local" / "site.yaml"
        doc = yaml.safe_load(path.read_text())
        doc.update(allow_custom_code=True, preload_modules=[], **settings)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        federation.data_dir(site).mkdir(exist_ok=True)
