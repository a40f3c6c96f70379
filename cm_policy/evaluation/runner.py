"""Closed-loop evaluation of any ``predict_action`` policy in parallel environments.

The runner keeps an observation history of ``n_obs_steps`` per env (filled with the first
observation at reset, as Diffusion Policy's multi-step wrapper does), executes ``n_action_steps``
actions of each predicted chunk, and records per episode the maximum reward and success.
Episodes run in waves of ``n_envs``, each env reset with its own test seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from cm_policy.atomic import write_figure_atomic, write_json_atomic
from cm_policy.observations import push_obs, stack_obs
from cm_policy.stats import mean_interval, wilson_interval


class ActionPredictor(Protocol):
    def predict_action(self, obs: Mapping[str, np.ndarray]) -> np.ndarray: ...


@dataclass
class EpisodeResult:
    seed: int
    max_reward: float
    success: bool
    n_steps: int
    video: str | None = None
    outcome: dict[str, Any] | None = None  # the task's account of how the episode ended


LAYOUTS = ("sync", "async")


def make_vector_env(
    env_fn: Callable[[], gym.Env], n_envs: int, layout: str = "async"
) -> gym.vector.VectorEnv:
    """``n_envs`` envs stepped together: ``sync``, all in this process (no IPC; for cheap physics
    such as PushT's, where the policy's batched forward is the cost to share), or ``async``, one
    spawned worker process each (no state or GL context inherited; for slow envs, robosuite)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if n_envs == 1:
        return gym.vector.SyncVectorEnv([env_fn], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    if layout == "sync":
        # NEXT_STEP: the runner keeps stepping envs whose episode ended (and ignores them); a
        # SyncVectorEnv with autoreset disabled refuses that.
        return gym.vector.SyncVectorEnv(
            [env_fn] * n_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP
        )
    return gym.vector.AsyncVectorEnv(
        [env_fn] * n_envs, context="spawn", autoreset_mode=gym.vector.AutoresetMode.DISABLED
    )


def chunk_generators(seeds: Sequence[int], chunk: int) -> list[Any]:
    """One torch generator per episode for its ``chunk``-th action chunk, seeded from (episode
    seed, chunk): an episode's noise then depends on neither the other envs nor the layout."""
    import torch

    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence((s, chunk)).generate_state(1)[0]))
        for s in seeds
    ]


