"""Real inputs to start each target from: a signed app bundle, a kit package, a model file.

Made once per run from a freshly provisioned project, so the seeds are what the project
itself writes today; the fuzzer mutates them from there.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare_provider.provisioning import parse_project, provision
from flare_provider.wire.bundles import build_bundle
from flare_provider.wire.tensors import dump_bytes

EXAMPLE_APP = Path(__file__).resolve().parents[1] / "examples" / "apps" / "digits"
PROJECT = """
api_version: 3
name: fuzz
participants:
  - {name: server1, type: server, org: lead}
  - {name: site-1, type: client, org: a}
"""
MODEL = {"0.weight": np.ones((4, 3), np.float32), "0.bias": np.zeros(4, np.float32), "steps": np.arange(2)}


@dataclass
class Project:
    root_ca_pem: bytes
    server: str
    bundle: bytes
    kit_package: bytes


def project() -> Project:
    folder = Path(tempfile.mkdtemp(prefix="flare-fuzz-project-"))
    result = provision(parse_project(PROJECT), folder / "workspace")
    startup = result.kits["server1"] / "startup"
    cert, key = (startup / "server1.crt").read_bytes(), (startup / "server1.key").read_bytes()
    return Project((startup / "rootCA.pem").read_bytes(), "server1", build_bundle(EXAMPLE_APP, cert, key),
                   result.packages["site-1"].read_bytes())


def model_file() -> bytes:
    return dump_bytes(MODEL, {"flare.result_kind": "weights"})


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("kit/startup/a.txt", b"a" * 40)
        zf.writestr("kit/local/b.txt", b"b")
    return buffer.getvalue()
