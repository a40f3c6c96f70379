"""The training loop: one loop for every task and method (they differ only through config).

A run is built (:func:`build`: data, policy, EMA copy, optimiser, schedule), optionally resumed
from a checkpoint (:func:`resume`), then stepped (:func:`train_step`: one optimiser step over the
global batch), with logging, evaluation and checkpoints between steps (:class:`Run`'s methods).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cm_policy.atomic import write_text_atomic
from cm_policy.checkpoint import (
    DamagedCheckpointError,
    load_training_state,
    numpy_rng_from_state,
    numpy_rng_state,
    resolve_checkpoint,
    save_checkpoint,
    split_weights,
)
from cm_policy.evaluation.runner import evaluate_config
from cm_policy.policy import Policy
from cm_policy.training.data import TrainingData, fit_normalizer
from cm_policy.training.distributed import Replica, local_slices, process_group, slice_seed


def policy_spec(cfg: DictConfig, data: TrainingData | None = None) -> dict[str, Any]:
    """The part of a training config that defines the policy (saved with every checkpoint),
    with every camera's frame shape as ``data`` has them (else as the config declares)."""
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
    if data is not None and data.image_shapes:
        spec["task"]["image_shape"] = {k: list(s) for k, s in data.image_shapes.items()}
    return spec


LR_SCHEDULES = ("cosine", "constant")
EMA_SCHEDULES = ("power", "ratio")


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to zero at ``total`` (or a constant rate)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"training.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(step: int, power: float, max_decay: float, schedule: str = "power") -> float:
    """The EMA decay at ``step``, capped at ``max_decay``: Diffusion Policy's warm-up
    1 - (1 + step)^-power ("power"), or (1 + step) / (10 + step) ("ratio")."""
    if schedule not in EMA_SCHEDULES:
        raise ValueError(f"training.ema_schedule must be one of {EMA_SCHEDULES}, got {schedule!r}")
    if schedule == "ratio":
        return min(max_decay, (1.0 + step) / (10.0 + step))
    return min(max_decay, max(0.0, 1.0 - (1.0 + step) ** -power))


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


@dataclass
class StepResult:
    """What one optimiser step reports: summed loss terms over slices, and gradient health."""

    totals: torch.Tensor  # [loss, *logged terms], summed over this process's slices
    names: list[str]  # "loss" and the method's logged terms, in the order of ``totals``
    grad_norm: float
    n_nonfinite: int


@dataclass
class Run:
    """A training run's state: config, data, networks, optimiser and bookkeeping."""

    cfg: DictConfig
    replica: Replica
    data: TrainingData
    policy: Policy
    ema: Policy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator
    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    wall_offset: float = 0.0  # a resumed run's clock continues from its checkpoint's

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.replica.is_main


def build(cfg: DictConfig, replica: Replica) -> Run:
    """Threads, seeds, data, the policy (normaliser fitted on the training episodes), its EMA
    copy, AdamW and the learning-rate schedule."""
    tc = cfg.training
    if replica.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(tc.num_threads))
    torch.manual_seed(cfg.seed)  # the initial weights; the noise of each step is seeded per slice
    rng = np.random.default_rng(cfg.seed)
    data = TrainingData(cfg)
    device = replica.device
    policy = Policy(policy_spec(cfg, data), fit_normalizer(cfg, data).to(device)).to(device)
    ema = copy.deepcopy(policy).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.lr_schedule)
    )
    return Run(cfg, replica, data, policy, ema, optimizer, scheduler, rng)


