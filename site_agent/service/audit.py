"""The agent's audit log: one JSON line per command, allowed or refused, never rewritten.

Each line says when, who (the caller's certificate: CN, org, kind, role, and the
network peer), what (the method and the task or app it concerned; for a fetched result,
the privacy filters it went through and any request the site refused) and the outcome
(``ok``, ``denied`` or the gRPC status code of the failure, with its message).
Lines are written with a single ``write`` to a file opened in append mode, so
concurrent calls never interleave within a line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

from flare_provider.provisioning.certs import PeerIdentity

AUDIT_FILE = "audit.jsonl"


class AuditLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def record(
        self,
        who: PeerIdentity,
        peer: str,
        method: str,
        outcome: str,
        detail: str = "",
        **what: Any,
    ) -> None:
        """Append one entry; ``what`` holds the task id, app name and the like."""
        entry = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "who": {"name": who.name, "org": who.org, "kind": who.kind, "role": who.role, "peer": peer},
            "method": method,
            **{key: value for key, value in what.items() if value not in (None, "")},
            "outcome": outcome,
        }
        if detail:
            entry["detail"] = detail
        line = (json.dumps(entry, sort_keys=False) + "\n").encode()
        with self._lock:
            if self._fd >= 0:
                os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_audit_log(path: str | os.PathLike) -> list[dict]:
    """Every entry of an audit log, oldest first."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
