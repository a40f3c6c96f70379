"""Start and stop ``cm-policy serve`` in a subprocess (for tests, benchmarks and scripts)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key for localhost and 127.0.0.1 in ``folder``, made
    with the openssl command (a server with TLS for tests and benchmarks on this machine)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("the openssl command is needed to make a TLS certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def healthz(port: int, host: str = "127.0.0.1", ca: str | Path | None = None) -> int:
    """The HTTP status of the server's health check (200 ready, 503 warming up or stopping);
    over HTTPS, verified with the PEM file ``ca``, for a server with TLS."""
    from cm_policy.serve.security import client_ssl_context

    scheme, context = ("https", client_ssl_context(str(ca))) if ca else ("http", None)
    url = f"{scheme}://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def spawn_server(
    checkpoint: str | Path,
    log: Path,
    *options: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen, int]:
    """``cm-policy serve`` on 127.0.0.1 in a subprocess, returned once /healthz answers 200.

    ``checkpoint``: a checkpoint (torch backend) or an exported ``.onnx`` model (served with
    ``model=``, by ONNX Runtime). ``options`` are further ``key=value`` arguments of
    ``cm-policy serve``; ``env``: variables added to the server's environment; the server's output
    goes to ``log``. OMP_NUM_THREADS defaults to 1 so the server's torch uses its ``threads``.
    """
    port = port or free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **(env or {}),
    }
    # A server with TLS answers its health check over HTTPS, verified with its own certificate.
    cert = next((o.partition("=")[2] for o in options if o.startswith("tls_cert=")), None)
    source = "model" if str(checkpoint).endswith(".onnx") else "checkpoint"
    command = [sys.executable, "-m", "cm_policy.cli", "serve", f"{source}={checkpoint}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*command, f"port={port}", *options], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if healthz(port, ca=cert) == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (graceful shutdown), then the exit code; killed if it does not stop in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