def run_episodes(
    policy: ActionPredictor,
    env_fn: Callable[[], gym.Env],
    seeds: Sequence[int],
    *,
    n_obs_steps: int = 2,
    n_action_steps: int = 8,
    max_steps: int = 300,
    n_envs: int = 2,
    layout: str = "async",
    n_videos: int = 0,
    video_dir: str | Path | None = None,
    fps: int | None = None,
    progress: bool = True,
    predict_kwargs: Mapping[str, Any] | None = None,
    seeded_noise: bool = False,
    noise_keys: Sequence[int] | None = None,
    vector_env: gym.vector.VectorEnv | None = None,
    outcome_keys: Sequence[str] = (),
    outcome: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    on_wave: Callable[[list[EpisodeResult]], None] | None = None,
) -> list[EpisodeResult]:
    """Run one episode per seed; videos of the first ``n_videos`` seeds go to ``video_dir``.

    ``outcome``: called with each episode's last ``info`` values of ``outcome_keys`` (those of
    its last step, or of the reset for an episode of no step); its dict is the result's
    ``outcome``. ``seeded_noise``: ``predict_action`` gets ``generator=`` one generator per env
    (:func:`chunk_generators`), so results do not depend on ``n_envs`` or ``layout``; its
    generators are keyed by ``noise_keys`` (one per seed) where given, else by the seeds, so one
    initial state can be run under several noise draws.
    ``on_wave``: called with the results of each wave of episodes as it ends.
    """
    seeds = [int(s) for s in seeds]
    keys = seeds if noise_keys is None else [int(k) for k in noise_keys]
    if len(keys) != len(seeds):
        raise ValueError(f"noise_keys must give one key per seed ({len(seeds)}), got {len(keys)}")
    if noise_keys is not None and not seeded_noise:
        raise ValueError("noise_keys needs seeded_noise=True")
    if n_videos and video_dir is None:
        raise ValueError("n_videos > 0 needs a video_dir")
    n_envs = max(1, min(n_envs, len(seeds)))
    envs = vector_env or make_vector_env(env_fn, n_envs, layout)
    n_envs = envs.num_envs
    fps = fps or int(envs.metadata.get("render_fps", 10))  # videos play at the control rate
    kwargs = dict(predict_kwargs or {})
    results: list[EpisodeResult] = []
    bar = tqdm(total=len(seeds), desc="eval", unit="ep", disable=not progress)
    try:
        for start in range(0, len(seeds), n_envs):
            wave = seeds[start : start + n_envs]
            wave_keys = keys[start : start + n_envs]
            first = len(results)
            # Unused envs of a short last wave run a copy of the wave's first seed.
            padded = wave + [wave[0]] * (n_envs - len(wave))
            padded_keys = wave_keys + [wave_keys[0]] * (n_envs - len(wave))
            obs, reset_info = envs.reset(seed=padded)
            history = stack_obs(obs, n_obs_steps)
            active = np.zeros(n_envs, dtype=bool)
            active[: len(wave)] = True
            max_reward = np.zeros(n_envs)
            success = np.zeros(n_envs, dtype=bool)
            last = [{k: reset_info[k][i] for k in outcome_keys} for i in range(n_envs)]
            n_steps = np.zeros(n_envs, dtype=int)
            filmed = [start + i < n_videos for i in range(n_envs)]
            frames: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
            if any(filmed):
                for i, frame in enumerate(envs.call("render")):
                    if filmed[i]:
                        frames[i].append(frame)
            step, chunk = 0, 0
            actions: np.ndarray | None = None
            while active.any() and step < max_steps:
                # Only the envs whose episode goes on are predicted for (an ended or padding env
                # replays its last chunk, ignored): the forward shrinks as episodes end.
                rows = np.flatnonzero(active)
                if seeded_noise:
                    kwargs["generator"] = chunk_generators([padded_keys[i] for i in rows], chunk)
                chunk += 1
                window = (
                    history if len(rows) == n_envs else {k: v[rows] for k, v in history.items()}
                )
                predicted = np.asarray(policy.predict_action(window, **kwargs))
                if predicted.ndim != 3 or predicted.shape[0] != len(rows):
                    raise ValueError(
                        f"predict_action must return (batch={len(rows)}, n_action_steps, "
                        f"action_dim), got shape {predicted.shape}"
                    )
                if actions is None or actions.shape[1:] != predicted.shape[1:]:
                    actions = np.repeat(predicted[:1], n_envs, axis=0)
                actions[rows] = predicted
                for j in range(min(n_action_steps, actions.shape[1])):
                    if not active.any() or step >= max_steps:
                        break
                    obs, reward, terminated, truncated, info = envs.step(actions[:, j])
                    step += 1
                    max_reward = np.where(active, np.maximum(max_reward, reward), max_reward)
                    success |= active & np.asarray(info.get("is_success", terminated), dtype=bool)
                    n_steps += active
                    for i in np.flatnonzero(active) if outcome_keys else ():
                        last[i] = {k: info[k][i] for k in outcome_keys}
                    push_obs(history, obs)
                    if any(filmed[i] and active[i] for i in range(n_envs)):
                        for i, frame in enumerate(envs.call("render")):
                            if filmed[i] and active[i]:
                                frames[i].append(frame)
                    active &= ~(terminated | truncated)
            for i, seed in enumerate(wave):
                video = None
                if filmed[i]:
                    from cm_policy.evaluation.video import write_mp4  # PyAV: videos only

                    video = str(write_mp4(Path(video_dir) / f"seed_{seed}.mp4", frames[i], fps))
                results.append(
                    EpisodeResult(
                        seed,
                        float(max_reward[i]),
                        bool(success[i]),
                        int(n_steps[i]),
                        video,
                        outcome(last[i]) if outcome else None,
                    )
                )
            if on_wave is not None:
                on_wave(results[first:])
            bar.update(len(wave))
    finally:
        bar.close()
        if vector_env is None:
            envs.close()
    return results


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """mean_score and success rate with 95% intervals (normal for the mean, Wilson for rates)."""
    n = len(results)
    scores = np.array([r.max_reward for r in results])
    wins = sum(r.success for r in results)
    low, high = mean_interval(scores)
    p = wins / n
    return {
        "n_episodes": n,
        "mean_score": float(scores.mean()),
        # Scores lie in [0, 1]; a single episode (no spread to estimate) gets all of it.
        "mean_score_ci95": [max(0.0, low), min(1.0, high)],
        "success_rate": p,
        "success_rate_ci95": list(wilson_interval(p, n)),
        "mean_episode_steps": float(np.mean([r.n_steps for r in results])),
    }