def resume(run: Run, path: str | Path) -> None:
    """Continue ``run`` from a checkpoint: weights, normaliser, optimiser, schedule, RNGs.

    Every file read is checked against the checkpoint's manifest: a damaged checkpoint is
    refused (naming the file and the run's checkpoints that verify), never resumed from."""
    try:
        state = load_training_state(resolve_checkpoint(path))
    except DamagedCheckpointError as exc:
        raise DamagedCheckpointError(
            f"resume={path}: not resuming from damaged weights: {exc}"
        ) from None
    network, normalizer = split_weights(state["model"])
    run.policy.load_state_dict(network)
    run.ema.load_state_dict(split_weights(state["ema"])[0])
    run.policy.normalizer = normalizer.to(run.replica.device)
    run.ema.normalizer = run.policy.normalizer
    run.optimizer.load_state_dict(state["optimizer"])
    ts = state["trainer_state"]
    run.start_step = int(ts["step"])
    run.scheduler.load_state_dict(ts["scheduler"])
    run.rng = numpy_rng_from_state(ts["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    run.history = ts.get("history", [])


def read_log(path: Path) -> list[dict]:
    """The entries of a run's ``train_log.jsonl``. A last line cut short (the machine stopped
    while it was appended: a power loss) is left out; a damaged line before it is an error
    naming the file and the line."""
    lines = path.read_text().splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(
                f"{path}, line {number}: not a JSON log entry ({line[:60]!r}); expected one "
                "entry per line (move the file aside to resume without its history)"
            ) from None
    return entries


def eval_interval(cfg: DictConfig) -> int | None:
    """``training.eval_every``, checked: None never evaluates, 0 evaluates once at the end of
    training, N > 0 every N steps and at the end."""
    every = cfg.training.eval_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise ValueError(
            "training.eval_every must be null (never evaluate), 0 (evaluate once, at the end of "
            f"training) or a positive number of steps, got {every!r}"
        )
    return every


def has_simulator(task_cfg: Any) -> bool:
    """Whether a task can be evaluated closed loop (a dataset task, ``env: dataset``, cannot)."""
    from cm_policy.tasks import load_task

    return load_task(task_cfg).simulated


class Trainer:
    """Steps a built (and possibly resumed) :class:`Run` to ``training.steps``.

    Closed-loop evaluations follow ``training.eval_every`` (:func:`eval_interval`); the one at
    the end of training happens at ``training.steps`` only, never where ``training.stop_after``
    stops a run early (the resumed run evaluates at its end). ``final_eval=False`` leaves out
    that last evaluation, for a caller that evaluates the final policy itself.
    """

    def __init__(self, run: Run, final_eval: bool = True):
        self.run = run
        cfg, tc, replica = run.cfg, run.cfg.training, run.replica
        self.tc = tc
        self.final_eval = final_eval
        self.eval_every = eval_interval(cfg)
        self.eval_note = ""
        if self.eval_every is not None and not has_simulator(cfg.task):
            if self.eval_every:
                raise ValueError(
                    f"training.eval_every={self.eval_every} asks for closed-loop evaluations, "
                    f"but task {cfg.task.name!r} is a dataset without a simulator: set "
                    "training.eval_every=null"
                )
            # The default (evaluate at the end) cannot apply: train, and say so.
            self.eval_every = None
            self.eval_note = (
                f"no closed-loop evaluation: task {cfg.task.name!r} is a dataset without a "
                "simulator (deploy the policy with cm-policy serve)"
            )
        self.n_slices, self.slices = local_slices(
            int(tc.batch_size), tc.micro_batches, replica.world_size, replica.rank
        )
        if tc.compile:
            # In place, so parameter names (checkpoints, EMA) stay those of the plain network.
            run.policy.net.compile()
        self.loss_fn = replica.wrap(PolicyLoss(run.policy))
        self.autocast = torch.autocast(
            replica.device.type, dtype=torch.bfloat16, enabled=bool(tc.amp)
        )
        if run.main:
            for message in run.policy.method.training_warnings(amp=bool(tc.amp)):
                warnings.warn(message, stacklevel=2)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.log_path = run.run_dir / "train_log.jsonl"
        self.params = list(run.policy.parameters())
        self.ema_params = list(run.ema.parameters())
        self.n_params = sum(p.numel() for p in self.params)
        self.writer: SummaryWriter | None = None
        if run.main:
            self._open_outputs()
            self._announce()

    def _open_outputs(self) -> None:
        """config.yaml, TensorBoard, and the log cut back to the checkpoint a run resumes from."""
        run = self.run
        # config.yaml and the log are replaced atomically: a run killed here and resumed finds
        # them whole (a campaign reads config.yaml to tell whether the run can go on).
        write_text_atomic(run.run_dir / "config.yaml", self.config_yaml)
        self.writer = SummaryWriter(str(run.run_dir / "tensorboard"))
        if self.log_path.exists():
            entries = read_log(self.log_path)
            kept = [e for e in entries if e["step"] <= run.start_step]
            write_text_atomic(self.log_path, "".join(json.dumps(e) + "\n" for e in kept))
            run.wall_offset = kept[-1]["wall_s"] if kept and run.start_step else 0.0

    def _announce(self) -> None:
        run, tc, replica = self.run, self.tc, self.run.replica
        layout = ""
        if self.n_slices > 1:
            layout += f" in {self.n_slices} micro-batches of {tc.batch_size // self.n_slices}"
        if replica.is_distributed:
            layout += f" over {replica.world_size} processes"
        print(
            f"training {run.cfg.method.name} on {run.cfg.task.name}: "
            f"{run.data.n_train_episodes}/{run.data.n_episodes} episodes, "
            f"{len(run.data.sampler)} windows, {self.n_params / 1e6:.2f}M params, {tc.steps} "
            f"steps at batch {tc.batch_size}{layout} on {replica.device} -> {run.run_dir}"
        )
        if self.eval_note:
            print(self.eval_note)

    def fit(self) -> Path:
        run, tc = self.run, self.tc
        self.started = time.perf_counter()
        bar = tqdm(
            range(run.start_step, tc.steps),
            initial=run.start_step,
            total=tc.steps,
            desc="train",
            disable=not run.main,
        )
        run.policy.train()
        for step in bar:
            result = self.train_step(step)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                self.log(done, result, bar)
            if run.main and self.evaluates_at(done):
                self.evaluate(done, bar)
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                self.save(done)
            if tc.stop_after and done >= tc.stop_after:
                if done % tc.checkpoint_every:
                    self.save(done)
                break
        if run.main:
            assert self.writer is not None
            self.writer.close()
            from cm_policy.training.plots import plot_learning_curves

            plot_learning_curves(run.run_dir)
        # Every process returns once the run folder is complete.
        run.replica.barrier()
        return run.run_dir

    def evaluates_at(self, done: int) -> bool:
        """Whether the run evaluates after step ``done``: at the end of training
        (``training.steps``, not a ``stop_after`` stop) unless eval_every is null or
        ``final_eval`` is off, and at every multiple of a positive eval_every."""
        if self.eval_every is None:
            return False
        if done == self.tc.steps:
            return self.final_eval
        return self.eval_every > 0 and done % self.eval_every == 0

    def train_step(self, step: int) -> StepResult:
        """One optimiser step over the global batch: its slices' gradients accumulated,
        non-finite entries zeroed (METHOD.md), optional clipping, then the EMA update."""
        run, tc, cfg = self.run, self.tc, self.run.cfg
        device = run.replica.device
        idx = run.data.draw(run.rng, tc.batch_size)
        run.policy.method.set_progress(step, tc.steps)
        run.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros((), device=device)
        logs: dict[str, torch.Tensor] = {}
        for k, (index, part) in enumerate(self.slices):
            obs, action = run.data.windows(idx[part], cfg.n_obs_steps, device)
            torch.manual_seed(slice_seed(cfg.seed, step, index))
            with run.replica.no_sync(self.loss_fn, sync=k == len(self.slices) - 1):
                with self.autocast:
                    loss, logs = self.loss_fn(obs, action)
                (loss / len(self.slices)).backward()
            totals = totals + torch.stack([loss.detach(), *logs.values()]).float()
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])
        ).item()
        n_bad = 0
        if not math.isfinite(grad_norm):
            for g in grads:
                bad = ~torch.isfinite(g)
                n_bad += int(bad.sum())
                g[bad] = 0.0
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        decay = ema_decay(step, tc.ema_power, tc.ema_max_decay, tc.ema_schedule)
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
        return StepResult(totals, ["loss", *logs], grad_norm, n_bad)

    def log(self, done: int, result: StepResult, bar: tqdm) -> None:
        """Means over the whole global batch (every slice, on every process) to the JSONL log
        and TensorBoard."""
        run = self.run
        means = (run.replica.sum(result.totals) / self.n_slices).tolist()
        if not run.main:
            return
        record = {
            "step": done,
            **dict(zip(result.names, means, strict=True)),
            "grad_norm": result.grad_norm,
            "nonfinite_grad_frac": result.n_nonfinite / self.n_params,
            "lr": run.scheduler.get_last_lr()[0],
            "wall_s": run.wall_offset + time.perf_counter() - self.started,
        }
        assert self.writer is not None
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, done)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", gnorm=f"{result.grad_norm:.3g}")

    def evaluate(self, done: int, bar: tqdm) -> None:
        run = self.run
        metrics = run_eval(run.cfg, run.ema, run.run_dir / "eval" / f"step_{done:07d}", n_videos=0)
        run.history.append({"step": done, **metrics})
        assert self.writer is not None
        for key in ("mean_score", "success_rate"):
            self.writer.add_scalar(f"eval/{key}", metrics[key], done)
        bar.write(
            f"step {done}: mean_score {metrics['mean_score']:.3f} "
            f"success {metrics['success_rate']:.2f} ({metrics['n_episodes']} episodes)"
        )
        run.policy.train()

    def save(self, step: int) -> None:
        run = self.run
        run.replica.check_in_sync(self.params)
        if run.main:
            save_checkpoint(
                run.run_dir,
                step,
                config_yaml=self.config_yaml,
                policy=run.policy,
                ema_policy=run.ema,
                optimizer=run.optimizer,
                trainer_state={
                    "scheduler": run.scheduler.state_dict(),
                    "numpy_rng": numpy_rng_state(run.rng),
                    "history": run.history,
                },
                keep_last=int(self.tc.get("keep_checkpoints", 2)),
                keep_steps=[int(s) for s in self.tc.get("keep_steps") or ()],
            )


def train(cfg: DictConfig, final_eval: bool = True) -> Path:
    """Train a policy as ``cfg`` says; returns the run folder.

    ``final_eval=False``: no closed-loop evaluation at the end of training whatever
    ``training.eval_every`` says (the periodic ones still happen), for a caller that evaluates
    the final policy itself (``cm-policy run``).

    Under ``torchrun --nproc_per_node=N`` every process calls this with the same config and they
    train one policy data-parallel; see :mod:`cm_policy.training.distributed`.
    """
    eval_interval(cfg)  # a bad value fails before the data is loaded
    with process_group(cfg.training.device) as replica:
        run = build(cfg, replica)
        if cfg.resume:
            resume(run, cfg.resume)
        return Trainer(run, final_eval=final_eval).fit()


def run_eval(
    cfg: DictConfig, policy: Policy, out_dir: Path, n_videos: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """Closed-loop evaluation of ``policy`` with the config's eval settings (``cfg.eval``)."""
    if n_videos is not None:
        overrides["n_videos"] = n_videos
    ec = OmegaConf.to_container(cfg.eval, resolve=True)
    assert isinstance(ec, dict)
    return evaluate_config(policy, ec, out_dir, **overrides)
