"""Robomimic's manipulation tasks (Lift, Can, Square with a Panda arm) as gymnasium envs.

A thin wrapper over robosuite 1.5 that speaks robomimic's contract: an env is described by the
``env_args`` metadata of a robomimic HDF5 dataset (env name, ``env_kwargs`` with the controller
config), observations carry robomimic's keys (``object``, ``robot0_eef_pos``, ``robot0_eef_quat``,
``robot0_gripper_qpos``, ``agentview_image``, ``robot0_eye_in_hand_image``), success is the task's
own ``_check_success``, and :meth:`RobosuiteEnv.reset_to` places the simulator at a recorded
flattened MuJoCo state as robomimic's ``EnvRobosuite.reset_to`` does.

Actions are 7-D delta end-effector poses for robosuite's OSC_POSE controller (position and
axis-angle deltas in [-1, 1], then the gripper, -1 open / +1 closed), or with ``abs_action`` 10-D
absolute world-frame targets: position, the rotation as a 6D representation (the first two columns
of the rotation matrix, continuous, unlike axis-angle) and the gripper. The rotation helpers below
convert between axis-angle, matrices and 6D in plain numpy.

robosuite is imported lazily, inside the functions that build envs: the rotation helpers and the
metadata functions work without it, and a process that only hands an env constructor to spawned
workers never creates a GL context.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# robomimic task names -> robosuite env classes.
TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
ROBOT = "Panda"
ARM = "right"  # robosuite 1.5 names the single arm's controller "right"
CONTROL_HZ = 20  # robomimic's control rate
MAX_STEPS = 400  # robomimic's evaluation horizon for proficient-human (ph) data
IMAGE_SIZE = 84  # robomimic's image observations: 84x84 RGB
CAMERAS = ("agentview", "robot0_eye_in_hand")
VIDEO_CAMERA = "agentview"
VIDEO_SIZE = 256
# The model is built once per env with this seed, so that every worker process simulates the same
# objects (Lift draws its cube size when the model is built); resets draw only the initial state.
MODEL_SEED = 0
DELTA_ACTION_DIM = 7
ABS_ACTION_DIM = 10
LOW_DIM_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
# Diffusion Policy's image tasks give the policy the cameras and the proprioception only.
IMAGE_LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
IMAGE_KEYS = tuple(f"{camera}_image" for camera in CAMERAS)
OBS_TYPES = ("lowdim", "image")
# OSC_POSE part-controller types of robosuite <= 1.4 (robomimic v0.3 datasets) and the keys that
# robosuite 1.5 renamed.
_PART_CONTROLLER_TYPES = ("OSC_POSE", "OSC_POSITION", "IK_POSE", "JOINT_POSITION")
_RENAMED_CONTROLLER_KEYS = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}

_SMALL_ANGLE = 1e-8


# --- rotations (numpy; vectorised over leading axes) ------------------------------------------
def axis_angle_to_matrix(axis_angle: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of axis-angle vectors (..., 3) (Rodrigues' formula)."""
    v = np.asarray(axis_angle, dtype=np.float64)
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    small = angle < _SMALL_ANGLE
    axis = v / np.where(small, 1.0, angle)
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    zero = np.zeros_like(x)
    skew = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(*v.shape[:-1], 3, 3)
    s = np.sin(angle)[..., None]
    c = np.cos(angle)[..., None]
    eye = np.broadcast_to(np.eye(3), skew.shape)
    rot = eye + s * skew + (1.0 - c) * (skew @ skew)
    # Below the threshold the first-order expansion I + [v]x is exact to float precision.
    vx = np.stack(
        [zero, -v[..., 2], v[..., 1], v[..., 2], zero, -v[..., 0], -v[..., 1], v[..., 0], zero],
        axis=-1,
    ).reshape(skew.shape)
    return np.where(small[..., None], eye + vx, rot)


def matrix_to_quaternion(matrix: np.ndarray) -> np.ndarray:
    """Unit quaternions (..., 4) as (w, x, y, z) with w >= 0, from rotation matrices (..., 3, 3).

    Shepperd's method: the largest of the four squared components is taken from the diagonal and
    the others from off-diagonal sums, which keeps the result accurate near 180 degrees.
    """
    m = np.asarray(matrix, dtype=np.float64)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    candidates = np.stack(
        [
            np.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2],
                      m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], axis=-1),
            np.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22,
                      m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], axis=-1),
            np.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                      1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], axis=-1),
            np.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0],
                      m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], axis=-1),
        ],
        axis=-2,
    )  # fmt: skip
    # Row k of `candidates` is 4 q_k q; the row with the largest diagonal entry is best scaled.
    diag = np.stack([candidates[..., k, k] for k in range(4)], axis=-1)
    best = np.argmax(diag, axis=-1)
    row = np.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    quat = row / np.linalg.norm(row, axis=-1, keepdims=True)
    return np.where(quat[..., :1] < 0, -quat, quat)


