#!/usr/bin/env python3
"""Fill the demo sites' data folders with scikit-learn's digits (``docker compose --profile demo``).

    flare-demo-data [--owner USER] [--iid] FOLDER [FOLDER ...]

Each folder gets its site's ``train.npz`` and ``test.npz`` (see
``site_agent.datasets.digits``); with ``--owner`` the folders and files are handed to
that user, the one the agents run as, since the compose service writes them as root.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def hand_over(folder: Path, owner: str) -> None:
    """Give ``folder`` and everything in it to ``owner`` (a user name or id)."""
    user: str | int = int(owner) if owner.isdigit() else owner
    for path in [folder, *folder.rglob("*")]:
        shutil.chown(path, user=user)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="one data folder per site")
    parser.add_argument("--owner", help="user (name or id) to own the written folders and files")
    parser.add_argument("--iid", action="store_true", help="split uniformly instead of skewing each site's labels")
    args = parser.parse_args(argv)

    from site_agent.datasets.digits import write_site_partitions  # needs scikit-learn

    summary = write_site_partitions(args.folders, non_iid=not args.iid)
    if args.owner:
        for folder in args.folders:
            hand_over(folder, args.owner)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
