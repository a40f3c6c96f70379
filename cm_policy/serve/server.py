"""The policy server: WebSocket sessions, message checks and the health endpoint.

See :mod:`cm_policy.serve` for the protocol. Each connection is a session with its own
observation history; ``infer`` requests go to a :class:`~cm_policy.serve.batching.MicroBatcher`
so that inference runs off the event loop, batched across sessions. The policy is a
:class:`~cm_policy.serve.backend.Backend` (torch, or ONNX Runtime without torch); this module
imports no torch itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from cm_policy.observations import push_obs, stack_obs
from cm_policy.serve.backend import Backend, TorchBackend
from cm_policy.serve.batching import InferenceError, InferRequest, InferResult, MicroBatcher
from cm_policy.serve.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    INFER_MODES,
    PROTOCOL_VERSION,
    ProtocolError,
    check_fields,
    decode_array,
    error_reply,
    key_names,
    pack,
    unpack,
)
from cm_policy.serve.security import RateLimiter, authorized

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WAIT_MS = 2.0
DEFAULT_MAX_INFER_STEPS = 100
DEFAULT_MAX_SESSIONS = 64
HEALTH_PATH = "/healthz"
# Messages up to this multiple of max_message_bytes are read and answered with an error; larger
# ones are cut off by websockets, which closes the connection with code 1009 (message too big).
TRANSPORT_SIZE_FACTOR = 2
# A session counts as active (worth waiting a little for) this long after its last request.
ACTIVE_SESSION_S = 1.0
WARMUP_PASSES = 3
SHUTDOWN_GRACE_S = 30.0
MAX_SEED = 2**63 - 1
DEFAULT_INFER_MODE = "step"
ORDER = "hello, then reset before step-mode observe/infer (window-mode infer needs only hello)"


class Session:
    """One connection: whether it said hello, its episode's observation window, and its request
    rate limit (``max_rate`` requests per second; None: none)."""

    def __init__(self, max_rate: float | None = None) -> None:
        self.limiter = None if max_rate is None else RateLimiter(max_rate)
        self.greeted = False
        self.in_episode = False
        self.history: dict[str, np.ndarray] | None = None
        self.unbatched = False
        self.last_request = -float("inf")

    def reset(self) -> None:
        self.in_episode, self.history = True, None

    def push(self, obs: Mapping[str, np.ndarray], n_obs_steps: int) -> None:
        """Append one observation (B, ...); the first of an episode fills the whole window."""
        if self.history is None:
            self.history = stack_obs(obs, n_obs_steps)
        else:
            push_obs(self.history, obs)


class PolicyServer:
    """Serves one policy to many sessions; run it with :meth:`serve`.

    ``policy``: a :class:`~cm_policy.serve.backend.Backend`, or a torch
    :class:`~cm_policy.policy.Policy` (served by a :class:`TorchBackend`).
    """

    def __init__(
        self,
        policy: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        max_infer_steps: int = DEFAULT_MAX_INFER_STEPS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        obs_limit: float | None = None,
        token: str | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_rate: float | None = None,
    ):
        """``token``: clients must send ``Authorization: Bearer <token>`` (None: no token);
        ``max_sessions``: concurrent sessions; ``max_rate``: requests per second per session
        (None: no limit). See :mod:`cm_policy.serve.security`."""
        if max_sessions < 1 or (max_rate is not None and not max_rate > 0):
            raise ValueError(
                f"max_sessions must be >= 1 and max_rate > 0 or null, got {max_sessions} and "
                f"{max_rate}"
            )
        self.token = token
        self.max_sessions = int(max_sessions)
        self.max_rate = None if max_rate is None else float(max_rate)
        self.backend: Backend = policy if isinstance(policy, Backend) else TorchBackend(policy)
        self.backend.set_obs_limit(obs_limit)
        self.max_batch = max_batch
        self.max_infer_steps = max_infer_steps
        self.max_message_bytes = max_message_bytes
        self.n_obs_steps = self.backend.n_obs_steps
        self.obs_spec: dict[str, tuple[tuple[int, ...], str]] = dict(self.backend.obs_spec)
        policy_fields = dict(self.backend.metadata)
        self.metadata = {
            "protocol": PROTOCOL_VERSION,
            "task": policy_fields.pop("task"),
            "observations": {
                k: {"shape": list(shape), "dtype": dtype}
                for k, (shape, dtype) in self.obs_spec.items()
            },
            **policy_fields,
            "max_infer_steps": max_infer_steps,
            "max_batch": max_batch,
            "max_message_bytes": max_message_bytes,
            "obs_limit": obs_limit,
            "infer_modes": list(INFER_MODES),
            "backend": self.backend.name,
            "fixed_steps": self.backend.fixed_steps,
            "max_sessions": self.max_sessions,
            "max_rate": self.max_rate,
        }
        self.batcher = MicroBatcher(
            self.backend.predict_action,
            max_batch=max_batch,
            wait_s=batch_wait_ms / 1e3,
            active_sessions=self.active_sessions,
            seeded=self.backend.generator,
        )
        self.sessions: set[Session] = set()
        self.pending: set[asyncio.Future] = set()
        # Messages being answered (any type); shutdown waits until their replies are sent.
        self.answering = 0
        self.all_answered = asyncio.Event()
        self.all_answered.set()
        self.ready = False
        self.draining = False

    # --- lifecycle -----------------------------------------------------------------------------
    async def serve(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        on_ready: Callable[[str, int], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Listen (with TLS when ``ssl_context`` is given), warm up, serve until SIGTERM/SIGINT,
        then finish in-flight requests."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with serve(
            self._handle,
            host,
            port,
            process_request=self._http,
            ssl=ssl_context,
            compression=None,  # deflate costs more than it saves on arrays, on loopback or LAN
            max_size=TRANSPORT_SIZE_FACTOR * self.max_message_bytes,
        ) as server:
            await asyncio.to_thread(self._warm_up)
            self.batcher.start()
            self.ready = True
            if on_ready is not None:
                on_ready(host, _bound_port(server))
            await stop.wait()
            await self._drain(server)

    def _warm_up(self) -> None:
        window = {
            k: np.zeros((1, self.n_obs_steps, *shape), dtype=dtype)
            for k, (shape, dtype) in self.obs_spec.items()
        }
        for _ in range(WARMUP_PASSES):
            self.backend.predict_action(window)

    async def _drain(self, server: Server) -> None:
        """Refuse new work, let queued and running requests reply, then close connections."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_answered.wait(), SHUTDOWN_GRACE_S)
        await asyncio.to_thread(self.batcher.stop)
        server.close()
        await server.wait_closed()

    def active_sessions(self) -> int:
        now = time.perf_counter()
        return sum(now - s.last_request < ACTIVE_SESSION_S for s in list(self.sessions))

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Before the WebSocket upgrade: GET /healthz answers 200 once warmed up, 503 before and
        while shutting down (no token needed, nothing about the model told); a session needs
        the token (401 without it) and a free place (503 at max_sessions)."""
        state = "shutting down" if self.draining else "ok" if self.ready else "warming up"
        status = HTTPStatus.OK if state == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
        if urlsplit(request.path).path == HEALTH_PATH or status != HTTPStatus.OK:
            return _answer(connection, status, state + "\n")
        if self.token is not None and not authorized(
            request.headers.get("Authorization"), self.token
        ):
            logger.warning("refused %s: wrong or missing token", _peer(connection))
            response = _answer(
                connection,
                HTTPStatus.UNAUTHORIZED,
                "a token is needed: send the header Authorization: Bearer <token>\n",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="cm-policy"'
            return response
        if len(self.sessions) >= self.max_sessions:
            return _answer(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many sessions: this server takes {self.max_sessions} at once "
                "(serve.max_sessions); try again later\n",
            )
        return None

    # --- sessions ------------------------------------------------------------------------------
    async def _handle(self, connection: ServerConnection) -> None:
        session = Session(self.max_rate)
        self.sessions.add(session)
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            async for raw in connection:
                self.answering += 1
                self.all_answered.clear()
                try:
                    reply = await self._reply(session, raw, closed)
                    if reply is None:  # the client left while its request was in flight
                        return
                    await connection.send(pack(reply))
                finally:
                    self.answering -= 1
                    if not self.answering:
                        self.all_answered.set()
        except ConnectionClosed:
            pass
        finally:
            closed.cancel()
            self.sessions.discard(session)

    async def _reply(
        self, session: Session, raw: bytes | str, closed: asyncio.Future
    ) -> dict[str, Any] | None:
        received = time.perf_counter()
        kind = None
        try:
            if session.limiter is not None and not session.limiter.allow():
                raise ProtocolError(
                    "rate limit: too many requests in this session",
                    expected=f"at most {self.max_rate:g} requests per second (serve.max_rate)",
                    got="more",
                )
            message = unpack(raw, self.max_message_bytes)
            kind = check_fields(message)
            if kind == "health":
                return self._health()
            if kind == "hello":
                return self._hello(session, message)
            if not session.greeted:
                raise ProtocolError(f"{kind!r} before 'hello'", expected=ORDER, got=kind)
            if kind == "reset":
                session.reset()
                return {"type": "reset", "ok": True}
            if kind == "observe":
                self._observe(session, message["obs"])
                return {"type": "observe", "ok": True}
            return await self._infer(session, message, received, closed)
        except ProtocolError as exc:
            return exc.reply(kind)
        except InferenceError as exc:  # the session stays usable
            return error_reply(kind, str(exc))
        except Exception as exc:  # a bug must not end the session: log it, answer and go on
            logger.exception("unexpected error answering a %r message", kind)
            return error_reply(kind, f"internal server error: {exc!r}")

    def _health(self) -> dict[str, Any]:
        return {
            "type": "health",
            "ok": True,
            "ready": self.ready and not self.draining,
            "sessions": len(self.sessions),
            "in_flight": len(self.pending),
            "requests": self.batcher.requests,
            "passes": self.batcher.passes,
            "refused": self.batcher.refused,
        }

    def _hello(self, session: Session, message: Mapping[str, Any]) -> dict[str, Any]:
        version = message.get("protocol", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported protocol version", expected=PROTOCOL_VERSION, got=repr(version)
            )
        session.greeted = True
        return {"type": "hello", "ok": True, "metadata": self.metadata}

    def _observe(self, session: Session, obj: Any) -> None:
        if not session.in_episode:
            raise ProtocolError(
                "step-mode observation before 'reset'", expected=ORDER, got="no reset yet"
            )
        obs, unbatched = self._read_obs(obj, "step")
        if session.history is not None:
            batch = len(next(iter(session.history.values())))
            got = len(next(iter(obs.values())))
            if unbatched != session.unbatched or batch != got:
                raise ProtocolError(
                    "observation batch changed within an episode; send 'reset' to start another",
                    expected="unbatched" if session.unbatched else f"batch {batch}",
                    got="unbatched" if unbatched else f"batch {got}",
                )
        session.unbatched = unbatched
        session.push(obs, self.n_obs_steps)

    async def _infer(
        self,
        session: Session,
        message: Mapping[str, Any],
        received: float,
        closed: asyncio.Future,
    ) -> dict[str, Any] | None:
        if self.draining:
            raise ProtocolError(
                "the server is shutting down", expected="no new infer after SIGTERM", got="infer"
            )
        mode = message.get("mode", DEFAULT_INFER_MODE)
        if mode not in INFER_MODES:
            raise ProtocolError("unknown infer mode", expected=list(INFER_MODES), got=repr(mode))
        steps = _optional_int(message, "steps", 1, self.max_infer_steps)
        seed = _optional_int(message, "seed", 0, MAX_SEED)
        fixed = self.backend.fixed_steps
        if steps is not None and fixed is not None and steps != fixed:
            raise ProtocolError(
                "this server's model runs a fixed number of steps (an ONNX export)",
                expected=f"steps={fixed} or none",
                got=steps,
            )
        sampler = message.get("sampler")
        if sampler is not None and sampler not in self.backend.samplers:
            raise ProtocolError(
                "unknown sampler", expected=list(self.backend.samplers), got=repr(sampler)
            )
        if mode == "step":
            self._observe(session, message["obs"])
            assert session.history is not None
            # A copy: the history moves on with the next observation.
            window = {k: v.copy() for k, v in session.history.items()}
            unbatched = session.unbatched
        else:
            obs, _ = self._read_obs(message["obs"], "window")
            window = {k: v[:, -self.n_obs_steps :].copy() for k, v in obs.items()}
            unbatched = False
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        session.last_request = received
        self.pending.add(future)
        try:
            self.batcher.submit(InferRequest(window, steps, seed, received, future, loop, sampler))
            await asyncio.wait({future, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                future.cancel()
                return None
            result: InferResult = future.result()
        finally:
            self.pending.discard(future)
        return {
            "type": "infer",
            "ok": True,
            "action": result.action[0] if unbatched else result.action,
            "timing": {
                "queue_ms": result.queue_ms,
                "compute_ms": result.compute_ms,
                "server_ms": (time.perf_counter() - received) * 1e3,
                "batch_rows": result.batch_rows,
                "batch_requests": result.batch_requests,
            },
        }

    def _read_obs(self, obj: Any, mode: str) -> tuple[dict[str, np.ndarray], bool]:
        """Checked observation arrays with a batch axis, and whether the client sent none.

        ``step``: one observation per key, (B, *shape) or unbatched (*shape);
        ``window``: (B, >=n_obs_steps, *shape).
        """
        expected_keys = sorted(self.obs_spec)
        if not isinstance(obj, Mapping):
            raise ProtocolError(
                "obs must be a map of arrays", expected=expected_keys, got=type(obj).__name__
            )
        if set(obj) != set(expected_keys):
            raise ProtocolError(
                "wrong observation keys", expected=expected_keys, got=key_names(obj)
            )
        n_obs = self.n_obs_steps
        obs, lead_shapes = {}, set()
        for key, (shape, dtype) in self.obs_spec.items():
            name = f"obs[{key!r}]"
            array = decode_array(obj[key], name)
            if array.dtype != np.dtype(dtype):
                raise ProtocolError(
                    f"{name} has the wrong dtype", expected=dtype, got=str(array.dtype)
                )
            lead = array.shape[: array.ndim - len(shape)]
            tail = ", ".join(map(str, shape))
            if mode == "window":
                ok = len(lead) == 2 and lead[1] >= n_obs
                want = f"(batch, >={n_obs}, {tail})"
            else:
                ok = len(lead) <= 1
                want = f"({tail}) or (batch, {tail})"
            if not ok or array.shape[len(lead) :] != shape:
                raise ProtocolError(
                    f"{name} has the wrong shape", expected=want, got=list(array.shape)
                )
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ProtocolError(
                    f"{name} has non-finite values",
                    expected="finite numbers",
                    got=f"{int((~np.isfinite(array)).sum())} NaN/inf values",
                )
            obs[key] = array if lead else array[None]
            lead_shapes.add(lead[:1])
        if len(lead_shapes) > 1:
            raise ProtocolError(
                "observation keys disagree on the batch size",
                expected="the same leading batch size for every key",
                got=sorted(str(s) for s in lead_shapes),
            )
        batch = len(next(iter(obs.values())))
        if not 1 <= batch <= self.max_batch:
            raise ProtocolError(
                "batch size out of range", expected=f"1 to {self.max_batch}", got=batch
            )
        return obs, not lead_shapes.pop()


def _optional_int(message: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(
            f"{key!r} out of range", expected=f"an int from {low} to {high}", got=repr(value)
        )
    return value


def _answer(connection: ServerConnection, status: HTTPStatus, text: str) -> Response:
    """A plain HTTP answer in place of the WebSocket upgrade. websockets aborts the transport of
    such a connection right after writing it; over TLS the answer can still sit in the
    transport's buffer then, and the client would see the connection drop instead (about 1 in
    60 refusals here). Closing flushes the buffer first, so the transport's close stands in for
    its abort on this connection."""
    transport = connection.transport
    transport.abort = transport.close  # type: ignore[method-assign]
    return connection.respond(status, text)


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "a client"


def _bound_port(server: Server) -> int:
    return server.sockets[0].getsockname()[1]


def run_server(
    policy: Any,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int = 1,
    on_ready: Callable[[str, int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **options: Any,
) -> None:
    """Serve ``policy`` (a Backend or a torch Policy) until SIGTERM/SIGINT with ``threads``
    inference threads, over TLS with ``ssl_context``; ``options`` go to :class:`PolicyServer`."""
    backend = policy if isinstance(policy, Backend) else TorchBackend(policy)
    backend.set_threads(threads)
    server = PolicyServer(backend, **options)
    asyncio.run(server.serve(host, port, on_ready, ssl_context))
