"""The training loop: one loop for every task and method (they differ only through config)."""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cm_policy.data import LinearNormalizer, ReplayBuffer, SequenceSampler
from cm_policy.data.sampler import downsample_mask, get_val_mask
from cm_policy.evaluation.runner import evaluate_policy
from cm_policy.policy import Policy
from cm_policy.tasks import dataset_keys, dataset_obs
from cm_policy.training.checkpoint import (
    load_training_state,
    numpy_rng_from_state,
    numpy_rng_state,
    resolve_checkpoint,
    save_checkpoint,
)
from cm_policy.training.distributed import Replica, local_slices, process_group, slice_seed


def policy_spec(cfg: DictConfig) -> dict[str, Any]:
    """The part of a training config that defines the policy (saved with every checkpoint)."""
    spec = OmegaConf.to_container(
        OmegaConf.create(
            {
                "task": cfg.task,
                "horizon": cfg.horizon,
                "n_obs_steps": cfg.n_obs_steps,
                "n_action_steps": cfg.n_action_steps,
                "model": cfg.model,
                "method": cfg.method,
            }
        ),
        resolve=True,
    )
    assert isinstance(spec, dict)
    return spec


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(step: int, power: float, max_decay: float) -> float:
    """Diffusion Policy's EMA warm-up: the decay grows as 1 - (1 + step)^-power."""
    return min(max_decay, max(0.0, 1.0 - (1.0 + step) ** -power))


