"""``provision()``: run the provisioning steps over one context."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .context import ProvisionContext, ProvisionResult
from .project import Project
from .steps import STEPS, Step
from .workspace import Workspace


def provision(
    project: Project,
    workspace_root: str | Path,
    add_sites: tuple[str, ...] | list[str] = (),
    password: str | object | None = None,
    steps: Sequence[Step] = STEPS,
) -> ProvisionResult:
    """Write a new ``prod_NN`` with a kit and a package for every participant.

    Without ``add_sites`` every participant gets a new certificate from the (reused or
    new) root CA. With ``add_sites`` only those client sites are issued; every other
    participant keeps its certificate and key, and the server and admin kits list the
    new sites. ``password`` protects the packages: one for all, or :data:`GENERATE`.
    """
    ctx = ProvisionContext(project, Workspace(workspace_root, project.name), tuple(add_sites), password)
    try:
        for step in steps:
            step(ctx)
    except BaseException:
        ctx.discard_staging()
        raise
    return ctx.result()
