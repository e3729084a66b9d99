"""The snapshot store: one committed folder per round, visible only once complete.

Layout, under ``file:///path`` or ``s3://bucket/prefix``::

    <root>/<federation>/<run>/round_00007/model.safetensors         the global weights
    <root>/<federation>/<run>/round_00007/server_state.safetensors  optimizer tensors (optional)
    <root>/<federation>/<run>/round_00007/state.json                round and aggregator state
    <root>/<federation>/<run>/round_00007/COMMIT                    written last
    <root>/<federation>/<run>/FINAL                                 the run's final round

``COMMIT`` lists every other file of the round with its SHA-256 and size, and for the
tensor files the backend's tag (S3: the SHA-256 the object was uploaded with, as object
metadata; file: inode and times). A round is visible only once its ``COMMIT`` exists, so
a worker dying mid-write leaves nothing a reader would take; a round whose files do not
match ``COMMIT`` is skipped in favour of the previous one, with a warning naming it.

Reading a round checks the small files by their SHA-256 and the tensor files by size and
tag, without downloading them; a tensor file whose tag changed (replaced, rewritten,
copied, or committed before tags) is checked by its SHA-256 instead. A tensor file's
SHA-256 is always checked as it is downloaded or loaded, so a model is fetched once and
never taken unverified.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ..files import file_digest
from .backend import Backend
from .errors import SnapshotCorrupted, SnapshotError
from .layout import (
    COMMIT_FILE,
    FINAL_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    SERVER_STATE_FILE,
    STATE_FILE,
    Snapshot,
    bytes_digest,
    check,
    json_bytes,
    now,
    parse_commit,
    state_json,
)
from .local import LocalBackend, path_from_file_uri
from .model_files import load_tensors, write_hashed
from .naming import decode_name, encode_name, parse_round_folder, round_folder
from .s3 import S3Backend, make_s3_client, parse_s3_uri

log = logging.getLogger(__name__)

def open_backend(uri: str, *, s3_client=None, s3_settings: Mapping[str, Any] | None = None, **s3_options) -> Backend:
    """The backend for a ``file://`` or ``s3://`` URI."""
    if not isinstance(uri, str):
        raise ValueError(f"a snapshot store URI must be a string, got {uri!r}")
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return LocalBackend(path_from_file_uri(uri))
    if scheme == "s3":
        bucket, prefix = parse_s3_uri(uri)
        if s3_client is None:
            s3_client = make_s3_client(s3_settings)
        elif s3_settings:
            raise ValueError("give either an S3 client or S3 settings, not both")
        return S3Backend(s3_client, bucket, prefix, **s3_options)
    raise ValueError(f"unsupported snapshot store {uri!r}; use file:///absolute/path or s3://bucket/prefix")


