"""``ProvisionOperator``: ``flare provision`` as an Airflow task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException


class ProvisionOperator(BaseOperator):
    """Write signed startup kits for every participant of an NVIDIA FLARE style project.

    :param project_file: path to ``project.yml`` (templated).
    :param workspace: workspace folder; kits go to ``WORKSPACE/<project>/prod_NN`` (templated).
    :param add_sites: client sites to issue on their own, keeping every other kit's
        certificate (``flare provision --add-site``); empty means a full run (templated).
    :param package_password: protect every package with this password, for example
        ``"{{ conn.kit_password.password }}"``; it is never logged (templated).

    Returns (to XCom) a secret-free summary: the ``prod_NN`` folder, the root CA
    fingerprint, and where each kit and package is.
    """

    template_fields: Sequence[str] = ("project_file", "workspace", "add_sites", "package_password")
    ui_color = "#d9f2e6"

    def __init__(
        self,
        *,
        project_file: str,
        workspace: str,
        add_sites: Sequence[str] = (),
        package_password: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.project_file = project_file
        self.workspace = workspace
        self.add_sites = add_sites
        self.package_password = package_password

    def execute(self, context: Any) -> dict:
        from flare_provider.provisioning import (
            ProjectError,
            WorkspaceStateError,
            load_project,
            provision,
        )

        try:
            project = load_project(self.project_file)
            for warning in project.warnings:
                self.log.warning("project.yml: %s", warning)
            result = provision(
                project, self.workspace, add_sites=tuple(self.add_sites or ()), password=self.package_password or None
            )
        except (ProjectError, WorkspaceStateError) as exc:
            # A bad project file or workspace needs a person; retrying cannot fix it.
            raise AirflowFailException(str(exc)) from exc
        self.log.info(
            "Provisioned %s into %s; root CA %s (%s); new certificates: %s; kept: %s",
            project.name,
            result.prod_dir,
            result.root_fingerprint,
            "created" if result.created_root else "reused",
            ", ".join(result.issued) or "none",
            ", ".join(result.reused) or "none",
        )
        return result.summary()
