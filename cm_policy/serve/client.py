"""A blocking Python client whose ``predict_action`` stands in for an in-process policy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response
from websockets.sync.client import connect

from cm_policy.serve.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    decode_response,
    pack,
)
from cm_policy.serve.security import TOKEN_ENV, client_ssl_context

DEFAULT_URI = "ws://127.0.0.1:8765"
DEFAULT_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    """An error reply: what the server expected and what it got."""

    def __init__(self, reply: Mapping[str, Any]):
        super().__init__(
            f"{reply.get('error')} (request {reply.get('request')!r}; "
            f"expected {reply.get('expected')!r}, got {reply.get('got')!r})"
        )
        self.error, self.expected, self.got = reply["error"], reply["expected"], reply["got"]


class ServerRefused(ConnectionError):
    """The server refused the session before it began: ``status`` 401 (a wrong or missing
    token) or 503 (too many sessions, or not ready); ``reason`` is what it said."""

    def __init__(self, message: str, status: int, reason: str):
        super().__init__(message)
        self.status, self.reason = status, reason


def _refusal(uri: str, response: Response, sent_token: bool) -> ServerRefused:
    reason = response.body.decode(errors="replace").strip()
    if response.status_code == 401:
        what = "refused the token" if sent_token else "needs a token"
        hint = (
            "pass token=... or set CM_POLICY_SERVE_TOKEN to the server's token"
            if not sent_token
            else "check that it is the server's token"
        )
        return ServerRefused(f"{uri} {what} (HTTP 401): {hint}", 401, reason)
    return ServerRefused(
        f"{uri} refused the session (HTTP {response.status_code}): {reason}",
        response.status_code,
        reason,
    )


class PolicyClient:
    """One session on a policy server.

    ``predict_action(obs)`` sends the observation window (B, >=n_obs_steps, ...) as it is, so the
    closed-loop runner evaluates the served policy exactly as an in-process one. A robot that
    sends one observation per control step uses ``reset``, ``observe`` and ``act`` instead: the
    server keeps the window. With ``seed`` set, the k-th request without its own seed uses
    ``seed + k``, i.e. the noise of ``torch.Generator().manual_seed(seed + k)``.
    """

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        token: str | None = None,
        ca: str | None = None,
        seed: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        """``uri``: ``ws://host:port`` or, to a server with TLS, ``wss://host:port``. ``token``:
        the server's token (default: the ``CM_POLICY_SERVE_TOKEN`` environment variable, if
        set). ``ca``: a PEM file to verify a ``wss://`` server with (e.g. its self-signed
        certificate; default: the system's CAs)."""
        self.timeout = timeout
        self.next_seed = seed
        self.last_timing: dict[str, float] = {}
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else None
        secure = urlsplit(uri).scheme == "wss"
        if ca is not None and not secure:
            raise ValueError(f"ca= verifies a TLS server: use a wss:// address, not {uri}")
        try:
            self._connection = connect(
                uri,
                compression=None,
                max_size=max_message_bytes,
                open_timeout=timeout,
                additional_headers=headers,
                ssl=client_ssl_context(ca) if secure else None,
            )
        except InvalidStatus as exc:
            raise _refusal(uri, exc.response, bool(token)) from None
        try:
            hello = self._call({"type": "hello", "protocol": PROTOCOL_VERSION})
        except BaseException:
            self._connection.close()
            raise
        self.metadata: dict[str, Any] = hello["metadata"]
        self.n_obs_steps: int = self.metadata["n_obs_steps"]
        self.n_action_steps: int = self.metadata["n_action_steps"]
        self.action_dim: int = self.metadata["action_dim"]
        self.horizon: int = self.metadata["horizon"]

    def predict_action(
        self,
        obs: Mapping[str, Any],
        steps: int | None = None,
        seed: int | None = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        """Actions (B, n_action_steps, action_dim) for raw observations (B, >=n_obs_steps, ...)."""
        window = {k: np.asarray(v)[:, -self.n_obs_steps :] for k, v in obs.items()}
        return self._infer("window", window, steps, seed, sampler)

    def reset(self) -> None:
        """Start an episode: the next observation fills the server's window."""
        self._call({"type": "reset"})

    def observe(self, obs: Mapping[str, Any]) -> None:
        """Push one observation ((B, ...) or unbatched) without asking for actions."""
        self._call({"type": "observe", "obs": self._cast(obs)})

    def act(
        self,
        obs: Mapping[str, Any],
        steps: int | None = None,
        seed: int | None = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        """Push one observation and get (B, n_action_steps, D), or (n_action_steps, D)."""
        return self._infer("step", obs, steps, seed, sampler)

    def health(self) -> dict[str, Any]:
        return self._call({"type": "health"})

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _infer(
        self,
        mode: str,
        obs: Mapping[str, Any],
        steps: int | None,
        seed: int | None,
        sampler: str | None = None,
    ) -> np.ndarray:
        message: dict[str, Any] = {"type": "infer", "mode": mode, "obs": self._cast(obs)}
        if steps is not None:
            message["steps"] = int(steps)
        if sampler is not None:
            message["sampler"] = str(sampler)
        if seed is None and self.next_seed is not None:
            seed, self.next_seed = self.next_seed, self.next_seed + 1
        if seed is not None:
            message["seed"] = int(seed)
        reply = self._call(message)
        self.last_timing = reply["timing"]
        return reply["action"]

    def _cast(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Float observations in the server's float dtype, as the in-process policy casts them."""
        declared = self.metadata["observations"]
        out = {}
        for key, value in obs.items():
            array = np.asarray(value)
            if key in declared and array.dtype.kind == "f":
                array = array.astype(declared[key]["dtype"], copy=False)
            out[key] = array
        return out

    def _call(self, message: Mapping[str, Any]) -> dict[str, Any]:
        self._connection.send(pack(message))
        reply = decode_response(self._connection.recv(timeout=self.timeout))
        if reply["type"] == "error":
            raise ServerError(reply)
        return reply