class TrainingData:
    """The dataset in RAM, its episode split, and a sampler over training windows."""

    def __init__(self, cfg: DictConfig):
        path = Path(cfg.task.dataset_path)
        keys = dataset_keys(cfg.task)
        # Image arrays stay on disk until dataset_obs converts them a chunk at a time: loading
        # the human PushT images (float32) whole would take 2.8 GB before the uint8 copy.
        lazy = ReplayBuffer.open(path, keys=keys)
        images = [k for k in keys if len(lazy[k].shape) >= 4]
        buffer = ReplayBuffer.load(path, keys=[k for k in keys if k not in images])
        raw = {k: buffer[k] for k in buffer.keys} | {k: lazy[k] for k in images}
        self.arrays = dataset_obs(cfg.task, raw)
        self.arrays["action"] = np.asarray(buffer["action"], dtype=np.float32)
        self.n_episodes = buffer.n_episodes
        val_mask = get_val_mask(buffer.n_episodes, cfg.training.val_ratio, cfg.seed)
        train_mask = ~val_mask
        if cfg.training.max_train_episodes:
            train_mask = downsample_mask(train_mask, cfg.training.max_train_episodes, cfg.seed)
        self.n_train_episodes = int(train_mask.sum())
        self.sampler = SequenceSampler(
            buffer.episode_ends,
            sequence_length=cfg.horizon,
            pad_before=cfg.n_obs_steps - 1,
            pad_after=cfg.n_action_steps - 1,
            episode_mask=train_mask,
        )
        if len(self.sampler) == 0:
            raise ValueError(f"{path}: no training windows (all episodes held out?)")
        starts = np.concatenate([[0], buffer.episode_ends[:-1]])
        rows = np.concatenate(
            [
                np.arange(s, e)
                for s, e, m in zip(starts, buffer.episode_ends, train_mask, strict=True)
                if m
            ]
        )
        self.train_rows = rows  # time steps of the training episodes, to fit the normaliser on

    def batch(
        self, rng: np.random.Generator, size: int, n_obs_steps: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``size`` random training windows, as CPU tensors (see :meth:`windows`)."""
        return self.windows(self.draw(rng, size), n_obs_steps)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Indices of ``size`` random training windows."""
        return rng.integers(0, len(self.sampler), size=size)

    def windows(
        self, idx: np.ndarray, n_obs_steps: int, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Observations (first ``n_obs_steps`` steps) and actions of windows ``idx`` on
        ``device``; CUDA copies go through pinned memory, asynchronously."""
        first_k = {k: n_obs_steps for k in self.arrays if k != "action"}
        window = self.sampler.sample_batch(self.arrays, idx, first_k=first_k)
        tensors = {k: _to_device(torch.from_numpy(v), device) for k, v in window.items()}
        action = tensors.pop("action")
        return tensors, action


def _to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class PolicyLoss(nn.Module):
    """``policy.compute_loss`` as one module call. DDP must see all the network passes of a step
    (iSD runs several) inside a single forward before the backward, so it wraps this."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(
        self, obs: dict[str, torch.Tensor], action: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.policy.compute_loss(obs, action)


def fit_normalizer(cfg: DictConfig, data: TrainingData) -> LinearNormalizer:
    normalizer = LinearNormalizer()
    # Only the normalised keys are gathered: copying the training rows of an image array would
    # duplicate the largest array in RAM for nothing.
    keys = ["action", *cfg.task.low_dim]
    normalizer.fit({k: data.arrays[k][data.train_rows] for k in keys}, mode="limits")
    return normalizer


def train(cfg: DictConfig) -> Path:
    """Train a policy as ``cfg`` says; returns the run folder.

    Under ``torchrun --nproc_per_node=N`` every process calls this with the same config and they
    train one policy data-parallel; see :mod:`cm_policy.training.distributed`.
    """
    with process_group(cfg.training.device) as replica:
        return _train(cfg, replica)


def _train(cfg: DictConfig, replica: Replica) -> Path:
    run_dir = Path(cfg.output_dir)
    main = replica.is_main
    device = replica.device
    tc = cfg.training
    n_slices, slices = local_slices(
        int(tc.batch_size), tc.micro_batches, replica.world_size, replica.rank
    )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(tc.num_threads))
    torch.manual_seed(cfg.seed)  # the initial weights; the noise of each step is seeded per slice
    rng = np.random.default_rng(cfg.seed)

    data = TrainingData(cfg)
    spec = policy_spec(cfg)
    policy = Policy(spec, fit_normalizer(cfg, data).to(device)).to(device)
    ema = copy.deepcopy(policy).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps)
    )
    start_step, history = 0, []
    if cfg.resume:
        folder = resolve_checkpoint(cfg.resume)
        state = load_training_state(folder)
        policy.load_state_dict(_strip_normalizer(state["model"]))
        ema.load_state_dict(_strip_normalizer(state["ema"]))
        normalizer = LinearNormalizer.from_state_dict(_normalizer_part(state["model"]))
        policy.normalizer = normalizer.to(device)
        ema.normalizer = policy.normalizer
        optimizer.load_state_dict(state["optimizer"])
        ts = state["trainer_state"]
        start_step = int(ts["step"])
        scheduler.load_state_dict(ts["scheduler"])
        rng = numpy_rng_from_state(ts["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        history = ts.get("history", [])
    if tc.compile:
        # In place, so parameter names (checkpoints, EMA) stay those of the plain network.
        policy.net.compile()
    loss_fn = replica.wrap(PolicyLoss(policy))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(tc.amp))
    if tc.amp and cfg.method.get("derivative") == "finite_difference" and main:
        # Measured on the tiny U-Net: bf16 turns a loss_sd of 0.003 into 0.05; jvp keeps it.
        warnings.warn(
            "training.amp=true with method.derivative=finite_difference: a difference over "
            f"fd_eps={cfg.method.fd_eps} is below bf16 resolution; use method.derivative=jvp",
            stacklevel=2,
        )

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    log_path = run_dir / "train_log.jsonl"
    wall_offset = 0.0  # a resumed run's clock continues from its checkpoint's
    if main:
        (run_dir / "config.yaml").write_text(config_yaml)
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        if log_path.exists():
            # Keep the log consistent with the checkpoint: drop lines written after it.
            lines = log_path.read_text().splitlines()
            kept = [x for x in lines if json.loads(x)["step"] <= start_step]
            log_path.write_text("".join(x + "\n" for x in kept))
            wall_offset = json.loads(kept[-1])["wall_s"] if kept and start_step else 0.0
    params = list(policy.parameters())
    ema_params = list(ema.parameters())
    n_params = sum(p.numel() for p in params)
    if main:
        layout = ""
        if n_slices > 1:
            layout += f" in {n_slices} micro-batches of {tc.batch_size // n_slices}"
        if replica.is_distributed:
            layout += f" over {replica.world_size} processes"
        print(
            f"training {cfg.method.name} on {cfg.task.name}: {data.n_train_episodes}/"
            f"{data.n_episodes} episodes, {len(data.sampler)} windows, {n_params / 1e6:.2f}M "
            f"params, {tc.steps} steps at batch {tc.batch_size}{layout} on {device} -> {run_dir}"
        )

    def save(step: int) -> None:
        replica.check_in_sync(params)
        if main:
            save_checkpoint(
                run_dir,
                step,
                config_yaml=config_yaml,
                policy=policy,
                ema_policy=ema,
                optimizer=optimizer,
                trainer_state={
                    "scheduler": scheduler.state_dict(),
                    "numpy_rng": numpy_rng_state(rng),
                    "history": history,
                },
                keep_last=int(tc.get("keep_checkpoints", 2)),
            )

    started = time.perf_counter()
    bar = tqdm(
        range(start_step, tc.steps),
        initial=start_step,
        total=tc.steps,
        desc="train",
        disable=not main,
    )
    policy.train()
    for step in bar:
        idx = data.draw(rng, tc.batch_size)
        policy.method.set_progress(step, tc.steps)
        optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros((), device=device)
        for k, (index, part) in enumerate(slices):
            obs, action = data.windows(idx[part], cfg.n_obs_steps, device)
            torch.manual_seed(slice_seed(cfg.seed, step, index))
            with replica.no_sync(loss_fn, sync=k == len(slices) - 1):
                with autocast:
                    loss, logs = loss_fn(obs, action)
                (loss / len(slices)).backward()
            totals = totals + torch.stack([loss.detach(), *logs.values()]).float()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])
        ).item()
        n_bad = 0
        if not math.isfinite(grad_norm):
            # METHOD.md: non-finite gradient entries are zeroed, and the fraction is logged.
            for g in grads:
                bad = ~torch.isfinite(g)
                n_bad += int(bad.sum())
                g[bad] = 0.0
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        scheduler.step()
        decay = ema_decay(step, tc.ema_power, tc.ema_max_decay)
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            # Means over the whole global batch: every slice, on every process.
            means = (replica.sum(totals) / n_slices).tolist()
            if main:
                record = {
                    "step": done,
                    **dict(zip(["loss", *logs], means, strict=True)),
                    "grad_norm": grad_norm,
                    "nonfinite_grad_frac": n_bad / n_params,
                    "lr": scheduler.get_last_lr()[0],
                    "wall_s": wall_offset + time.perf_counter() - started,
                }
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(f"train/{key}", value, done)
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}", gnorm=f"{grad_norm:.3g}")
        if main and tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
            metrics = run_eval(cfg, ema, run_dir / "eval" / f"step_{done:07d}", n_videos=0)
            history.append({"step": done, **metrics})
            for key in ("mean_score", "success_rate"):
                writer.add_scalar(f"eval/{key}", metrics[key], done)
            bar.write(
                f"step {done}: mean_score {metrics['mean_score']:.3f} "
                f"success {metrics['success_rate']:.2f} ({metrics['n_episodes']} episodes)"
            )
            policy.train()
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            save(done)
        if tc.stop_after and done >= tc.stop_after:
            if done % tc.checkpoint_every:
                save(done)
            break
    if main:
        writer.close()
        from cm_policy.training.plots import plot_learning_curves

        plot_learning_curves(run_dir)
    # Every process returns once the run folder is complete.
    replica.barrier()
    return run_dir


def run_eval(
    cfg: DictConfig, policy: Policy, out_dir: Path, n_videos: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """Closed-loop evaluation of ``policy`` on the config's test seeds."""
    ec = cfg.eval
    n = int(overrides.get("n_episodes", ec.n_episodes))
    steps = int(overrides.get("steps", ec.steps))
    seeds = list(range(int(ec.start_seed), int(ec.start_seed) + n))
    return evaluate_policy(
        policy,
        seeds,
        out_dir,
        steps=steps,
        max_steps=int(ec.max_steps),
        n_envs=int(ec.n_envs),
        n_videos=int(ec.n_videos if n_videos is None else n_videos),
        progress=bool(ec.progress),
    )


def _strip_normalizer(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if not k.startswith("normalizer.")}


def _normalizer_part(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("normalizer.") :]: v for k, v in weights.items() if k.startswith("normalizer.")}