def quaternion_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Axis-angle vectors (..., 3) with angle in [0, pi] of (w, x, y, z) quaternions (..., 4)."""
    q = np.asarray(quat, dtype=np.float64)
    q = np.where(q[..., :1] < 0, -q, q)
    vec = q[..., 1:]
    sin_half = np.linalg.norm(vec, axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(sin_half, q[..., :1])
    small = sin_half < _SMALL_ANGLE
    # angle / sin(angle / 2) -> 2 as the angle -> 0.
    scale = np.where(small, 2.0, angle / np.where(small, 1.0, sin_half))
    return vec * scale


def matrix_to_axis_angle(matrix: np.ndarray) -> np.ndarray:
    """Axis-angle vectors (..., 3), angle in [0, pi], of rotation matrices (..., 3, 3)."""
    return quaternion_to_axis_angle(matrix_to_quaternion(matrix))


def matrix_to_rot6d(matrix: np.ndarray) -> np.ndarray:
    """The 6D representation (..., 6): the first two columns of the rotation matrix, stacked."""
    m = np.asarray(matrix, dtype=np.float64)
    return np.concatenate([m[..., :, 0], m[..., :, 1]], axis=-1)


def rot6d_to_matrix(rot6d: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) from 6D vectors (..., 6) by Gram-Schmidt (any input that
    is not degenerate maps to the nearest valid frame, as a network's raw output must)."""
    r = np.asarray(rot6d, dtype=np.float64)
    a, b = r[..., :3], r[..., 3:6]
    c0 = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b - np.sum(c0 * b, axis=-1, keepdims=True) * c0
    c1 = b / np.linalg.norm(b, axis=-1, keepdims=True)
    c2 = np.cross(c0, c1)
    return np.stack([c0, c1, c2], axis=-1)


def axis_angle_to_rot6d(axis_angle: np.ndarray) -> np.ndarray:
    return matrix_to_rot6d(axis_angle_to_matrix(axis_angle))


def rot6d_to_axis_angle(rot6d: np.ndarray) -> np.ndarray:
    return matrix_to_axis_angle(rot6d_to_matrix(rot6d))


def abs_action_to_env(action: np.ndarray) -> np.ndarray:
    """A 10-D absolute action (pos, rot6d, gripper) as robosuite's 7-D (pos, axis-angle, grip)."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape[-1] != ABS_ACTION_DIM:
        raise ValueError(f"absolute actions have {ABS_ACTION_DIM} values, got shape {a.shape}")
    return np.concatenate([a[..., :3], rot6d_to_axis_angle(a[..., 3:9]), a[..., 9:]], axis=-1)


def env_to_abs_action(action: np.ndarray) -> np.ndarray:
    """robosuite's 7-D absolute action (pos, axis-angle, gripper) as the policy's 10-D one."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape[-1] != DELTA_ACTION_DIM:
        raise ValueError(f"robosuite actions have {DELTA_ACTION_DIM} values, got shape {a.shape}")
    return np.concatenate([a[..., :3], axis_angle_to_rot6d(a[..., 3:6]), a[..., 6:]], axis=-1)


# --- metadata (robomimic's env_args) ----------------------------------------------------------
def import_robosuite() -> Any:
    """Import robosuite with its import-time warnings (no private macro file, optional robot
    packages) silenced, and its logger set to errors only."""
    previous = logging.root.manager.disable
    gl = os.environ.get("MUJOCO_GL")
    logging.disable(logging.WARNING)
    try:
        import robosuite
    finally:
        logging.disable(previous)
        # robosuite sets MUJOCO_GL=egl in os.environ when imported (its own renderer has read
        # it by then). Put back what the user had: processes started later (the env workers)
        # inherit the environment, and a worker whose MuJoCo import then loads EGL dies on a
        # machine without libEGL even when it never renders (low-dim observations, no video).
        if gl is None:
            os.environ.pop("MUJOCO_GL", None)
        else:
            os.environ["MUJOCO_GL"] = gl
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    return robosuite


def _robot_name(env_kwargs: Mapping[str, Any]) -> str:
    robots = env_kwargs.get("robots", ROBOT)
    robots = [robots] if isinstance(robots, str) else list(robots)
    if len(robots) != 1:
        raise ValueError(f"expected a single-arm env (one robot), got robots={robots}")
    return str(robots[0])


