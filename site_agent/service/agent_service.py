"""The ``FlareAgent`` service of one site: one method per RPC of ``agent.proto``.

Every call is first authorized from the caller's certificate (:mod:`site_agent.service.auth`),
then handled by the runtime (app store, task manager), and recorded in the audit log
whatever its outcome. The runtime's errors become gRPC status codes carrying their
messages; anything unexpected becomes INTERNAL with a generic message (the details
go to the agent's log only).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from flare_provider import __version__
from flare_provider.provisioning.certs import PeerIdentity
from flare_provider.wire import agent_pb2, agent_pb2_grpc
from flare_provider.wire.checksums import FAST_CHECKSUMS, SHA256, fastest_shared
from flare_provider.wire.chunks import (
    DEFAULT_CHUNK_SIZE,
    HELD_BYTES_KEY,
    PayloadError,
    PayloadTooLarge,
    PayloadTruncated,
    check_announced_size,
    read_header,
    receive_payload,
    send_payload,
)
from flare_provider.wire.task_state import QUEUED, RUNNING, TERMINAL_STATUSES

from ..consent import app_standing
from ..data_version import DataVersionProbe
from ..errors import (
    BundleError,
    InvalidTaskError,
    NoResultError,
    TaskRejected,
    UnknownAppError,
    UnknownTaskError,
)
from ..kit_config import DEFAULT_MAX_BUNDLE_BYTES, DEFAULT_MAX_WEIGHTS_BYTES, AgentConfig
from ..privacy.apply import result_privacy
from ..runtime.app_store import AppInfo, AppStore
from ..runtime.task_manager import TaskManager
from ..runtime.task_records import TaskSpec
from ..runtime.upload_staging import KeptUploadCorrupt, UploadConflict, UploadInterrupted, UploadKey
from ..site_settings import SiteSettings, site_settings_path
from .audit import AuditLog
from .auth import Action, Policy, peer_identity

log = logging.getLogger(__name__)

ACTIVE_STATUSES = (QUEUED, RUNNING)
WATCH_POLL_SECONDS = 1.0  # how often a watch re-checks for shutdown and a vanished caller


class ResultOffsetOutOfRange(ValueError):
    """A download asked for a result from beyond its end. OUT_OF_RANGE."""


# The runtime's errors, most specific first, and the gRPC code each one becomes.
_STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (KeptUploadCorrupt, grpc.StatusCode.DATA_LOSS),  # the client sends the whole payload again
    (UploadInterrupted, grpc.StatusCode.ABORTED),  # the client asks for the offset and sends the rest
    (UploadConflict, grpc.StatusCode.ABORTED),
    (ResultOffsetOutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (PayloadError, grpc.StatusCode.INVALID_ARGUMENT),
    (BundleError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidTaskError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownAppError, grpc.StatusCode.NOT_FOUND),
    (UnknownTaskError, grpc.StatusCode.NOT_FOUND),
    (TaskRejected, grpc.StatusCode.FAILED_PRECONDITION),
    (NoResultError, grpc.StatusCode.FAILED_PRECONDITION),
)


@dataclass(frozen=True)
class Limits:
    """What one caller may upload, and the chunk size the agent sends with."""

    max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    chunk_size: int = DEFAULT_CHUNK_SIZE


@dataclass
class _Call:
    """One RPC in flight: who called, and what it concerned (for the audit log)."""

    method: str
    who: PeerIdentity
    peer: str
    what: dict[str, str] = field(default_factory=dict)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for error_type, code in _STATUS_CODES:
        if isinstance(exc, error_type):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error in the agent ({type(exc).__name__}); the site's agent log has the details"


def _rpc(action: Action):
    """Authorize, audit and map errors around one servicer method.

    The method receives the :class:`_Call` as an extra argument and may add to
    ``call.what`` (task id, app) as it learns them.
    """

    def decorate(handler):
        method = handler.__name__

        if inspect.isgeneratorfunction(handler):

            @functools.wraps(handler)
            def streaming(self: AgentService, request, context: grpc.ServicerContext):
                call = self._authorize(method, action, request, context)
                try:
                    yield from handler(self, request, context, call)
                except GeneratorExit:  # the caller went away or its deadline passed
                    self._audit(call, "cancelled")
                    raise
                except Exception as exc:
                    self._fail(call, exc, context)
                self._audit(call, "ok")

            return streaming

        @functools.wraps(handler)
        def unary(self: AgentService, request, context: grpc.ServicerContext):
            call = self._authorize(method, action, request, context)
            try:
                reply = handler(self, request, context, call)
            except Exception as exc:
                self._fail(call, exc, context)
            self._audit(call, "ok")
            return reply

        return unary

    return decorate


def _cut_when_cancelled(messages):
    """``messages``, where a call cancelled by its caller (or its connection) ends as a truncated payload."""
    try:
        yield from messages
    except grpc.RpcError:
        raise PayloadTruncated("the caller's stream broke (call cancelled)") from None


def app_info_message(info: AppInfo, standing: dict | None = None) -> agent_pb2.AppInfo:
    """``standing``: how the site stands on running it (:func:`site_agent.consent.app_standing`)."""
    return agent_pb2.AppInfo(
        name=info.name, version=info.version, has_custom_code=info.has_custom_code, deployed_at=info.deployed_at,
        **(standing or {}),
    )


class AgentService(agent_pb2_grpc.FlareAgentServicer):
    """The ``FlareAgent`` service of one site."""

    def __init__(
        self,
        config: AgentConfig,
        settings: SiteSettings,
        apps: AppStore,
        tasks: TaskManager,
        audit: AuditLog,
        limits: Limits,
        request_shutdown,
        attachments=lambda: (),
    ):
        self.config = config
        self.settings = settings
        self.apps = apps
        self.tasks = tasks
        self.audit = audit
        self.limits = limits
        self.policy = Policy(server_names=frozenset(config.servers), site_org=config.org)
        self.started_at = time.time()
        self.stopping = threading.Event()
        self._request_shutdown = request_shutdown
        self.attachments = attachments  # the outbound connector's states, for status callers
        # site.yaml is read afresh for it: the kit folder is startup/'s parent
        self.data_version = DataVersionProbe(site_settings_path(config.root_ca_file.parents[1]), settings.data_dir)

    # ---- the frame around every call -------------------------------------------------

    def _authorize(self, method: str, action: Action, request, context: grpc.ServicerContext) -> _Call:
        call = _Call(method=method, who=peer_identity(context), peer=context.peer())
        task_id = getattr(request, "task_id", "")  # unary requests name their task up front
        if task_id:
            call.what["task_id"] = task_id
        decision = self.policy.decide(call.who, action)
        if not decision.allowed:
            message = f"{method} refused for {call.who.name or 'an unnamed caller'}: {decision.reason}"
            self._audit(call, "denied", decision.reason)
            log.warning(message, extra={"method": method, **call.what})
            context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        return call

    def _fail(self, call: _Call, exc: Exception, context: grpc.ServicerContext):
        code, message = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", call.method, extra={"method": call.method, **call.what})
        else:
            log.info("%s refused: %s", call.method, message, extra={"method": call.method, **call.what})
        self._audit(call, code.name, message)
        if isinstance(exc, UploadConflict) and exc.held is not None:
            context.set_trailing_metadata(((HELD_BYTES_KEY, str(exc.held)),))
        context.abort(code, message)

    def _audit(self, call: _Call, outcome: str, detail: str = "") -> None:
        self.audit.record(call.who, call.peer, call.method, outcome, detail, **call.what)

    # ---- status ------------------------------------------------------------------------

    @_rpc(Action.STATUS)
    def GetStatus(self, request, context, call):
        tasks = self.tasks.list()
        who = call.who
        data = self.data_version.current()
        return agent_pb2.AgentStatus(
            project=self.config.project,
            site=self.config.site,
            org=self.config.org,
            version=__version__,
            gpus=self.settings.gpus,
            allow_custom_code=self.settings.allow_custom_code,
            apps=[app_info_message(info, app_standing(self.settings, info, self.config.site)) for info in self.apps.list()],
            custom_code_policy=self.settings.custom_code.describe(),
            active_tasks=[t.to_message() for t in tasks if t.status in ACTIVE_STATUSES],
            task_counts=Counter(t.status for t in tasks),
            started_at=self.started_at,
            caller=agent_pb2.Identity(name=who.name, org=who.org, kind=who.kind, role=who.role or ""),
            attachments=[
                agent_pb2.RelayAttachment(relay=a.relay.name, address=a.relay.address, connected_since=a.connected_since,
                                          last_ping=a.last_ping, attached=a.attached, error=a.error)
                for a in self.attachments()
            ],
            data_version=data.version, data_version_source=data.source, data_version_seen_at=data.seen_at,
            payload_checksums=FAST_CHECKSUMS,
        )

    # ---- apps --------------------------------------------------------------------------

    @_rpc(Action.DEPLOY)
    def DeployApp(self, request_iterator, context, call):
        messages = iter(request_iterator)
        header = read_header(messages, "app bundle")
        bundle = receive_payload(
            messages, header.payload_size, self.tasks.incoming_dir, self.limits.max_bundle_bytes, "app bundle"
        )
        try:
            info, newly = self.apps.deploy(bundle)
        finally:
            bundle.unlink(missing_ok=True)
        call.what["app"] = f"{info.name}@{info.version}"
        standing = app_standing(self.settings, info, self.config.site, with_requirements=True)
        call.what["consent"] = standing["consent_status"]
        return agent_pb2.DeployAppReply(app=app_info_message(info, standing), newly_deployed=newly)

    # ---- tasks -------------------------------------------------------------------------

    @_rpc(Action.SUBMIT)
    def SubmitTask(self, request_iterator, context, call):
        messages = iter(request_iterator)
        header = read_header(messages, "task submission")
        call.what.update(task_id=header.task_id, app=header.app_name)
        spec = self._task_spec(header, call.who)
        try:
            # A known task is answered before its weights are read: a retried submit
            # costs one round trip, not another upload of the model.
            state = self.tasks.get(spec.task_id)
        except UnknownTaskError:
            pass
        else:
            self.tasks.uploads.discard_task(spec.task_id)
            return agent_pb2.SubmitTaskReply(state=state.to_message(), created=False)
        weights = self._receive_weights(header, messages, context)
        try:
            state, created = self.tasks.submit(spec, weights)  # checks the safetensors layout first
        finally:
            weights.unlink(missing_ok=True)  # moved into the task's folder unless refused
        return agent_pb2.SubmitTaskReply(state=state.to_message(), created=created)

    def _receive_weights(self, header: agent_pb2.SubmitTaskHeader, messages, context) -> Path:
        """The global weights of a submission, in a file of their own once all arrived and verified.

        An upload that names its digest (SHA-256 or XXH3-128) is kept when its stream breaks, and one that
        starts at ``header.offset`` continues what was kept (see :mod:`..runtime.upload_staging`).
        """
        what = f"global weights of task {header.task_id}"
        check_announced_size(header.payload_size, self.limits.max_weights_bytes, what)
        key = UploadKey.named_by(header)
        if key is None:  # a sender that cannot resume: nothing is kept on a problem
            if header.offset:
                raise PayloadError(f"{what}: an upload from an offset must name its payload_sha256 or payload_xxh3_128")
            incoming = self.tasks.incoming_dir
            return receive_payload(messages, header.payload_size, incoming, self.limits.max_weights_bytes, what)
        messages = _cut_when_cancelled(messages)
        return self.tasks.uploads.receive(key, header.offset, messages, what, on_superseded=context.cancel)

    @_rpc(Action.SUBMIT)
    def GetUploadOffset(self, request, context, call):
        key = UploadKey.named_by(request) or UploadKey(request.task_id, request.payload_size, "")  # no digest: refused by name
        check_announced_size(key.size, self.limits.max_weights_bytes, f"global weights of task {key.task_id}")
        # Also the sender's probe of progress while an upload runs: answered without waiting on the tasks.
        held = self.tasks.uploads.offset(key)
        return agent_pb2.UploadOffsetReply(offset=held, task_exists=not held and self.tasks.exists(key.task_id))

    @staticmethod
    def _task_spec(header: agent_pb2.SubmitTaskHeader, who: PeerIdentity) -> TaskSpec:
        try:
            config = json.loads(header.config_json) if header.config_json else {}
        except ValueError as exc:
            raise InvalidTaskError(f"task {header.task_id}: config is not valid JSON ({exc})") from None
        except RecursionError:
            raise InvalidTaskError(f"task {header.task_id}: config is not valid JSON (nested too deeply)") from None
        if not isinstance(config, dict):
            raise InvalidTaskError(f"task {header.task_id}: config must be a JSON object, got {type(config).__name__}")
        return TaskSpec(
            task_id=header.task_id,
            app_name=header.app_name,
            app_version=header.app_version if header.HasField("app_version") else None,
            round=header.round,
            kind=header.kind or "train",
            config=config,
            num_gpus=header.num_gpus if header.HasField("num_gpus") else None,
            num_processes=header.num_processes if header.HasField("num_processes") else None,
            requested_by=who.name,
        )

    @_rpc(Action.READ_TASK)
    def GetTask(self, request, context, call):
        return self.tasks.get(request.task_id).to_message()

    @_rpc(Action.READ_TASK)
    def WatchTask(self, request, context, call):
        after = request.after_seq
        state = self.tasks.get(request.task_id)
        while True:
            if state.seq > after:
                yield state.to_message()
                after = state.seq
            if state.status in TERMINAL_STATUSES or self.stopping.is_set() or not context.is_active():
                return
            remaining = context.time_remaining()
            timeout = WATCH_POLL_SECONDS if remaining is None else max(0.0, min(WATCH_POLL_SECONDS, remaining))
            state = self.tasks.wait(request.task_id, after, timeout)

    @_rpc(Action.FETCH)
    def FetchResult(self, request, context, call):
        path, state = self.tasks.result_file(request.task_id)
        call.what["privacy"] = result_privacy(path)  # the filters this result went through, in the audit line
        # Send from the open file: an acknowledge meanwhile cannot cut the transfer short.
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = request.offset  # the bytes a download cut short has already
            if offset > size:
                raise ResultOffsetOutOfRange(f"result of task {request.task_id}: offset {offset} is beyond its {size} bytes")
            checksum = fastest_shared(request.checksums)  # SHA-256 for a client that offers nothing else
            header = agent_pb2.FetchResultHeader(state=state.to_message(), checksum="" if checksum == SHA256 else checksum)
            yield from send_payload(agent_pb2.FetchResultReply, header, f, self.limits.chunk_size, size, offset, None, checksum)
        log.info("result of task %s sent (bytes %d to %d)", request.task_id, offset, size, extra={"task_id": request.task_id})

    @_rpc(Action.ACKNOWLEDGE)
    def AcknowledgeResult(self, request, context, call):
        self.tasks.acknowledge(request.task_id)
        log.info("result of task %s acknowledged", request.task_id, extra={"task_id": request.task_id})
        return agent_pb2.AcknowledgeResultReply()

    @_rpc(Action.ABORT)
    def AbortTask(self, request, context, call):
        state = self.tasks.abort(request.task_id)
        log.info("task %s aborted by %s", request.task_id, call.who.name, extra={"task_id": request.task_id})
        return state.to_message()

    # ---- the agent ---------------------------------------------------------------------

    @_rpc(Action.SHUTDOWN)
    def Shutdown(self, request, context, call):
        reason = request.reason or "no reason given"
        call.what["reason"] = reason
        self._request_shutdown(f"Shutdown requested by {call.who.name}: {reason}")
        return agent_pb2.ShutdownReply()
