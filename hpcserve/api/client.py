"""Synchronous client of the daemon's public gRPC API, used by the CLI. No torch.

Interface::

    client = Client.connect(endpoint=None, state_dir=None, timeout=5.0)
    client.submit_batch(path_or_bytes, completion_window=None, metadata=None) -> dict
    client.get_batch(id) -> dict;  client.cancel_batch(id) -> dict
    client.list_batches(limit=20, after=None) -> (list[dict], has_more)
    client.iter_batch_results(id, follow=False) -> Iterator[(custom_id, json_str, is_error)]
    client.server_info() -> serving_pb2.ServerInfo
    client.usage(since_day=None, by_day=False) -> serving_pb2.UsageReport;  client.drain() -> bool
    client.create_key(tenant, note) / list_keys(tenant=None) / revoke_key(key_id)   # admin keys
    client.chat_stream(messages, max_tokens=None, temperature=None, request_id=None, ...)
    client.complete_stream(prompt, ...) -> Iterator[chunk];  client.abort(request_id) -> bool
    client.close()   # or use it as a context manager
    resolve_tls(endpoint, state_dir=None, env=None) -> (trust root PEM | None for system roots, source) | None

Lifecycle: ``connect`` resolves the address with ``hpcserve.daemon.endpoint.resolve_endpoint``
(``--endpoint``, ``HPCSERVE_ENDPOINT``, then the state dir's ``endpoint.json``), the token
with ``resolve_token`` (a tenant's own key in ``HPCSERVE_API_KEY``; else the endpoint file's
minted key; else ``HPCSERVE_TOKEN``; else, for an address
given by flag or env, the state dir file's token if that file names the same address) and
the TLS trust root with ``resolve_tls`` (below), then waits up to ``timeout`` for the
channel. Every call sends ``authorization: Bearer <token>`` when a token is known. Batch
dicts use OpenAI field names (``batch_from_proto``).

TLS: the channel is TLS (``grpc.secure_channel``) when a trust root is known, else plaintext:
- ``HPCSERVE_TLS_CA=/path/ca.pem``: trust the PEM certificate(s) in that file (the daemon's
  certificate or the CA that signed it); ``HPCSERVE_TLS_CA=system``: the system's roots, for a
  site certificate from a public or site CA installed system-wide. It wins over the file's;
- else the endpoint file's ``tls_ca`` (the daemon writes its certificate's path there), also
  for an address given by flag or env when the state dir file names the same address.
The certificate must name the host of the address (a SubjectAltName; see ``daemon/tls.py``).

Errors: every ``grpc.RpcError`` becomes a ``ClientError`` (an ``HpcserveError``) with one
line: ``DaemonUnreachable`` (not listening, or the connection broke), ``Unauthenticated``
(token hint), ``NotFound`` / ``InvalidArgument`` and other codes with the server's details;
``TlsVerificationFailed`` (code None: a setup problem, not worth retrying) when the TLS
handshake fails (wrong trust root, a certificate not naming the host, a plaintext daemon).
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from hpcserve.api.batch_api import batch_from_proto
from hpcserve.api.v1 import serving_pb2, serving_pb2_grpc
from hpcserve.daemon.endpoint import (
    FILE_NAME,
    Endpoint,
    EndpointNotFound,
    read_endpoint,
    resolve_endpoint,
    state_dir_from,
)
from hpcserve.daemon.tls import grpc_channel_credentials
from hpcserve.errors import HpcserveError

if TYPE_CHECKING:
    from typing_extensions import Self

CALL_TIMEOUT_S = 60.0  # unary calls except SubmitBatch (which validates the whole input)
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
            ("grpc.enable_retries", 0)]
_TOKEN_HINT = ("set HPCSERVE_API_KEY to your tenant's key (from `hpcserve keys add`), or use the daemon's "
               "endpoint.json (--state-dir)")
ENV_TLS_CA = "HPCSERVE_TLS_CA"  # path of a PEM trust root, or "system"
_TLS_MARKS = ("handshake", "ssl_error", "certificate", "hostname verification", "tsi_")


class ClientError(HpcserveError):
    """A call to the daemon failed; ``code`` is the gRPC status code (None before any call);
    ``retry_after_s`` the server's ``retry-after`` trailer (tenant limits), if any."""

    retry_after_s: float | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(" ".join(str(message).split()))
        self.code = code


class DaemonUnreachable(ClientError):
    """Nothing answers at the daemon's address, or the connection to it broke."""


