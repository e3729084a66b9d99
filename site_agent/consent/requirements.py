"""Whether the interpreter a task would run in satisfies its app's ``requirements``.

An app lists Python requirements in ``app.yaml`` (PEP 508: ``scikit-learn>=1.3``); the
site decides whether to provide them, in the environment its workers run in (the agent's
own, or site.yaml ``python``). The agent refuses a task whose requirements that
environment lacks, naming each, before anything trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from ..errors import TaskRejected
from .probe import probe

PROBE_TIMEOUT_S = 30.0


def missing_requirements(requirements: Sequence[str], python: str | Path | None = None) -> list[str]:
    """The requirements not met in ``python`` (default: this interpreter), each with what was found."""
    if not requirements:
        return []
    parsed = []
    for text in requirements:
        try:
            parsed.append((text, Requirement(text)))
        except InvalidRequirement as exc:  # checked at deploy already; an app edited on disk is refused as well
            raise TaskRejected(f"requirement {text!r} is not valid: {exc}") from None
    answer = _probe([req.name for _, req in parsed], python)
    missing = []
    for text, req in parsed:
        if req.marker is not None and not req.marker.evaluate({**answer["environment"], "extra": ""}):
            continue  # not needed on this platform or Python
        found = answer["versions"].get(req.name)
        if found is None:
            missing.append(f"{text} (not installed)")
        elif req.specifier and not req.specifier.contains(found, prereleases=True):
            missing.append(f"{text} (found {found})")
    return missing


def _probe(names: list[str], python: str | Path | None) -> dict:
    if python is None or str(python) == sys.executable:
        return probe(names)
    try:
        out = subprocess.run([str(python), "-I", str(Path(__file__).with_name("probe.py")), *names],
                             capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=True)
        answer = json.loads(out.stdout)
        if not isinstance(answer, dict) or not isinstance(answer.get("versions"), dict):
            raise ValueError("unexpected answer")
        return answer
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()[-1:] or [f"exit status {exc.returncode}"]
        raise TaskRejected(f"cannot check the app's requirements in {python}: {detail[0]}") from None
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise TaskRejected(f"cannot check the app's requirements in {python}: {exc}") from None
