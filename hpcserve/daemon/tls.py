"""Transport security (TLS) of the daemon's gRPC port, its HTTP API and the worker link. No torch.

Interface::

    tls = load_tls(cert_file, key_file)        # TlsMaterial | None; the site config's [tls] table
    bound = bind_grpc(server, host, port, tls)  # add_secure_port / add_insecure_port; 0 = failed
    grpc_server_credentials(tls) -> grpc.ServerCredentials
    http_ssl_context(tls) -> ssl.SSLContext     # server side, TLS >= 1.2 (the OpenAI-compatible API)
    grpc_channel_credentials(ca_pem) -> grpc.ChannelCredentials   # ca_pem None: the system's roots

Lifecycle: the daemon calls ``load_tls`` once at start, before it binds anything; a bad file is a
one-line ``HpcserveError`` naming ``tls.cert-file`` / ``tls.key-file``, the path and the fix. With
TLS on, one certificate serves the gRPC port (public ``Serving`` API and the internal
``WorkerLink``) and the HTTP port. The daemon then writes the certificate's absolute path as
``tls_ca`` into ``endpoint.json``, so clients on a shared file system trust it without setup (the
API client also reads ``HPCSERVE_TLS_CA=/path/ca.pem`` or ``=system``; see
``hpcserve.api.client``), and passes the certificate's PEM text (not a path: ranks may run on other
nodes) to the worker ranks in ``HPCSERVE_WORKER_TLS_CA`` (``WORKER_CA_ENV``); the rank leaders then
dial the daemon over TLS with it as the trust root.

Certificate requirements: clients and worker ranks check the certificate against the host part
of the address they dial. That is the daemon node's hostname inside a Slurm allocation (the
``endpoint.json`` address and the worker link) and ``127.0.0.1`` outside one, so the
certificate needs a SubjectAltName for the daemon node's hostname (DNS) and, for local use,
``127.0.0.1`` (IP) and ``localhost`` (DNS); a site wildcard for the nodes' domain is fine when
the hostname is fully qualified. gRPC accepts the certificate itself (or any certificate of its
chain) as the trust root, so a self-signed certificate works as its own CA; for a certificate
from a public or site CA installed system-wide, clients can use ``HPCSERVE_TLS_CA=system``.
HTTP clients (OpenAI SDK, curl) usually want the CA at the top of the chain as their trust
root (a self-signed certificate is its own).
The private key must be unencrypted PEM (protect it with file permissions, ``chmod 600``).
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from hpcserve.errors import HpcserveError

WORKER_CA_ENV = "HPCSERVE_WORKER_TLS_CA"  # PEM text of the worker link's trust root (set when TLS is on)
_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_FIX = "set tls.key-file to the unencrypted PEM private key the certificate was issued for"
_CERT_FIX = "set tls.cert-file to the server's PEM certificate (chain)"


@dataclass(frozen=True)
class TlsMaterial:
    """The server certificate chain and its private key, both PEM, as read at start."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: str  # absolute path of the certificate file (written to endpoint.json as tls_ca)

    def __repr__(self) -> str:  # never show the key in logs or tracebacks
        return f"TlsMaterial(cert_path={self.cert_path!r})"


class _Encrypted(Exception):
    """load_cert_chain asked for a password: the key file is encrypted."""


def _password() -> bytes:
    raise _Encrypted  # instead of OpenSSL prompting on the terminal


def _read(key: str, raw: str) -> tuple[Path, bytes]:
    path = Path(os.path.expandvars(os.path.expanduser(raw))).absolute()
    fix = _CERT_FIX if key == "tls.cert-file" else _KEY_FIX
    if path.is_dir():
        raise HpcserveError(f"{key}: {path} is a directory; {fix}")
    try:
        return path, path.read_bytes()
    except FileNotFoundError:
        raise HpcserveError(f"{key}: {path} does not exist; {fix}") from None
    except OSError as exc:
        raise HpcserveError(f"{key}: cannot read {path} ({exc.strerror or exc}); make it readable by the "
                            "daemon's user, or " + fix) from None


def _ssl_error(exc: Exception) -> str:
    why = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", why)


