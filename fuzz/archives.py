"""Fuzz target: app bundles (verified and deployed into an app store) and kit packages (unpacked).

The first byte of an input picks the reader. Either reader may refuse the input with its
own error (:class:`BundleError`, :class:`PackageError`) and must leave nothing behind; any
other exception, or a file left after a refusal, is a finding.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["flare_provider", "site_agent", "zipfile"]):
    import zipfile  # noqa: F401  (instrumented when nothing imported it before)

    from flare_provider.provisioning.packages import PackageError, unpack
    from flare_provider.wire.bundles import BundleError
    from site_agent.runtime.app_store import AppStore

from fuzz import seeds

PROJECT = seeds.project()
WORK = Path(tempfile.mkdtemp(prefix="flare-fuzz-archives-"))
STORE = AppStore(WORK / "apps", PROJECT.root_ca_pem, PROJECT.server)


def deploy(data: bytes) -> None:
    path = WORK / "incoming.bundle"
    path.write_bytes(data)
    before = sorted(STORE.root.iterdir())
    try:
        info, newly = STORE.deploy(path)
    except BundleError:
        if sorted(STORE.root.iterdir()) != before:
            raise AssertionError("a refused bundle left files in the app store") from None
        return
    if newly:  # keep the store as it was, so every input meets the same store
        shutil.rmtree(info.path.parent)
        if not any(info.path.parent.parent.iterdir()):
            info.path.parent.parent.rmdir()


def unpack_package(data: bytes) -> None:
    package, dest = WORK / "kit.zip", WORK / "dest"
    package.write_bytes(data)
    try:
        unpack(package, dest, password=None)  # a protected package is refused without one (scrypt is for the tests)
    except PackageError:
        if dest.exists() and any(dest.iterdir()):
            raise AssertionError("a refused package left files behind") from None
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    (deploy if data[0] % 2 == 0 else unpack_package)(data[1:])


def seed_inputs() -> dict[str, bytes]:
    return {"bundle": b"\x00" + PROJECT.bundle, "kit": b"\x01" + PROJECT.kit_package, "zip": b"\x01" + seeds.small_zip()}


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