class Unauthenticated(ClientError):
    """The daemon refused the token (or none was sent)."""


class NotFound(ClientError):
    """No such batch (or other object)."""


class InvalidArgument(ClientError):
    """The daemon rejected an argument; the message names the field."""


class TlsVerificationFailed(ClientError):
    """The TLS handshake with the daemon failed: wrong trust root, wrong host name, or no TLS there."""


def _is_tls_failure(details: str) -> bool:
    low = details.lower()
    return any(m in low for m in _TLS_MARKS)


def _local_endpoint(ep: Endpoint, state_dir, env) -> Endpoint | None:
    """For an address given by flag or env: the state dir's endpoint file if it names the same address."""
    if ep.source not in ("--endpoint", "HPCSERVE_ENDPOINT"):
        return None
    try:
        local = read_endpoint(state_dir_from(state_dir, env))
    except EndpointNotFound:
        return None
    return local if local is not None and local.address == ep.address else None


def resolve_tls(ep: Endpoint, state_dir: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None) -> tuple[bytes | None, str] | None:
    """None for plaintext, else ``(trust root PEM, or None for the system's roots; where it came from)``.
    An unreadable or non-PEM trust root file is one ``ClientError`` naming it."""
    env = os.environ if env is None else env
    raw = env.get(ENV_TLS_CA, "").strip()
    if raw:
        if raw.lower() == "system":
            return None, f"{ENV_TLS_CA}=system"
        path, source = raw, ENV_TLS_CA
    else:
        file_ep = ep if ep.tls_ca else _local_endpoint(ep, state_dir, env)
        if file_ep is None or not file_ep.tls_ca:
            return None
        path, source = file_ep.tls_ca, f"the tls_ca of {file_ep.source}"
    p = Path(os.path.expanduser(path))
    fix = (f"set {ENV_TLS_CA}=/path/ca.pem to the daemon's certificate or its CA (or {ENV_TLS_CA}=system "
           "for a certificate from a CA installed system-wide)")
    try:
        pem = p.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read the TLS trust root {p} (from {source}): {exc.strerror or exc}; {fix}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ClientError(f"the TLS trust root {p} (from {source}) holds no PEM certificate; {fix}")
    return pem, f"{p} from {source}"


def resolve_token(ep: Endpoint, state_dir: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """``(token, where it came from)`` for an endpoint from ``resolve_endpoint``: a tenant's own
    key in ``HPCSERVE_API_KEY`` wins; else the endpoint file's (minted) key; else HPCSERVE_TOKEN."""
    env = os.environ if env is None else env
    if env.get("HPCSERVE_API_KEY"):
        return env["HPCSERVE_API_KEY"], "HPCSERVE_API_KEY"
    if ep.token:
        return ep.token, ep.source
    if env.get("HPCSERVE_TOKEN"):
        return env["HPCSERVE_TOKEN"], "HPCSERVE_TOKEN"
    local = _local_endpoint(ep, state_dir, env)
    if local is not None and local.token:
        return local.token, local.source
    return None, None


def read_input_file(path: str | os.PathLike) -> bytes:
    """The bytes of a local batch input file, or one clear error."""
    p = Path(path)
    if p.is_dir():
        raise HpcserveError(f"input file {p} is a directory; pass a .jsonl file")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise HpcserveError(f"input file {p} does not exist") from None
    except OSError as exc:
        raise HpcserveError(f"cannot read input file {p}: {exc.strerror or exc}") from None


def _sampling(max_tokens=None, temperature=None, top_p=None, top_k=None, seed=None,
              stop=None) -> serving_pb2.SamplingParams:
    sp = serving_pb2.SamplingParams(stop=list(stop or ()))
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sp, name, value)
    return sp