def convert_controller_config(
    config: Mapping[str, Any], robot: str = ROBOT, abs_action: bool = False
) -> dict[str, Any]:
    """A controller config in robosuite 1.5's composite form.

    robomimic v0.3 datasets (robosuite <= 1.4) store a part config (``"type": "OSC_POSE"`` with
    ``damping``/``damping_limits`` and ``control_delta``); 1.5 wants a composite config whose arm
    entry uses ``damping_ratio``/``damping_ratio_limits`` and ``input_type``. With ``abs_action``
    the arm takes absolute world-frame targets (the default "base" frame would offset every target
    by the base position).
    """
    config = copy.deepcopy(dict(config))
    if "body_parts" not in config:
        if config.get("type") not in _PART_CONTROLLER_TYPES:
            raise ValueError(
                "controller config: expected a robosuite 1.5 composite config (with 'body_parts') "
                f"or a part config of type {_PART_CONTROLLER_TYPES}, got type "
                f"{config.get('type')!r} and keys {sorted(config)}"
            )
        for old, new in _RENAMED_CONTROLLER_KEYS.items():
            if old in config:
                config[new] = config.pop(old)
        if "control_delta" in config:
            config["input_type"] = "delta" if config.pop("control_delta") else "absolute"
        from robosuite.controllers.composite.composite_controller_factory import (
            refactor_composite_controller_config,
        )

        config = refactor_composite_controller_config(config, robot, [ARM])
    arm = config["body_parts"].get(ARM)
    if arm is None:
        raise ValueError(
            f"controller config has no '{ARM}' arm entry; "
            f"body parts: {sorted(config['body_parts'])}"
        )
    if abs_action:
        arm["input_type"] = "absolute"
    if arm.get("input_type") == "absolute":
        arm["input_ref_frame"] = "world"
    return config


def default_env_meta(task: str) -> dict[str, Any]:
    """robomimic-style ``env_args`` for a task name (``lift``, ``can``, ``square``) with the
    controller of robomimic's datasets (OSC_POSE, kp 150, critically damped, deltas of at most
    5 cm and 0.5 rad per step) on robosuite 1.5's physics."""
    if task not in TASKS:
        raise ValueError(f"unknown robomimic task {task!r}; expected one of {sorted(TASKS)}")
    robosuite = import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    controller = load_composite_controller_config(controller="BASIC", robot=ROBOT)
    controller["body_parts"] = {ARM: controller["body_parts"][ARM]}
    return {
        "env_name": TASKS[task],
        "type": 1,  # robomimic's EnvType.ROBOSUITE_TYPE
        "env_version": robosuite.__version__,
        "env_kwargs": {
            "robots": [ROBOT],
            "controller_configs": controller,
            "control_freq": CONTROL_HZ,
            "reward_shaping": False,
            "use_object_obs": True,
            "ignore_done": True,
            "has_renderer": False,
            "has_offscreen_renderer": False,
            "use_camera_obs": False,
            "camera_names": list(CAMERAS),
            "camera_heights": IMAGE_SIZE,
            "camera_widths": IMAGE_SIZE,
            "camera_depths": False,
            "lite_physics": True,
        },
    }


def task_of_env_name(env_name: str) -> str:
    """The task name (``lift`` ...) of a robosuite env class name (``Lift`` ...)."""
    for task, name in TASKS.items():
        if name == env_name:
            return task
    raise ValueError(
        f"unsupported robosuite env {env_name!r}; expected one of {list(TASKS.values())}"
    )


def build_env_kwargs(
    env_meta: Mapping[str, Any], image: bool, abs_action: bool
) -> tuple[str, dict[str, Any]]:
    """The robosuite env name and ``suite.make`` kwargs of ``env_meta`` for this wrapper."""
    for key in ("env_name", "env_kwargs"):
        if key not in env_meta:
            raise ValueError(
                f"env metadata needs '{key}' (robomimic env_args), found {sorted(env_meta)}"
            )
    env_name = str(env_meta["env_name"])
    task_of_env_name(env_name)
    kwargs = copy.deepcopy(dict(env_meta["env_kwargs"]))
    robot = _robot_name(kwargs)
    kwargs["robots"] = [robot]
    kwargs["controller_configs"] = convert_controller_config(
        kwargs.get("controller_configs", {"type": "OSC_POSE"}), robot, abs_action
    )
    # Datasets of robosuite <= 1.4 were simulated with a full forward pass per substep.
    version = str(env_meta.get("env_version", "1.4"))
    kwargs.setdefault(
        "lite_physics", not version.startswith(("0.", "1.0", "1.1", "1.2", "1.3", "1.4"))
    )
    kwargs.update(
        has_renderer=False,
        has_offscreen_renderer=image,
        use_camera_obs=image,
        use_object_obs=True,
        ignore_done=True,
        # Soft resets: the model (and the GL context) is built once per env; hard resets would
        # rebuild both at every episode.
        hard_reset=False,
        camera_names=list(CAMERAS),
        camera_heights=IMAGE_SIZE,
        camera_widths=IMAGE_SIZE,
        camera_depths=False,
    )
    kwargs.setdefault("seed", MODEL_SEED)
    return env_name, kwargs


