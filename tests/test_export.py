"""ONNX export: the graph against Policy.predict_action on real PushT observations, its metadata,
its refusals, a closed-loop evaluation through ONNX Runtime, and the torch-free onnx server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cm_policy.checkpoint import load_policy, save_policy
from cm_policy.cli import main, run_command
from cm_policy.configs import compose
from cm_policy.data import LinearNormalizer, ReplayBuffer
from cm_policy.evaluation.runner import run_episodes
from cm_policy.export import METADATA_KEY, VERIFY_TOLERANCE, export_policy
from cm_policy.policy import Policy
from cm_policy.serve import PolicyClient, ServerError
from cm_policy.serve.backend import resolve_backend
from cm_policy.serve.launch import spawn_server, stop_server
from cm_policy.serve.noise import TorchGenerator, torch_randn
from cm_policy.serve.onnx_policy import OnnxPolicy
from cm_policy.tasks import as_uint8, load_task
from cm_policy.training.trainer import policy_spec

# The bar: ONNX Runtime's actions equal torch's to 1e-5 of the action range (normalised
# units, where each action dimension's training range is [-1, 1]; raw PushT actions are pixels in
# 0..512, whose float32 spacing alone is 3e-5 at 400).
TOLERANCE = 1e-5
TRAIN_STEPS, TRAIN_BATCH = 20, 32
SEED = 1234


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real(real_pusht: Path) -> dict[str, Any]:
    """Real PushT windows: keypoints (N, 2, 20), agent_pos (N, 2, 2), images (N, 2, 96, 96, 3)
    uint8 at 32 spread-out steps, and the data for fitting and training."""
    buffer = ReplayBuffer.load(real_pusht, keys=["action", "state", "keypoint"])
    data = {k: np.asarray(buffer[k]) for k in ("action", "state", "keypoint")}
    keypoints = load_task({"env": "pusht", "obs_type": "keypoints"}).dataset_obs(data)["keypoints"]
    starts = np.linspace(0, len(keypoints) - 2, 32).astype(int)
    images = ReplayBuffer.open(real_pusht)["img"]
    frames = as_uint8(
        np.stack([np.asarray(images[i : i + 2]) for i in starts]).reshape(-1, 96, 96, 3)
    )
    return {
        "action": data["action"].astype(np.float32),
        "keypoints": keypoints,
        "agent_pos": data["state"][:, :2].astype(np.float32),
        "windows": {
            "keypoints": np.stack([keypoints[i : i + 2] for i in starts]),
            "agent_pos": np.stack([data["state"][i : i + 2, :2] for i in starts]).astype(
                np.float32
            ),
            "image": frames.reshape(len(starts), 2, 96, 96, 3),
        },
    }


def make_policy(task: str, real: Mapping[str, Any], method: str = "isd") -> Policy:
    torch.manual_seed(0)
    spec = policy_spec(compose("config", [f"task={task}", f"method={method}", "model=unet_tiny"]))
    norm = LinearNormalizer()
    low_dim = next(iter(spec["task"]["low_dim"]))
    norm.fit({"action": real["action"], low_dim: real[low_dim]})
    return Policy(spec, norm)


@pytest.fixture(scope="module")
def checkpoint(real: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keypoint iSD policy fitted on the real data and trained for 20 steps, saved."""
    policy = make_policy("pusht_keypoints", real)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    kp, action = torch.as_tensor(real["keypoints"]), torch.as_tensor(real["action"])
    for _ in range(TRAIN_STEPS):
        starts = rng.integers(0, len(kp) - policy.horizon, TRAIN_BATCH)
        obs = torch.stack([kp[s : s + policy.n_obs_steps] for s in starts])
        chunk = torch.stack([action[s : s + policy.horizon] for s in starts])
        loss, _ = policy.compute_loss({"keypoints": obs}, chunk)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = tmp_path_factory.mktemp("run")
    save_policy(policy.eval(), run, step=TRAIN_STEPS)
    return run


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "policy.onnx"
    meta = run_command(["export", f"checkpoint={checkpoint}", f"out={out}"])
    assert meta["exporter"] in ("dynamo", "torchscript")
    return out


