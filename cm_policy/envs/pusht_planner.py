"""Offline PushT demonstrations from a greedy push planner with simulated lookahead.

Each stroke of the planner is a travel around the block to a contact point, then a push. To pick
one, it ranks pushes at points of the T's outline with a first-order (impulse) model of
frictionless quasi-static pushing, simulates the most promising ones from a teleported start in a
scratch :class:`PushTEnv`, re-simulates the best few as whole strokes from the exact real state
(tuning the push depth there), and executes the best in the real env. It replans after every
stroke, so what the scratch simulation misses does not add up. Speeds, clearances and
tie-breaking are drawn per episode, so the demonstrations vary.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing as mp
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import shapely
import shapely.geometry as sg
from tqdm import tqdm

from cm_policy.envs.pusht import (
    AGENT_RADIUS,
    GOAL_POSE,
    WINDOW_SIZE,
    PushTEnv,
    block_keypoints,
    render_state,
    tee_geometry,
)

# --- Planner constants ------------------------------------------------------------------------
OUTLINE = np.array(tee_geometry(0.0, 0.0, 0.0).exterior.coords[:-1])  # block frame, clockwise
GOAL = np.array(GOAL_POSE)
CONTACT_SPACING = 7.5  # px between candidate contact points along an edge
PRE_CONTACT_GAP = 3.0  # px between the agent and the block where a push starts
PUSH_ANGLES = np.deg2rad([-25.0, 0.0, 25.0])  # push direction offsets from the inward normal
# First-order ranking: angle error is weighted like the displacement of a point this far from the
# centre of gravity (about the T's mean vertex radius), so rotation and translation trade off.
ANGLE_WEIGHT = 55.0  # px per rad
# The pose error adds this much per rad of angle error to the outline distance, which alone goes
# flat when the T is upside down (a greedy planner would then stall there) and undervalues how
# much pushing a rotation takes.
ANGLE_SLOPE = 30.0  # px per rad
N_SIMULATED = 24  # candidate pushes simulated per stroke (the rest are pruned by the model)
N_VERIFIED = 3  # best simulated pushes re-simulated as whole strokes from the real state
PUSH_OVERSHOOT = 1.6  # simulate pushes longer than the model's optimum; prefixes cover shorter
MIN_PUSH, MAX_PUSH = 4.0, 90.0  # px of agent travel along a simulated push
PUSH_SIM_STEPS = 8  # control steps a simulated push takes (sets its speed, capped per episode)
MIN_PUSH_SPEED = 1.5  # px per control step, for the final sub-pixel corrections
BRAKE_GAIN = 0.35  # travel speed <= this x remaining distance: the lagging agent arrives settled
MIN_APPROACH_SPEED = 4.0  # px per control step: the approach to a fine push need not crawl
DEPTH_SEARCH_MOVES = 4  # pattern-search moves on the push depth in exact rollouts
TOUCH_TOLERANCE = 0.5  # px: closer than this to the block counts as touching it
TRAVEL_RETRIES = 3  # halvings of the travel speed tried when the agent would clip the block
BACK_OFF = 10.0  # px the agent target steps back from the block at the end of a stroke
HOLD_STEPS = 1  # control steps holding the last push target, so the push ends where planned
# A control step is worth this fraction of the current pose error when choosing a stroke: time
# matters far from the goal, while the last sub-pixel corrections may take as long as they need.
STEP_COST = 0.01
NO_PROGRESS_STROKES = 6  # give up after this many strokes without a new best pose error
DATASET_IMAGE_SIZE = 96  # px, the image size of Diffusion Policy's PushT dataset


@dataclass(frozen=True)
class Style:
    """Per-episode demonstrator style, drawn at random so that demonstrations vary."""

    travel_speed: float  # px per control step while travelling around the block
    max_push_speed: float  # px per control step while pushing
    clearance: float  # px kept between the agent and the block while travelling
    temperature: float  # spread of the random choice among near-best strokes, px of pose error

    @staticmethod
    def draw(rng: np.random.Generator) -> Style:
        return Style(
            travel_speed=float(rng.uniform(14.0, 24.0)),
            max_push_speed=float(rng.uniform(6.0, 10.0)),
            clearance=float(rng.uniform(6.0, 12.0)),
            temperature=float(rng.uniform(0.05, 0.2)),
        )


@dataclass
class PlannedEpisode:
    """One planned episode in the schema of Diffusion Policy's PushT zarr; states are recorded
    before their actions."""

    seed: int
    state: np.ndarray  # (T, 5) float32: agent xy, block xy, block angle
    keypoint: np.ndarray  # (T, 9, 2) float32
    img: np.ndarray | None  # (T, S, S, 3) float32 in 0..255, None when not rendered
    action: np.ndarray  # (T, 2) float32: agent targets
    n_contacts: np.ndarray  # (T, 1) float32
    success: bool
    max_coverage: float
    goal: int = 0  # index of the goal planned for, among the goals a generator was given

    @property
    def n_steps(self) -> int:
        return len(self.action)


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def wrap_angle(angle: np.ndarray | float) -> np.ndarray | float:
    """``angle`` (radians) wrapped into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _outline_at(block_pose: np.ndarray) -> np.ndarray:
    """World-frame outline vertices (8, 2) of the T at ``block_pose``."""
    return OUTLINE @ _rotation(float(block_pose[2])).T + block_pose[:2]


