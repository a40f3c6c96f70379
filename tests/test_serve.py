"""The action server, over a real socket: a server subprocess on 127.0.0.1 and its clients."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import pytest
import torch
from tiny_config import SERVE_SPEC
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from cm_policy.checkpoint import load_policy, save_policy
from cm_policy.data import LinearNormalizer
from cm_policy.evaluation.runner import run_episodes
from cm_policy.policy import Policy
from cm_policy.serve import PolicyClient, ServerError
from cm_policy.serve.batching import InferRequest, MicroBatcher
from cm_policy.serve.launch import healthz, spawn_server, stop_server
from cm_policy.serve.protocol import decode_response, pack
from cm_policy.tasks import load_task

SPEC = SERVE_SPEC
N_OBS, N_ACT, KEY, DIM = 2, 8, "keypoints", 20
# Long enough for the micro-batcher to gather the 16 clients' requests on a loaded machine.
BATCH_WAIT_MS = 20
BASE_SEED = 1000


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The server runs with one torch thread; the in-process side must too, so that the float
    sums of both run in the same order and their actions can be compared bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = LinearNormalizer()
    norm.fit({"action": rng.uniform(50, 450, (100, 2)), KEY: rng.uniform(0, 512, (100, DIM))})
    policy = Policy(SPEC, norm)
    run = tmp_path_factory.mktemp("run")
    save_policy(policy, run, step=1)
    return run


@pytest.fixture(scope="module")
def policy(checkpoint: Path) -> Policy:
    return load_policy(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, port = spawn_server(checkpoint, log, f"batch_wait_ms={BATCH_WAIT_MS}")
    yield f"ws://127.0.0.1:{port}"
    assert stop_server(proc) == 0, log.read_text()


def random_obs(batch: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {KEY: rng.uniform(0, 512, (batch, steps, DIM)).astype(np.float32)}


def seeded(policy: Policy, obs: Mapping[str, np.ndarray], seed: int, **kwargs: Any) -> np.ndarray:
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed), **kwargs)


class Recorder:
    """Records the actions of a policy; with ``seed``, call k draws noise with seed + k."""

    def __init__(self, predictor: Any, seed: int | None = None):
        self.predictor, self.seed, self.actions = predictor, seed, []

    def predict_action(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.seed is None:
            action = self.predictor.predict_action(obs)
        else:
            action = seeded(self.predictor, obs, self.seed + len(self.actions))
        self.actions.append(action)
        return action


def raw_call(connection: ClientConnection, message: Any) -> dict[str, Any]:
    connection.send(message if isinstance(message, bytes | str) else pack(message))
    return decode_response(connection.recv(timeout=30))


def test_runner_through_client_matches_in_process(server: str, policy: Policy):
    seeds = [100000, 100001, 100002]
    env_fn = load_task(SPEC["task"]).env_factory()

    def run(predictor: Recorder) -> list[float]:
        envs = gym.vector.SyncVectorEnv(
            [env_fn] * len(seeds), autoreset_mode=gym.vector.AutoresetMode.DISABLED
        )
        try:
            results = run_episodes(
                predictor,
                env_fn,
                seeds,
                n_obs_steps=N_OBS,
                n_action_steps=N_ACT,
                max_steps=40,
                progress=False,
                vector_env=envs,
            )
        finally:
            envs.close()
        return [r.max_reward for r in results]

    local = Recorder(policy, seed=BASE_SEED)
    with PolicyClient(server, seed=BASE_SEED) as client:
        remote = Recorder(client)
        remote_scores = run(remote)
    local_scores = run(local)
    assert remote_scores == local_scores
    assert len(remote.actions) == len(local.actions) == 5
    # Seeded requests run in a pass of their own: bitwise the in-process actions.
    for a, b in zip(remote.actions, local.actions, strict=True):
        np.testing.assert_array_equal(a, b)


def test_metadata_steps_override_and_batched_window(server: str, policy: Policy):
    with PolicyClient(server) as client:
        meta = client.metadata
        assert meta["observations"] == {KEY: {"shape": [DIM], "dtype": "float32"}}
        assert (meta["n_obs_steps"], meta["n_action_steps"], meta["horizon"]) == (N_OBS, N_ACT, 16)
        assert (meta["method"], meta["default_steps"], meta["control_hz"]) == ("isd", 1, 10)
        obs = random_obs(4, 3)  # a longer history than needed: the last n_obs_steps are used
        for steps in (1, 2):
            action = client.predict_action(obs, steps=steps, seed=7)
            np.testing.assert_array_equal(action, seeded(policy, obs, 7, steps=steps))
        assert not np.array_equal(client.predict_action(obs, seed=7), action)
        unseeded = client.predict_action(obs)
        assert unseeded.shape == (4, N_ACT, 2) and np.isfinite(unseeded).all()
        assert not np.array_equal(client.predict_action(obs), unseeded)  # fresh noise each time
        assert set(client.last_timing) >= {"queue_ms", "compute_ms", "server_ms", "batch_rows"}


def test_step_mode_fills_the_window_like_the_runner(server: str, policy: Policy):
    frames = random_obs(3, 4)[KEY]  # 4 consecutive observations of 3 envs
    with PolicyClient(server) as client:
        client.reset()
        first = client.act({KEY: frames[:, 0]}, seed=1)
        expected = seeded(policy, {KEY: frames[:, [0, 0]]}, 1)
        np.testing.assert_array_equal(first, expected)
        client.observe({KEY: frames[:, 1]})
        client.observe({KEY: frames[:, 2]})
        later = client.act({KEY: frames[:, 3]}, seed=2)
        np.testing.assert_array_equal(later, seeded(policy, {KEY: frames[:, 2:4]}, 2))
        client.reset()  # a new episode, now with one unbatched env
        single = client.act({KEY: frames[0, 0].astype(np.float64)}, seed=3)
        assert single.shape == (N_ACT, 2)
        np.testing.assert_array_equal(single, seeded(policy, {KEY: frames[:1, [0, 0]]}, 3)[0])


def array_message(dtype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    return {"__ndarray__": True, "dtype": dtype, "shape": shape, "data": data}


def window_infer(array: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "infer", "mode": "window", "obs": {KEY: array}, **extra}


GOOD = np.zeros((1, N_OBS, DIM), dtype=np.float32)
NAN = GOOD.copy()
NAN[0, 1, 3] = np.nan
INF = GOOD.copy()
INF[0, 0, 0] = np.inf
OVERSIZED_BYTES = 17 * 2**20
MALFORMED: list[tuple[str, Any, str]] = [
    ("not msgpack", b"\xc1\xc1 not msgpack", "not valid msgpack"),
    ("text frame", "hello", "binary msgpack"),
    ("not a map", msgpack.packb([1, 2]), "must be a msgpack map"),
    ("unknown type", {"type": "fly"}, "unknown message type"),
    ("missing type", {"obs": {}}, "unknown message type"),
    ("unhashable type", {"type": ["infer"]}, "unknown message type"),
    ("bytes key", msgpack.packb({"type": "reset", b"now": 1}), "unknown fields [\"b'now'\"]"),
    ("missing field", {"type": "infer"}, "missing fields ['obs']"),
    ("extra field", {"type": "reset", "now": True}, "unknown fields ['now']"),
    ("wrong protocol", {"type": "hello", "protocol": 99}, "unsupported protocol"),
    ("obs not a map", window_infer(None) | {"obs": [1]}, "obs must be a map"),
    ("missing obs key", {"type": "infer", "mode": "window", "obs": {}}, "wrong observation keys"),
    ("extra obs key", window_infer(GOOD) | {"obs": {KEY: GOOD, "img": GOOD}}, "wrong observation"),
    ("not an array", window_infer([1.0, 2.0]), "must be an array"),
    ("wrong dtype", window_infer(GOOD.astype(np.float64)), "wrong dtype"),
    ("object dtype", window_infer(array_message("object", [1], b"x")), "unsupported dtype"),
    ("list dtype", window_infer(array_message(["f4"], [1], b"x")), "unsupported dtype"),
    ("bad shape", window_infer(array_message("uint8", [-1], b"")), "invalid shape"),
    ("short data", window_infer(array_message("float32", [1, 2, 20], b"\0" * 8)), "data size"),
    ("wrong shape", window_infer(np.zeros((1, 2, 18), np.float32)), "wrong shape"),
    ("short window", window_infer(np.zeros((1, 1, 20), np.float32)), "wrong shape"),
    ("batch too large", window_infer(np.zeros((65, 2, 20), np.float32)), "batch size"),
    ("NaN", window_infer(NAN), "non-finite"),
    ("inf", window_infer(INF), "non-finite"),
    ("unknown mode", window_infer(GOOD, mode="all"), "unknown infer mode"),
    ("zero steps", window_infer(GOOD, steps=0), "'steps' out of range"),
    ("too many steps", window_infer(GOOD, steps=10**6), "'steps' out of range"),
    ("string steps", window_infer(GOOD, steps="2"), "'steps' out of range"),
    ("negative seed", window_infer(GOOD, seed=-1), "'seed' out of range"),
    ("step before reset", {"type": "infer", "obs": {KEY: GOOD[0]}}, "before 'reset'"),
    ("observe before reset", {"type": "observe", "obs": {KEY: GOOD[0]}}, "before 'reset'"),
    ("oversized", {"type": "reset", "pad": b"\0" * OVERSIZED_BYTES}, "message too large"),
]


def test_malformed_messages_get_errors_and_the_session_goes_on(server: str):
    with connect(server, compression=None) as connection:
        reply = raw_call(connection, window_infer(GOOD))
        assert reply["type"] == "error" and "before 'hello'" in reply["error"]
        assert raw_call(connection, {"type": "hello"})["ok"]
        for name, message, error in MALFORMED:
            reply = raw_call(connection, message)
            assert reply["type"] == "error" and reply["ok"] is False, name
            assert error in reply["error"], (name, reply)
            assert reply["expected"] is not None and reply["got"] is not None, (name, reply)
            assert raw_call(connection, {"type": "health"})["ready"], name
        # The batch form is fixed within an episode.
        assert raw_call(connection, {"type": "reset"})["ok"]
        assert raw_call(connection, {"type": "observe", "obs": {KEY: GOOD[:, 0]}})["ok"]
        reply = raw_call(connection, {"type": "infer", "obs": {KEY: GOOD[0, 0]}})
        assert "batch changed" in reply["error"] and reply["expected"] == "batch 1"
        # After all that, the same session still gets actions.
        action = raw_call(connection, window_infer(GOOD))["action"]
        assert action.shape == (1, N_ACT, 2)
    # Beyond twice the limit the transport cuts the connection off; the server stays up.
    with connect(server, compression=None, close_timeout=5) as connection:
        with pytest.raises(ConnectionClosed):
            raw_call(connection, {"type": "reset", "pad": b"\0" * 2 * OVERSIZED_BYTES})
        assert connection.close_code == CloseCode.MESSAGE_TOO_BIG
    with PolicyClient(server) as client:
        with pytest.raises(ServerError, match="wrong shape") as info:
            client.predict_action({KEY: np.zeros((1, 2, 18), np.float32)})
        assert info.value.expected == "(batch, >=2, 20)" and info.value.got == [1, 2, 18]


def test_sixteen_concurrent_clients(server: str, policy: Policy):
    n_clients, n_requests = 16, 4
    obs = [random_obs(1, N_OBS, seed=i) for i in range(n_clients)]
    expected = [
        [seeded(policy, obs[i], BASE_SEED + k) for k in range(n_requests)] for i in range(n_clients)
    ]
    start = threading.Barrier(n_clients)
    actions: dict[int, list[np.ndarray]] = {}
    batch_requests: list[int] = []
    errors: list[BaseException] = []

    def session(i: int) -> None:
        try:
            with PolicyClient(server) as client:
                start.wait(timeout=60)
                actions[i] = [
                    client.predict_action(obs[i], seed=BASE_SEED + k) for k in range(n_requests)
                ]
                start.wait(timeout=60)
                for _ in range(n_requests):
                    assert client.predict_action(obs[i]).shape == (1, N_ACT, 2)
                    batch_requests.append(client.last_timing["batch_requests"])
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    with PolicyClient(server) as monitor:
        before = monitor.health()
        threads = [threading.Thread(target=session, args=(i,)) for i in range(n_clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        after = monitor.health()
    assert not errors, errors
    for i in range(n_clients):
        for got, want in zip(actions[i], expected[i], strict=True):
            np.testing.assert_array_equal(got, want)
    # Unseeded requests of different sessions share forward passes.
    assert after["requests"] - before["requests"] == 2 * n_clients * n_requests
    assert max(batch_requests) > 1
    assert after["passes"] - before["passes"] < 2 * n_clients * n_requests


def wait_for(condition: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_mid_request_leaves_no_session(server: str):
    with PolicyClient(server) as monitor:
        assert wait_for(lambda: monitor.health()["sessions"] == 1)
        connection = connect(server, compression=None)
        raw_call(connection, {"type": "hello"})
        connection.send(pack(window_infer(np.zeros((64, 2, 20), np.float32), steps=100)))
        connection.close()

        def only_monitor_left() -> bool:
            health = monitor.health()
            return health["sessions"] == 1 and health["in_flight"] == 0

        assert wait_for(only_monitor_left)
        assert monitor.predict_action(random_obs(1, N_OBS)).shape == (1, N_ACT, 2)


def test_health_endpoint_and_plain_http(server: str):
    port = int(server.rsplit(":", 1)[1])
    assert healthz(port) == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    info.value.close()  # an open HTTP connection would hold up the server's shutdown
    assert info.value.code == 426  # Upgrade Required: the rest of the port speaks WebSocket
    assert healthz(port) == 200


def test_sigterm_finishes_in_flight_requests_and_exits_zero(checkpoint: Path, tmp_path: Path):
    proc, port = spawn_server(checkpoint, tmp_path / "server.log", "max_infer_steps=100000")
    uri = f"ws://127.0.0.1:{port}"
    try:
        with PolicyClient(uri) as monitor, connect(uri, compression=None) as connection:
            raw_call(connection, {"type": "hello"})
            connection.send(pack(window_infer(GOOD, steps=1500)))
            assert wait_for(lambda: monitor.health()["in_flight"] == 1)
            proc.send_signal(signal.SIGTERM)
            # While the request runs: not ready any more, and no new inference accepted.
            assert wait_for(lambda: healthz(port) == 503)
            with pytest.raises(ServerError, match="shutting down"):
                monitor.predict_action(random_obs(1, N_OBS))
            reply = decode_response(connection.recv(timeout=60))
            assert reply["ok"] and reply["action"].shape == (1, N_ACT, 2)
            with pytest.raises(ConnectionClosed):
                connection.recv(timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert healthz_refused(port)


def healthz_refused(port: int) -> bool:
    try:
        healthz(port)
    except OSError:
        return True
    return False


# --- the micro-batcher alone, with a stand-in policy ----------------------------------------------
class EchoPolicy:
    """Returns each row's last observation times ``steps``, and records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None, bool]] = []

    def predict_action(
        self,
        obs: Mapping[str, np.ndarray],
        steps: int | None = None,
        generator: Any = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        self.calls.append((len(obs["x"]), steps, generator is not None))
        return obs["x"][:, -1:] * (steps or 1)


def test_micro_batcher_merges_and_splits_requests():
    echo = EchoPolicy()
    batcher = MicroBatcher(echo.predict_action, max_batch=6, wait_s=0.5, active_sessions=lambda: 1)
    specs = [(2, None, None), (1, None, None), (2, 3, None), (1, None, 5), (2, None, None)]

    async def main() -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        requests = [
            InferRequest(
                {"x": np.full((rows, 2, 1), float(i))},
                steps,
                seed,
                time.perf_counter(),
                loop.create_future(),
                loop,
            )
            for i, (rows, steps, seed) in enumerate(specs)
        ]
        for request in requests:
            batcher.submit(request)
        batcher.start()
        results = await asyncio.gather(*(r.future for r in requests))
        await asyncio.to_thread(batcher.stop)
        return [r.action for r in results]

    actions = asyncio.run(main())
    for i, ((rows, steps, _), action) in enumerate(zip(specs, actions, strict=True)):
        np.testing.assert_array_equal(action, np.full((rows, 1, 1), float(i) * (steps or 1)))
    # First batch (6 rows): the two unseeded 1-step requests share a pass, the 3-step and the
    # seeded one run alone; the last request did not fit and forms the next batch.
    assert sorted(echo.calls[:3]) == [(1, None, True), (2, 3, False), (3, None, False)]
    assert echo.calls[3:] == [(2, None, False)]
    assert (batcher.requests, batcher.passes) == (5, 4)


def test_server_never_sends_non_finite_actions(server: str):
    """Finite but extreme observations (a broken sensor's 1e38) make the network overflow: the
    request gets an error reply that says why, counted in health, and the session goes on. Other
    requests batched with it are answered."""
    extreme = np.full((1, N_OBS, DIM), 1e38, dtype=np.float32)
    with connect(server, compression=None) as connection:
        assert raw_call(connection, {"type": "hello"})["ok"]
        before = raw_call(connection, {"type": "health"})["refused"]
        reply = raw_call(connection, window_infer(extreme))
        assert reply["type"] == "error" and reply["ok"] is False and "action" not in reply
        assert "non-finite actions" in reply["error"], reply
        assert raw_call(connection, {"type": "health"})["refused"] == before + 1
        action = raw_call(connection, window_infer(GOOD))["action"]
        assert action.shape == (1, N_ACT, 2) and np.isfinite(action).all()
        reply = raw_call(connection, window_infer(GOOD, sampler="ddim"))
        assert "unknown sampler" in reply["error"] and reply["expected"] == ["flowmap"]
        reply = raw_call(connection, window_infer(GOOD, sampler="flowmap", steps=2, seed=3))
        assert reply["action"].shape == (1, N_ACT, 2)


def test_server_obs_limit_refuses_far_observations(checkpoint: Path, tmp_path: Path):
    proc, port = spawn_server(checkpoint, tmp_path / "server.log", "obs_limit=2")
    try:
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            assert client.metadata["obs_limit"] == 2.0
            inside = random_obs(1, N_OBS)  # the training range: [0, 512]
            assert np.isfinite(client.predict_action(inside)).all()
            far = {KEY: inside[KEY] + 4 * 512}  # 9 half-ranges from the middle
            with pytest.raises(ServerError, match="accepts up to 2 \\(obs_limit\\)"):
                client.predict_action(far)
            assert client.health()["refused"] == 1
    finally:
        assert stop_server(proc) == 0


def test_batcher_answers_the_good_rows_of_a_refused_pass():
    """A pass whose batch holds a refused row answers the other requests of the batch."""
    from cm_policy.observations import ActionRefused

    def predict(window, steps=None, generator=None, sampler=None):
        x = window["x"][:, -1]
        if (x > 100).any():
            reasons = ["too far" if v > 100 else None for v in x[:, 0]]
            raise ActionRefused(reasons, x[:, None] * 1.0)
        return x[:, None] * 1.0

    batcher = MicroBatcher(predict, max_batch=8, wait_s=0.5, active_sessions=lambda: 1)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        requests = [
            InferRequest({"x": np.full((1, 2, 1), v)}, None, None, 0.0, loop.create_future(), loop)
            for v in (1.0, 500.0, 3.0)
        ]
        for request in requests:
            batcher.submit(request)
        batcher.start()
        results = await asyncio.gather(*(r.future for r in requests), return_exceptions=True)
        await asyncio.to_thread(batcher.stop)
        return results

    results = asyncio.run(main())
    assert results[0].action[0, 0, 0] == 1.0 and results[2].action[0, 0, 0] == 3.0
    assert "too far" in str(results[1]) and batcher.refused == 1
    assert results[0].batch_requests == 3  # one pass for all three