def normalised_diff(a: np.ndarray, b: np.ndarray, policy: Policy) -> float:
    scale = policy.normalizer.state_dict()["action.scale"].numpy()
    return float(np.max(np.abs(a - b) * scale))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_onnx_matches_predict_action_on_real_pusht(
    exported: Path, checkpoint: Path, real: dict[str, Any]
):
    policy = load_policy(checkpoint)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    windows = real["windows"]["keypoints"]
    worst = 0.0
    for batch in (1, 7, len(windows)):  # dynamic batch
        obs = windows[:batch]
        expected = policy.predict_action({"keypoints": obs}, generator=seeded(SEED + batch))
        noise = torch.randn(batch, 16, 2, generator=seeded(SEED + batch)).numpy()
        (got,) = session.run(["action"], {"keypoints": obs, "noise": noise})
        assert got.shape == expected.shape == (batch, 8, 2)
        worst = max(worst, normalised_diff(got, expected, policy))
        np.testing.assert_allclose(got, expected, rtol=TOLERANCE, atol=0)
    assert worst <= TOLERANCE, worst
    # A trained chunk is not clipped flat: the comparison covers real values.
    assert np.unique(np.round(expected, 3)).size > 100
    print(f"max |onnx - torch| on real PushT windows: {worst:.2e} (normalised units)")


def test_onnx_policy_stands_in_for_policy(exported: Path, checkpoint: Path, real: dict[str, Any]):
    """OnnxPolicy.predict_action takes Policy's arguments; a TorchGenerator seed draws torch's
    noise, so seeded actions agree with the torch policy's without torch."""
    policy, onnx_policy = load_policy(checkpoint), OnnxPolicy(exported)
    obs = {"keypoints": real["windows"]["keypoints"][:7]}
    for seed in (0, 5, 2**40 + 3):
        expected = policy.predict_action(obs, generator=seeded(seed))
        got = onnx_policy.predict_action(obs, generator=TorchGenerator(seed))
        assert normalised_diff(got, expected, policy) <= TOLERANCE
    # Per-row torch generators (the runner's), zero noise and a longer history than needed.
    rows = [seeded(s) for s in range(7)]
    expected = policy.predict_action(obs, generator=[seeded(s) for s in range(7)])
    assert (
        normalised_diff(onnx_policy.predict_action(obs, generator=rows), expected, policy)
        < TOLERANCE
    )
    longer = {"keypoints": real["windows"]["keypoints"][:3].repeat(2, axis=1)}
    expected = policy.predict_action(longer, noise="zero")
    assert (
        normalised_diff(onnx_policy.predict_action(longer, noise="zero"), expected, policy)
        < TOLERANCE
    )
    with pytest.raises(ValueError, match="exported with steps=1"):
        onnx_policy.predict_action(obs, steps=2)
    with pytest.raises(ValueError, match="must have shape"):
        onnx_policy.predict_action({"keypoints": obs["keypoints"][:, :1]})
    broken = obs["keypoints"][:2].copy()
    broken[1, 1, 3] = np.nan  # a broken sensor: torch and the graph compute NaN for that row
    with pytest.raises(ValueError, match="rows \\[1\\]: the policy computed non-finite") as info:
        onnx_policy.predict_action({"keypoints": broken})
    assert np.isfinite(info.value.actions[0]).all() and info.value.reasons[0] is None
    with pytest.raises(ValueError, match="rows \\[1\\]: the policy computed non-finite"):
        policy.predict_action({"keypoints": broken})


def test_seeded_noise_is_torchs():
    """TorchGenerator draws torch.randn's values: bitwise where torch runs its AVX2 kernels
    (this project's machines), to float32 rounding elsewhere."""
    bitwise = torch.backends.cpu.get_cpu_capability() == "AVX2"
    shapes = [(1, 16, 2), (64, 16, 2), (3, 16, 7), (2, 17), (5,), (1, 16, 10)]
    for seed in (0, 1, 1000, 2**31 + 5, 2**63 - 1):
        for shape in shapes:
            want = torch.randn(shape, generator=seeded(seed)).numpy()
            got = torch_randn(shape, seed)
            if bitwise:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    generator, numpy_twin = seeded(9), TorchGenerator(9)  # successive draws, cached normals too
    for shape in [(3,), (40,), (5,), (2, 16, 2)]:
        want = torch.randn(shape, generator=generator).numpy()
        np.testing.assert_allclose(
            numpy_twin.randn(shape), want, rtol=0, atol=0 if bitwise else 1e-5
        )