def pose_error(block_pose: np.ndarray, goal: np.ndarray = GOAL) -> float:
    """Mean distance (px) of the T's outline vertices from where they are at the goal, plus a
    term linear in the angle error (see ``ANGLE_SLOPE``)."""
    vertices = GOAL_VERTICES if goal is GOAL else _outline_at(goal)
    vertex_error = np.linalg.norm(_outline_at(block_pose) - vertices, axis=1).mean()
    return float(vertex_error + ANGLE_SLOPE * abs(wrap_angle(float(block_pose[2]) - goal[2])))


def _contact_points() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-frame contact points, outward normals, and whether each is a convex corner."""
    tee = sg.Polygon(OUTLINE)
    points, normals, corners = [], [], []
    n_vertices = len(OUTLINE)
    for i in range(n_vertices):
        a, b = OUTLINE[i], OUTLINE[(i + 1) % n_vertices]
        edge = b - a
        length = float(np.linalg.norm(edge))
        # The outline is clockwise in a y-up frame, so the outward normal is the edge turned left.
        normal = np.array([-edge[1], edge[0]]) / length
        n_points = int(length // CONTACT_SPACING)
        for t in (np.arange(n_points) + 0.5) / n_points:
            points.append(a + t * edge)
            normals.append(normal)
            corners.append(False)
        prev = OUTLINE[i - 1]
        bisector = (a - prev) / np.linalg.norm(a - prev) - edge / length
        if _cross(a - prev, edge) < 0:  # a convex vertex: push it from outside along the bisector
            points.append(a)
            normals.append(bisector / np.linalg.norm(bisector))
            corners.append(True)
    points, normals = np.array(points), np.array(normals)
    # Keep points whose pre-contact disc fits outside the T (not deep in its inner corners).
    starts = points + normals * (AGENT_RADIUS + PRE_CONTACT_GAP)
    clearance = shapely.distance(tee, shapely.points(starts))
    keep = clearance >= AGENT_RADIUS + PRE_CONTACT_GAP - 0.5
    return points[keep], normals[keep], np.array(corners)[keep]


def _block_inertia() -> tuple[float, float, np.ndarray]:
    """Mass, moment about the centre of gravity, and block-frame centre of gravity of the T, read
    from the env's body so that the reference's quirks in them carry over."""
    body = PushTEnv().block
    return body.mass, body.moment, np.array(body.center_of_gravity)


BLOCK_MASS, BLOCK_MOMENT, BLOCK_COG = _block_inertia()
GOAL_VERTICES = _outline_at(GOAL)
CONTACTS, CONTACT_NORMALS, CONTACT_IS_CORNER = _contact_points()


def _ring_arc(ring: sg.LinearRing, start: float, end: float) -> list[np.ndarray]:
    """Points along ``ring`` from arc position ``start`` to ``end``, the shorter way round."""
    closed = np.asarray(ring.coords)
    coords = closed[:-1]
    positions = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))]
    length, positions = positions[-1], positions[:-1]
    forward = (end - start) % length
    if forward <= length / 2:
        offsets = (positions - start) % length
        inside = np.flatnonzero((offsets > 0) & (offsets < forward))
    else:
        offsets = (start - positions) % length
        inside = np.flatnonzero((offsets > 0) & (offsets < length - forward))
    inside = inside[np.argsort(offsets[inside])]
    ends = [np.array(ring.interpolate(s).coords[0]) for s in (start, end)]
    return [ends[0], *coords[inside], ends[1]]


def travel_path(
    agent: np.ndarray,
    start: np.ndarray,
    normal: np.ndarray,
    block_pose: np.ndarray,
    clearance: float,
) -> np.ndarray:
    """Waypoints (M, 2) from ``agent`` to the pre-contact point ``start`` that avoid the block.

    Straight if that keeps the agent off the block. Otherwise the agent backs off the block, goes
    straight if that keeps ``clearance`` from the block, else around the convex hull of the block
    grown by the agent radius and ``clearance``, and approaches ``start`` along the contact's
    outward ``normal``.
    """
    tee = sg.Polygon(_outline_at(block_pose))
    if sg.LineString([agent, start]).distance(tee) >= AGENT_RADIUS + PRE_CONTACT_GAP - 0.5:
        return np.array([agent, start])
    keep_out = AGENT_RADIUS + clearance
    ring = tee.exterior
    point = sg.Point(agent)
    nearest = np.array(ring.interpolate(ring.project(point)).coords[0])
    away = agent - nearest
    if tee.contains(point):
        away = -away
    distance = float(np.linalg.norm(away))
    waypoints = [agent]
    if tee.contains(point) or distance < keep_out:
        direction = away / distance if distance > 1e-6 else -normal
        waypoints.append(nearest + direction * keep_out)
    approach = start + normal * max(clearance - PRE_CONTACT_GAP, 0.0)
    leg = sg.LineString([waypoints[-1], approach])
    if leg.length > 0 and leg.distance(tee) < keep_out - 1.0:
        hull = tee.buffer(keep_out, quad_segs=4).convex_hull.exterior
        waypoints.extend(
            _ring_arc(hull, hull.project(sg.Point(waypoints[-1])), hull.project(sg.Point(approach)))
        )
    waypoints += [approach, start]
    path = np.array(waypoints)
    steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
    return path[np.r_[True, steps > 1e-6]]


def _along(path: np.ndarray, speed_at: Callable[[float], float]) -> list[np.ndarray]:
    """Targets stepping along a polyline; ``speed_at(remaining)`` gives px per control step."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    cum = np.r_[0.0, np.cumsum(seg)]
    total, s, targets = cum[-1], 0.0, []
    while s < total - 1e-6:
        s = min(s + speed_at(total - s), total)
        i = min(int(np.searchsorted(cum, s, side="right")) - 1, len(seg) - 1)
        t = (s - cum[i]) / seg[i] if seg[i] > 0 else 0.0
        targets.append(path[i] + t * (path[i + 1] - path[i]))
    return targets


