"""A real S3-protocol endpoint for tests: moto's standalone server as a child process.

It runs on a free 127.0.0.1 port and is reached over HTTP with boto3, exactly as a
deployment reaches S3 or MinIO.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from botocore.config import Config

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
START_TIMEOUT_S = 30
TEST_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing-secret", "region_name": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """A moto S3 server child process on 127.0.0.1."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log_dir / f"moto-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}; see {self._log.name}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not answer on port {self.port} in {START_TIMEOUT_S} s")
                time.sleep(0.1)

    def client(self, endpoint: str | None = None, attempts: int = 1):
        """A boto3 client for this server; one HTTP attempt per call unless told otherwise."""
        import boto3

        config = Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=2,
            read_timeout=10,
            s3={"addressing_style": "path"},
        )
        return boto3.session.Session(**TEST_KEYS).client("s3", endpoint_url=endpoint or self.endpoint, config=config)

    def kill(self) -> None:
        """SIGKILL, as when the endpoint's machine dies: no goodbye to open connections."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
