"""PushT: push a T-shaped block onto a fixed goal pose with a circular kinematic agent.

A faithful re-implementation of the PushT environment of Diffusion Policy (Chi et al. 2023) and of
gym-pusht, on gymnasium 1.x and pymunk 7. Every physics constant, and every quirk of the reference
that changes the dynamics, is reproduced and named below, because the public datasets were recorded
with them (see ``eval/results/pusht_fidelity.md`` for the measured agreement).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import gymnasium as gym
import numpy as np
import pymunk
import shapely
import shapely.geometry as sg
from gymnasium import spaces
from pymunk._chipmunk_cffi import lib as chipmunk_lib

# --- Constants of the reference PushT (diffusion_policy/env/pusht/pusht_env.py, gym-pusht) -----
WINDOW_SIZE = 512  # workspace [0, 512]^2 in pixels; actions are agent target positions in it
SIM_HZ = 100  # physics rate
CONTROL_HZ = 10  # policy rate: one action = SIM_HZ // CONTROL_HZ physics steps
K_P, K_V = 100.0, 20.0  # PD gains of the agent controller (critically damped)
AGENT_RADIUS = 15.0
AGENT_START = (256.0, 400.0)
TEE_SCALE = 30.0  # bar 120 x 30 on top, stem 30 x 90 below it (body frame, y down in the image)
TEE_LENGTH = 4.0
TEE_MASS = 1.0
WALL_RADIUS = 2.0
WALLS = (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506)))
GOAL_POSE = (256.0, 256.0, math.pi / 4)  # block origin x, y and angle at the goal
SUCCESS_THRESHOLD = 0.95  # coverage of the goal needed for success; reward = coverage / this
# Reference reset ranges (legacy numpy RandomState, so seed N gives the reference's state N).
RESET_AGENT_RANGE = (50, 450)
RESET_BLOCK_RANGE = (100, 400)
# Render colours of the reference (pygame THECOLORS names).
COLOR_BACKGROUND = (255, 255, 255)
COLOR_GOAL = (144, 238, 144)  # LightGreen
# Shapes are filled with a lightened colour and outlined with the named one, as in the reference's
# pymunk draw options; the values were read off the dataset's images.
COLOR_BLOCK = (119, 136, 153)  # LightSlateGray
COLOR_BLOCK_FILL = (143, 163, 184)
COLOR_AGENT = (65, 105, 225)  # RoyalBlue
COLOR_AGENT_FILL = (78, 126, 255)
COLOR_WALL = (233, 233, 233)
COLOR_ACTION = (255, 0, 0)
# Block-frame keypoints of the dataset's ``keypoint`` field (rigid with the block; see
# ../shared/docs/PUSHT_FACTS.md, fitted from the real dataset with 0.03 px residual).
BLOCK_KEYPOINTS = np.array(
    [
        (9.27, 90.02),
        (-60.99, -1.19),
        (60.91, -1.39),
        (-0.27, 25.54),
        (-14.06, 122.81),
        (39.00, 32.86),
        (-39.96, 32.73),
        (-16.82, 62.87),
        (23.54, -1.70),
    ],
    dtype=np.float64,
)

OBS_TYPES = ("state", "state_sincos", "keypoints", "image")


def tee_vertices() -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Block-frame vertices of the T's bar and stem, as in the reference ``add_tee``."""
    s, n = TEE_SCALE, TEE_LENGTH
    bar = [(-n * s / 2, s), (n * s / 2, s), (n * s / 2, 0), (-n * s / 2, 0)]
    stem = [(-s / 2, s), (-s / 2, n * s), (s / 2, n * s), (s / 2, s)]
    return bar, stem