@dataclass(frozen=True)
class _Push:
    start: np.ndarray  # world pre-contact agent position
    normal: np.ndarray  # world outward normal of the block at the contact
    direction: np.ndarray  # unit push direction
    length: float  # px of agent travel from ``start``
    speed: float  # px per control step


class _Planner:
    """Chooses strokes (travel + push) greedily by simulating candidate pushes."""

    def __init__(self, style: Style, rng: np.random.Generator, goal: np.ndarray = GOAL):
        self.style, self.rng, self.goal = style, rng, goal
        self.scratch = PushTEnv(goal=tuple(goal))

    def _ranked_pushes(self, state: np.ndarray) -> list[_Push]:
        """Candidate pushes, best first by the first-order model of frictionless pushing.

        A push with normal n at a point r from the centre of gravity gives the block the impulse
        that stops the agent's normal motion: J = 1 / (1/m + (r x n)^2 / I) per px pushed.
        """
        block = state[2:5]
        rot = _rotation(block[2])
        points, normals = CONTACTS @ rot.T + block[:2], CONTACT_NORMALS @ rot.T
        cog = rot @ BLOCK_COG + block[:2]
        goal = self.goal
        goal_cog = _rotation(goal[2]) @ BLOCK_COG + goal[:2]
        error = np.r_[goal_cog - cog, ANGLE_WEIGHT * wrap_angle(goal[2] - block[2])]
        error_norm = float(np.linalg.norm(error))
        starts = points + normals * (AGENT_RADIUS + PRE_CONTACT_GAP)
        reachable = np.all((starts >= 0) & (starts <= WINDOW_SIZE), axis=1)
        candidates, scores = [], []
        for alpha in PUSH_ANGLES:
            directions = -normals @ _rotation(alpha).T
            # A corner is pushed along the push direction, a face along its normal.
            force = np.where(CONTACT_IS_CORNER[:, None], -directions, normals)
            gain = np.where(CONTACT_IS_CORNER, 1.0, math.cos(alpha))
            arm = _cross(points - cog, force)
            impulse = gain / (1.0 / BLOCK_MASS + arm**2 / BLOCK_MOMENT)
            twist = np.c_[
                -force * (impulse / BLOCK_MASS)[:, None],
                -ANGLE_WEIGHT * impulse * arm / BLOCK_MOMENT,
            ]
            optimum = np.clip(twist @ error / (twist**2).sum(1), 0.0, MAX_PUSH)
            residual = np.linalg.norm(error - optimum[:, None] * twist, axis=1)
            travel = np.linalg.norm(starts - state[:2], axis=1) / self.style.travel_speed
            steps = travel + optimum / self.style.max_push_speed
            for i in np.flatnonzero(reachable & (optimum > 0)):
                candidates.append((i, directions[i], optimum[i]))
                scores.append(residual[i] + STEP_COST * error_norm * steps[i])
        order = np.argsort(np.array(scores) * self.rng.lognormal(0.0, 0.1, len(scores)))
        pushes = []
        for k in order:
            i, direction, optimum = candidates[k]
            length = PRE_CONTACT_GAP + float(np.clip(PUSH_OVERSHOOT * optimum, MIN_PUSH, MAX_PUSH))
            speed = float(
                np.clip(length / PUSH_SIM_STEPS, MIN_PUSH_SPEED, self.style.max_push_speed)
            )
            pushes.append(_Push(starts[i], normals[i], direction, length, speed))
        return pushes

    def _simulate_push(
        self, push: _Push, block: np.ndarray, step_cost: float
    ) -> tuple[float, _Push, int] | None:
        """Pose error, the push cut at its best length, and its steps, from a teleported start.

        None when no length of the push reduces the pose error.
        """
        env = self.scratch
        env.set_state(np.r_[push.start, block])
        best, best_score, error = None, math.inf, pose_error(block, self.goal)
        for k in range(1, math.ceil(push.length / push.speed) + 1):
            target = push.start + push.direction * min(push.speed * k, push.length)
            _, _, done, _, _ = env.step(target)
            state = env.get_state()
            cost = 0.0 if done else pose_error(state[2:5], self.goal)
            score = cost + step_cost * k
            if cost < error and score < best_score:
                length = float((state[:2] - push.start) @ push.direction)
                best = (cost, _Push(push.start, push.normal, push.direction, length, push.speed), k)
                best_score = score
            if done:
                break
        return best

    def _stroke(
        self, push: _Push, state: np.ndarray, travel_speed: float
    ) -> tuple[np.ndarray, int]:
        """Agent targets of a whole stroke (travel to the push start, push, hold, back off), and
        how many of them are travel."""
        path = travel_path(state[:2], push.start, push.normal, state[2:5], self.style.clearance)
        slowest = max(push.speed, MIN_APPROACH_SPEED)
        targets = _along(
            path, lambda remaining: min(travel_speed, max(slowest, BRAKE_GAIN * remaining))
        )
        n_travel = len(targets)
        end = push.start + push.direction * push.length
        targets += _along(np.array([push.start, end]), lambda remaining: push.speed)
        # Backing off within the stroke puts the agent's coasting into the verified rollout.
        targets += [end] * HOLD_STEPS + [end - push.direction * BACK_OFF]
        # Rounded as recorded, so that the rollouts, the real env and a replay see the same actions.
        targets = np.clip(np.array(targets), 0.0, WINDOW_SIZE).astype(np.float32)
        return targets.astype(np.float64), n_travel

    def _rollout(
        self, targets: np.ndarray, n_travel: int, state: np.ndarray, velocities: np.ndarray
    ) -> tuple[float, bool]:
        """Pose error after executing ``targets`` from the exact real state (0 on success), and
        whether the agent touched the block while travelling."""
        env = self.scratch
        env.set_state(state, velocities)
        touched = False
        for k, target in enumerate(targets):
            _, _, done, _, _ = env.step(target)
            if k < n_travel and not touched:
                after = env.get_state()
                tee = sg.Polygon(_outline_at(after[2:5]))
                touched = tee.distance(sg.Point(after[:2])) < AGENT_RADIUS + TOUCH_TOLERANCE
            if done:
                return 0.0, touched
        return pose_error(env.get_state()[2:5], self.goal), touched

    def _verified(
        self, push: _Push, state: np.ndarray, velocities: np.ndarray, step_cost: float
    ) -> tuple[np.ndarray, float]:
        """The best stroke around ``push`` by exact rollouts from the real state, and its score.

        The agent lags its targets and coasts when the stroke ends, so the push depth that the
        teleported start suggested is adjusted by a pattern search in steps of the push speed.
        The travel is slowed down where the agent would cut a corner into the block.
        """
        cache: dict[float, tuple[np.ndarray, float]] = {}

        def evaluate(depth: float) -> float:
            if depth not in cache:
                pushed = _Push(
                    push.start, push.normal, push.direction, PRE_CONTACT_GAP + depth, push.speed
                )
                speed, tried = self.style.travel_speed, []
                for _ in range(TRAVEL_RETRIES):
                    targets, n_travel = self._stroke(pushed, state, speed)
                    cost, touched = self._rollout(targets, n_travel, state, velocities)
                    tried.append((targets, cost + step_cost * len(targets)))
                    if not touched:
                        break
                    speed /= 2
                cache[depth] = min(tried, key=lambda t: t[1])
            return cache[depth][1]

        depth = max(push.length - PRE_CONTACT_GAP, 0.0) + push.speed
        step = push.speed
        for _ in range(DEPTH_SEARCH_MOVES):
            best = min((depth - step, depth, depth + step), key=evaluate)
            if best == depth:
                step /= 2
            depth = best
        return cache[depth]

    def next_stroke(self, state: np.ndarray, velocities: np.ndarray) -> np.ndarray | None:
        """Agent targets (K, 2) of the stroke to execute next from ``state``; None if no push
        reduces the pose error."""
        error = pose_error(state[2:5], self.goal)
        step_cost = STEP_COST * error
        ranked = self._ranked_pushes(state)
        simulated = []
        # Simulate the model's best pushes first, and further ones only if none of them helps.
        for first in range(0, len(ranked), N_SIMULATED):
            for push in ranked[first : first + N_SIMULATED]:
                result = self._simulate_push(push, state[2:5], step_cost)
                if result is not None:
                    simulated.append(result)
            if simulated:
                break
        if not simulated:
            return None
        simulated.sort(key=lambda r: r[0] + step_cost * r[2])
        strokes, scores = zip(
            *(
                self._verified(push, state, velocities, step_cost)
                for _, push, _ in simulated[:N_VERIFIED]
            ),
            strict=True,
        )
        scores = np.array(scores)
        spread = self.style.temperature * max(error, 1.0)
        weights = np.exp(-(scores - scores.min()) / spread)
        return strokes[self.rng.choice(len(strokes), p=weights / weights.sum())]