def plot_summary(results: Sequence[EpisodeResult], metrics: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.array([r.max_reward for r in results])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist(scores, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    axes[0].axvline(metrics["mean_score"], color="k", ls="--", label="mean_score")
    axes[0].set_xlabel("episode max reward")
    axes[0].set_ylabel("episodes")
    axes[0].legend()
    order = np.argsort(scores)
    colors = ["tab:green" if results[i].success else "tab:red" for i in order]
    axes[1].bar(np.arange(len(scores)), scores[order], color=colors, width=1.0)
    axes[1].set_xlabel("episode (sorted); green = success")
    axes[1].set_ylabel("max reward")
    fig.suptitle(
        f"mean_score {metrics['mean_score']:.3f}, success {metrics['success_rate']:.2f} "
        f"over {metrics['n_episodes']} episodes"
    )
    fig.tight_layout()
    write_figure_atomic(path, fig, dpi=110)
    plt.close(fig)


def evaluate(
    policy: ActionPredictor,
    env_fn: Callable[[], gym.Env],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
    summarize_outcomes: Callable[[Sequence[EpisodeResult]], dict[str, Any]] | None = None,
    resume: bool = False,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """Run the episodes; write ``metrics.json``, ``episodes.json``, videos and ``summary.png``.
    ``summarize_outcomes`` adds the task's own metrics over the episodes' outcomes.

    ``resume``: each finished wave of episodes is appended to ``episodes.partial.jsonl``, and
    episodes found there (from an evaluation that was stopped) are not run again. Sound only
    when an episode's result depends on its seed alone, so it needs ``seeded_noise``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = [int(s) for s in seeds]
    partial = out / "episodes.partial.jsonl"
    done: dict[int, EpisodeResult] = {}
    if resume:
        if not run_kwargs.get("seeded_noise"):
            raise ValueError("resume=True needs seeded_noise=True (results must follow the seed)")
        wanted = set(seeds)
        done = {r.seed: r for r in read_partial(partial) if r.seed in wanted}

    def keep(wave: list[EpisodeResult]) -> None:
        with open(partial, "a") as f:  # one write per wave: a stop leaves at most a torn tail
            f.write("".join(json.dumps(asdict(r)) + "\n" for r in wave))

    todo = [s for s in seeds if s not in done]
    ran = (
        run_episodes(
            policy,
            env_fn,
            todo,
            video_dir=out / "videos",
            on_wave=keep if resume else None,
            **run_kwargs,
        )
        if todo
        else []
    )
    by_seed = {**done, **{r.seed: r for r in ran}}
    results = [by_seed[s] for s in seeds]
    metrics = summarize(results)
    if summarize_outcomes is not None:
        metrics.update(summarize_outcomes(results))
    metrics.update({"seeds": [seeds[0], seeds[-1]], "wall_s": time.perf_counter() - started})
    if done:
        metrics["resumed_episodes"] = len(done)  # wall_s counts only the episodes run here
    metrics.update(extra or {})
    write_json_atomic(out / "episodes.json", [asdict(r) for r in results], indent=2)
    plot_summary(results, metrics, out / "summary.png")
    # metrics.json last, atomically: its presence means the evaluation is complete.
    write_json_atomic(out / "metrics.json", metrics, indent=2)
    partial.unlink(missing_ok=True)
    return metrics


def read_partial(path: Path) -> list[EpisodeResult]:
    """The episodes of a stopped evaluation's ``episodes.partial.jsonl`` (see :func:`evaluate`),
    up to a torn last line."""
    results = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                results.append(EpisodeResult(**json.loads(line)))
            except (ValueError, TypeError):
                break
    return results


def evaluate_policy(
    policy: Any,
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    noise: str = "random",
    extra: Mapping[str, Any] | None = None,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate` a :class:`~cm_policy.policy.Policy` on the task of its spec, with its own
    observation window and action steps, with its method's sampler ``sampler`` (default kind
    when None) at ``steps`` network evaluations per chunk and initial noise ``noise``; episodes
    last the task's horizon unless ``max_steps`` is given, and the envs are laid out as the task
    prefers (:attr:`~cm_policy.tasks.Task.eval_layout`, ``eval_envs``) unless ``layout`` /
    ``n_envs`` are given. The noise is seeded per episode and chunk (``seeded_noise``)."""
    from cm_policy.tasks import load_task

    task = load_task(policy.spec["task"])
    steps = steps or policy.method.default_steps
    sampler = policy.method.resolve_sampler(sampler)
    defaults = {"max_steps": task.horizon, "layout": task.eval_layout, "n_envs": task.eval_envs}
    for key, value in defaults.items():
        if run_kwargs.get(key) is None:
            run_kwargs[key] = value
    run_kwargs.setdefault("seeded_noise", True)
    policy.eval()
    return evaluate(
        policy,
        task.env_factory(),
        seeds,
        out_dir,
        n_obs_steps=policy.n_obs_steps,
        n_action_steps=policy.n_action_steps,
        predict_kwargs={"steps": steps, "sampler": sampler, "noise": noise},
        extra={"steps": steps, "sampler": sampler, "noise": noise, **(extra or {})},
        outcome_keys=task.outcome_keys,
        outcome=task.episode_outcome if task.outcome_keys else None,
        summarize_outcomes=task.summarize_outcomes if task.outcome_keys else None,
        **run_kwargs,
    )


def evaluate_config(
    policy: Any, ec: Mapping[str, Any], out_dir: str | Path, **overrides: Any
) -> dict[str, Any]:
    """:func:`evaluate_policy` with the settings of an eval config (``config/eval``), any of them
    replaced by ``overrides``."""
    ec = {**ec, **overrides}
    start = int(ec["start_seed"])
    return evaluate_policy(
        policy,
        list(range(start, start + int(ec["n_episodes"]))),
        out_dir,
        steps=ec["steps"],
        sampler=ec["sampler"],
        noise=ec["noise"],
        max_steps=ec["max_steps"],
        n_envs=ec["n_envs"],
        layout=ec["layout"],
        n_videos=int(ec["n_videos"]),
        progress=bool(ec["progress"]),
        extra=ec.get("extra"),
    )