# --- the env ----------------------------------------------------------------------------------
class RobosuiteEnv(gym.Env):
    """A robomimic task (Lift, Can, Square; Panda, OSC_POSE) as a gymnasium environment.

    Build it from a task name (``task="lift"``) or from a dataset's ``env_meta`` (robomimic's
    ``env_args``). ``obs_type`` ``lowdim`` observes ``object`` + proprioception, ``image`` the two
    84x84 cameras (uint8 HWC, upright) + proprioception. ``reset(seed=N)`` draws initial state N
    (the same N gives the same state in any process); :meth:`reset_to` places the env at a
    recorded flattened MuJoCo state. An episode ends on the task's success (``terminated``) or
    after ``max_steps`` steps (``truncated``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        task: str | None = None,
        obs_type: str = "lowdim",
        abs_action: bool = False,
        env_meta: Mapping[str, Any] | None = None,
        max_steps: int = MAX_STEPS,
        video_size: int = VIDEO_SIZE,
    ):
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
        if (task is None) == (env_meta is None):
            raise ValueError("give exactly one of task (a name) or env_meta (robomimic env_args)")
        env_meta = dict(env_meta) if env_meta is not None else default_env_meta(str(task))
        robosuite = import_robosuite()
        env_name, kwargs = build_env_kwargs(env_meta, obs_type == "image", abs_action)
        self.task = task_of_env_name(env_name)
        self.env_meta = env_meta
        self.obs_type = obs_type
        self.abs_action = abs_action
        self.max_steps = int(max_steps)
        self.video_size = int(video_size)
        self.render_mode = "rgb_array"
        self.sim_env = robosuite.make(env_name, **kwargs)
        self._initial_xml = self.sim_env.sim.model.get_xml()
        self._model_replaced = False
        self._steps = 0
        self._last_obs: dict[str, np.ndarray] = {}
        self.sim_env.reset()

        obs = robomimic_obs(self._robosuite_obs(), image=False)
        keys = IMAGE_LOW_DIM_KEYS if obs_type == "image" else LOW_DIM_KEYS
        space = {k: spaces.Box(-np.inf, np.inf, shape=obs[k].shape, dtype=np.float32) for k in keys}
        if obs_type == "image":
            shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
            space.update({k: spaces.Box(0, 255, shape=shape, dtype=np.uint8) for k in IMAGE_KEYS})
        self.observation_space = spaces.Dict(space)
        if abs_action:
            self.action_space = spaces.Box(-np.inf, np.inf, (ABS_ACTION_DIM,), dtype=np.float32)
        else:
            self.action_space = spaces.Box(-1.0, 1.0, (DELTA_ACTION_DIM,), dtype=np.float32)

    # --- state ---------------------------------------------------------------------------------
    @property
    def arm_controller(self) -> Any:
        """robosuite's OSC controller of the arm (its ``goal_pos`` / ``goal_ori`` after a step)."""
        return self.sim_env.robots[0].composite_controller.part_controllers[ARM]

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel), robomimic's ``states`` entry."""
        return np.asarray(self.sim_env.sim.get_state().flatten(), dtype=np.float64)

    def get_model_xml(self) -> str:
        """The MJCF of the current model, robomimic's ``model_file`` attribute."""
        return self.sim_env.sim.model.get_xml()

    def reset_to(
        self, state: np.ndarray, model_xml: str | None = None, new_episode: bool = True
    ) -> dict[str, np.ndarray]:
        """Place the env at a flattened MuJoCo ``state``, in the model ``model_xml`` if given
        (a dataset's per-demo MJCF); returns the observation there.

        Two parts of robosuite's control state are not in MuJoCo's: the OSC controller's
        null-space posture (the arm joints at the episode's start) and the Panda gripper's command
        ramp (0.2 per step towards +-1). With ``new_episode`` the state starts an episode, as a
        demo's first state does: the posture becomes its arm joints and the ramp restarts, as at a
        robosuite reset, so a demo replays exactly from its first state. ``new_episode=False``
        keeps both, to follow a recorded episode state by state.
        """
        if model_xml is not None:
            self.sim_env.reset_from_xml_string(self.sim_env.edit_model_xml(model_xml))
            self._model_replaced = True
        state = np.asarray(state, dtype=np.float64)
        sim = self.sim_env.sim
        expected = 1 + sim.model.nq + sim.model.nv
        if state.shape != (expected,):
            raise ValueError(
                f"state must be a flattened MuJoCo state of {expected} values (time, qpos "
                f"{sim.model.nq}, qvel {sim.model.nv}) for {type(self.sim_env).__name__}, "
                f"got shape {state.shape}"
            )
        sim.set_state_from_flattened(state)
        sim.forward()
        if new_episode:
            robot = self.sim_env.robots[0]
            self.arm_controller.update_initial_joints(sim.data.qpos[robot._ref_joint_pos_indexes])
            robot.gripper[ARM].current_action = np.zeros(robot.gripper[ARM].dof)
        self._steps = 0
        return self._get_obs(self._robosuite_obs(force=True))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and options.get("state") is not None:
            obs = self.reset_to(options["state"], options.get("model_xml"))
            return obs, self._get_info()
        if self._model_replaced:
            self.sim_env.reset_from_xml_string(self.sim_env.edit_model_xml(self._initial_xml))
            self._model_replaced = False
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        # robosuite's placement samplers and robot init noise hold this generator: reseeding it
        # in place makes the initial state a function of the seed alone.
        self.sim_env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.sim_env.reset()
        self._steps = 0
        return self._get_obs(self._robosuite_obs()), self._get_info()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape or not np.all(np.isfinite(action)):
            raise ValueError(
                f"action must be {self.action_space.shape[0]} finite values, got {action!r}"
            )
        if self.abs_action:
            action = abs_action_to_env(action)
        raw, reward, _, _ = self.sim_env.step(action)
        self._steps += 1
        info = self._get_info()
        truncated = self._steps >= self.max_steps
        return self._get_obs(raw), float(reward), info["is_success"], truncated, info

    def is_success(self) -> bool:
        return bool(self.sim_env._check_success())

    # --- observations --------------------------------------------------------------------------
    def _robosuite_obs(self, force: bool = False) -> dict[str, np.ndarray]:
        return self.sim_env._get_observations(force_update=force)

    def _get_obs(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = self._last_obs = robomimic_obs(raw, self.obs_type == "image")
        keys = IMAGE_LOW_DIM_KEYS + IMAGE_KEYS if self.obs_type == "image" else LOW_DIM_KEYS
        return {k: obs[k] for k in keys}

    def full_obs(self) -> dict[str, np.ndarray]:
        """The latest observation with every robomimic key the env has (``object`` too, images
        only with ``obs_type="image"``): what a dataset records."""
        return dict(self._last_obs)

    def _get_info(self) -> dict[str, Any]:
        return {"is_success": self.is_success()}

    # --- rendering -----------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """An upright RGB frame (video_size square) from the agentview camera."""
        sim = self.sim_env.sim
        if sim._render_context_offscreen is None:
            # Low-dim envs create their GL context on the first frame asked for, in the worker.
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            MjRenderContextOffscreen(sim, device_id=-1)
            sim._render_context_offscreen.vopt.geomgroup[0] = 0  # visual meshes, no collision
            sim._render_context_offscreen.vopt.geomgroup[1] = 1
        frame = sim.render(self.video_size, self.video_size, camera_name=VIDEO_CAMERA)
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        env = getattr(self, "sim_env", None)
        if env is not None and env.sim is not None:
            # Frees the MuJoCo model and data and, with them, the offscreen GL context.
            env.close()
        self.sim_env = None


def robomimic_obs(raw: Mapping[str, np.ndarray], image: bool) -> dict[str, np.ndarray]:
    """robomimic's observation keys from robosuite's: ``object`` is ``object-state``; camera
    images are flipped upright (OpenGL renders bottom-up) and kept uint8 HWC."""
    obs = {k: np.asarray(raw[k], dtype=np.float32) for k in LOW_DIM_KEYS[1:]}
    obs["object"] = np.asarray(raw["object-state"], dtype=np.float32)
    if image:
        for key in IMAGE_KEYS:
            obs[key] = np.ascontiguousarray(raw[key][::-1])
    return obs
