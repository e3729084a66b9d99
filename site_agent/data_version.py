"""The version of a site's training data, as the agent reports it in its status.

A site states it in ``local/site.yaml`` (``data_version: 2026-03``), for instance from the
job that refreshes its data; without that key the version is a digest of the data
folder's listing: every file's path, size and modification time. Either way the agent
reads it afresh while it runs, so a site changes its data (or the key) without a restart,
and an Airflow trigger watching the sites sees the change (``docs/assets.md``).

The listing is walked at most every ``max_age`` seconds, however often status is asked,
and never more than ``max_entries`` entries deep: a folder of millions of files costs a
bounded walk, and its digest still changes when any of the files walked changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import SettingsError
from .site_settings import data_version_setting

log = logging.getLogger(__name__)

SOURCE_SETTINGS = "site.yaml"
SOURCE_LISTING = "listing"
MAX_ENTRIES = 200_000


@dataclass(frozen=True)
class DataVersion:
    version: str  # "" when neither site.yaml nor the data folder gives one
    source: str  # SOURCE_SETTINGS, SOURCE_LISTING or ""
    seen_at: float  # when this agent first saw this version (seconds since the epoch)


def listing_digest(data_dir: Path, max_entries: int = MAX_ENTRIES) -> str:
    """A digest of ``data_dir``'s listing: relative paths, sizes, modification times (ns).

    Links are not followed (a link's own entry counts). "" for a missing folder.
    """
    if not data_dir.is_dir():
        return ""
    digest = hashlib.sha256()
    seen = 0
    for folder, dirs, files in os.walk(data_dir):
        dirs.sort()
        for name in sorted(files) + [d + "/" for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name.rstrip("/"))
            try:
                info = os.lstat(path)
            except OSError:  # removed while walking: the next walk tells
                continue
            digest.update(f"{os.path.relpath(path, data_dir)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
            seen += 1
            if seen >= max_entries:
                log.warning("data folder %s has more than %d entries; its version covers the first %d",
                            data_dir, max_entries, max_entries)
                return "sha256:" + digest.hexdigest()[:16]
    return "sha256:" + digest.hexdigest()[:16]


class DataVersionProbe:
    """The site's data version now: ``site.yaml``'s ``data_version``, else the listing's digest."""

    def __init__(self, settings_file: Path, data_dir: Path, max_age: float = 2.0, max_entries: int = MAX_ENTRIES):
        self.settings_file = Path(settings_file)
        self.data_dir = Path(data_dir)
        self.max_age = max_age
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._current = DataVersion("", "", 0.0)
        self._read_at = float("-inf")

    def current(self) -> DataVersion:
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.max_age:
                self._read_at = now
                version, source = self._read()
                if (version, source) != (self._current.version, self._current.source):
                    if self._current.version:
                        log.info("data version changed: %s (%s)", version or "(none)", source or "no data")
                    self._current = DataVersion(version, source, time.time())
            return self._current

    def _read(self) -> tuple[str, str]:
        stated = self._stated()
        if stated:
            return stated, SOURCE_SETTINGS
        listed = listing_digest(self.data_dir, self.max_entries)
        return (listed, SOURCE_LISTING) if listed else ("", "")

    def _stated(self) -> str | None:
        """``data_version`` of site.yaml as it is now; the last good one when the file is broken."""
        try:
            doc = yaml.safe_load(self.settings_file.read_text(encoding="utf-8"))
            return data_version_setting(doc, str(self.settings_file))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError, SettingsError) as exc:
            log.warning("cannot read data_version from %s, keeping %r: %s", self.settings_file, self._current.version, exc)
            return self._current.version if self._current.source == SOURCE_SETTINGS else None
