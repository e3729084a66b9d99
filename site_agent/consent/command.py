"""``flare approve``: at a site, the operator's decision on app versions held for approval.

    flare approve --kit KIT --list                      every version with custom code, and how it stands
    flare approve APP --kit KIT                         the versions of APP held, with their files
    flare approve APP --version DIGEST --kit KIT        approve that version (shows its files first)
    flare approve APP --version DIGEST --kit KIT --reject

It reads the site's ``local/site.yaml`` for the agent's work folder and writes the
decision into the app store there; the running agent reads it on the next task, no
restart needed. Nothing here talks to the network.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from ..errors import SettingsError
from ..runtime.app_store import APPS_DIR, AppInfo, list_deployed
from ..site_settings import SiteSettings, load_site_settings
from . import judge
from .approvals import APPROVED, record_decision
from .policy import ALLOWED, PENDING, REJECTED

MIN_PREFIX = 12


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_site_settings(Path(args.kit))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    apps = list_deployed(settings.work_dir / APPS_DIR)
    site = Path(args.kit).resolve().name
    if args.list or not args.app:
        return _list(settings, apps, site)
    mine = [a for a in apps if a.name == args.app]
    if not mine:
        print(f"error: no app named {args.app!r} is deployed at this site", file=sys.stderr)
        return 2
    if not args.version:
        held = [a for a in mine if judge(settings.custom_code, a, site).status == PENDING]
        for app in held:
            _show(app, settings, site)
        print(f"{len(held)} version(s) of {args.app!r} wait for approval; give --version DIGEST to decide on one",
              file=sys.stderr)
        return 2
    matches = [a for a in mine if a.version.startswith(args.version.lower())] if len(args.version) >= MIN_PREFIX else []
    if len(matches) != 1:
        what = "matches no" if not matches else "matches more than one"
        print(f"error: version {args.version!r} {what} version of {args.app!r} here (give {MIN_PREFIX}+ digits; "
              "--list shows them)", file=sys.stderr)
        return 2
    app = matches[0]
    _show(app, settings, site)
    if not app.has_custom_code:
        print("This version brings no custom code: it runs without approval.")
        return 0
    decision = REJECTED if args.reject else APPROVED
    record = record_decision(app.path.parent, decision, args.by, args.note)
    now = judge(settings.custom_code, app, site)
    print(f"\n{decision} by {record['by']} at {record['at_utc']}: app {app.name!r} version {app.version}")
    print(f"Tasks of this version: {'run from now on' if now.runnable else 'refused'} ({now.reason})")
    if decision == APPROVED and not now.runnable:
        print("note: this site's local/site.yaml allows no custom code (allow_custom_code: false, no custom_code); "
              "approvals count once it sets custom_code (e.g. custom_code: {require_approval: true})", file=sys.stderr)
    return 0


def _list(settings: SiteSettings, apps: list[AppInfo], site: str) -> int:
    print(f"Custom code allowed here: {settings.custom_code.describe()}")
    rows = []
    for app in apps:
        if app.has_custom_code:
            consent = judge(settings.custom_code, app, site)
            rows.append((consent.status, app.name, app.version, app.signer or "?", _when(app.deployed_at)))
    if not rows:
        print("No deployed app brings custom code.")
        return 0
    rows.sort(key=lambda r: (r[0] != PENDING, r[1], r[4]))
    widths = [max(len(r[i]) for r in rows + [("status", "app", "version", "signer", "deployed (UTC)")]) for i in range(5)]
    for row in [("status", "app", "version", "signer", "deployed (UTC)"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    pending = sum(r[0] == PENDING for r in rows)
    print(f"\n{pending} version(s) wait for approval: flare approve APP --version DIGEST --kit KIT (or --reject)")
    return 0


def _show(app: AppInfo, settings: SiteSettings, site: str) -> None:
    consent = judge(settings.custom_code, app, site)
    config = app.config()
    print(f"app:          {app.name}")
    print(f"version:      {app.version}")
    print(f"signed by:    {app.signer or 'unknown'}")
    print(f"deployed:     {_when(app.deployed_at)} UTC")
    print(f"trainer:      {config.script or config.trainer_path}")
    print(f"requirements: {', '.join(config.requirements) or 'none'}")
    print(f"status:       {consent.status}{'' if consent.status == ALLOWED else ': ' + consent.reason}")
    sizes = app.file_sizes()
    print(f"files ({len(sizes)}, {sum(sizes.values())} bytes):")
    for rel, size in sizes.items():
        print(f"  {size:>10}  {rel}")


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

