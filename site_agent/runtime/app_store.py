"""The app store: deployed app bundles, one folder per app name and version.

Layout under the store's root::

    <name>/<version>/app/...            the app's files, as signed
    <name>/<version>/deployment.json    when and what was deployed

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
from flare_provider.wire.bundles import (
    APP_PREFIX,
    DEFAULT_MAX_BUNDLE_BYTES,
    AppConfig,
    BundleError,
    load_app_config,
    open_bundle,
    server_name_set,
    verify_bundle,
)

from ..errors import UnknownAppError

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"
_STAGING_PREFIX = ".staging-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: no final newline, as "$" would allow
_VERSION_RE = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class AppInfo:
    """A deployed app version; ``path`` is the app folder (``app.yaml``, ``custom/``)."""

    name: str
    version: str
    path: Path
    has_custom_code: bool
    deployed_at: float

    def config(self) -> AppConfig:
        return load_app_config(self.path)


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
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UnknownAppError(f"no app named {name!r} is deployed here")
        if version is not None:
            if not isinstance(version, str) or not _VERSION_RE.match(version):
                raise UnknownAppError(f"app {name!r} has no version {version!r} here")
            folder = self.root / name / version
            if not (folder / DEPLOYMENT_FILE).is_file():
                raise UnknownAppError(f"app {name!r} has no version {version[:12]}... deployed here")
            return self._read_info(folder)
        versions = self._versions(name)
        if not versions:
            raise UnknownAppError(f"no app named {name!r} is deployed here; deploy its bundle first")
        return max(versions, key=lambda info: info.deployed_at)

    def list(self) -> list[AppInfo]:
        """Every deployed app version, by name, oldest first."""
        apps = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and _NAME_RE.match(folder.name):
                apps.extend(sorted(self._versions(folder.name), key=lambda info: info.deployed_at))
        return apps

    def _versions(self, name: str) -> list[AppInfo]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = []
        for version_dir in folder.iterdir():
            if _VERSION_RE.match(version_dir.name) and (version_dir / DEPLOYMENT_FILE).is_file():
                try:
                    found.append(self._read_info(version_dir))
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("skipping unreadable deployment %s: %s", version_dir, exc)
        return found

    @staticmethod
    def _read_info(folder: Path) -> AppInfo:
        record = json.loads((folder / DEPLOYMENT_FILE).read_text())
        return AppInfo(
            name=record["name"],
            version=record["version"],
            path=folder / APP_PREFIX,
            has_custom_code=bool(record["has_custom_code"]),
            deployed_at=float(record["deployed_at"]),
        )