def tee_polygons(x: float, y: float, angle: float) -> list[np.ndarray]:
    """World-frame vertex arrays of the T at a block pose (body origin x, y and angle)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return [np.asarray(part) @ rot.T + (x, y) for part in tee_vertices()]


def tee_geometry(x: float, y: float, angle: float) -> sg.Polygon:
    """The T at a block pose as one shapely polygon."""
    parts = [sg.Polygon(p) for p in tee_polygons(x, y, angle)]
    return parts[0].union(parts[1])


GOAL_GEOMETRY = tee_geometry(*GOAL_POSE)
shapely.prepare(GOAL_GEOMETRY)
GOAL_AREA = float(GOAL_GEOMETRY.area)


def coverage_of(block_pose: np.ndarray, goal: sg.Polygon = GOAL_GEOMETRY) -> float:
    """Fraction of the goal area covered by the block at ``block_pose`` = (x, y, angle).

    ``goal``: the T at the goal pose (:func:`tee_geometry`; every goal has the T's area). The bar
    and the stem do not overlap, so the covered area is the sum of their intersections with the
    goal; that avoids a polygon union per step.
    """
    parts = shapely.polygons(np.stack(tee_polygons(*(float(v) for v in block_pose[:3]))))
    return float(shapely.area(shapely.intersection(goal, parts)).sum()) / GOAL_AREA


def block_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """The 9 world-frame keypoints (9, 2) of the block at ``block_pose`` = (x, y, angle)."""
    c, s = math.cos(block_pose[2]), math.sin(block_pose[2])
    rot = np.array([[c, -s], [s, c]])
    return BLOCK_KEYPOINTS @ rot.T + np.asarray(block_pose[:2], dtype=np.float64)


def keypoint_obs(state: np.ndarray) -> np.ndarray:
    """Keypoint observation (20,) of a 5-d state: 9 block keypoints then the agent position."""
    kp = block_keypoints(state[2:5])
    return np.concatenate([kp.reshape(-1), state[:2]]).astype(np.float32)


def state_sincos_obs(state: np.ndarray) -> np.ndarray:
    """State observation with the block angle as (sin, cos): agent xy, block xy, sin, cos."""
    state = np.asarray(state, dtype=np.float64)
    return np.concatenate(
        [state[..., :4], np.sin(state[..., 4:5]), np.cos(state[..., 4:5])], axis=-1
    ).astype(np.float32)


class PushTEnv(gym.Env):
    """The PushT task as a gymnasium environment.

    ``obs_type``: ``state`` (agent xy, block xy, block angle), ``state_sincos`` (the angle as sin
    and cos), ``keypoints`` (9 block keypoints + agent xy = 20 values, the dataset's low-dim
    observation) or ``image`` (``image`` 96x96x3 uint8 + ``agent_pos``). Observations are dicts.

    ``reset(seed=N)`` draws the reference's initial state N; ``reset(options={"state": s})`` and
    :meth:`set_state` place the env exactly at a recorded 5-d state. ``goal``: the block pose to
    reach (x, y, angle), the reference's by default.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        obs_type: str = "state",
        render_size: int = 96,
        video_size: int = 256,
        goal: tuple[float, float, float] = GOAL_POSE,
    ):
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
        self.obs_type = obs_type
        self.render_mode = "rgb_array"
        self.render_size = render_size
        self.video_size = video_size
        self.goals: tuple[tuple[float, float, float], ...] = (tuple(goal),)  # drawn in renders
        self.goal_geometry = GOAL_GEOMETRY if tuple(goal) == GOAL_POSE else tee_geometry(*goal)
        shapely.prepare(self.goal_geometry)
        ws = float(WINDOW_SIZE)
        self.action_space = spaces.Box(0.0, ws, shape=(2,), dtype=np.float32)
        low_dim = {"state": 5, "state_sincos": 6, "keypoints": 20}
        if obs_type == "image":
            self.observation_space = spaces.Dict(
                {
                    "image": spaces.Box(0, 255, (render_size, render_size, 3), dtype=np.uint8),
                    "agent_pos": spaces.Box(0.0, ws, shape=(2,), dtype=np.float32),
                }
            )
        else:
            dim = low_dim[obs_type]
            self.observation_space = spaces.Dict(
                {obs_type: spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)}
            )
        self.latest_action: np.ndarray | None = None
        self._n_contact_points = 0
        self._coverage_cache: tuple[tuple[float, float, float] | None, float] = (None, 0.0)
        self._build_space()

    # --- physics -------------------------------------------------------------------------------
    def _build_space(self) -> None:
        space = pymunk.Space()
        space.gravity = (0.0, 0.0)
        # Quirk: damping 0 removes all of the block's velocity at every physics step, so the block
        # only moves while it is pushed (quasi-static pushing).
        space.damping = 0.0
        for a, b in WALLS:
            space.add(pymunk.Segment(space.static_body, a, b, WALL_RADIUS))
        agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        agent.position = AGENT_START
        space.add(agent, pymunk.Circle(agent, AGENT_RADIUS))
        bar, stem = tee_vertices()
        # Quirk: the reference computes the stem's moment from the bar's vertices.
        inertia = 2 * pymunk.moment_for_poly(TEE_MASS, vertices=bar)
        block = pymunk.Body(TEE_MASS, inertia)
        bar_shape, stem_shape = pymunk.Poly(block, bar), pymunk.Poly(block, stem)
        # Quirk: the centre of gravity is the unweighted mean of the two parts' centroids,
        # (0, 45) in the block frame, not the area-weighted (0, 40.7).
        cog = (bar_shape.center_of_gravity + stem_shape.center_of_gravity) / 2
        block.center_of_gravity = cog
        # The reference sets friction on the body, where pymunk ignores it: contacts are
        # frictionless (shape friction 0). Reproduced by leaving the shapes' friction at 0.
        space.add(block, bar_shape, stem_shape)
        space.on_collision(0, 0, post_solve=self._count_contacts)
        self.space, self.agent, self.block = space, agent, block

    def _count_contacts(self, arbiter: pymunk.Arbiter, space: pymunk.Space, data: Any) -> None:
        # The point count straight from Chipmunk: building pymunk's ContactPointSet per contact
        # would cost a third of a step.
        self._n_contact_points += chipmunk_lib.cpArbiterGetCount(arbiter._arbiter)

    def get_state(self) -> np.ndarray:
        """The 5-d state: agent x, y, block origin x, y, block angle (unwrapped)."""
        a, b = self.agent.position, self.block.position
        return np.array([a.x, a.y, b.x, b.y, self.block.angle], dtype=np.float64)

    def get_velocities(self) -> np.ndarray:
        """Agent vx, vy, block vx, vy, block angular velocity."""
        a, b = self.agent.velocity, self.block.velocity
        return np.array([a.x, a.y, b.x, b.y, self.block.angular_velocity], dtype=np.float64)

    def set_state(self, state: np.ndarray, velocities: np.ndarray | None = None) -> None:
        """Place the env exactly at ``state`` (read-back error < 1e-13), without a physics step.

        pymunk rotates a body about its centre of gravity, so the angle is set before the position.
        The moved shapes are deliberately not reindexed, as in the reference: reindexing changes
        the order in which Chipmunk solves simultaneous contacts, and with it the replay of the
        recorded episodes (eval/results/pusht_fidelity.md).
        """
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (5,) or not np.all(np.isfinite(state)):
            raise ValueError(f"state must be 5 finite values, got {state!r}")
        self._build_space()
        self.agent.position = (state[0], state[1])
        self.block.angle = state[4]
        self.block.position = (state[2], state[3])
        if velocities is not None:
            v = np.asarray(velocities, dtype=np.float64)
            self.agent.velocity = (v[0], v[1])
            self.block.velocity = (v[2], v[3])
            self.block.angular_velocity = v[4]

    def _set_state_legacy(self, state: np.ndarray) -> None:
        """The reference's seeded-reset setter: position, then angle, then one physics step."""
        self._build_space()
        self.agent.position = (float(state[0]), float(state[1]))
        self.block.position = (float(state[2]), float(state[3]))
        self.block.angle = float(state[4])
        self.space.step(1.0 / SIM_HZ)

    @staticmethod
    def initial_state(seed: int) -> np.ndarray:
        """The reference's initial state for ``seed`` (before its legacy setter is applied)."""
        rs = np.random.RandomState(seed=seed)
        return np.array(
            [
                rs.randint(*RESET_AGENT_RANGE),
                rs.randint(*RESET_AGENT_RANGE),
                rs.randint(*RESET_BLOCK_RANGE),
                rs.randint(*RESET_BLOCK_RANGE),
                rs.randn() * 2 * np.pi - np.pi,
            ],
            dtype=np.float64,
        )

    # --- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.latest_action = None
        self._n_contact_points = 0
        if options and options.get("state") is not None:
            self.set_state(np.asarray(options["state"], dtype=np.float64))
        else:
            if seed is None:
                seed = int(self.np_random.integers(0, 2**31 - 1))
            self._set_state_legacy(self.initial_state(seed))
        return self._get_obs(), self._get_info(self._coverage())

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 2 finite values (target x, y), got {action!r}")
        self.latest_action = action
        self._n_contact_points = 0
        dt = 1.0 / SIM_HZ
        tx, ty = float(action[0]), float(action[1])
        agent, step = self.agent, self.space.step
        for _ in range(SIM_HZ // CONTROL_HZ):
            (px, py), (vx, vy) = agent.position, agent.velocity
            agent.velocity = (
                vx + (K_P * (tx - px) - K_V * vx) * dt,
                vy + (K_P * (ty - py) - K_V * vy) * dt,
            )
            step(dt)
        coverage = self._coverage()
        reward = float(np.clip(coverage / SUCCESS_THRESHOLD, 0.0, 1.0))
        terminated = coverage > SUCCESS_THRESHOLD
        return self._get_obs(), reward, terminated, False, self._get_info(coverage)

    def _coverage(self) -> float:
        # The block rests between pushes (zero damping), so its pose often repeats.
        b = self.block.position
        pose = (b.x, b.y, self.block.angle)
        if pose != self._coverage_cache[0]:
            self._coverage_cache = (pose, coverage_of(np.array(pose), self.goal_geometry))
        return self._coverage_cache[1]

    def _get_info(self, coverage: float) -> dict:
        return {
            "coverage": coverage,
            "is_success": coverage > SUCCESS_THRESHOLD,
            # Diffusion Policy's dataset field: contact points per physics step, rounded up.
            "n_contacts": math.ceil(self._n_contact_points / (SIM_HZ // CONTROL_HZ)),
            "state": self.get_state(),
        }

    def _get_obs(self) -> dict:
        state = self.get_state()
        state[4] = state[4] % (2 * np.pi)
        if self.obs_type == "state":
            return {"state": state.astype(np.float32)}
        if self.obs_type == "state_sincos":
            return {"state_sincos": state_sincos_obs(state)}
        if self.obs_type == "keypoints":
            return {"keypoints": keypoint_obs(state)}
        return {
            "image": render_state(state, self.render_size, goals=self.goals),
            "agent_pos": state[:2].astype(np.float32),
        }

    def render(self) -> np.ndarray:
        """An RGB frame (video_size x video_size) with the latest action marked by a red cross."""
        return render_state(self.get_state(), self.video_size, self.latest_action, self.goals)


def render_state(
    state: np.ndarray,
    size: int,
    action: np.ndarray | None = None,
    goals: tuple[tuple[float, float, float], ...] = (GOAL_POSE,),
) -> np.ndarray:
    """Draw a 5-d state as an RGB uint8 image of ``size`` x ``size`` (the reference's look), with
    the goal pose(s) filled in."""
    shift = 4  # sub-pixel precision of the cv2 drawing calls, in bits
    scale = size / WINDOW_SIZE * (1 << shift)
    img = np.full((size, size, 3), COLOR_BACKGROUND, dtype=np.uint8)

    def fixed(points: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(points) * scale).astype(np.int32)

    for goal in goals:
        for part in tee_polygons(*goal):
            cv2.fillPoly(img, [fixed(part)], COLOR_GOAL, cv2.LINE_AA, shift)
    wall_px = max(1, round(2 * WALL_RADIUS * size / WINDOW_SIZE))
    for a, b in WALLS:
        p, q = fixed(a), fixed(b)
        cv2.line(
            img,
            tuple(int(v) for v in p),
            tuple(int(v) for v in q),
            COLOR_WALL,
            wall_px,
            cv2.LINE_AA,
            shift,
        )
    outline_px = max(1, round(4 * size / WINDOW_SIZE))
    block = [fixed(p) for p in tee_polygons(float(state[2]), float(state[3]), float(state[4]))]
    cv2.fillPoly(img, block, COLOR_BLOCK_FILL, cv2.LINE_AA, shift)
    cv2.polylines(img, block, True, COLOR_BLOCK, outline_px, cv2.LINE_AA, shift)
    center = tuple(int(v) for v in fixed(state[:2]))
    radius = round(AGENT_RADIUS * scale)
    cv2.circle(img, center, radius, COLOR_AGENT, -1, cv2.LINE_AA, shift)
    inner = round((AGENT_RADIUS - 4) * scale)
    cv2.circle(img, center, inner, COLOR_AGENT_FILL, -1, cv2.LINE_AA, shift)
    if action is not None:
        coord = tuple(int(v) for v in np.asarray(action) / WINDOW_SIZE * size)
        cv2.drawMarker(
            img, coord, COLOR_ACTION, cv2.MARKER_CROSS, max(3, size // 12), max(1, size // 96)
        )
    return img