class SnapshotStore:
    """Committed rounds of federated runs, on a local file system or S3.

    :param uri: ``file:///absolute/path`` or ``s3://bucket/prefix``.
    :param s3_client: a boto3 S3 client to use (for example from an Airflow AWS connection).
    :param s3_settings: else settings for a new client: ``endpoint_url``, ``region_name``,
        ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
        ``profile_name``, ``addressing_style``, ``verify``, ``connect_timeout``,
        ``read_timeout``; without either, the standard AWS credential chain.
    :param attempts: tries per S3 operation before :class:`SnapshotError` (at least 1).
    :param backoff_s: delay before the first S3 retry, doubled for each further one.
    :param transfer_config: a ``boto3.s3.transfer.TransferConfig`` for large files.
    :param tmp_dir: where downloads and serialized models are staged (default: system temp).
    """

    def __init__(
        self,
        uri: str,
        *,
        s3_client=None,
        s3_settings: Mapping[str, Any] | None = None,
        attempts: int = 4,
        backoff_s: float = 0.5,
        transfer_config=None,
        tmp_dir: str | Path | None = None,
    ):
        options = {"attempts": attempts, "backoff_s": backoff_s, "transfer_config": transfer_config}
        self.backend = open_backend(uri, s3_client=s3_client, s3_settings=s3_settings, **options)
        self.uri = self.backend.uri()
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else None

    def __repr__(self) -> str:
        return f"SnapshotStore({self.uri!r})"

    # ---- writing ---------------------------------------------------------------------------

    def commit_round(
        self,
        federation: str,
        run: str,
        round_number: int,
        weights_or_file: Mapping[str, np.ndarray] | str | os.PathLike,
        state: Mapping[str, Any],
        *,
        state_tensors: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Store a round's model and state and commit it; returns the round's URI.

        ``weights_or_file`` is the new global weights or a safetensors file holding them;
        ``state`` is JSON (round metrics, ``aggregator.state()`` meta, ...);
        ``state_tensors`` the aggregator's tensors (``aggregator.state()[0]``). A round that
        is committed already is never overwritten.
        """
        folder = self._round_key(federation, run, round_number)
        state_bytes = state_json(state)
        if self.backend.get_bytes(f"{folder}/{COMMIT_FILE}") is not None:
            try:
                self.get_round(federation, run, round_number)
            except SnapshotCorrupted as exc:
                # Readers skip it already; the new commit marker, written last, replaces it.
                log.warning("replacing a committed round that does not verify: %s", exc)
            else:
                raise SnapshotError(
                    f"{self.backend.uri(folder)} is committed already; a committed round is never rewritten"
                )
        with self._staging(folder) as staging:
            # Weights are serialized and hashed in one pass; a file given is read once, to hash it.
            files = {MODEL_FILE: self._model_file(weights_or_file, staging)}
            if state_tensors:
                path = staging / SERVER_STATE_FILE
                files[SERVER_STATE_FILE] = path, write_hashed(
                    state_tensors, path, "state tensors", writeback=self.backend.adopts_in_place
                )
            manifest = {}
            for name, (path, (sha256, size)) in files.items():
                # Files written here are given up (a local store moves them in); the caller's are copied.
                store = self.backend.adopt_file if path.parent == staging else self.backend.put_file
                tag = store(f"{folder}/{name}", path, sha256)
                manifest[name] = {"sha256": sha256, "size": size, "tag": tag}
        self.backend.put_bytes(f"{folder}/{STATE_FILE}", state_bytes)
        sha256, size = bytes_digest(state_bytes)
        manifest[STATE_FILE] = {"sha256": sha256, "size": size}
        commit = {
            "format": FORMAT_VERSION,
            "federation": federation,
            "run": run,
            "round": round_number,
            "committed_at": now(),
            "files": manifest,
        }
        # The marker goes last: until it exists, readers do not see the round at all.
        self.backend.put_bytes(f"{folder}/{COMMIT_FILE}", json_bytes(commit))
        uri = self.backend.uri(folder)
        log.info("committed %s", uri)
        return uri

    def mark_final(self, federation: str, run: str, round_number: int) -> str:
        """Record ``round_number`` (committed, verified) as the final model of ``run``."""
        snapshot = self.get_round(federation, run, round_number)
        marker = {"round": round_number, "marked_at": now(), "model_sha256": snapshot.files[MODEL_FILE]["sha256"]}
        self.backend.put_bytes(f"{self.run_prefix(federation, run)}/{FINAL_FILE}", json_bytes(marker))
        return snapshot.uri

    # ---- reading ---------------------------------------------------------------------------

    def latest(self, federation: str, run: str) -> Snapshot | None:
        """The newest committed round of ``run`` whose files check out, or None.

        A round that does not is skipped with a warning naming it. A store that cannot be
        reached raises :class:`SnapshotError` instead: an older round is never taken for
        lack of an answer. Cheap: no tensor file is downloaded (see :meth:`restore`).
        """
        for round_number in reversed(self.list_rounds(federation, run)):
            try:
                return self.get_round(federation, run, round_number)
            except SnapshotCorrupted as exc:
                log.warning("skipping snapshot: %s", exc)
        return None

    def restore(self, federation: str, run: str) -> tuple[Snapshot, dict[str, np.ndarray]] | None:
        """The newest committed round of ``run`` with its weights, or None.

        As :meth:`latest`, and a round whose model fails its SHA-256 as it loads is skipped
        too, in favour of the previous one: each model is downloaded once.
        """
        for round_number in reversed(self.list_rounds(federation, run)):
            try:
                snapshot = self.get_round(federation, run, round_number)
                return snapshot, self.load_weights(snapshot)
            except SnapshotCorrupted as exc:
                log.warning("skipping snapshot: %s", exc)
        return None

    def get_round(self, federation: str, run: str, round_number: int) -> Snapshot:
        """A committed round whose state verifies against its checksum and whose tensor files
        are there, unchanged (size and tag; else by checksum); :class:`SnapshotCorrupted` if it
        is not committed or does not check out."""
        folder = self._round_key(federation, run, round_number)
        where = self.backend.uri(folder)
        raw = self.backend.get_bytes(f"{folder}/{COMMIT_FILE}")
        if raw is None:
            raise SnapshotCorrupted(f"{where} is not committed")
        files, committed_at = parse_commit(raw, where)
        state_raw = self.backend.get_bytes(f"{folder}/{STATE_FILE}")
        if state_raw is None:
            raise SnapshotCorrupted(f"{where}: {STATE_FILE} is missing")
        check(where, STATE_FILE, files[STATE_FILE], bytes_digest(state_raw))
        for name in sorted(files):
            if name != STATE_FILE:
                self._check_unchanged(where, f"{folder}/{name}", name, files[name])
        try:
            state = json.loads(state_raw)
        except (ValueError, RecursionError) as exc:
            raise SnapshotCorrupted(f"{where}: {STATE_FILE} is not JSON: {exc}") from None
        if not isinstance(state, dict):  # commit_round writes a mapping, and readers take one
            raise SnapshotCorrupted(f"{where}: {STATE_FILE} is not a JSON object")
        return Snapshot(federation, run, round_number, where, state, files, committed_at)

    def load_weights(self, snapshot: Snapshot) -> dict[str, np.ndarray]:
        """The snapshot's global weights, checked against their SHA-256 as they are fetched;
        :class:`SnapshotCorrupted` if they do not match (see :meth:`restore`)."""
        return self._load(snapshot, MODEL_FILE)

    def load_server_state(self, snapshot: Snapshot) -> dict[str, np.ndarray]:
        """The aggregator tensors committed with the snapshot (empty if there were none)."""
        if not snapshot.has_server_state:
            return {}
        return self._load(snapshot, SERVER_STATE_FILE)

    def _load(self, snapshot: Snapshot, name: str) -> dict[str, np.ndarray]:
        """One of the snapshot's tensor files, read into arrays and checked against its
        SHA-256 in the same pass (streamed: no local copy, no second read)."""
        loaded = self.backend.read_tensors(f"{self._round_key(snapshot.federation, snapshot.run, snapshot.round)}/{name}")
        check(snapshot.uri, name, snapshot.files[name], None if loaded is None else (loaded.sha256, loaded.size))
        if loaded.tensors is None:
            raise SnapshotError(f"{snapshot.uri}/{name} is not a safetensors file numpy can read: {loaded.problem}")
        return loaded.tensors

    def download_weights(self, snapshot: Snapshot, dest: str | Path) -> Path:
        """Write the snapshot's model file to ``dest`` (streamed, verified)."""
        dest = Path(dest)
        with self._fetch(snapshot, MODEL_FILE) as path:
            shutil.copyfile(path, dest)
        return dest

    def find_final(self, federation: str, run: str | None = None) -> Snapshot | None:
        """The final model of ``run``, or of the most recently finished run of ``federation``.

        For warm starts: with no ``run``, finished runs are tried newest first (by when
        they were marked final) and one whose model does not verify is skipped with a
        warning. With a ``run``, a final round that does not verify raises.
        """
        if run is not None:
            marker = self._final_marker(federation, run)
            return None if marker is None else self.get_round(federation, run, marker["round"])
        finished = []
        for name in self.list_runs(federation):
            try:
                marker = self._final_marker(federation, name)
            except SnapshotCorrupted as exc:
                log.warning("skipping run %r: %s", name, exc)
                continue
            if marker is not None:
                finished.append((str(marker.get("marked_at", "")), name, marker["round"]))
        for _, name, round_number in sorted(finished, reverse=True):
            try:
                return self.get_round(federation, name, round_number)
            except SnapshotCorrupted as exc:
                log.warning("skipping final model of run %r: %s", name, exc)
        return None

    def list_federations(self) -> list[str]:
        """Federations with anything stored."""
        return sorted(n for n in map(decode_name, self.backend.list_folders("")) if n is not None)

    def list_runs(self, federation: str) -> list[str]:
        """Run ids of ``federation`` with anything stored."""
        folders = self.backend.list_folders(encode_name(federation, "federation"))
        return sorted(n for n in map(decode_name, folders) if n is not None)

    def list_rounds(self, federation: str, run: str) -> list[int]:
        """Round numbers of ``run`` that have a commit marker (not yet verified), ascending."""
        rounds = set()
        for key in self.backend.list_keys(self.run_prefix(federation, run)):
            folder, _, name = key.partition("/")
            number = parse_round_folder(folder)
            if name == COMMIT_FILE and number is not None:
                rounds.add(number)
        return sorted(rounds)

    def load_initial_weights(self, source: str | os.PathLike) -> dict[str, np.ndarray]:
        """An initial model: a safetensors file by path, ``file://`` or ``s3://`` URI.

        An S3 source is read with this store's S3 client when it has one.
        """
        from .initial import load_initial_weights

        client = self.backend.client if isinstance(self.backend, S3Backend) else None
        return load_initial_weights(source, s3_client=client, tmp_dir=self.tmp_dir)

    # ---- helpers ---------------------------------------------------------------------------

    def run_prefix(self, federation: str, run: str) -> str:
        """The key every object of the run lies under (its folder in a file store)."""
        return f"{encode_name(federation, 'federation')}/{encode_name(run, 'run id')}"

    def _round_key(self, federation: str, run: str, round_number: int) -> str:
        return f"{self.run_prefix(federation, run)}/{round_folder(round_number)}"

    def _final_marker(self, federation: str, run: str) -> dict | None:
        key = f"{self.run_prefix(federation, run)}/{FINAL_FILE}"
        raw = self.backend.get_bytes(key)
        if raw is None:
            return None
        try:
            marker = json.loads(raw)
            round_folder(marker["round"])
            return marker
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise SnapshotCorrupted(f"{self.backend.uri(key)} is damaged: {exc}") from None

    @contextmanager
    def _staging(self, folder: str | None = None) -> Iterator[Path]:
        """A scratch folder, removed afterwards; for files to store under ``folder``, where the
        backend can adopt them cheaply (a local store: a hidden folder of the store itself)."""
        near = self.backend.staging_dir(folder) if folder is not None else None
        if near is None and self.tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".flare-staging-" if near else "flare-snapshot-", dir=near or self.tmp_dir))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _model_file(self, weights_or_file, staging: Path) -> tuple[Path, tuple[str, int]]:
        """The model's file and its SHA-256 and size."""
        if isinstance(weights_or_file, Mapping):
            path = staging / MODEL_FILE
            return path, write_hashed(weights_or_file, path, "weights", writeback=self.backend.adopts_in_place)
        path = Path(weights_or_file)
        load_tensors(path, str(path), header_only=True)
        return path, file_digest(path)

    def _check_unchanged(self, where: str, key: str, name: str, expected: Mapping[str, Any]) -> None:
        """That a tensor file is the one committed, without reading it where its tag says so."""
        stat = self.backend.stat(key)
        if stat is None:
            raise SnapshotCorrupted(f"{where}: {name} is missing")
        size, tag = stat
        if size != expected["size"]:
            raise SnapshotCorrupted(f"{where}: {name} is {size} bytes, the commit says {expected['size']}")
        if tag is None or tag != expected.get("tag"):
            # Written or replaced by something else since, or committed before tags: only
            # its content can tell.
            check(where, name, expected, self.backend.digest(key))

    @contextmanager
    def _fetch(self, snapshot: Snapshot, name: str) -> Iterator[Path]:
        """A local, verified copy of one of the snapshot's files (the file itself when local)."""
        key = f"{self._round_key(snapshot.federation, snapshot.run, snapshot.round)}/{name}"
        expected = snapshot.files[name]
        local = self.backend.local_path(key)
        if local is not None:
            check(snapshot.uri, name, expected, self.backend.digest(key))
            yield local
            return
        with self._staging() as staging:
            path = staging / name
            check(snapshot.uri, name, expected, self.backend.download(key, path))  # hashed as it came
            yield path