def plan_episode(
    seed: int,
    max_steps: int = 300,
    render_size: int | None = 96,
    rng_seed: int | None = None,
    goal: tuple[float, float, float] = GOAL_POSE,
    drawn_goals: tuple[tuple[float, float, float], ...] | None = None,
) -> PlannedEpisode:
    """Plan and record one episode from the reference initial state of ``seed`` to ``goal``.

    ``rng_seed`` (default: ``seed``) draws the demonstrator's style and its random choices.
    ``drawn_goals``: the goal outlines in the rendered images (default: ``goal``'s).
    """
    rng = np.random.default_rng(seed if rng_seed is None else rng_seed)
    goal_array = GOAL if tuple(goal) == GOAL_POSE else np.array(goal, dtype=np.float64)
    planner = _Planner(Style.draw(rng), rng, goal_array)
    env = PushTEnv(goal=tuple(goal))
    env.reset(seed=seed)
    # Restart from the same state, as recorded (float32, angle wrapped as in the observations), in
    # a fresh space, so that replaying the actions from the recorded first state is exact.
    start = env.get_state()
    start[4] %= 2 * np.pi
    env.set_state(start.astype(np.float32).astype(np.float64))
    states, actions, contacts = [], [], []
    max_coverage = 0.0
    success, best_error, stale = False, math.inf, 0
    while not success and len(actions) < max_steps and stale < NO_PROGRESS_STROKES:
        stroke = planner.next_stroke(env.get_state(), env.get_velocities())
        if stroke is None:
            break
        for target in stroke:
            states.append(env.get_state())
            actions.append(target)
            _, _, success, _, info = env.step(target)
            contacts.append(info["n_contacts"])
            max_coverage = max(max_coverage, info["coverage"])
            if success or len(actions) >= max_steps:
                break
        error = pose_error(env.get_state()[2:5], goal_array)
        stale = 0 if error < best_error else stale + 1
        best_error = min(best_error, error)
    state = np.array(states, dtype=np.float64).reshape(-1, 5)
    state[:, 4] %= 2 * np.pi
    img = None
    if render_size is not None:
        goals = drawn_goals or (tuple(goal),)
        img = np.array([render_state(s, render_size, goals=goals) for s in state], np.float32)
        img = img.reshape(-1, render_size, render_size, 3)
    return PlannedEpisode(
        seed=seed,
        state=state.astype(np.float32),
        keypoint=np.array([block_keypoints(s[2:5]) for s in state], dtype=np.float32).reshape(
            -1, 9, 2
        ),
        img=img,
        action=np.array(actions, dtype=np.float32).reshape(-1, 2),
        n_contacts=np.array(contacts, dtype=np.float32).reshape(-1, 1),
        success=bool(success),
        max_coverage=float(max_coverage),
    )


