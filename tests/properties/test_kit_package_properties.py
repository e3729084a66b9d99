"""Kit packages (``flare kit unpack``): a zip, or one protected with a password.

Unpacking gives the kit folder or a :class:`PackageError` naming the package; a refused
package leaves nothing in the destination (no kit folder, no staging folder). A
protected package's header cannot make the key derivation take unbounded memory or time.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import struct
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from hostile_support import (
    broken_bytes,
    damage,
    damaged,
    entries_before_the_start,
    examples,
    hostile_text,
    zip_bytes,
    zip_entries,
)
from hypothesis import example, given
from hypothesis import strategies as st

from flare_provider.cli import main as flare
from flare_provider.provisioning import parse_project, provision
from flare_provider.provisioning.packages import MAGIC, PackageError, encrypt, unpack

PROJECT = """
api_version: 3
name: packages
participants:
  - {name: server1, type: server, org: lead}
  - {name: site-1, type: client, org: a}
"""
PASSWORD = "correct horse"
HEADER = struct.Struct(">8sBBBB16s12s")  # the protected package's header, as packages.py writes it


@pytest.fixture(scope="module")
def kit_zip(tmp_path_factory) -> bytes:
    result = provision(parse_project(PROJECT), tmp_path_factory.mktemp("packages") / "workspace")
    return result.packages["site-1"].read_bytes()


@pytest.fixture(scope="module")
def protected(kit_zip) -> bytes:
    return encrypt(kit_zip, PASSWORD)


def unpack_checked(package: bytes, password: str | None = None, *, cli: bool = False) -> None:
    folder = Path(tempfile.mkdtemp(prefix="package-prop-"))
    try:
        path = folder / "site-1.zip"
        path.write_bytes(package)
        dest = folder / "dest"
        if cli:
            args = ["kit", "unpack", str(path), "-d", str(dest)] + (["--password", password] if password is not None else [])
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = flare(args)
            assert code in (0, 1, 2)
            if code == 2:
                assert str(path) in err.getvalue(), err.getvalue()
                assert not dest.exists() or not any(dest.iterdir())
            return
        try:
            kit = unpack(path, dest, password)
        except PackageError as exc:
            assert str(path) in str(exc) or str(dest) in str(exc), exc
            assert not dest.exists() or not any(dest.iterdir()), "a refused package left files behind"
        else:
            assert kit.parent == dest and kit.is_dir() and [p.name for p in dest.iterdir()] == [kit.name]
            for file in kit.rglob("*"):
                assert not file.is_symlink() and file.resolve().is_relative_to(kit.resolve())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@examples(120)
@given(entries=zip_entries, top=st.sampled_from(["site-1/", "", "../", "/", "a/b/"]))
@example(entries=[("startup", b"x", 0o100644, zipfile.ZIP_STORED)], top="").via("one file, no folder (was unpacked)")
@example(entries=[("x", b"x", 0o120777, zipfile.ZIP_STORED)], top="site-1/")
@example(entries=[("\x00x", b"x", 0o100644, zipfile.ZIP_STORED)], top="").via("an empty name (atheris: was IndexError)")
def test_zip_packages_of_hostile_entries_unpack_or_are_refused(entries, top):
    unpack_checked(zip_bytes(entries, prefix=top))


@examples(100)
@given(how=damage)
def test_a_damaged_kit_zip_unpacks_only_whole(kit_zip, how):
    unpack_checked(damaged(kit_zip, how))


@examples(40)
@given(raw=broken_bytes, password=st.one_of(st.none(), st.just(PASSWORD)))
def test_bytes_that_are_no_package_are_refused(raw, password):
    unpack_checked(raw, password)


@examples(40)
@given(version=st.integers(0, 255), log_n=st.integers(0, 255), r=st.integers(0, 255), p=st.integers(0, 255),
       cut=st.integers(0, 80))
@example(version=1, log_n=22, r=32, p=16, cut=80).via("16 GiB and minutes of scrypt (was accepted)")
@example(version=1, log_n=15, r=8, p=1, cut=0)
def test_a_protected_header_with_hostile_parameters_is_refused_quickly(protected, version, log_n, r, p, cut):
    magic, _, _, _, _, salt, nonce = HEADER.unpack_from(protected)
    body = protected[HEADER.size:]
    package = HEADER.pack(magic, version, log_n, r, p, salt, nonce) + body[: len(body) * cut // 80]
    started = time.monotonic()
    unpack_checked(package, PASSWORD)
    assert time.monotonic() - started < 10, "a package header made opening it take too long"


@examples(12)
@given(how=damage)
def test_a_damaged_protected_package_is_refused(protected, how):
    package = damaged(protected, how)
    if package[: len(MAGIC)] == MAGIC and package[8:12] != protected[8:12]:
        return  # other scrypt parameters: the test above covers them, without its cost here
    unpack_checked(package, PASSWORD)


@examples(10)
@given(password=st.one_of(hostile_text, st.just("")))
@example(password="\udcff").via("was UnicodeEncodeError: surrogates not allowed")
def test_any_password_unpacks_or_is_refused(protected, password):
    unpack_checked(protected, password)


@examples(10)
@given(how=damage, password=st.one_of(st.none(), st.just(PASSWORD), st.just("\udcff")))
def test_flare_kit_unpack_never_fails_with_a_traceback(kit_zip, protected, how, password):
    unpack_checked(damaged(kit_zip, how), password, cli=True)
    unpack_checked(damaged(protected, how) if password else protected, password, cli=True)


def test_a_zip_whose_entries_lie_before_its_start_is_refused(kit_zip, tmp_path):
    """Regression (atheris): was ``ValueError: negative seek value`` from zipfile, out of unpack."""
    unpack_checked(entries_before_the_start(kit_zip))
    package = tmp_path / "site-1.zip"
    package.write_bytes(entries_before_the_start(kit_zip))
    with pytest.raises(PackageError, match="is damaged: negative seek value"):
        unpack(package, tmp_path / "dest")
    assert not any((tmp_path / "dest").iterdir())