def test_metadata_of_the_export(exported: Path, checkpoint: Path):
    model = onnx.load(str(exported))
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    policy = load_policy(checkpoint)
    assert meta["spec"] == policy.spec
    assert meta["observations"] == {"keypoints": {"shape": [20], "dtype": "float32"}}
    assert (meta["n_obs_steps"], meta["n_action_steps"], meta["horizon"]) == (2, 8, 16)
    assert (meta["action_dim"], meta["control_hz"], meta["task"]) == (2, 10, "pusht_keypoints")
    assert (meta["method"], meta["sampler"], meta["sampler_label"], meta["steps"]) == (
        "isd",
        "flowmap",
        "1",
        1,
    )
    assert meta["inputs"] == ["keypoints", "noise"] and meta["output"] == "action"
    assert meta["cm_policy_version"] and meta["opset"] >= 17
    assert meta["checkpoint"].endswith("step_0000020") and meta["weights"] == "ema"
    assert meta["verified_max_abs_diff"] <= VERIFY_TOLERANCE
    scale = policy.normalizer.state_dict()["keypoints.scale"].numpy()
    np.testing.assert_array_equal(np.float32(meta["normalizer"]["keypoints"]["scale"]), scale)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in [*model.graph.input, *model.graph.output]
    }
    batch = dims["keypoints"][0]
    assert isinstance(batch, str) and batch  # a symbolic batch dimension
    assert dims == {
        "keypoints": [batch, 2, 20],
        "noise": [batch, 16, 2],
        "action": [batch, 8, 2],
    }


def test_image_policy_export(real: dict[str, Any], tmp_path: Path):
    """Image + agent_pos policy (the eval-mode centre crop in the graph) on real frames."""
    policy = make_policy("pusht_image", real).eval()
    out = tmp_path / "image.onnx"
    meta = export_policy(policy, out)
    assert meta["observations"] == {
        "agent_pos": {"shape": [2], "dtype": "float32"},
        "image": {"shape": [96, 96, 3], "dtype": "uint8"},
    }
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == [
        "tensor(float)",
        "tensor(uint8)",
        "tensor(float)",
    ]
    onnx_policy = OnnxPolicy(out)
    for batch in (1, 7):
        obs = {k: real["windows"][k][:batch] for k in ("agent_pos", "image")}
        expected = policy.predict_action(obs, generator=seeded(batch))
        noise = torch.randn(batch, 16, 2, generator=seeded(batch)).numpy()
        (got,) = session.run(["action"], {**obs, "noise": noise})
        assert normalised_diff(got, expected, policy) <= TOLERANCE
        got = onnx_policy.predict_action(obs, generator=TorchGenerator(batch))
        assert normalised_diff(got, expected, policy) <= TOLERANCE
    with pytest.raises(ValueError, match="uint8"):
        onnx_policy.predict_action({**obs, "image": obs["image"].astype(np.float32)})


def test_flow_map_steps_unrolled(checkpoint: Path, real: dict[str, Any], tmp_path: Path):
    policy = load_policy(checkpoint)
    meta = export_policy(policy, tmp_path / "two.onnx", steps=2, exporter="torchscript")
    assert meta["exporter"] == "torchscript"
    assert (meta["steps"], meta["sampler_label"]) == (2, "2")
    obs = {"keypoints": real["windows"]["keypoints"][:7]}
    expected = policy.predict_action(obs, steps=2, generator=seeded(3))
    got = OnnxPolicy(tmp_path / "two.onnx").predict_action(
        obs, steps=2, generator=TorchGenerator(3)
    )
    assert normalised_diff(got, expected, policy) <= TOLERANCE


