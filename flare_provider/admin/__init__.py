"""The admin commands of ``flare``: operating a running federation, as NVIDIA FLARE's admin console does.

- :mod:`.site_commands`: ``abort`` (a task, or a run's tasks on every site) and
  ``shutdown`` (a site's agent), with an admin kit whose role the agents check;
- :mod:`.runs`: ``runs list``, ``runs download`` and ``model export``, over the snapshot store;
- :mod:`.sample_project`: the commented ``project.yml`` that ``flare provision`` offers.

``flare status`` (in :mod:`flare_provider.cli`) completes the set. Only argparse is
imported here; gRPC, the snapshot store and PyTorch load when a command runs.
"""

from __future__ import annotations

import argparse

from . import runs, site_commands


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``abort``, ``shutdown``, ``runs`` and ``model`` on ``flare``'s subcommands."""
    site_commands.add_parsers(sub)
    runs.add_parsers(sub)
