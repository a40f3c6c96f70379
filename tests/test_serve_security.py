"""Serving off the loopback (cm_policy/serve/security.py): the token checked before the
WebSocket upgrade, TLS with a self-signed certificate made here, the refusal to listen openly,
and the limits on sessions and request rate. The server runs as `cm-policy serve` does, in a
subprocess."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import SERVE_SPEC
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from cm_policy.checkpoint import save_policy
from cm_policy.data import LinearNormalizer
from cm_policy.policy import Policy
from cm_policy.serve import PolicyClient, ServerError, ServerRefused
from cm_policy.serve.launch import (
    free_port,
    healthz,
    local_certificate,
    spawn_server,
    stop_server,
)
from cm_policy.serve.security import (
    TOKEN_ENV,
    RateLimiter,
    authorized,
    check_exposure,
    is_loopback,
    resolve_token,
)

SPEC = SERVE_SPEC
TOKEN = "s3cret-token-of-the-lab-0123456789"
MAX_SESSIONS = 2
MAX_RATE = 4.0


def window(batch: int = 1) -> dict[str, np.ndarray]:
    return {"keypoints": np.random.default_rng(0).uniform(0, 512, (batch, 2, 20)).astype("f4")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = LinearNormalizer().fit(
        {"action": rng.uniform(50, 450, (100, 2)), "keypoints": rng.uniform(0, 512, (100, 20))}
    )
    run = tmp_path_factory.mktemp("run")
    save_policy(Policy(SPEC, norm), run, step=1)
    return run


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made with openssl here."""
    return local_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured(
    checkpoint: Path, certificate: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Path]]:
    """A server with a token (from a file), TLS and both limits: (uri, its certificate, log)."""
    folder = tmp_path_factory.mktemp("server")
    token_file = folder / "token.txt"
    token_file.write_text(TOKEN + "\n")
    cert, key = certificate
    log = folder / "server.log"
    proc, port = spawn_server(
        checkpoint,
        log,
        f"token_file={token_file}",
        f"tls_cert={cert}",
        f"tls_key={key}",
        f"max_sessions={MAX_SESSIONS}",
        f"max_rate={MAX_RATE}",
    )
    yield f"wss://127.0.0.1:{port}", cert, log
    assert stop_server(proc) == 0, log.read_text()
    assert TOKEN not in log.read_text()  # never logged


def test_the_right_token_over_tls_gets_a_session(secured):
    uri, cert, log = secured
    with PolicyClient(uri, token=TOKEN, ca=str(cert)) as client:
        assert client.predict_action(window()).shape == (1, 8, 2)
        assert (client.metadata["max_sessions"], client.metadata["max_rate"]) == (2, MAX_RATE)
    assert "wss://127.0.0.1" in log.read_text() and "token required" in log.read_text()


def test_a_wrong_or_missing_token_gets_401_and_no_session(secured, monkeypatch):
    uri, cert, log = secured
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ServerRefused, match=r"needs a token \(HTTP 401\): pass token=") as missing:
        PolicyClient(uri, ca=str(cert))
    assert missing.value.status == 401
    with pytest.raises(ServerRefused, match=r"refused the token \(HTTP 401\)"):
        PolicyClient(uri, token=TOKEN[:-1] + "X", ca=str(cert))
    with pytest.raises(ServerRefused, match="refused the token"):
        PolicyClient(uri, token=TOKEN + "0", ca=str(cert))  # a longer token is no token either
    # A raw handshake with another scheme, or the token without the scheme: 401 as well.
    context = ssl.create_default_context(cafile=str(cert))
    for header in (f"Basic {TOKEN}", TOKEN):
        with pytest.raises(InvalidStatus) as raw:
            connect(uri, ssl=context, additional_headers={"Authorization": header})
        assert raw.value.response.status_code == 401
        assert raw.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    # The environment variable is the client's default token.
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with PolicyClient(uri, ca=str(cert)) as client:
        assert client.health()["ready"]
    assert "wrong or missing token" in log.read_text()


def test_tls_is_verified_and_healthz_tells_nothing(secured):
    """A client that does not trust the certificate, or speaks plain ws://, gets nowhere;
    /healthz answers over HTTPS without a token and says only 'ok'."""
    uri, cert, _ = secured
    port = int(uri.rsplit(":", 1)[1])
    with pytest.raises(ssl.SSLCertVerificationError):
        PolicyClient(uri, token=TOKEN)  # the system's CAs do not know a self-signed cert
    with pytest.raises(Exception):  # noqa: B017 - a plain handshake with a TLS server fails
        PolicyClient(uri.replace("wss://", "ws://"), token=TOKEN, timeout=5)
    assert healthz(port, ca=cert) == 200
    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context) as reply:
        assert reply.read() == b"ok\n"
    with pytest.raises(ValueError, match="ca= verifies a TLS server: use a wss:// address"):
        PolicyClient(uri.replace("wss://", "ws://"), token=TOKEN, ca=str(cert))