def test_clear_errors(real: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture):
    ddpm = make_policy("pusht_keypoints", real, method="ddpm")
    with pytest.raises(ValueError, match=r"sampler 'ddpm'.*fresh noise.*sampler=ddim"):
        export_policy(ddpm, tmp_path / "ddpm.onnx")
    ict = make_policy("pusht_keypoints", real, method="ict")
    with pytest.raises(ValueError, match=r"fresh noise.*sampler=consistency steps=1"):
        export_policy(ict, tmp_path / "ict.onnx", steps=2)
    assert not list(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_command(["export", f"checkpoint={tmp_path / 'missing'}", f"out={tmp_path / 'x.onnx'}"])
    with pytest.raises(SystemExit) as info:
        main(["export", f"checkpoint={tmp_path / 'missing'}", "out=x.onnx"])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs out="):
        run_command(["export", f"checkpoint={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxPolicy(tmp_path / "missing.onnx")
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX model that no cm-policy export wrote
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), foreign)
    with pytest.raises(ValueError, match="not a cm-policy export"):
        OnnxPolicy(foreign)
    with pytest.raises(ValueError, match="backend=onnx serves an exported model"):
        resolve_backend("onnx", str(tmp_path), None)
    assert resolve_backend("auto", None, "p.onnx") == ("onnx", "p.onnx")
    assert resolve_backend("auto", "run", None) == ("torch", "run")


def test_closed_loop_through_onnx_runtime_equals_torch(exported: Path, checkpoint: Path):
    """The runner with per-episode seeded noise: the ONNX policy gets the same torch generators
    (it draws their noise with torch), so both runs see the same noise."""
    policy, onnx_policy = load_policy(checkpoint), OnnxPolicy(exported)
    seeds = [100000, 100001, 100002]
    env_fn = load_task(policy.spec["task"]).env_factory()

    def run(predictor: Any) -> tuple[list[float], list[np.ndarray]]:
        actions: list[np.ndarray] = []

        class Recorder:
            def predict_action(self, obs: Mapping[str, np.ndarray], **kwargs: Any) -> np.ndarray:
                actions.append(predictor.predict_action(obs, **kwargs))
                return actions[-1]

        envs = gym.vector.SyncVectorEnv(
            [env_fn] * len(seeds), autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP
        )
        try:
            results = run_episodes(
                Recorder(),
                env_fn,
                seeds,
                n_obs_steps=2,
                n_action_steps=8,
                max_steps=80,
                progress=False,
                seeded_noise=True,
                vector_env=envs,
            )
        finally:
            envs.close()
        return [r.max_reward for r in results], actions

    torch_scores, torch_actions = run(policy)
    onnx_scores, onnx_actions = run(onnx_policy)
    assert len(torch_actions) == len(onnx_actions) == 10
    worst = max(
        normalised_diff(a, b, policy) for a, b in zip(onnx_actions, torch_actions, strict=True)
    )
    assert worst <= TOLERANCE, worst
    # The envs see actions that differ by float rounding (a few 1e-6 of the range, growing a
    # little as the states drift apart), so the scores agree to rounding, not bitwise.
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=0, atol=1e-4)
    assert max(torch_scores) > 0  # an episode that moved the block: a non-trivial score


BLOCK_TORCH = "import sys\nsys.modules['torch'] = None  # any `import torch` now fails\n"


def test_onnx_server_runs_without_torch(
    exported: Path, checkpoint: Path, real: dict[str, Any], tmp_path: Path
):
    """`cm-policy serve model=policy.onnx` with `import torch` made to fail in the server's
    interpreter (a sitecustomize): it starts, answers, and its seeded actions are the torch
    policy's to float rounding."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {"PYTHONPATH": str(guard)}
    check = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True
    )
    assert check.returncode != 0 and b"import of torch halted" in check.stderr
    proc, port = spawn_server(exported, tmp_path / "server.log", "obs_limit=2", env=env)
    policy = load_policy(checkpoint)
    obs = {"keypoints": real["windows"]["keypoints"][:4]}
    try:
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            meta = client.metadata
            assert (meta["backend"], meta["fixed_steps"], meta["method"]) == ("onnx", 1, "isd")
            assert (meta["control_hz"], meta["n_action_steps"]) == (10, 8)
            assert meta["observations"] == {"keypoints": {"shape": [20], "dtype": "float32"}}
            for seed in (7, 8):
                got = client.predict_action(obs, seed=seed)
                expected = policy.predict_action(obs, generator=seeded(seed))
                assert normalised_diff(got, expected, policy) <= TOLERANCE
            again = [client.predict_action(obs, seed=7) for _ in range(2)]
            np.testing.assert_array_equal(again[0], again[1])  # seeded: reproducible
            assert client.predict_action(obs).shape == (4, 8, 2)
            with pytest.raises(ServerError, match="fixed number of steps"):
                client.predict_action(obs, steps=2)
            far = {"keypoints": obs["keypoints"] + 4 * 512}  # beyond obs_limit=2
            with pytest.raises(ServerError, match="accepts up to 2 \\(obs_limit\\)"):
                client.predict_action(far)
            assert client.health()["refused"] == 1
            client.reset()
            step = client.act({"keypoints": obs["keypoints"][0, 0]}, seed=3)
            window = {"keypoints": obs["keypoints"][:1, [0, 0]]}
            expected = policy.predict_action(window, generator=seeded(3))[0]
            assert normalised_diff(step, expected, policy) <= TOLERANCE
    finally:
        assert stop_server(proc) == 0, (tmp_path / "server.log").read_text()
    log = (tmp_path / "server.log").read_text()
    assert "onnx, isd, 1, CPUExecutionProvider" in log, log