class Client:
    """See the module docstring. Build one with ``Client.connect``."""

    def __init__(self, channel: grpc.Channel, endpoint: Endpoint, state_dir: Path,
                 token: str | None = None, token_source: str | None = None, tls_source: str | None = None):
        self._channel = channel
        self.tls_source = tls_source  # where the TLS trust root came from; None: plaintext
        self._stub = serving_pb2_grpc.ServingStub(channel)
        self.endpoint, self.address, self.state_dir = endpoint, endpoint.address, state_dir
        self.token_source = token_source
        self._failed = False  # the last _wait_ready saw a failed connection attempt
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    @classmethod
    def connect(cls, endpoint: str | None = None, state_dir: str | os.PathLike | None = None,
                timeout: float = 5.0, env: Mapping[str, str] | None = None) -> Client:
        env = os.environ if env is None else env
        ep = resolve_endpoint(endpoint, state_dir, env)
        token, token_source = resolve_token(ep, state_dir, env)
        tls = resolve_tls(ep, state_dir, env)
        if tls is None:
            channel = grpc.insecure_channel(ep.address, options=_OPTIONS)
        else:
            channel = grpc.secure_channel(ep.address, grpc_channel_credentials(tls[0]), options=_OPTIONS)
        client = cls(channel, ep, state_dir_from(state_dir, env), token, token_source, tls and tls[1])
        if not client._wait_ready(timeout, fail_fast=True):
            details = client._connect_error() if client._failed else ""
            client.close()
            if _is_tls_failure(details):
                raise TlsVerificationFailed(client._tls_failed(details))
            why = "connection failed" if client._failed else f"no connection within {timeout:g} s"
            if tls is None and "socket closed" in details.lower():
                why += (f"; the connection was closed at once: if that daemon serves TLS, set "
                        f"{ENV_TLS_CA}=/path/ca.pem (its certificate or CA) or {ENV_TLS_CA}=system")
            raise DaemonUnreachable(client._unreachable(why))
        return client

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- errors

    def _wait_ready(self, timeout: float, fail_fast: bool = False, connect: bool = True) -> bool:
        """Whether the channel gets READY within ``timeout``; ``fail_fast``: give up at the first
        failed connection attempt (nothing listens there) instead of retrying until the timeout;
        ``connect=False``: only watch (an idle channel stays idle)."""
        done, ok = threading.Event(), []

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state == grpc.ChannelConnectivity.READY or (
                    fail_fast and state == grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                ok.append(state == grpc.ChannelConnectivity.READY)
                done.set()

        self._channel.subscribe(watch, try_to_connect=connect)
        try:
            done.wait(timeout)
        finally:
            self._channel.unsubscribe(watch)
        self._failed = bool(ok) and not ok[0]
        return bool(ok and ok[0])

    def _connect_error(self) -> str:
        """The details of the last failed connection attempt: a call on a channel in TRANSIENT_FAILURE
        fails at once with them (no token is sent: nothing is connected)."""
        try:
            health_stub = self._channel.unary_unary("/grpc.health.v1.Health/Check",
                                                    request_serializer=bytes, response_deserializer=bytes)
            health_stub(b"", timeout=2.0)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return exc.details() or ""
        return ""

    def _tls_failed(self, details: str) -> str:
        last = re.sub(r"^.*?last error: \w+: (?:ipv[46]:\S+|unix:\S+): ", "", details).strip()
        last = re.sub(r"[:\s]+OK$", "", last)  # grpc appends the status of its own check
        low, host = last.lower(), self.address.rpartition(":")[0]
        fix = (f"set {ENV_TLS_CA}=/path/ca.pem to the daemon's certificate or the CA that signed it "
               f"({ENV_TLS_CA}=system for a CA installed system-wide)")
        if "wrong_version_number" in low or "packet_length_too_long" in low:
            why = "it does not speak TLS"
            from_env = ENV_TLS_CA in (self.tls_source or "")
            fix = (f"unset {ENV_TLS_CA} to talk plaintext to a daemon without [tls]" if from_env else
                   "the endpoint file says it serves TLS: is that file stale, with another program on that port?")
        elif "hostname verification" in low or "peer name" in low:
            why = f"its certificate does not name {host}"
            fix = (f"the daemon's certificate needs a SubjectAltName for {host} (see [tls] in the site config), or "
                   "connect by a name it has (--endpoint NAME:PORT)")
        elif "certificate_verify_failed" in low:
            reason = last.rsplit("CERTIFICATE_VERIFY_FAILED", 1)[-1].strip(" :")
            why = "its certificate is not trusted" + (f" ({reason})" if reason else "")
        else:
            why = last
        return (f"TLS verification of the hpcserve daemon at {self.address} failed: {why}; trust root: "
                f"{self.tls_source or 'none, plaintext'}; {fix}")

    def _unreachable(self, why: str) -> str:
        ep, where = self.endpoint, self.state_dir / FILE_NAME
        if ep.source not in ("--endpoint", "HPCSERVE_ENDPOINT"):
            hint = (f"If it stopped, that file is stale (pid {ep.pid}"
                    + (", draining: its allocation was ending" if ep.draining else "")
                    + "): start it again, or use --state-dir DIR / --endpoint HOST:PORT for another daemon")
        else:
            hint = (f"Check the address, or leave out {ep.source} to use the state dir's {where} "
                    "(--state-dir / HPCSERVE_STATE_DIR)")
        return (f"cannot reach the hpcserve daemon at {ep.address} (from {ep.source}): is `hpcserve serve` "
                f"running? {hint} [{why}]")

    def _error(self, exc: grpc.RpcError, method: str, timeout: float | None = None,
               started: bool = False) -> ClientError:
        err = self._error_of(exc, method, timeout, started)
        trailers = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
        for key, value in trailers or ():
            if key == "retry-after" and str(value).isdigit():
                err.retry_after_s = float(value)
        return err

    def _error_of(self, exc: grpc.RpcError, method: str, timeout: float | None, started: bool) -> ClientError:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        details = (exc.details() if callable(getattr(exc, "details", None)) else None) or ""
        if code == grpc.StatusCode.UNAVAILABLE and _is_tls_failure(details):
            return TlsVerificationFailed(self._tls_failed(details))
        if code == grpc.StatusCode.UNAVAILABLE:
            # Still connected: the daemon sent UNAVAILABLE itself (e.g. its workers died). Only watch,
            # no reconnect: grpc's poller would touch the channel after close() (grpcio 1.85).
            if self._wait_ready(0.5, connect=False):
                return ClientError(details or f"the daemon at {self.address} is unavailable", code)
            if started:
                return DaemonUnreachable(f"the stream from the hpcserve daemon at {self.address} broke "
                                         f"({details or 'connection lost'}); is `hpcserve serve` still running?",
                                         code)
            return DaemonUnreachable(self._unreachable(details or "connection failed"), code)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            sent = f"the token from {self.token_source}" if self._metadata else "no token (none found)"
            return Unauthenticated(f"the daemon at {self.address} refused the call ({sent}): "
                                   f"{details or 'missing or wrong token: ' + _TOKEN_HINT}", code)
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details or f"{method}: not found", code)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(details or f"{method}: invalid argument", code)
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.PERMISSION_DENIED):
            return ClientError(details or f"{method}: {code.name.lower()}", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ClientError(f"the daemon at {self.address} did not answer {method} within {timeout:g} s"
                               if timeout else f"{method}: deadline exceeded ({details})", code)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ClientError(f"the daemon at {self.address} does not implement {method} "
                               f"(an older or different server?): {details}", code)
        if code == grpc.StatusCode.CANCELLED:
            return ClientError(f"{method} was cancelled ({details or 'by the client or server'})", code)
        name = code.name if code is not None else "error"
        return ClientError(f"{method} failed at the daemon {self.address} ({name}): {details}", code)

    def _unary(self, method: str, request: Any, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, method, timeout) from None

    def _stream(self, method: str, request: Any) -> Iterator[Any]:
        call = getattr(self._stub, method)(request, metadata=self._metadata)
        started = False
        try:
            for msg in call:
                started = True
                yield msg
        except grpc.RpcError as exc:
            raise self._error(exc, method, started=started) from None
        finally:
            call.cancel()  # no-op once finished; stops the server side if the caller stopped early

    # ---------------------------------------------------------------- batches

    def submit_batch(self, source: str | os.PathLike | bytes, completion_window: str | None = None,
                     metadata: Mapping[str, str] | None = None, endpoint: str | None = None,
                     by_path: bool = False) -> dict:
        """Submit a local file (its content is sent inline) or bytes. ``by_path=True`` sends the
        file's absolute path instead: the daemon must be able to read it (shared file system)."""
        req = serving_pb2.SubmitBatchRequest(completion_window=completion_window or "", endpoint=endpoint or "",
                                             metadata=dict(metadata or {}))
        if isinstance(source, (bytes, bytearray)):
            req.input_jsonl = bytes(source)
        elif by_path:
            path = Path(source).absolute()
            if not path.is_file():
                raise HpcserveError(f"input file {path} does not exist or is not a file")
            req.input_path = str(path)
        else:
            req.input_jsonl = read_input_file(source)
        return batch_from_proto(self._unary("SubmitBatch", req, timeout=None))

    def get_batch(self, batch_id: str) -> dict:
        return batch_from_proto(self._unary("GetBatch", serving_pb2.GetBatchRequest(batch_id=batch_id)))

    def list_batches(self, limit: int = 20, after: str | None = None) -> tuple[list[dict], bool]:
        resp = self._unary("ListBatches", serving_pb2.ListBatchesRequest(limit=limit, after=after or ""))
        return [batch_from_proto(b) for b in resp.batches], resp.has_more

    def cancel_batch(self, batch_id: str) -> dict:
        return batch_from_proto(self._unary("CancelBatch", serving_pb2.CancelBatchRequest(batch_id=batch_id)))

    def iter_batch_results(self, batch_id: str, follow: bool = False) -> Iterator[tuple[str | None, str, bool]]:
        """``(custom_id or None, output/error line JSON, is_error)``; see ``StreamBatchResults``."""
        req = serving_pb2.StreamBatchResultsRequest(batch_id=batch_id, follow=follow)
        for line in self._stream("StreamBatchResults", req):
            yield line.custom_id or None, line.json, line.is_error

    # ---------------------------------------------------------------- server, chat, completions

    def server_info(self) -> serving_pb2.ServerInfo:
        return self._unary("GetServerInfo", serving_pb2.GetServerInfoRequest())

    def chat_stream(self, messages: Iterable[Mapping[str, str] | serving_pb2.ChatMessage],
                    max_tokens: int | None = None, temperature: float | None = None,
                    request_id: str | None = None, top_p: float | None = None, top_k: int | None = None,
                    seed: int | None = None, stop: Iterable[str] | None = None,
                    request_class: int = serving_pb2.REQUEST_CLASS_UNSPECIFIED,
                    model: str = "") -> Iterator[serving_pb2.ChatChunk]:
        """Stream a chat completion; closing the iterator early cancels the call."""
        msgs = [m if isinstance(m, serving_pb2.ChatMessage) else
                serving_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        req = serving_pb2.ChatRequest(messages=msgs, request_class=request_class, model=model,
                                      sampling_params=_sampling(max_tokens, temperature, top_p, top_k, seed, stop))
        if request_id is not None:
            req.request_id = request_id
        return self._stream("Chat", req)

    def complete_stream(self, prompt: str | Iterable[int], max_tokens: int | None = None,
                        temperature: float | None = None, request_id: str | None = None,
                        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                        stop: Iterable[str] | None = None,
                        request_class: int = serving_pb2.REQUEST_CLASS_UNSPECIFIED,
                        model: str = "") -> Iterator[serving_pb2.CompletionChunk]:
        """Stream a text completion of a prompt (text or token ids)."""
        req = serving_pb2.CompletionRequest(request_class=request_class, model=model,
                                            sampling_params=_sampling(max_tokens, temperature, top_p, top_k,
                                                                      seed, stop))
        if isinstance(prompt, str):
            req.prompt_text = prompt
        else:
            req.prompt_token_ids.ids.extend(prompt)
        if request_id is not None:
            req.request_id = request_id
        return self._stream("Complete", req)

    def abort(self, request_id: str) -> bool:
        """Abort an in-flight Chat/Complete request; False if it was unknown or finished."""
        return self._unary("Abort", serving_pb2.AbortRequest(request_id=request_id), timeout=10.0).is_aborted

    def usage(self, since_day: str | None = None, by_day: bool = False) -> serving_pb2.UsageReport:
        """Per-tenant usage (every tenant with an admin key, else the caller's own)."""
        return self._unary("GetUsage", serving_pb2.GetUsageRequest(since_day=since_day or "", by_day=by_day))

    def create_key(self, tenant: str, note: str = "") -> serving_pb2.CreateKeyResponse:
        """Admin keys only: a new key for ``tenant`` (``.key``, shown once; ``.info``)."""
        return self._unary("CreateKey", serving_pb2.CreateKeyRequest(tenant=tenant, note=note))

    def list_keys(self, tenant: str | None = None) -> list[serving_pb2.ApiKeyInfo]:
        return list(self._unary("ListKeys", serving_pb2.ListKeysRequest(tenant=tenant or "")).keys)

    def revoke_key(self, key_id: str) -> serving_pb2.ApiKeyInfo:
        return self._unary("RevokeKey", serving_pb2.RevokeKeyRequest(key_id=key_id))

    def drain(self) -> bool:
        """Ask the daemon to drain and stop (admin keys only)."""
        return self._unary("Drain", serving_pb2.DrainRequest(), timeout=10.0).is_draining


def new_request_id(prefix: str = "cli") -> str:
    """A client-chosen request id, so a request can be aborted while it streams."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