def _context_with(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context holding the pair; load_cert_chain only takes files, so they go to a private
    temporary directory (0700) for the call and are deleted at once."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="hpcserve-tls-") as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert, key, password=_password)
    return ctx


def load_tls(cert_file: str | None, key_file: str | None) -> TlsMaterial | None:
    """The ``[tls]`` pair checked and loaded, or None when both are unset."""
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        have, missing = ("tls.cert-file", "tls.key-file") if cert_file else ("tls.key-file", "tls.cert-file")
        raise HpcserveError(f"{have} is set but {missing} is not; set both (the PEM certificate chain and its "
                            "private key) to serve TLS, or neither")
    cert_path, cert_pem = _read("tls.cert-file", cert_file)
    key_path, key_pem = _read("tls.key-file", key_file)
    if _CERT_MARK not in cert_pem:
        raise HpcserveError(f"tls.cert-file: {cert_path} holds no PEM certificate (no {_CERT_MARK.decode()} line); "
                            + _CERT_FIX)
    if b"PRIVATE KEY-----" in cert_pem:  # clients and worker ranks are given the certificate file / text
        raise HpcserveError(f"tls.cert-file: {cert_path} also holds a private key; clients are given this file as "
                            "their trust root, so keep only the certificate chain in it and the key in tls.key-file")
    if b"PRIVATE KEY-----" not in key_pem:
        raise HpcserveError(f"tls.key-file: {key_path} holds no PEM private key (no -----BEGIN ... PRIVATE KEY----- "
                            "line); " + _KEY_FIX)
    try:  # the certificates alone first, so that a broken one is not blamed on the key
        ssl.create_default_context(cadata=cert_pem.decode("ascii"))
    except UnicodeDecodeError:
        raise HpcserveError(f"tls.cert-file: {cert_path} is not a PEM file (it holds non-ASCII bytes); "
                            + _CERT_FIX) from None
    except (ssl.SSLError, ValueError) as exc:
        raise HpcserveError(f"tls.cert-file: {cert_path} is not a valid PEM certificate "
                            f"({_ssl_error(exc)}); {_CERT_FIX}") from None
    try:
        _context_with(cert_pem, key_pem)
    except _Encrypted:
        raise HpcserveError(f"tls.key-file: {key_path} is encrypted (it needs a passphrase); give an unencrypted key "
                            "(e.g. `openssl pkey -in KEY -out KEY.plain`) and protect it with chmod 600") from None
    except ssl.SSLError as exc:
        why = _ssl_error(exc)
        if "MISMATCH" in why.upper():
            raise HpcserveError(f"tls.key-file: {key_path} is not the private key of the certificate in "
                                f"tls.cert-file {cert_path}; {_KEY_FIX}") from None
        raise HpcserveError(f"tls.key-file: {key_path} cannot be used with tls.cert-file {cert_path} ({why}); "
                            + _KEY_FIX) from None
    return TlsMaterial(cert_pem=cert_pem, key_pem=key_pem, cert_path=str(cert_path))


def grpc_server_credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """Server-side TLS for a gRPC port (no client certificates: callers authenticate with tokens)."""
    return grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])


def http_ssl_context(tls: TlsMaterial) -> ssl.SSLContext:
    """Server-side ``ssl.SSLContext`` (TLS 1.2 or newer) for the HTTP API, e.g. aiohttp's ``ssl_context``."""
    ctx = _context_with(tls.cert_pem, tls.key_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def grpc_channel_credentials(ca_pem: bytes | str | None) -> grpc.ChannelCredentials:
    """Client-side TLS trusting ``ca_pem`` (PEM certificates), or the system's roots when None."""
    if isinstance(ca_pem, str):
        ca_pem = ca_pem.encode()
    return grpc.ssl_channel_credentials(root_certificates=ca_pem)


def bind_grpc(server, host: str, port: int, tls: TlsMaterial | None) -> int:
    """Bind ``host:port`` (IPv6 hosts get brackets) with TLS when ``tls`` is given; returns the bound port,
    0 when it could not be bound (like grpc's ``add_*_port``)."""
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, grpc_server_credentials(tls))
    except RuntimeError:
        return 0
