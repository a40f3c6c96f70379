"""The registries are the only list: a method and a task added as a module + a YAML each, in a
copy of the package, train and evaluate with no other edit.

The copy lies beside the checkout (so ``../shared`` resolves as from the checkout) and is run
in subprocesses with ``PYTHONPATH`` and ``cwd`` on it; the checkout itself is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from tiny_config import TINY

from cm_policy.data import ReplayBuffer

REPO = Path(__file__).resolve().parents[1]
NEW_METHOD, NEW_TASK = "logitflow", "point_reach"
HORIZON = 40  # the new task's evaluation horizon (its max_steps)
STEP, TOLERANCE = 0.08, 0.1  # the point's largest move per step and axis; the success radius

# Flow matching with the logit-normal time distribution of rectified-flow models (Esser et al.,
# 2024) instead of flow.py's Beta draws: t = sigmoid(N(logit_mean, logit_std)).
METHOD_MODULE = '''"""Flow matching, logit-normal times (written by tests/test_registries.py)."""

from __future__ import annotations

import torch
from torch import nn

from cm_policy.methods.base import Generators, Method, euler_sample


class LogitFlow(Method):
    name = "logitflow"
    loss_keys = ("loss_lfm",)
    samplers = ("euler",)
    eval_samplers = ("1", "4")

    def __init__(
        self, *, logit_mean: float, logit_std: float, default_steps: int, sampler=None
    ):
        super().__init__(default_steps=default_steps, sampler=sampler)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def loss(self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor):
        noise = torch.randn(actions.shape[0], device=actions.device)
        t = torch.sigmoid(self.logit_mean + self.logit_std * noise)
        z = torch.randn_like(actions)
        x_t = (1 - t.view(-1, 1, 1)) * actions + t.view(-1, 1, 1) * z
        loss = (model(x_t, t, t, cond) - (z - actions)).pow(2).mean()
        return loss, {"loss_lfm": loss.detach()}

    def sample(
        self,
        model: nn.Module,
        cond: torch.Tensor,
        shape: tuple[int, ...],
        steps: int | None = None,
        generator: Generators = None,
        sampler: str | None = None,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.resolve_sampler(sampler)
        return euler_sample(model, cond, shape, self.resolve_steps(steps), generator, False, z)
'''
METHOD_YAML = """# Flow matching with logit-normal times (written by tests/test_registries.py).
name: logitflow
logit_mean: 0.0
logit_std: 1.0
default_steps: 4
"""

# A point in the square [-1, 1]^2 moved by velocity actions toward a goal drawn at reset; the
# observation is (position, goal), recorded in the demonstrations as the field "state".
TASK_MODULE = f'''"""A point that must reach a goal (written by tests/test_registries.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from cm_policy.tasks import Task

STEP, TOLERANCE = {STEP}, {TOLERANCE}


class PointReachEnv(gym.Env):
    metadata = {{"render_modes": ["rgb_array"], "render_fps": 10}}

    def __init__(self):
        self.render_mode = "rgb_array"
        self.observation_space = spaces.Dict(
            {{"point": spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)}}
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.pos, self.goal = np.zeros(2), np.zeros(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.goal = self.np_random.uniform(-0.8, 0.8, size=(2, 2))
        return self._obs(), self._info()

    def step(self, action):
        move = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.pos = np.clip(self.pos + STEP * move, -1.0, 1.0)
        info = self._info()
        reward = max(0.0, 1.0 - info["distance"] / 2.0)
        return self._obs(), reward, info["is_success"], False, info

    def _obs(self):
        return {{"point": np.concatenate([self.pos, self.goal]).astype(np.float32)}}

    def _info(self):
        distance = float(np.linalg.norm(self.goal - self.pos))
        return {{"distance": distance, "is_success": distance < TOLERANCE}}

    def render(self):
        frame = np.zeros((32, 32, 3), dtype=np.uint8)
        for xy, channel in ((self.goal, 1), (self.pos, 0)):
            col, row = np.clip(((xy + 1) / 2 * 31).round().astype(int), 0, 31)
            frame[row, col, channel] = 255
        return frame


class PointReach(Task):
    name = "point_reach"
    control_hz = 10.0
    max_steps = {HORIZON}
    eval_layout = "sync"
    eval_envs = 2
    success_rule = f"within {{TOLERANCE}} of the goal at some step"
    outcome_keys = ("distance",)

    def make_env(self) -> gym.Env:
        return PointReachEnv()

    def dataset_keys(self) -> list[str]:
        return ["action", "state"]

    def dataset_obs(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {{"point": np.asarray(data["state"], dtype=np.float32)}}

    def episode_outcome(self, info: Mapping[str, Any]) -> dict[str, Any]:
        return {{"final_distance": float(info["distance"])}}

    def summarize_outcomes(self, results: Sequence[Any]) -> dict[str, Any]:
        distances = [r.outcome["final_distance"] for r in results]
        return {{"mean_final_distance": float(np.mean(distances))}}
'''
TASK_YAML = """# A point that must reach a goal (written by tests/test_registries.py).
name: point_reach
env: point_reach
dataset_path: data/point_reach.zarr
action_dim: 2
low_dim: {point: 4}
image_keys: []
"""


def write_demonstrations(path: Path, n_episodes: int = 12, seed: int = 0) -> int:
    """The expert of the new task (straight to the goal at full speed), as a replay buffer with
    the task's recorded fields ``state`` (position, goal) and ``action``; returns the steps."""
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer.create(path)
    for _ in range(n_episodes):
        pos, goal = rng.uniform(-0.8, 0.8, size=(2, 2))
        while np.linalg.norm(goal - pos) < 0.6:
            goal = rng.uniform(-0.8, 0.8, size=2)
        states, actions = [], []
        while np.linalg.norm(goal - pos) >= TOLERANCE:
            action = np.clip((goal - pos) / STEP, -1.0, 1.0)
            states.append(np.concatenate([pos, goal]))
            actions.append(action)
            pos = np.clip(pos + STEP * action, -1.0, 1.0)
        buffer.add_episode(
            {
                "state": np.asarray(states, dtype=np.float32),
                "action": np.asarray(actions, dtype=np.float32),
            }
        )
    return buffer.n_steps


def registry_files(root: Path) -> set[str]:
    """The files of the method and task packages and of their config groups under ``root``
    (names only: other work may edit the checkout's files while this test runs)."""
    folders = ("cm_policy/methods", "cm_policy/tasks", "config/method", "config/task")
    return {str(p.relative_to(root)) for f in folders for p in (root / f).glob("*.*")}


def test_a_new_method_and_task_train_and_evaluate_with_no_other_edit():
    before = registry_files(REPO)
    with tempfile.TemporaryDirectory(dir=REPO.parent, prefix=".registries_") as tmp:
        copy = Path(tmp)
        for part in ("cm_policy", "config"):
            shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
        # A method and a task: one module and one YAML each, nothing else edited.
        (copy / f"cm_policy/methods/{NEW_METHOD}.py").write_text(METHOD_MODULE)
        (copy / f"config/method/{NEW_METHOD}.yaml").write_text(METHOD_YAML)
        (copy / f"cm_policy/tasks/{NEW_TASK}.py").write_text(TASK_MODULE)
        (copy / f"config/task/{NEW_TASK}.yaml").write_text(TASK_YAML)
        assert write_demonstrations(copy / "data/point_reach.zarr") > 100

        env = {
            **os.environ,
            "PYTHONPATH": str(copy),
            "OMP_NUM_THREADS": "1",
            "SDL_VIDEODRIVER": "dummy",
            "CM_POLICY_DEBUG": "1",
        }

        def python(*args: str) -> str:
            out = subprocess.run(
                [sys.executable, *args],
                cwd=copy,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            assert out.returncode == 0, f"{args[:3]}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
            return out.stdout

        # The subprocesses import the copy, whose registries hold the new modules.
        probe = (
            "import json, cm_policy\n"
            "from cm_policy.configs import config_dir\n"
            "from cm_policy.methods import METHODS\n"
            "from cm_policy.tasks import task_types\n"
            "print(json.dumps({'package': cm_policy.__file__, 'config': str(config_dir()),"
            " 'methods': sorted(METHODS), 'tasks': sorted(task_types())}))\n"
        )
        seen = json.loads(python("-c", probe).strip().splitlines()[-1])
        assert Path(seen["package"]).resolve().is_relative_to(copy.resolve()), seen
        assert Path(seen["config"]).resolve() == (copy / "config").resolve(), seen
        assert NEW_METHOD in seen["methods"] and NEW_TASK in seen["tasks"], seen

        run = copy / "run"
        steps = 80
        python(
            "-m",
            "cm_policy.cli",
            "train",
            f"task={NEW_TASK}",
            f"method={NEW_METHOD}",
            *TINY,
            f"training.steps={steps}",
            "training.lr=1e-3",
            f"output_dir={run}",
        )
        assert (run / "checkpoints" / f"step_{steps:07d}").is_dir(), sorted(run.rglob("*"))
        config = (run / "config.yaml").read_text()
        assert f"name: {NEW_METHOD}" in config and f"env: {NEW_TASK}" in config
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, steps + 1))
        losses = [r["loss_lfm"] for r in log]  # the new method's own loss term, logged
        assert all(np.isfinite(losses))
        assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10]), losses

        out = copy / "evaluation"
        python(
            "-m",
            "cm_policy.cli",
            "eval",
            f"checkpoint={run}",
            "n_episodes=2",
            "n_videos=0",
            "progress=false",
            f"output_dir={out}",
        )
        metrics = json.loads((out / "metrics.json").read_text())
        episodes = json.loads((out / "episodes.json").read_text())
        assert metrics["n_episodes"] == 2 and len(episodes) == 2
        assert 0.0 <= metrics["success_rate"] <= 1.0
        assert metrics["steps"] == 4  # the new method's default steps, from its YAML
        # The new task's success rule, horizon and outcome: success within the horizon, ended
        # at the goal; otherwise run to the horizon (its max_steps, not PushT's 300).
        for episode in episodes:
            final = episode["outcome"]["final_distance"]
            if episode["success"]:
                assert final < TOLERANCE and episode["n_steps"] <= HORIZON, episode
            else:
                assert final >= TOLERANCE and episode["n_steps"] == HORIZON, episode
        assert metrics["mean_final_distance"] == np.mean(
            [e["outcome"]["final_distance"] for e in episodes]
        )
    # The checkout was only read: the new modules and YAMLs went to the copy alone.
    assert registry_files(REPO) == before
    for new in (f"methods/{NEW_METHOD}.py", f"tasks/{NEW_TASK}.py"):
        assert not (REPO / "cm_policy" / new).exists()
