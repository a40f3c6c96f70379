"""Serving off the loopback: a shared-secret token, TLS, and the limits that keep one client
from starving the others.

- **Token.** ``cm-policy serve token_file=PATH`` (or the environment variable
  :data:`TOKEN_ENV`, or ``token=...``, which other users of the machine can read in ``ps``): every
  WebSocket client must send ``Authorization: Bearer <token>`` with its opening handshake. The
  check runs before the upgrade completes (a wrong or missing token gets HTTP 401 and no
  session), compares in constant time, and the token is never printed or logged.
- **TLS.** ``tls_cert=cert.pem tls_key=key.pem``: the server speaks ``wss://`` (and
  ``https://`` for ``/healthz``) itself, TLS 1.2 or newer; clients verify it against the
  system's CAs or their own ``ca=`` file (a self-signed certificate).
- **Exposure.** A host other than the loopback without a token is refused, saying how to serve
  it safely; ``insecure=true`` overrides that for a trusted network.
- **Limits.** At most ``max_sessions`` concurrent sessions (more get HTTP 503 before the
  upgrade), and at most ``max_rate`` requests per second per session (a token bucket holding
  one second's worth; a request over it gets an error reply and the session goes on).

``/healthz`` stays open for load balancers and answers only ``ok``, ``warming up`` or ``shutting
down``: nothing about the model. This module needs only the standard library.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import ssl
import time
from pathlib import Path

TOKEN_ENV = "CM_POLICY_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
LOOPBACK_NAMES = ("localhost",)


def resolve_token(
    token: str | None, token_file: str | None, environ: dict[str, str] | None = None
) -> str | None:
    """The server's token from exactly one of ``token_file``, ``token`` and :data:`TOKEN_ENV`
    (None: no token). A token shorter than :data:`MIN_TOKEN_CHARS` is refused."""
    env = os.environ if environ is None else environ
    sources = {
        "token_file": token_file,
        "token": token,
        TOKEN_ENV: env.get(TOKEN_ENV) or None,
    }
    given = [name for name, value in sources.items() if value]
    if len(given) > 1:
        raise ValueError(f"the token comes from one place; got {given}: keep one of them")
    if not given:
        return None
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise FileNotFoundError(f"token_file={path}: no such file (expected the token in it)")
        lines = path.read_text().splitlines()
        value = lines[0].strip() if lines else ""
    else:
        value = str(sources[given[0]]).strip()
    if len(value) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"the token from {given[0]} has {len(value)} characters; expected at least "
            f"{MIN_TOKEN_CHARS} (make one with {MAKE_TOKEN})"
        )
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond the loopback without a token unless ``insecure``."""
    if token is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"host={host} without a token would let anyone who reaches this address drive the "
            f"policy: give clients a token (token_file=PATH or the {TOKEN_ENV} environment "
            f"variable; make one with {MAKE_TOKEN}) and encrypt it with tls_cert=CERT.pem "
            "tls_key=KEY.pem, or keep host=127.0.0.1 behind an SSH tunnel; insecure=true "
            "serves without a token (a trusted network only)"
        )


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant time)."""
    scheme, _, given = (header or "").partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    return ok and scheme.lower() == "bearer"


def server_ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The TLS context of ``tls_cert`` and ``tls_key`` (both or neither), TLS 1.2 or newer."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError(
            "TLS needs both tls_cert=CERT.pem and tls_key=KEY.pem; got only "
            + ("tls_cert" if cert else "tls_key")
        )
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name}={path}: no such file (expected a PEM file)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(
            f"tls_cert={cert} and tls_key={key} do not load as a PEM certificate and its key: "
            f"{exc.reason or exc}"
        ) from None
    return context


def client_ssl_context(ca: str | None) -> ssl.SSLContext:
    """A client's TLS context: the system's CAs, or the ``ca`` file (e.g. the server's own
    self-signed certificate); the server's name is always verified."""
    if ca is not None and not Path(ca).is_file():
        raise FileNotFoundError(f"ca={ca}: no such file (expected a PEM certificate)")
    return ssl.create_default_context(cafile=ca)


class RateLimiter:
    """A token bucket: ``rate`` requests per second on average, bursts up to one second's worth
    (at least one request)."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.clock = clock
        self.last = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
        self.last = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False
