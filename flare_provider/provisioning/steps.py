"""The steps of a provisioning run, each one job over the run's :class:`ProvisionContext`.

:data:`STEPS` is their order. Everything that can refuse the request (a damaged state,
a site that cannot be added) runs before anything is written; the kits are written into
a staging folder that only :func:`publish_prod_folder` renames into place, and the state
is recorded last, so a failure leaves no half-written ``prod_NN`` and no state that
points at one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ..files import write_atomic
from .certs import create_root_ca, issue_certificate
from .context import GENERATE, ProvisionContext
from .kits import sign_kit, write_admin_kit, write_client_kit, write_identity, write_server_kit
from .packages import ENCRYPTED_SUFFIX, encrypt, generate_password, zip_folder
from .project import ProjectError
from .workspace import WorkspaceStateError

Step = Callable[[ProvisionContext], None]


def read_state(ctx: ProvisionContext) -> None:
    """The workspace's root CA and state, when it was provisioned before."""
    loaded = ctx.workspace.load_state()
    if loaded is not None:
        ctx.root, ctx.state = loaded


def check_added_sites(ctx: ProvisionContext) -> None:
    """``--add-site``: only new client sites, into a workspace that has every other participant."""
    if not ctx.add_sites:
        return
    if ctx.state is None:
        raise WorkspaceStateError(
            f"--add-site needs an existing provisioned workspace at {ctx.workspace.project_dir}; run a full provision first"
        )
    provisioned = ctx.state["participants"]
    for name in ctx.add_sites:
        if ctx.project.participant(name).type != "client":
            raise ProjectError(f"--add-site {name!r}: only client sites can be added this way")
        if name in provisioned:
            raise ProjectError(f"--add-site {name!r}: already provisioned; a full run re-issues every kit")
    known = set(provisioned) | set(ctx.add_sites)
    missing = [p.name for p in ctx.project.participants if p.name not in known]
    if missing:
        raise ProjectError(
            f"participants {missing} are in project.yml but were never provisioned; add them with --add-site or run a full provision"
        )


def create_root(ctx: ProvisionContext) -> None:
    """A new workspace gets its root CA and state folder; later runs reuse them."""
    if ctx.root is not None:
        return
    ctx.root = create_root_ca(ctx.project.name, ctx.project.server.org)
    ctx.state = ctx.workspace.create_state(ctx.root)
    ctx.created_root = True


def open_prod_folder(ctx: ProvisionContext) -> None:
    """Number this run's ``prod_NN`` and make the hidden folder it is built in."""
    ctx.prod_number = ctx.workspace.next_prod_number(ctx.state)
    prefix = f".{ctx.prod_dir.name}."
    ctx.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=ctx.workspace.project_dir))


def certificates(ctx: ProvisionContext) -> None:
    """A new certificate for each participant, except those ``--add-site`` leaves as they are."""
    for participant in ctx.project.participants:
        name = participant.name
        if ctx.add_sites and name not in ctx.add_sites:
            ctx.identities[name] = ctx.workspace.load_identity(ctx.state, name, ctx.root)
            ctx.records[name] = ctx.state["participants"][name]
            ctx.reused.append(name)
            continue
        identity = issue_certificate(ctx.root, participant)
        ctx.identities[name] = identity
        ctx.records[name] = {
            "type": participant.type,
            "org": participant.org,
            "serial": format(identity.cert.serial_number, "x"),
            "cert_fingerprint": identity.fingerprint,
            "prod": ctx.prod_number,
        }
        ctx.issued.append(name)


def identity_files(ctx: ProvisionContext) -> None:
    """Each kit's certificate, key and root CA."""
    for participant in ctx.project.participants:
        write_identity(ctx.kit_dir(participant.name), participant, ctx.identities[participant.name], ctx.root)


def client_kits(ctx: ProvisionContext) -> None:
    for site in ctx.project.clients:
        write_client_kit(ctx.kit_dir(site.name), ctx.project, site, ctx.root)


def server_kits(ctx: ProvisionContext) -> None:
    """One kit per server participant, each with its own identity and connection file."""
    for server in ctx.project.servers:
        write_server_kit(ctx.kit_dir(server.name), ctx.project, server, ctx.identities[server.name], ctx.root)


def admin_kits(ctx: ProvisionContext) -> None:
    for admin in ctx.project.admins:
        write_admin_kit(ctx.kit_dir(admin.name), ctx.project, admin, ctx.root)


def signatures(ctx: ProvisionContext) -> None:
    """Sign every kit's ``startup/`` with the root CA key, once all its files are there."""
    for participant in ctx.project.participants:
        sign_kit(ctx.kit_dir(participant.name), ctx.root)


def passwords(ctx: ProvisionContext) -> None:
    """The password of each protected package: one for all, or one generated per participant."""
    if ctx.password is None:
        return
    for participant in ctx.project.participants:
        secret = generate_password() if ctx.password is GENERATE else str(ctx.password)
        ctx.passwords[participant.name] = secret


def packages(ctx: ProvisionContext) -> None:
    """Each kit as a zip beside it, encrypted where it has a password."""
    for participant in ctx.project.participants:
        name = participant.name
        blob = zip_folder(ctx.kit_dir(name))
        if name in ctx.passwords:
            blob = encrypt(blob, ctx.passwords[name])
            ctx.packages[name] = f"{name}{ENCRYPTED_SUFFIX}"
        else:
            ctx.packages[name] = f"{name}.zip"
        write_atomic(ctx.staging / ctx.packages[name], blob, 0o600)


def publish_prod_folder(ctx: ProvisionContext) -> None:
    """The complete ``prod_NN`` appears under its name in one rename."""
    ctx.staging.rename(ctx.prod_dir)
    ctx.staging = None


def record_state(ctx: ProvisionContext) -> None:
    """What was issued, so that a later ``--add-site`` reuses these certificates."""
    ctx.state["last_prod"] = ctx.prod_number
    ctx.state["participants"] = ctx.records
    ctx.workspace.save_state(ctx.state)


STEPS: tuple[Step, ...] = (
    read_state,
    check_added_sites,
    create_root,
    open_prod_folder,
    certificates,
    identity_files,
    client_kits,
    server_kits,
    admin_kits,
    signatures,
    passwords,
    packages,
    publish_prod_folder,
    record_state,
)