GOAL_CHOICE_STREAM = 7  # keeps the goal draw apart from the style draw of the same seed


def goal_choice(seed: int, n_goals: int) -> int:
    """The goal an attempt on ``seed`` plans for: uniform over ``n_goals``, fixed by the seed."""
    return int(np.random.default_rng((GOAL_CHOICE_STREAM, seed)).integers(n_goals))


def _plan_attempt(
    seed: int, render: bool, goals: tuple[tuple[float, float, float], ...] | None
) -> PlannedEpisode:
    size = DATASET_IMAGE_SIZE if render else None
    if goals is None:
        return plan_episode(seed, render_size=size)
    k = goal_choice(seed, len(goals))
    episode = plan_episode(seed, render_size=size, goal=goals[k], drawn_goals=goals)
    episode.goal = k
    return episode


def generate(
    n_episodes: int,
    seed: int = 0,
    workers: int = 1,
    render: bool = True,
    progress: bool = True,
    goals: tuple[tuple[float, float, float], ...] | None = None,
) -> Iterator[PlannedEpisode]:
    """Attempt ``n_episodes`` episodes on seeds ``seed``, ``seed + 1``, ... and yield every
    attempt, successful or not, in seed order. ``goals``: each attempt plans for one of them
    (:func:`goal_choice`) and images show them all; None: the reference's goal."""
    if n_episodes < 0 or workers < 1:
        raise ValueError(f"need n_episodes >= 0 and workers >= 1, got {n_episodes}, {workers}")
    seeds = range(seed, seed + n_episodes)
    attempt = functools.partial(_plan_attempt, render=render, goals=goals)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=n_episodes, desc="planning PushT demos", unit="ep", disable=not progress)
        )
        if workers > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers))
            episodes = pool.imap(attempt, seeds)
        else:
            episodes = map(attempt, seeds)
        n_success = 0
        for episode in episodes:
            n_success += episode.success
            bar.set_postfix(success=f"{n_success}/{bar.n + 1}", refresh=False)
            bar.update()
            yield episode
