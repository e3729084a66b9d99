"""The synchronous client of one site's agent: operators, the ``flare`` CLI, the run engine."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from ..wire import agent_pb2, agent_pb2_grpc
from ..wire.chunks import DEFAULT_CHUNK_SIZE, PayloadError, PayloadTooLarge, read_header, receive_payload, send_payload
from ..wire.task_state import TaskState
from .channel import (
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TRANSFER_TIMEOUT,
    AgentCaller,
)
from .kit import load_caller_kit
from .replies import AgentError, AgentStatus, AppVersion


class AgentClient(AgentCaller):
    """A synchronous client of one site's agent. Use as a context manager, or call close()."""

    def __init__(
        self,
        *args: Any,
        transfer_timeout: float = DEFAULT_TRANSFER_TIMEOUT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ):
        """``AgentClient(site, address, cert_pem, key_pem, root_ca_pem, timeout=...)``."""
        super().__init__(*args, **kwargs)
        self.transfer_timeout = transfer_timeout
        self.chunk_size = chunk_size
        self._channel = grpc.secure_channel(self.address, self._credentials, options=self._options)
        self._stub = agent_pb2_grpc.FlareAgentStub(self._channel)

    @classmethod
    def from_kit(cls, kit_dir: str | os.PathLike, site: str, address: str | None = None, **kwargs: Any) -> "AgentClient":
        """A client with the identity of a server or admin kit, for one of its sites."""
        return load_caller_kit(kit_dir).client(site, address, **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _call(self, method: str):
        try:
            yield
        except grpc.RpcError as exc:
            raise AgentError(self.site, method, exc.code(), exc.details() or "") from None
        except PayloadError as exc:  # what arrived is not what the agent sent
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, PayloadTooLarge) else grpc.StatusCode.DATA_LOSS
            raise AgentError(self.site, method, code, str(exc)) from None

    # ---- calls ---------------------------------------------------------------------

    def status(self, timeout: float | None = None) -> AgentStatus:
        with self._call("GetStatus"):
            reply = self._stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=timeout or self.timeout)
        return AgentStatus.from_message(reply)

    def deploy_app(self, bundle: bytes | str | os.PathLike) -> tuple[AppVersion, bool]:
        """Upload a signed app bundle (bytes or a file); returns (app, newly_deployed)."""
        with self._call("DeployApp"):
            messages = send_payload(agent_pb2.DeployAppRequest, agent_pb2.DeployAppHeader(), bundle, self.chunk_size)
            reply = self._stub.DeployApp(messages, timeout=self.transfer_timeout)
        return AppVersion.from_message(reply.app), reply.newly_deployed

    def submit_task(
        self,
        task_id: str,
        app_name: str,
        weights: bytes | str | os.PathLike,
        round: int,
        *,
        kind: str = "train",
        config: dict[str, Any] | None = None,
        app_version: str | None = None,
        num_gpus: int | None = None,
    ) -> tuple[TaskState, bool]:
        """Start a task with the global ``weights`` (safetensors bytes or file).

        Idempotent by ``task_id``: a task the site knows is returned as it is, without
        uploading the weights again. Returns (task, created).
        """
        header = agent_pb2.SubmitTaskHeader(
            task_id=task_id, app_name=app_name, round=round, kind=kind, config_json=json.dumps(config or {})
        )
        if app_version is not None:
            header.app_version = app_version
        if num_gpus is not None:
            header.num_gpus = num_gpus
        with self._call("SubmitTask"):
            messages = send_payload(agent_pb2.SubmitTaskRequest, header, weights, self.chunk_size)
            reply = self._stub.SubmitTask(messages, timeout=self.transfer_timeout)
        return TaskState.from_message(reply.state), reply.created

    def get_task(self, task_id: str) -> TaskState:
        with self._call("GetTask"):
            return TaskState.from_message(self._stub.GetTask(agent_pb2.TaskRef(task_id=task_id), timeout=self.timeout))

    def watch_task(self, task_id: str, timeout: float, after_seq: int = 0) -> Iterator[TaskState]:
        """The task's state now and after every change, until it ends or ``timeout`` passes.

        Running out of time ends the iteration quietly; look at the last state seen.
        """
        call = self._stub.WatchTask(agent_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq), timeout=timeout)
        try:
            with self._call("WatchTask"):
                try:
                    for message in call:
                        yield TaskState.from_message(message)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
        finally:
            call.cancel()  # the caller may stop early; free the stream on the agent at once

    def fetch_result(
        self, task_id: str, dest: str | os.PathLike, max_bytes: int = DEFAULT_MAX_RESULT_BYTES
    ) -> TaskState:
        """Download a finished task's result (safetensors) to ``dest``; returns the task's state.

        ``dest`` appears only once the whole file arrived with the right size and
        SHA-256. Its metadata says whether it holds full weights or a difference
        (:data:`flare_provider.wire.tensors.RESULT_KIND_KEY`); ``num_samples`` and the
        metrics are in the returned state. The agent keeps its copy until :meth:`acknowledge`.
        """
        dest = Path(dest)
        with self._call("FetchResult"):
            replies = self._stub.FetchResult(agent_pb2.TaskRef(task_id=task_id), timeout=self.transfer_timeout)
            header = read_header(replies, f"result of task {task_id}")
            tmp = receive_payload(replies, header.payload_size, dest.parent, max_bytes, f"result of task {task_id}")
        os.replace(tmp, dest)
        return TaskState.from_message(header.state)

    def acknowledge(self, task_id: str) -> None:
        """Tell the site its result is safe here; it deletes its copy."""
        with self._call("AcknowledgeResult"):
            self._stub.AcknowledgeResult(agent_pb2.TaskRef(task_id=task_id), timeout=self.timeout)

    def abort(self, task_id: str) -> TaskState:
        with self._call("AbortTask"):
            return TaskState.from_message(self._stub.AbortTask(agent_pb2.TaskRef(task_id=task_id), timeout=self.timeout))

    def shutdown(self, reason: str = "") -> None:
        """Stop the agent (project_admin only)."""
        with self._call("Shutdown"):
            self._stub.Shutdown(agent_pb2.ShutdownRequest(reason=reason), timeout=self.timeout)


