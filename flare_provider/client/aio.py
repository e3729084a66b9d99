"""The asyncio client of one site's agent (grpc.aio), for Airflow triggers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from ..wire import agent_pb2, agent_pb2_grpc
from ..wire.task_state import TaskState
from .channel import AgentCaller
from .kit import load_caller_kit
from .replies import AgentError, AgentStatus


class AsyncAgentClient(AgentCaller):
    """An asyncio client of one site's agent (grpc.aio), for Airflow triggers.

    The channel opens on first use, inside the running event loop.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        """``AsyncAgentClient(site, address, cert_pem, key_pem, root_ca_pem, timeout=...)``."""
        super().__init__(*args, **kwargs)
        self._channel: grpc.aio.Channel | None = None
        self._stub: agent_pb2_grpc.FlareAgentStub | None = None

    @classmethod
    def from_kit(cls, kit_dir: str | os.PathLike, site: str, address: str | None = None, **kwargs: Any) -> "AsyncAgentClient":
        return load_caller_kit(kit_dir).async_client(site, address, **kwargs)

    def _agent(self) -> agent_pb2_grpc.FlareAgentStub:
        if self._stub is None:
            self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
            self._stub = agent_pb2_grpc.FlareAgentStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> "AsyncAgentClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, method: str, exc: grpc.aio.AioRpcError) -> AgentError:
        return AgentError(self.site, method, exc.code(), exc.details() or "")

    async def _unary(self, method: str, request, timeout: float | None = None):
        try:
            return await getattr(self._agent(), method)(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(method, exc) from None

    async def status(self, timeout: float | None = None) -> AgentStatus:
        return AgentStatus.from_message(await self._unary("GetStatus", agent_pb2.GetStatusRequest(), timeout))

    async def get_task(self, task_id: str) -> TaskState:
        return TaskState.from_message(await self._unary("GetTask", agent_pb2.TaskRef(task_id=task_id)))

    async def abort(self, task_id: str) -> TaskState:
        return TaskState.from_message(await self._unary("AbortTask", agent_pb2.TaskRef(task_id=task_id)))

    async def watch_task(self, task_id: str, timeout: float, after_seq: int = 0) -> AsyncIterator[TaskState]:
        """Like :meth:`AgentClient.watch_task`: states until the task ends or ``timeout`` passes."""
        call = self._agent().WatchTask(agent_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq), timeout=timeout)
        try:
            async for message in call:
                yield TaskState.from_message(message)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._error("WatchTask", exc) from None
        finally:
            call.cancel()
