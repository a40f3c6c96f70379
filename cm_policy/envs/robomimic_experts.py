"""Scripted experts for robomimic's Lift, Can and Square, and the episodes they play.

Neither robosuite nor robomimic ships scripted experts, and robomimic's human datasets cannot be
downloaded here, so demonstrations are made by waypoint state machines that read the privileged
object poses from the simulator: approach above the object, descend, grasp, lift, carry (to the
bin, over the peg), release. Each episode draws its own waypoint offsets, approach heights, speeds,
grasp pauses and a little action noise, so that trajectories vary as human demos do. Actions are
robosuite's 7-D delta OSC_POSE commands, as in robomimic's datasets. This module plays episodes
(:func:`run_expert`, :func:`expert_episodes`) and stores nothing: the dataset writer,
:func:`cm_policy.data.robomimic_demos.generate_robomimic_dataset`, keeps the successful ones.

Recovery demonstrations (``recovery=`` of :func:`expert_episodes`): a policy that drifts
a few centimetres off the expert's path meets states no clean demonstration visits. A recovery
attempt runs the expert unrecorded from the initial state to a random moment of its task, pushes
the gripper off course for a few steps (a random displacement of 3-10 cm, the gripper's
orientation and fingers as the expert wants them), and records only what follows: the expert
bringing the task back on track from the disturbed state to success. The recorded actions are the
ones executed, so the demos replay exactly, and no label is ever a disturbance.

A second kind (``recovery_kind="regrasp"``, Lift and Can) starts from a missed grasp: the expert,
unrecorded, descends beside the object (6-9 cm across the fingers' closing axis), closes the
fingers on nothing and lifts the empty gripper a few steps; the recording starts there, with the
expert opening the fingers, going back above the object and grasping it. A policy that closes
short of the object otherwise meets a state (fingers closed, object on the table) that no
demonstration shows a way out of.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cm_policy.envs.robosuite_env import (
    ARM,
    RobosuiteEnv,
    matrix_to_axis_angle,
)

# robosuite's OSC_POSE turns a rotation action of 1 into 0.5 rad (robomimic's controller; a
# position action of 1 into 5 cm).
ROT_SCALE = 0.5
OPEN, CLOSED = -1.0, 1.0
# The gripper's "down" orientation: fingers close along world y, the approach axis points down.
DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
# Where the Can expert drops the can: this far inside the near corner of the can's bin (m).
BIN_MARGIN = np.array([0.045, 0.055])
# The Panda's last (wrist) joint range is +-2.9 rad; the Square expert keeps this margin inside.
WRIST_LIMIT = 2.75
MAX_TURN = 1.0  # rad: how far ahead of the gripper's yaw a turning goal is set
# Expert episodes end at the task's success or after these many steps (failed attempts).
EXPERT_MAX_STEPS = {"lift": 200, "can": 400, "square": 400}
# Recovery attempts: the disturbance starts after a uniform draw of [10, PUSH_BEFORE[task]) expert
# steps, once the expert is not holding still to close or open its fingers; it lasts 3-6 steps
# and moves the gripper's target 3-10 cm in a random direction (downward at most a little: a push
# into the table only makes a failed attempt). An attempt with fewer than MIN_RECORDED of its
# steps left after the push records nothing.
PUSH_BEFORE = {"lift": 30, "can": 110, "square": 130}
PUSH_STEPS = (3, 7)
PUSH_DISTANCE = (0.03, 0.10)
POSITION_SCALE = 0.05  # m of target motion per unit of position action (OSC_POSE)
MIN_RECORDED = 10
RECOVERY_KINDS = ("push", "regrasp")
# Missed grasps: the grasp point moved this far (m) across the fingers' closing axis (clear of the
# object: the can's radius is ~3.3 cm, a finger ~2 cm wide), then this many steps of lifting the
# empty gripper before the retry.
MISS_DISTANCE = (0.06, 0.09)
MISS_LIFT_STEPS = (0, 9)
REGRASP_TASKS = ("lift", "can")


def yaw_of_quat_wxyz(quat: np.ndarray) -> float:
    w, x, y, z = (float(v) for v in quat)
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def wrap(angle: float, period: float) -> float:
    """``angle`` shifted by multiples of ``period`` into [-period/2, period/2)."""
    return (angle + period / 2) % period - period / 2


def rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def gripper_yaw(rotation: np.ndarray) -> float:
    """The yaw of a gripper orientation relative to :data:`DOWN` (its x axis is world y)."""
    x_axis = rotation[:, 0]
    return math.atan2(-x_axis[0], x_axis[1])


@dataclass
class Style:
    """The per-episode randomisation of an expert."""

    speed: float  # largest position action (fraction of 5 cm per step)
    gain: float  # position action per metre of error (an action of 1 moves the target 5 cm)
    approach_height: float  # above the grasp point before descending (m)
    grasp_offset: np.ndarray  # added to the grasp point (m)
    close_steps: int  # steps holding still while the fingers close
    release_steps: int
    carry_height: float  # lift / carry height above the task's reference (m)
    noise: float  # std of the Gaussian noise on position actions
    place_offset: np.ndarray = field(default_factory=lambda: np.zeros(2))

    @classmethod
    def draw(cls, rng: np.random.Generator, task: str) -> Style:
        grasp_xy = {"lift": 0.004, "can": 0.004, "square": 0.003}[task]
        return cls(
            speed=float(rng.uniform(0.5, 1.0)),
            gain=float(rng.uniform(8.0, 14.0)),
            approach_height=float(rng.uniform(0.05, 0.12)),
            grasp_offset=np.array(
                [*rng.uniform(-grasp_xy, grasp_xy, 2), rng.uniform(-0.005, 0.005)]
            ),
            close_steps=int(rng.integers(6, 11)),
            release_steps=int(rng.integers(5, 9)),
            carry_height=float(rng.uniform(0.0, 0.05)),
            noise=float(rng.uniform(0.0, 0.08)),
            place_offset=rng.uniform(-0.02, 0.02, 2),
        )


class WaypointExpert:
    """Base class: servo the gripper to a target position and yaw; phases live in subclasses."""

    task = ""
    # Phases in which the expert holds still to close or open the fingers: never disturbed.
    hold_phases: frozenset[int] = frozenset({2})

    def __init__(self, env: RobosuiteEnv, rng: np.random.Generator):
        if env.abs_action:
            raise ValueError(
                "the scripted experts command delta actions: build the env without abs_action"
            )
        self.env = env
        self.rng = rng
        self.style = Style.draw(rng, self.task)
        self.phase = 0
        self.phase_steps = 0
        self.grip = OPEN

    # --- simulator reads (privileged) ---------------------------------------------------------
    @property
    def sim(self) -> Any:
        return self.env.sim_env.sim

    def eef_pos(self) -> np.ndarray:
        return np.array(self.sim.data.site_xpos[self.env.sim_env.robots[0].eef_site_id[ARM]])

    def eef_rot(self) -> np.ndarray:
        site = self.env.sim_env.robots[0].eef_site_id[ARM]
        return np.array(self.sim.data.site_xmat[site]).reshape(3, 3)

    def body_pos(self, body_id: int) -> np.ndarray:
        return np.array(self.sim.data.body_xpos[body_id])

    def body_yaw(self, body_id: int) -> float:
        return yaw_of_quat_wxyz(self.sim.data.body_xquat[body_id])

    # --- control ------------------------------------------------------------------------------
    def servo(self, target: np.ndarray, yaw: float) -> tuple[np.ndarray, float]:
        """A delta action towards ``target`` and the gripper yaw; also the position error."""
        error = target - self.eef_pos()
        move = error * self.style.gain
        norm = np.linalg.norm(move)
        if norm > self.style.speed:
            move *= self.style.speed / norm
        move = move + self.rng.normal(0.0, self.style.noise, 3) * min(1.0, norm)
        goal = rot_z(yaw) @ DOWN
        rot_error = matrix_to_axis_angle(goal @ self.eef_rot().T)
        turn = np.clip(rot_error / ROT_SCALE, -1.0, 1.0)
        action = np.concatenate([np.clip(move, -1.0, 1.0), turn, [self.grip]])
        return action, float(np.linalg.norm(error))

    def next_phase(self) -> None:
        self.phase += 1
        self.phase_steps = 0

    def act(self) -> np.ndarray:
        action = self.policy()
        self.phase_steps += 1
        return action

    def policy(self) -> np.ndarray:
        raise NotImplementedError

    def grasp_point(self) -> np.ndarray:
        """Where to grasp the object now (objects settle during the first steps)."""
        raise NotImplementedError

    def grasp_sequence(self, yaw: float, lift_to: float) -> np.ndarray | None:
        """Phases 0-3: above the object, descend, close, lift; None once lifted. The grasp
        point follows the object until the fingers start closing."""
        s = self.style
        p = self.phase
        if p < 2:
            self.grasp = self.grasp_point()
        target = self.grasp + s.grasp_offset
        if p == 0:  # above the object, turning to the grasp yaw
            self.grip = OPEN
            above = target + np.array([0.0, 0.0, s.approach_height])
            action, err = self.servo(above, yaw)
            yaw_err = abs(wrap(gripper_yaw(self.eef_rot()) - yaw, 2 * math.pi))
            if (err < 0.015 and yaw_err < 0.08) or self.phase_steps > 80:
                self.next_phase()
            return action
        if p == 1:  # straight down to the grasp point
            action, err = self.servo(target, yaw)
            if err < 0.012 or self.phase_steps > 40:
                self.next_phase()
            return action
        if p == 2:  # close the fingers, holding still
            self.grip = CLOSED
            action, _ = self.servo(target, yaw)
            if self.phase_steps >= s.close_steps:
                self.next_phase()
            return action
        if p == 3:  # lift
            lifted = np.array([*target[:2], lift_to])
            action, err = self.servo(lifted, yaw)
            if err < 0.02 or self.phase_steps > 60:
                self.next_phase()
            return action
        return None


class LiftExpert(WaypointExpert):
    """Grasp the cube (yaw matched modulo 90 degrees) and lift it."""

    task = "lift"

    def __init__(self, env: RobosuiteEnv, rng: np.random.Generator):
        super().__init__(env, rng)
        self.cube = env.sim_env.cube_body_id
        self.yaw = wrap(self.body_yaw(self.cube), math.pi / 2)
        self.grasp = self.grasp_point()

    def grasp_point(self) -> np.ndarray:
        return self.body_pos(self.cube)

    def policy(self) -> np.ndarray:
        lift_to = self.grasp[2] + 0.12 + self.style.carry_height
        action = self.grasp_sequence(self.yaw, lift_to)
        if action is None:  # hold up high until the episode ends
            action, _ = self.servo(np.array([*self.grasp[:2], lift_to]), self.yaw)
        return action


class CanExpert(WaypointExpert):
    """Grasp the can from above, carry it over its bin, lower, release and retreat upwards."""

    task = "can"
    hold_phases = frozenset({2, 6})

    def __init__(self, env: RobosuiteEnv, rng: np.random.Generator):
        super().__init__(env, rng)
        sim_env = env.sim_env
        self.can = sim_env.obj_body_id["Can"]
        self.grasp = self.grasp_point()
        self.yaw = float(rng.uniform(-0.3, 0.3))  # a cylinder: any yaw grasps it
        # The can's bin spans x in [bin2_x, bin2_x + w/2], y in [bin2_y, bin2_y + d/2]; its centre
        # (robosuite's target placement) is at the edge of the Panda's reach, so the expert aims
        # at the bin's quarter nearest to the robot.
        corner = np.asarray(sim_env.bin2_pos[:2], dtype=np.float64)
        self.bin_xy = corner + BIN_MARGIN + self.style.place_offset * 0.75
        self.bin_z = float(sim_env.bin2_pos[2])

    def grasp_point(self) -> np.ndarray:
        return self.body_pos(self.can)

    def policy(self) -> np.ndarray:
        s = self.style
        carry_z = self.bin_z + 0.17 + s.carry_height
        action = self.grasp_sequence(self.yaw, carry_z)
        if action is not None:
            return action
        p = self.phase - 4
        if p == 0:  # carry over the bin
            action, err = self.servo(np.array([*self.bin_xy, carry_z]), self.yaw)
            if err < 0.025 or self.phase_steps > 80:
                self.next_phase()
            return action
        if p == 1:  # lower into the bin
            action, err = self.servo(np.array([*self.bin_xy, self.bin_z + 0.1]), self.yaw)
            if err < 0.02 or self.phase_steps > 40:
                self.next_phase()
            return action
        if p == 2:  # release
            self.grip = OPEN
            action, _ = self.servo(np.array([*self.bin_xy, self.bin_z + 0.1]), self.yaw)
            if self.phase_steps >= s.release_steps:
                self.next_phase()
            return action
        action, _ = self.servo(np.array([*self.bin_xy, carry_z]), self.yaw)  # retreat
        return action


class SquareExpert(WaypointExpert):
    """Grasp the square nut by its handle, square it to the peg, lower it over the peg, release."""

    task = "square"
    hold_phases = frozenset({2, 6})

    def __init__(self, env: RobosuiteEnv, rng: np.random.Generator):
        super().__init__(env, rng)
        sim_env = env.sim_env
        nut = sim_env.nuts[0]
        self.nut = sim_env.obj_body_id[nut.name]
        self.handle_site = self.sim.model.site_name2id(nut.important_sites["handle"])
        self.peg = np.array(self.sim.data.body_xpos[sim_env.peg1_body_id])
        # Fingers close across the handle, which runs along the nut's x axis.
        self.yaw = wrap(self.body_yaw(self.nut), math.pi)
        self.style.grasp_offset[:2] *= 0.5
        self.grasp = self.grasp_point()
        self.carry_yaw: float | None = None
        self.yaw_now = 0.0

    def grasp_point(self) -> np.ndarray:
        return np.array(self.sim.data.site_xpos[self.handle_site])

    def plan_carry_yaw(self) -> float:
        """The gripper yaw to carry the nut at: the nut turned so that its handle points towards
        the robot (the peg is near the edge of the arm's reach, and the gripper holds the handle,
        5 cm from the nut's centre), else sideways, within the wrist joint's range."""
        nut_yaw = self.body_yaw(self.nut)
        yaw = gripper_yaw(self.eef_rot())
        robot = self.env.sim_env.robots[0]
        wrist = float(self.sim.data.qpos[robot._ref_joint_pos_indexes][-1])
        for nut_target in (math.pi, math.pi / 2, -math.pi / 2):
            turn = wrap(nut_target - nut_yaw, 2 * math.pi)
            # The wrist joint turns against the gripper's yaw (about one for one, pointing down).
            for candidate in sorted((turn, turn - 2 * math.pi, turn + 2 * math.pi), key=abs):
                if abs(wrist - candidate) < WRIST_LIMIT:
                    return yaw + candidate
        return yaw

    def policy(self) -> np.ndarray:
        s = self.style
        peg_top = self.peg[2] + 0.1
        carry_z = peg_top + 0.08 + s.carry_height
        action = self.grasp_sequence(self.yaw, carry_z)
        if action is not None:
            return action
        p = self.phase - 4
        if self.carry_yaw is None:
            self.carry_yaw = self.plan_carry_yaw()
            self.yaw_now = gripper_yaw(self.eef_rot())
        # The planned turn can exceed 180 degrees, where the shortest rotation to the goal would
        # turn the wrist the other way into its limit: follow the yaw unwrapped, and servo to a
        # goal at most MAX_TURN ahead along the planned direction.
        self.yaw_now += wrap(gripper_yaw(self.eef_rot()) - self.yaw_now, 2 * math.pi)
        yaw_goal = self.yaw_now + float(np.clip(self.carry_yaw - self.yaw_now, -MAX_TURN, MAX_TURN))
        # Where the gripper must be for the nut's centre to sit on the peg axis.
        offset = self.eef_pos()[:2] - self.body_pos(self.nut)[:2]
        over_peg = self.peg[:2] + offset
        if p == 0:  # carry over the peg, squaring the nut
            action, err = self.servo(np.array([*over_peg, carry_z]), yaw_goal)
            nut_err = np.linalg.norm(self.body_pos(self.nut)[:2] - self.peg[:2])
            if (err < 0.01 and nut_err < 0.004) or self.phase_steps > 150:
                self.next_phase()
            return action
        if p == 1:  # lower the nut down the peg
            nut_z = self.body_pos(self.nut)[2]
            lower = np.array([*over_peg, self.eef_pos()[2] - 0.03])
            action, _ = self.servo(lower, yaw_goal)
            if nut_z < self.peg[2] - 0.01 or self.phase_steps > 80:
                self.next_phase()
            return action
        if p == 2:  # release
            self.grip = OPEN
            action, _ = self.servo(self.eef_pos(), gripper_yaw(self.eef_rot()))
            if self.phase_steps >= s.release_steps:
                self.next_phase()
            return action
        up = np.array([*self.eef_pos()[:2], carry_z])
        action, _ = self.servo(up, gripper_yaw(self.eef_rot()))
        return action


EXPERTS: dict[str, type[WaypointExpert]] = {
    "lift": LiftExpert,
    "can": CanExpert,
    "square": SquareExpert,
}


@dataclass
class ExpertEpisode:
    seed: int
    success: bool
    states: np.ndarray
    actions: np.ndarray
    obs: dict[str, np.ndarray]
    next_obs: dict[str, np.ndarray]
    rewards: np.ndarray
    dones: np.ndarray
    model_xml: str
    recovery: bool = False  # a recovery attempt (run_expert's ``recovery``)
    recovery_kind: str = "push"  # which disturbance a recovery attempt starts from
    # Recovery attempts: unrecorded env steps (expert + push) before the first recorded state.
    recorded_from: int = 0

    @property
    def n_steps(self) -> int:
        return len(self.actions)

    @classmethod
    def failed(cls, seed: int, env: RobosuiteEnv, recovery_kind: str) -> ExpertEpisode:
        """An attempt that recorded nothing (a recovery attempt that succeeded or ran out of
        steps before its disturbance ended)."""
        empty = np.zeros((0,))
        model_xml = env.get_model_xml()
        return cls(
            seed,
            False,
            empty,
            empty,
            {},
            {},
            empty,
            empty,
            model_xml,
            recovery=True,
            recovery_kind=recovery_kind,
        )

    def attrs(self) -> dict[str, Any]:
        """The demo attributes it is written with: its initial state's seed and, for a recovery
        demo, its kind and the unrecorded steps before its first state."""
        if not self.recovery:
            return {"seed": self.seed}
        return {
            "seed": self.seed,
            "recorded_from": self.recorded_from,
            "recovery_kind": self.recovery_kind,
        }


def _stack(frames: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]}


def push_off_course(expert: WaypointExpert, rng: np.random.Generator) -> int | None:
    """Run ``expert`` unrecorded to a random moment, then disturb the gripper (see the module
    docstring). Returns the env steps taken, or None when the task already succeeded."""
    env = expert.env
    start = int(rng.integers(10, PUSH_BEFORE[env.task]))
    steps = 0
    while steps < start or expert.phase in expert.hold_phases:
        steps += 1
        if env.step(expert.act())[4]["is_success"]:
            return None
    n_push = int(rng.integers(*PUSH_STEPS))
    direction = rng.normal(size=3)
    direction[2] = rng.uniform(-0.2, 0.6) * np.linalg.norm(direction[:2])
    direction /= np.linalg.norm(direction)
    move = direction * rng.uniform(*PUSH_DISTANCE) / n_push / POSITION_SCALE
    for _ in range(n_push):
        action = expert.act()
        action[:3] = move
        steps += 1
        if env.step(action)[4]["is_success"]:
            return None
    return steps


def check_recovery_kind(task: str, recovery_kind: str, recovery: bool = True) -> None:
    """Raise a clear error unless ``recovery_kind`` is a known kind and, where there are recovery
    attempts (``recovery``), one that exists for ``task``."""
    if recovery_kind not in RECOVERY_KINDS:
        raise ValueError(f"recovery_kind must be one of {RECOVERY_KINDS}, got {recovery_kind!r}")
    if recovery and recovery_kind == "regrasp" and task not in REGRASP_TASKS:
        raise ValueError(f"regrasp recovery demos exist for {REGRASP_TASKS}, not {task!r}")


def miss_grasp(expert: WaypointExpert, rng: np.random.Generator) -> int | None:
    """Run ``expert`` unrecorded through a grasp beside the object (see the module docstring),
    lift the empty gripper a few steps, and set the expert back to its first phase, so that it
    retries. Returns the env steps taken, or None when the task succeeded all the same."""
    env = expert.env
    check_recovery_kind(env.task, "regrasp")
    keep = expert.style.grasp_offset
    # The fingers close along the gripper's x axis, which DOWN turned by the grasp yaw puts
    # along world y: across it is the turned world x.
    across = rot_z(expert.yaw) @ np.array([1.0, 0.0, 0.0])
    distance = rng.uniform(*MISS_DISTANCE) * rng.choice([-1.0, 1.0])
    expert.style.grasp_offset = keep + across * distance
    lift_steps = int(rng.integers(*MISS_LIFT_STEPS))
    steps = 0
    while expert.phase < 3 or expert.phase_steps < lift_steps:
        steps += 1
        if env.step(expert.act())[4]["is_success"]:
            return None
        if expert.phase > 3:  # lifted all the way before the draw's steps ran out
            break
    expert.style.grasp_offset = keep
    expert.phase, expert.phase_steps = 0, 0
    return steps


def run_expert(
    env: RobosuiteEnv,
    seed: int,
    max_steps: int | None = None,
    recovery: bool = False,
    recovery_kind: str = "push",
) -> ExpertEpisode:
    """One expert episode from initial state ``seed`` (expert randomness seeded by it too).

    With ``recovery`` the recording starts after an unrecorded disturbance: a push off course
    (``recovery_kind="push"``, :func:`push_off_course`) or a missed grasp (``"regrasp"``,
    :func:`miss_grasp`); ``max_steps`` bounds the whole episode, disturbance included.
    """
    check_recovery_kind(env.task, recovery_kind, recovery)
    env.reset(seed=seed)
    expert = EXPERTS[env.task](env, np.random.default_rng([seed, 1]))
    max_steps = max_steps or EXPERT_MAX_STEPS[env.task]
    recorded_from = 0
    if recovery:
        disturb = push_off_course if recovery_kind == "push" else miss_grasp
        pushed = disturb(expert, np.random.default_rng([seed, 2]))
        if pushed is None or pushed > max_steps - MIN_RECORDED:
            return ExpertEpisode.failed(seed, env, recovery_kind)
        recorded_from = pushed
    states, actions, rewards, frames = [], [], [], [env.full_obs()]
    success = False
    for _ in range(max_steps - recorded_from):
        states.append(env.get_state())
        action = expert.act()
        _, reward, _, _, info = env.step(action)
        actions.append(action)
        rewards.append(reward)
        frames.append(env.full_obs())
        if info["is_success"]:  # robomimic's demos also end at success
            success = True
            break
    n = len(actions)
    dones = np.zeros(n, dtype=np.int64)
    dones[-1] = int(success)
    return ExpertEpisode(
        seed=seed,
        success=success,
        states=np.asarray(states),
        actions=np.asarray(actions),
        obs=_stack(frames[:-1]),
        next_obs=_stack(frames[1:]),
        rewards=np.asarray(rewards, dtype=np.float64),
        dones=dones,
        model_xml=env.get_model_xml(),
        recovery=recovery,
        recovery_kind=recovery_kind,
        recorded_from=recorded_from,
    )


def is_recovery_attempt(index: int, recovery: float) -> bool:
    """Whether attempt ``index`` is a recovery attempt, for a fraction ``recovery`` of attempts
    spread evenly (0: none, 0.5: every other one, 1: all)."""
    return math.floor((index + 1) * recovery) > math.floor(index * recovery)


def expert_episodes(
    task: str,
    seeds: range,
    images: bool = False,
    recovery: float = 0.0,
    recovery_kind: str = "push",
) -> Iterator[ExpertEpisode]:
    """Expert attempts on consecutive seeds in one env (successful or not); the fraction
    ``recovery`` of them are recovery attempts of ``recovery_kind`` (:func:`run_expert`)."""
    if not 0.0 <= recovery <= 1.0:
        raise ValueError(f"recovery is a fraction of attempts in [0, 1], got {recovery}")
    check_recovery_kind(task, recovery_kind, recovery > 0)  # before the env is built
    env = RobosuiteEnv(task=task, obs_type="image" if images else "lowdim")
    try:
        for i, seed in enumerate(seeds):
            recover = is_recovery_attempt(i, recovery)
            yield run_expert(env, seed, recovery=recover, recovery_kind=recovery_kind)
    finally:
        env.close()
