"""``s3://bucket/prefix`` snapshots through boto3, on AWS or any S3-compatible endpoint.

Only the standard S3 API is used (put, get, head-less listing, managed multipart
transfers), so MinIO, Ceph and other compatible stores work. Large files stream from and
to disk through boto3's managed transfer; nothing the size of a model is held in memory.
Transient failures (connection refused or reset, timeouts, 5xx, throttling) are retried
a bounded number of times with exponential backoff, then raise :class:`SnapshotError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from ..files import file_digest
from .backend import Backend
from .errors import SnapshotError
from .model_files import HashedTensors, read_hashed

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What ``s3_settings`` may hold; anything else is refused so that a typo is not ignored.
S3_SETTINGS = frozenset(
    {
        "endpoint_url",
        "region_name",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "profile_name",
        "addressing_style",
        "verify",
        "connect_timeout",
        "read_timeout",
    }
)
_SESSION_SETTINGS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "profile_name", "region_name")
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError", "ServiceUnavailable"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_MAX_DELAY_S = 30.0
#: User metadata (``x-amz-meta-sha256``) holding the SHA-256 an object was uploaded with.
SHA256_METADATA = "sha256"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parts = urlparse(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an S3 URI (s3://bucket/prefix): {uri!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"an S3 URI takes no query or fragment: {uri!r}")
    return parts.netloc, parts.path.strip("/")


def make_s3_client(settings: Mapping[str, Any] | None = None):
    """A boto3 S3 client from ``settings`` (see :data:`S3_SETTINGS`), else the standard AWS chain.

    With an ``endpoint_url`` (an S3-compatible store) path-style addressing is the default.
    boto3's own retries are kept short; :class:`S3Backend` retries whole operations.
    """
    import boto3
    from botocore.config import Config

    settings = dict(settings or {})
    unknown = sorted(set(settings) - S3_SETTINGS)
    if unknown:
        raise ValueError(f"unknown S3 settings {unknown}; allowed: {sorted(S3_SETTINGS)}")
    session = boto3.session.Session(**{k: settings[k] for k in _SESSION_SETTINGS if settings.get(k) is not None})
    style = settings.get("addressing_style") or ("path" if settings.get("endpoint_url") else "auto")
    config = Config(
        retries={"total_max_attempts": 2, "mode": "standard"},
        connect_timeout=settings.get("connect_timeout", 10),
        read_timeout=settings.get("read_timeout", 60),
        s3={"addressing_style": style},
    )
    kwargs: dict[str, Any] = {"config": config}
    if settings.get("endpoint_url"):
        kwargs["endpoint_url"] = settings["endpoint_url"]
    if "verify" in settings:
        kwargs["verify"] = settings["verify"]
    return session.client("s3", **kwargs)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the S3 call that raised ``exc`` may succeed."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
    )

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClientError):
            error = current.response.get("Error", {})
            status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or status in (408, 429) or error.get("Code") in _TRANSIENT_CODES
        if isinstance(current, (HTTPClientError, ConnectionError, IncompleteReadError, TimeoutError)):
            return True
        # boto3 wraps transfer failures; look at what they wrap.
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__
    return False


def _is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _MISSING_CODES


class S3Backend(Backend):
    """Keys under ``s3://bucket/prefix``.

    :param client: a boto3 S3 client.
    :param attempts: tries per operation before giving up (at least 1).
    :param backoff_s: delay before the first retry; doubled for each further one.
    :param transfer_config: a ``boto3.s3.transfer.TransferConfig`` for large files.
    """

    def __init__(
        self,
        client,
        bucket: str,
        prefix: str = "",
        *,
        attempts: int = 4,
        backoff_s: float = 0.5,
        transfer_config=None,
    ):
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an integer >= 1, got {attempts!r}")
        if not isinstance(backoff_s, (int, float)) or backoff_s < 0:
            raise ValueError(f"backoff_s must be a number >= 0, got {backoff_s!r}")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.attempts = attempts
        self.backoff_s = float(backoff_s)
        self.transfer_config = transfer_config

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if (key or self.prefix) else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return "/".join(part for part in (self.prefix, key) if part)

    def _call(self, what: str, key: str, fn: Callable[[], T], missing_is_none: bool = False) -> T | None:
        """Run ``fn`` with bounded retries of transient failures; with ``missing_is_none``, a missing object gives None."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except SnapshotError:
                raise
            except Exception as exc:
                if missing_is_none and _is_missing(exc):
                    return None
                if not is_transient(exc):
                    raise SnapshotError(f"{self.uri(key)}: cannot {what}: {exc}") from None
                if attempt == self.attempts:
                    raise SnapshotError(
                        f"{self.uri(key)}: cannot {what} after {self.attempts} attempts: {exc}"
                    ) from None
                delay = min(_MAX_DELAY_S, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("S3 %s of %s failed (%s); retry %d of %d in %.1f s",
                            what, self.uri(key), exc, attempt, self.attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def put_file(self, key: str, path: Path, sha256: str) -> str:
        # The SHA-256 goes with the object as metadata, which is its tag: an object that
        # anything else wrote or replaced lacks it, or carries another one.
        extra = {"Metadata": {SHA256_METADATA: sha256}}
        self._call(
            "upload",
            key,
            lambda: self.client.upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs=extra, Config=self.transfer_config
            ),
        )
        return sha256

    def put_bytes(self, key: str, data: bytes, durable: bool = True) -> None:
        self._call("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key: str) -> bytes | None:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call("read", key, get, missing_is_none=True)

    def download(self, key: str, dest: Path) -> tuple[str, int] | None:
        def fetch() -> tuple[str, int]:
            with open(dest, "w+b") as f:  # read too: parts written out of order are hashed from it
                out = _HashingFile(f)
                self.client.download_fileobj(self.bucket, self._key(key), out, Config=self.transfer_config)
                hashed = out.result()
            return hashed or file_digest(dest)

        return self._call("download", key, fetch, missing_is_none=True)

    def read_tensors(self, key: str) -> HashedTensors | None:
        # One GET streamed straight into the arrays and hashed on the way: no staging file,
        # no second pass over the model.
        def fetch() -> HashedTensors:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            try:
                return read_hashed(_readinto(body), response["ContentLength"], self.uri(key))
            finally:
                body.close()

        return self._call("download", key, fetch, missing_is_none=True)

    def stat(self, key: str) -> tuple[int, str | None] | None:
        def head() -> tuple[int, str | None]:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return response["ContentLength"], response.get("Metadata", {}).get(SHA256_METADATA)

        return self._call("read", key, head, missing_is_none=True)

    def digest(self, key: str) -> tuple[str, int] | None:
        def stream() -> tuple[str, int]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            digest, size = hashlib.sha256(), 0
            for chunk in response["Body"].iter_chunks(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            return digest.hexdigest(), size

        return self._call("read", key, stream, missing_is_none=True)

    def _list(self, prefix: str, delimiter: bool) -> tuple[list[str], list[str]]:
        base = self._key(prefix)
        base = f"{base}/" if base else ""

        def listing() -> tuple[list[str], list[str]]:
            folders, keys = [], []
            kwargs = {"Bucket": self.bucket, "Prefix": base}
            if delimiter:
                kwargs["Delimiter"] = "/"
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                folders += [p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
                keys += [o["Key"][len(base) :] for o in page.get("Contents", [])]
            return folders, keys

        return self._call("list", prefix, listing)

    def list_folders(self, prefix: str) -> list[str]:
        return sorted(self._list(prefix, delimiter=True)[0])

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self._list(prefix, delimiter=False)[1])


def _readinto(body) -> Callable[[memoryview], int]:
    """``readinto`` of a botocore streaming body: the bytes go from the socket straight into
    the caller's buffer where the body is a plain (not content-encoded) HTTP response, else
    through ``read()`` (which copies them once more). The caller checks the length."""
    raw = getattr(body, "_raw_stream", None)
    response = getattr(raw, "_fp", None)  # http.client's response under urllib3's
    plain = raw is not None and not raw.headers.get("content-encoding") and not getattr(raw, "chunked", False)
    if plain and callable(getattr(response, "readinto", None)) and not getattr(raw, "_has_decoded_content", False):
        return response.readinto

    def readinto(view: memoryview) -> int:
        data = body.read(len(view))
        view[: len(data)] = data
        return len(data)

    return readinto


class _HashingFile:
    """A file for boto3 to download into that hashes the bytes as they are written.

    A multipart download writes its parts concurrently, so out of order: a part written
    ahead of the hashed prefix is hashed from the file (still in the page cache) once the
    gap before it is filled. Anything written over bytes already hashed (boto3 retrying a
    part) makes :meth:`result` None, and the caller hashes the finished file instead.
    """

    def __init__(self, f):
        self._f = f
        self._digest = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in the digest
        self._ahead: dict[int, int] = {}  # start -> end of ranges written beyond it
        self._rewritten = False

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def write(self, data) -> int:
        start = self._f.tell()
        written = self._f.write(data)
        if start < self._hashed:
            self._rewritten = True
        elif start == self._hashed:
            self._digest.update(data)
            self._hashed += written
            self._catch_up()
        else:
            self._ahead[start] = max(self._ahead.get(start, 0), start + written)
        return written

    def _catch_up(self) -> None:
        while (end := self._ahead.pop(self._hashed, None)) is not None:
            self._f.flush()
            fd = self._f.fileno()
            while self._hashed < end:
                chunk = os.pread(fd, min(1 << 20, end - self._hashed), self._hashed)
                if not chunk:
                    raise OSError(f"{self._f.name} is shorter than what was written to it")
                self._digest.update(chunk)
                self._hashed += len(chunk)

    def result(self) -> tuple[str, int] | None:
        """SHA-256 and size of the whole file, or None where it has to be hashed again."""
        size = self._f.seek(0, os.SEEK_END)
        if self._rewritten or self._ahead or self._hashed != size:
            return None
        return self._digest.hexdigest(), size
