"""Loading an initial model: a safetensors file by local path, ``file://`` or ``s3://`` URI."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SnapshotError
from .local import path_from_file_uri
from .model_files import load_tensors
from .s3 import S3Backend, make_s3_client, parse_s3_uri


def load_initial_weights(
    source: str | os.PathLike,
    *,
    s3_client=None,
    s3_settings: Mapping[str, Any] | None = None,
    tmp_dir: str | Path | None = None,
    attempts: int = 4,
    backoff_s: float = 0.5,
) -> dict[str, np.ndarray]:
    """The tensors of the safetensors file at ``source``.

    An ``s3://bucket/key`` source is streamed to a temporary file first (with
    ``s3_client``, else a client from ``s3_settings`` or the standard AWS chain).
    """
    text = os.fspath(source)
    if text.startswith("s3://"):
        bucket, key = parse_s3_uri(text)
        if not key:
            raise ValueError(f"an initial model URI names an object, s3://bucket/key; got {text!r}")
        client = s3_client if s3_client is not None else make_s3_client(s3_settings)
        backend = S3Backend(client, bucket, attempts=attempts, backoff_s=backoff_s)
        staging = Path(tempfile.mkdtemp(prefix="flare-initial-", dir=tmp_dir))
        try:
            path = staging / "model.safetensors"
            if not backend.download(key, path):
                raise SnapshotError(f"{text} does not exist")
            return load_tensors(path, text)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    path = path_from_file_uri(text) if text.startswith("file:") else Path(text)
    return load_tensors(path, text)
