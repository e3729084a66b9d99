"""The app store: deployed app bundles, one folder per app name and version.

Layout under the store's root::

    <name>/<version>/app/...            the app's files, as signed
    <name>/<version>/deployment.json    when and what was deployed
    <name>/<version>/consent.json       the site operator's approval or rejection (flare approve)

A bundle is verified completely (signer, signature, every file's hash, safe paths)
before anything is written, then unpacked into a hidden staging folder and renamed
into place, so a refused or interrupted deploy leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flare_provider.safezip import extract_members
from flare_provider.wire.app_config import APP_NAME_RE, AppConfig, load_app_config
from flare_provider.wire.bundles import (
    APP_PREFIX,
    DEFAULT_MAX_BUNDLE_BYTES,
    BundleError,
    open_bundle,
    server_name_set,
    verify_bundle,
)

from ..errors import UnknownAppError

log = logging.getLogger(__name__)

APPS_DIR = "apps"  # the store's folder in the agent's work folder
DEPLOYMENT_FILE = "deployment.json"
_STAGING_PREFIX = ".staging-"
_VERSION_RE = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class AppInfo:
    """A deployed app version; ``path`` is the app folder (``app.yaml``, ``custom/``)."""

    name: str
    version: str
    path: Path
    has_custom_code: bool
    deployed_at: float
    signer: str = ""  # the server identity that signed the bundle

    def config(self) -> AppConfig:
        return load_app_config(self.path)

    def file_sizes(self) -> dict[str, int]:
        """The app's files (paths as in the bundle) and their sizes in bytes."""
        return {p.relative_to(self.path).as_posix(): p.stat().st_size for p in sorted(self.path.rglob("*")) if p.is_file()}


class AppStore:
    """Deployed apps of one federation, verified against its root CA and server identities.

    ``server_names`` is one server participant's name or all of them: a bundle signed by
    any of them deploys (with two servers, either Airflow-side identity may deploy).
    """

    def __init__(
        self,
        root: Path,
        root_ca_pem: bytes,
        server_names: str | Iterable[str],
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    ):
        self.root = Path(root)
        self.root_ca_pem = root_ca_pem
        self.server_names = server_name_set(server_names)
        self.max_bundle_bytes = max_bundle_bytes
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"{_STAGING_PREFIX}*"):  # from a deploy cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)

    def deploy(self, bundle_path: Path) -> tuple[AppInfo, bool]:
        """Verify and unpack a bundle; returns (info, newly_deployed).

        Deploying content that is already here is a no-op (``newly_deployed`` False).
        Raises :class:`BundleError` for anything that must not run here.
        """
        bundle_path = Path(bundle_path)
        source = f"app bundle {bundle_path.name}"
        try:
            size = bundle_path.stat().st_size
        except OSError as exc:
            raise BundleError(f"{source}: cannot read: {exc.strerror}") from None
        if size > self.max_bundle_bytes:
            raise BundleError(f"{source}: {size} bytes is more than the {self.max_bundle_bytes} bytes allowed")
        with open_bundle(bundle_path, source) as zf:
            verified = verify_bundle(zf, self.root_ca_pem, self.server_names, source, self.max_bundle_bytes)
            manifest = verified.manifest
            target = self.root / manifest.name / manifest.version
            with self._lock:
                if (target / DEPLOYMENT_FILE).is_file():
                    return self._read_info(target), False
                staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.root))
                try:
                    extract_members(zf, verified.members, staging / APP_PREFIX, source, BundleError, strip=APP_PREFIX)
                    record = {
                        "name": manifest.name,
                        "version": manifest.version,
                        "deployed_at": time.time(),
                        "has_custom_code": manifest.has_custom_code,
                        "signer": verified.signer,
                        "trainer": verified.config.trainer_path,
                        "script": verified.config.script,
                        "files": manifest.files,
                    }
                    (staging / DEPLOYMENT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
                    target.parent.mkdir(exist_ok=True)
                    staging.rename(target)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        log.info("deployed app %s version %s (custom code: %s)", manifest.name, manifest.version[:12], manifest.has_custom_code)
        return self._read_info(target), True

    def get(self, name: str, version: str | None = None) -> AppInfo:
        """The app ``name`` at ``version``, or its latest deployed version; :class:`UnknownAppError` if absent."""
        if not isinstance(name, str) or not APP_NAME_RE.match(name):
            raise UnknownAppError(f"no app named {name!r} is deployed here")
        if version is not None:
            if not isinstance(version, str) or not _VERSION_RE.match(version):
                raise UnknownAppError(f"app {name!r} has no version {version!r} here")
            folder = self.root / name / version
            if not (folder / DEPLOYMENT_FILE).is_file():
                raise UnknownAppError(f"app {name!r} has no version {version[:12]}... deployed here")
            return self._read_info(folder)
        versions = _versions(self.root, name)
        if not versions:
            raise UnknownAppError(f"no app named {name!r} is deployed here; deploy its bundle first")
        return max(versions, key=lambda info: info.deployed_at)

    def list(self) -> list[AppInfo]:
        """Every deployed app version, by name, oldest first."""
        return list_deployed(self.root)

    @staticmethod
    def _read_info(folder: Path) -> AppInfo:
        return _read_info(folder)


def list_deployed(root: Path) -> list[AppInfo]:
    """Every app version deployed in the store at ``root``, by name, oldest first; reads only
    (``flare approve`` lists them while the agent runs)."""
    apps = []
    for folder in sorted(Path(root).iterdir()) if Path(root).is_dir() else ():
        if folder.is_dir() and APP_NAME_RE.match(folder.name):
            apps.extend(sorted(_versions(root, folder.name), key=lambda info: info.deployed_at))
    return apps


def _versions(root: Path, name: str) -> list[AppInfo]:
    folder = Path(root) / name
    if not folder.is_dir():
        return []
    found = []
    for version_dir in folder.iterdir():
        if _VERSION_RE.match(version_dir.name) and (version_dir / DEPLOYMENT_FILE).is_file():
            try:
                found.append(_read_info(version_dir))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("skipping unreadable deployment %s: %s", version_dir, exc)
    return found


def _read_info(folder: Path) -> AppInfo:
    record = json.loads((folder / DEPLOYMENT_FILE).read_text())
    return AppInfo(
        name=record["name"],
        version=record["version"],
        path=folder / APP_PREFIX,
        has_custom_code=bool(record["has_custom_code"]),
        deployed_at=float(record["deployed_at"]),
        signer=str(record.get("signer", "")),
    )