def test_sessions_beyond_max_sessions_are_refused(secured):
    uri, cert, _ = secured
    clients = [PolicyClient(uri, token=TOKEN, ca=str(cert)) for _ in range(MAX_SESSIONS)]
    try:
        with pytest.raises(
            ServerRefused, match=r"HTTP 503\): too many sessions: this server takes 2"
        ):
            PolicyClient(uri, token=TOKEN, ca=str(cert))
        clients.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the server sees the close a moment later
            try:
                clients.append(PolicyClient(uri, token=TOKEN, ca=str(cert)))
                break
            except ServerRefused:
                assert time.monotonic() < deadline, "a freed place was not given again"
                time.sleep(0.05)
    finally:
        for client in clients:
            client.close()


def test_requests_beyond_max_rate_get_an_error_and_the_session_goes_on(secured):
    uri, cert, _ = secured
    with PolicyClient(uri, token=TOKEN, ca=str(cert)) as client:
        time.sleep(1.0)  # the bucket full: MAX_RATE requests
        refused = 0
        for _ in range(12):
            try:
                client.health()
            except ServerError as exc:
                assert exc.error == "rate limit: too many requests in this session"
                assert exc.expected == "at most 4 requests per second (serve.max_rate)"
                refused += 1
        assert 12 - refused <= MAX_RATE + 1 and refused >= 6
        time.sleep(0.6)  # 2 requests' worth comes back
        assert client.predict_action(window()).shape == (1, 8, 2)


def test_listening_beyond_the_loopback_needs_a_token(checkpoint: Path, tmp_path: Path):
    """host=0.0.0.0 without a token: refused before the policy loads, saying how to do it
    safely; with a token it serves (and warns that the token travels in clear text)."""
    command = [sys.executable, "-m", "cm_policy.cli", "serve", f"checkpoint={checkpoint}"]
    env_free = {k: v for k, v in __import__("os").environ.items() if k != TOKEN_ENV}
    refused = subprocess.run(
        [*command, "host=0.0.0.0", f"port={free_port()}"],
        capture_output=True,
        text=True,
        env=env_free,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "host=0.0.0.0 without a token would let anyone" in refused.stderr
    assert "token_file=PATH" in refused.stderr and "insecure=true" in refused.stderr
    log = tmp_path / "open.log"
    proc, port = spawn_server(checkpoint, log, "host=0.0.0.0", env={TOKEN_ENV: TOKEN})
    try:
        assert healthz(port) == 200
        assert "warning: the token travels unencrypted" in log.read_text()
        with PolicyClient(f"ws://127.0.0.1:{port}", token=TOKEN) as client:
            assert client.predict_action(window(2)).shape == (2, 8, 2)
    finally:
        assert stop_server(proc) == 0
    assert TOKEN not in log.read_text()


def test_token_sources_exposure_and_the_bucket(tmp_path: Path):
    """The pure parts: one token source, at least 16 characters; what counts as loopback; the
    constant-time check; the token bucket's rate and burst."""
    file = tmp_path / "token"
    file.write_text(TOKEN + "\nignored\n")
    assert resolve_token(None, str(file), {}) == TOKEN
    assert resolve_token(None, None, {TOKEN_ENV: TOKEN}) == TOKEN
    assert resolve_token(TOKEN, None, {}) == TOKEN and resolve_token(None, None, {}) is None
    with pytest.raises(ValueError, match=r"from one place; got \['token_file', 'token'\]"):
        resolve_token(TOKEN, str(file), {})
    with pytest.raises(ValueError, match="has 5 characters; expected at least 16"):
        resolve_token("short", None, {})
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_token(None, str(tmp_path / "missing"), {})
    for host, loop in (("127.0.0.1", True), ("127.4.5.6", True), ("::1", True)):
        assert is_loopback(host) == loop
    for host in ("0.0.0.0", "::", "192.168.1.5", "gpu-host.lab"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="without a token would let anyone"):
            check_exposure(host, None, insecure=False)
        check_exposure(host, TOKEN, insecure=False)
        check_exposure(host, None, insecure=True)
    check_exposure("localhost", None, insecure=False)
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", "Bearer "):
        assert not authorized(header, TOKEN)
    now = [0.0]
    bucket = RateLimiter(4.0, clock=lambda: now[0])
    assert [bucket.allow() for _ in range(5)] == [True] * 4 + [False]
    now[0] += 0.5  # two requests' worth
    assert [bucket.allow() for _ in range(3)] == [True, True, False]
    now[0] += 100.0  # never more than one second's worth
    assert sum(bucket.allow() for _ in range(10)) == 4
    slow = RateLimiter(0.5, clock=lambda: now[0])
    assert [slow.allow() for _ in range(2)] == [True, False]  # a burst of at least one
