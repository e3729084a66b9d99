"""The synchronous client of one site's agent: operators, the ``flare`` CLI, the run engine.

Uploads of global weights and downloads of results survive a cut connection: the
client asks where the other end is and sends or fetches only the rest (see
:mod:`.transfer`), and gives a transfer up when nothing moved for ``idle_timeout``
seconds rather than after a total time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from ..wire import agent_pb2
from ..wire.checksums import FAST_CHECKSUMS, SHA256, fastest_shared, identity_fields
from ..wire.chunks import (
    DEFAULT_CHUNK_SIZE,
    PayloadError,
    PayloadTooLarge,
    PayloadTruncated,
    PayloadWriter,
    check_announced_size,
    payload_size,
    read_header,
    send_payload,
)
from ..wire.payload_codec import AgentStub
from ..wire.task_state import TaskState
from .channel import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_RESUME_ATTEMPTS,
    DEFAULT_TRANSFER_TIMEOUT,
    AgentCaller,
)
from .kit import load_caller_kit
from .replies import AgentError, AgentStatus, AppVersion
from .resuming import ResumingTransfers
from .transfer import (
    IdleWatchdog,
    PartialDownload,
    StartOver,
    TransferStalled,
    TransferStats,
    counted,
    held_bytes,
    payload_identity,
)

if TYPE_CHECKING:  # numpy: only where a scan is used
    from ..wire.finite_scan import FiniteScan

log = logging.getLogger(__name__)
# Codes after which the bytes of a download kept so far are of no use.
_RESULT_GONE = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
# Weights smaller than this are checked with SHA-256 without asking the agent what else it
# speaks: hashing them costs less than the question.
ASK_CHECKSUM_FROM_BYTES = 4 << 20


class AgentClient(ResumingTransfers, AgentCaller):
    """A synchronous client of one site's agent. Use as a context manager, or call close().

    :param idle_timeout: seconds without a byte of a transfer moving before it is given
        up (None: never); a transfer as such has no time limit.
    :param transfer_timeout: an optional bound on a whole transfer's time (None: none).
    :param resume_attempts: resumes in a row that move no byte before a cut transfer is
        given up.
    ``last_transfer`` holds the :class:`~.transfer.TransferStats` of the latest upload
    or download (with one thread per client, as the run engine has).
    """

    def __init__(
        self,
        *args: Any,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        transfer_timeout: float | None = DEFAULT_TRANSFER_TIMEOUT,
        resume_attempts: int = DEFAULT_RESUME_ATTEMPTS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ):
        """``AgentClient(site, address, cert_pem, key_pem, root_ca_pem, timeout=...)``."""
        super().__init__(*args, **kwargs)
        self.idle_timeout = idle_timeout
        self.transfer_timeout = transfer_timeout
        self.resume_attempts = resume_attempts
        self.chunk_size = chunk_size
        self.last_transfer: TransferStats | None = None
        self._channel = grpc.secure_channel(self.address, self._credentials, options=self._options)
        self._stub = AgentStub(self._channel)
        self._probe_channel: grpc.Channel | None = None
        self._agent_checksums: tuple[str, ...] | None = None  # what the agent checks uploads with besides SHA-256

    @classmethod
    def from_kit(cls, kit_dir: str | os.PathLike, site: str, address: str | None = None, **kwargs: Any) -> "AgentClient":
        """A client with the identity of a server or admin kit, for one of its sites."""
        return load_caller_kit(kit_dir).client(site, address, **kwargs)

    def close(self) -> None:
        self._channel.close()
        if self._probe_channel is not None:
            self._probe_channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _call(self, method: str):
        try:
            yield
        except (grpc.RpcError, PayloadError, TransferStalled, StartOver) as exc:
            raise self._error(method, exc) from None

    def _error(self, method: str, exc: Exception) -> AgentError:
        if isinstance(exc, grpc.RpcError):
            return AgentError(self.site, method, exc.code(), exc.details() or "")
        if isinstance(exc, TransferStalled):
            return AgentError(self.site, method, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        # what arrived is not what the agent sent
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, PayloadTooLarge) else grpc.StatusCode.DATA_LOSS
        return AgentError(self.site, method, code, str(exc))

    # ---- calls ---------------------------------------------------------------------

    def status(self, timeout: float | None = None) -> AgentStatus:
        with self._call("GetStatus"):
            reply = self._stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=timeout or self.timeout)
        return AgentStatus.from_message(reply)

    def deploy_app(self, bundle: bytes | str | os.PathLike) -> tuple[AppVersion, bool]:
        """Upload a signed app bundle (bytes or a file); returns (app, newly_deployed)."""
        with self._call("DeployApp"):
            messages = send_payload(agent_pb2.DeployAppRequest, agent_pb2.DeployAppHeader(), bundle, self.chunk_size)
            stats = TransferStats("DeployApp", payload_bytes=payload_size(bundle))
            reply = self._send_stream(self._stub.DeployApp, messages, stats, self.transfer_timeout)
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
        num_processes: int | None = None,
    ) -> tuple[TaskState, bool]:
        """Start a task with the global ``weights`` (safetensors bytes or file).

        Idempotent by ``task_id``: a task the site knows is returned as it is, without
        uploading the weights again. Returns (task, created). An upload cut short is
        resumed from the bytes the site kept, also by a later call with the same weights
        (the site answers its first stream that it holds them).
        """
        checksum = self._upload_checksum(payload_size(weights))
        size, digest = payload_identity(weights, checksum)
        identity = identity_fields(checksum, digest)  # what the agent keeps a cut upload under
        stats = self.last_transfer = TransferStats("SubmitTask", task_id, size, checksum=checksum)
        told: list[int] = []  # what the site said it holds when it refused a stream's offset

        def upload() -> agent_pb2.SubmitTaskReply:
            # The first stream sends it all without asking, as most uploads have nothing kept;
            # a site that kept bytes of it refuses that stream at once, saying how many.
            if told:
                offset = told.pop()
            else:
                offset = self._upload_offset(task_id, size, identity) if stats.attempts > 1 else 0
            self._note_start("upload", stats, offset)
            header = agent_pb2.SubmitTaskHeader(
                task_id=task_id, app_name=app_name, round=round, kind=kind, config_json=json.dumps(config or {}),
                **identity,
            )
            if app_version is not None:
                header.app_version = app_version
            if num_gpus is not None:
                header.num_gpus = num_gpus
            if num_processes is not None:
                header.num_processes = num_processes
            messages = send_payload(agent_pb2.SubmitTaskRequest, header, weights, self.chunk_size, size, offset, digest, checksum)
            probe = self._upload_probe(task_id, size, identity)
            try:
                return self._send_stream(self._stub.SubmitTask, messages, stats, self._time_left(stats), probe)
            except grpc.RpcError as exc:
                held = held_bytes(exc)
                if held is not None:
                    told.append(held)
                    if stats.attempts == 1:  # kept from an earlier call: none of this stream's bytes were taken
                        stats.start_offset = held
                raise

        reply = self._resuming("SubmitTask", stats, upload)
        return TaskState.from_message(reply.state), reply.created

    def _upload_checksum(self, size: int) -> str:
        """The checksum an upload of ``size`` bytes carries: the fastest the agent lists
        (asked once per client), or SHA-256 for weights too small to be worth asking."""
        if size < ASK_CHECKSUM_FROM_BYTES:
            return SHA256
        if self._agent_checksums is None:
            try:
                status = self._stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=self.timeout)
            except grpc.RpcError:  # the upload that follows says what is wrong with the site, or retries
                return SHA256
            self._agent_checksums = tuple(status.payload_checksums)
        return fastest_shared(self._agent_checksums)

    def _upload_offset(self, task_id: str, size: int, identity: dict[str, str]) -> int:
        """How many bytes of these weights the site kept from an upload cut short."""
        request = agent_pb2.UploadOffsetRequest(task_id=task_id, payload_size=size, **identity)
        try:
            return self._stub.GetUploadOffset(request, timeout=self.timeout).offset
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an agent that cannot resume: send it all
                return 0
            raise

    def _upload_probe(self, task_id: str, size: int, identity: dict[str, str]) -> Callable[[float], object]:
        """What the site holds of an upload, asked over a connection of its own.

        The upload's own connection may have megabytes queued ahead of any new call; a
        second one (through the same relay) answers at once while the link lives.
        """
        if self._probe_channel is None:
            options = [*self._options, ("grpc.use_local_subchannel_pool", 1)]  # never the upload's connection
            self._probe_channel = grpc.secure_channel(self.address, self._credentials, options=options)
        stub = AgentStub(self._probe_channel)
        request = agent_pb2.UploadOffsetRequest(task_id=task_id, payload_size=size, **identity)

        def probe(timeout: float) -> object:
            try:
                reply = stub.GetUploadOffset(request, timeout=timeout)
            except grpc.RpcError:
                return None
            return reply.offset, reply.task_exists

        return probe

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
        self, task_id: str, dest: str | os.PathLike, max_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        scan: FiniteScan | None = None,
    ) -> TaskState:
        """Download a finished task's result (safetensors) to ``dest``; returns the task's state.

        ``dest`` appears only once the whole file arrived with the right size and
        checksum (XXH3-128 from an agent that speaks it, else SHA-256). Its metadata says
        whether it holds full weights or a difference
        (:data:`flare_provider.wire.tensors.RESULT_KIND_KEY`); ``num_samples`` and the
        metrics are in the returned state. The agent keeps its copy until :meth:`acknowledge`.
        Until then the bytes received are in ``<dest>.part``: a download cut short is
        resumed from there, also by a later call for the same task and ``dest``.

        ``scan`` counts the non-finite values of the result's tensors as its bytes arrive
        (``scan.counts()`` afterwards; None where it could not see them all, such as a
        download resumed from bytes an earlier call received).
        """
        partial = PartialDownload(Path(dest), task_id)
        stats = self.last_transfer = TransferStats("FetchResult", task_id)
        return self._resuming("FetchResult", stats, lambda: self._download(partial, stats, max_bytes, scan))

    def _download(self, partial: PartialDownload, stats: TransferStats, max_bytes: int,
                  scan: FiniteScan | None = None) -> TaskState:
        """One attempt at a result, from the bytes received so far on; decides what to keep of them."""
        what = f"result of task {partial.task_id}"
        offset = partial.resume_point()
        self._note_start("download", stats, offset)
        try:
            return self._receive_result(partial, stats, offset, max_bytes, what, scan)
        except PayloadTruncated:
            raise  # a cut: what arrived is good and stays
        except PayloadTooLarge:
            partial.discard()
            raise
        except PayloadError as exc:
            partial.discard()
            if offset:  # the bytes kept may be what was wrong: once more, all of it
                raise StartOver(f"{exc}; starting over from byte 0") from None
            raise
        except grpc.RpcError as exc:
            if exc.code() in _RESULT_GONE:
                partial.discard()
            elif exc.code() == grpc.StatusCode.OUT_OF_RANGE:  # more bytes kept than the result has
                partial.discard()
                raise StartOver(exc.details()) from None
            raise

    def _receive_result(
        self, partial: PartialDownload, stats: TransferStats, offset: int, max_bytes: int, what: str,
        scan: FiniteScan | None,
    ) -> TaskState:
        watchdog = IdleWatchdog(self.idle_timeout, stats, "received")
        request = agent_pb2.FetchResultRequest(task_id=partial.task_id, offset=offset, checksums=FAST_CHECKSUMS)
        replies = self._stub.FetchResult(request, timeout=self._time_left(stats))
        try:
            with watchdog.watching(replies.cancel):
                messages = counted(replies, stats, watchdog)
                header = read_header(messages, what)
                check_announced_size(header.payload_size, max_bytes, what)
                stats.payload_bytes = header.payload_size
                if header.offset != offset:
                    if header.offset:
                        raise PayloadError(f"{what}: asked for bytes from {offset} on, the agent sends from {header.offset}")
                    offset = 0  # an agent that cannot resume sends all of it
                checksum = header.checksum or SHA256  # what the agent chose of those offered; "" from one that offers none
                if checksum != SHA256 and checksum not in FAST_CHECKSUMS:
                    raise PayloadError(f"{what}: the agent checks it with {checksum!r}, which was not offered")
                stats.checksum = checksum
                digest = partial.prefix_digest(offset, checksum) if offset else None
                out = partial.open(header.payload_size, offset)
                if scan is not None and not offset:
                    scan.start(header.payload_size)
                elif scan is not None and scan.position != offset:  # resumed from bytes it did not see
                    scan.abandon()
                writer = PayloadWriter(out, header.payload_size, what, offset, digest, checksum,
                                       scan.feed if scan is not None else None)
                try:
                    writer.receive(messages)
                except BaseException:
                    partial.keep(writer.received, checksum, writer.digest)
                    raise
                partial.finish()
        finally:
            replies.cancel()  # a stream given up is freed on the agent at once; a no-op once it ended
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
