"""The policy: normaliser + observation encoder + network + method behind ``predict_action``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from cm_policy.data.normalizer import LinearNormalizer
from cm_policy.methods import Method, make_method
from cm_policy.methods.base import Generators
from cm_policy.models.encoders import DEFAULT_CROP, ImageEncoder, LowDimEncoder
from cm_policy.models.unet import ConditionalUnet1D
from cm_policy.observations import (
    ActionRefused,
    camera_shapes,
    check_obs,
    check_obs_limit,
    refusal_reasons,
)


class Policy(nn.Module):
    """Maps the last ``n_obs_steps`` raw observations to ``n_action_steps`` raw actions.

    ``spec`` is a plain dict (the ``policy`` part of a resolved config): ``task`` (``low_dim``
    {key: dim}, ``image_keys``, ``image_shape`` {camera: [H, W, 3]} or one shape for all,
    ``action_dim``), ``horizon``, ``n_obs_steps``,
    ``n_action_steps``, ``model`` and ``method`` settings. It is saved beside the weights, so a
    checkpoint rebuilds its policy without the training config.
    """

    def __init__(self, spec: Mapping[str, Any], normalizer: LinearNormalizer):
        super().__init__()
        self.spec = _plain(spec)
        task, model = self.spec["task"], self.spec["model"]
        self.horizon = int(self.spec["horizon"])
        self.n_obs_steps = int(self.spec["n_obs_steps"])
        self.n_action_steps = int(self.spec["n_action_steps"])
        self.action_dim = int(task["action_dim"])
        self.low_dim: dict[str, int] = {k: int(v) for k, v in task.get("low_dim", {}).items()}
        self.image_keys: list[str] = list(task.get("image_keys", []))
        levels = len(model["down_dims"])
        if self.horizon % 2 ** (levels - 1):
            raise ValueError(
                f"horizon {self.horizon} must be divisible by 2^{levels - 1} for "
                f"{levels} U-Net levels (down_dims {model['down_dims']})"
            )
        self.set_n_action_steps(self.n_action_steps)
        self.obs_limit: float | None = None
        # Each camera's frame shape (every checkpoint's spec carries them; training takes them
        # from the data): the encoder's crops and the checks of observations follow them.
        self.image_shapes = camera_shapes(task)
        if self.image_keys:
            self.obs_encoder: nn.Module = ImageEncoder(
                self.image_shapes,
                self.low_dim,
                self.n_obs_steps,
                crop=model.get("crop", DEFAULT_CROP),
                widths=model.get("resnet_widths", (64, 128, 256, 512)),
            )
        else:
            self.obs_encoder = LowDimEncoder(self.low_dim, self.n_obs_steps)
        self.net = ConditionalUnet1D(
            self.action_dim,
            self.obs_encoder.out_dim,
            down_dims=model["down_dims"],
            kernel_size=int(model["kernel_size"]),
            n_groups=int(model["n_groups"]),
            time_embed_dim=int(model["time_embed_dim"]),
            # Checkpoints from before these settings existed used the defaults.
            time_combine=str(model.get("time_combine", "concat")),
            time_hidden_mult=int(model.get("time_hidden_mult", 4)),
        )
        method = dict(self.spec["method"])
        self.method: Method = make_method(method.pop("name"), **method)
        self.normalizer = normalizer

    def set_n_action_steps(self, n: int) -> None:
        """How many actions of each chunk are executed before replanning (an evaluation choice:
        fewer means more closed-loop corrections, more means fewer network evaluations)."""
        if n < 1 or self.n_obs_steps + n - 1 > self.horizon:
            raise ValueError(
                f"n_action_steps must be in [1, {self.horizon - self.n_obs_steps + 1}] "
                f"(horizon {self.horizon}, n_obs_steps {self.n_obs_steps}), got {n}"
            )
        self.n_action_steps = int(n)

    # --- training ------------------------------------------------------------------------------

    def normalize_obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: self.normalizer.normalize(k, obs[k].float()) for k in self.low_dim}
        out.update({k: obs[k] for k in self.image_keys})
        return out

    def compute_loss(
        self, obs: Mapping[str, torch.Tensor], action: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss on a batch of raw windows: obs (B, n_obs_steps, ...), action (B, horizon, D)."""
        cond = self.obs_encoder(self.normalize_obs(obs))
        return self.method.loss(self.net, self.normalizer.normalize("action", action), cond)

    # --- inference -----------------------------------------------------------------------------
    def check_obs(self, obs: Mapping[str, Any]) -> None:
        """Raise a ValueError naming what was expected when ``obs`` does not fit this policy."""
        expected = {k: (d,) for k, d in self.low_dim.items()}
        expected.update(self.image_shapes)
        check_obs(obs, expected, self.n_obs_steps)

    @torch.no_grad()
    def predict_action(
        self,
        obs: Mapping[str, Any],
        steps: int | None = None,
        generator: Generators = None,
        sampler: str | None = None,
        noise: str = "random",
    ) -> np.ndarray:
        """Raw actions (B, n_action_steps, action_dim) for raw observations (B, >=n_obs_steps, ...).

        Uses the last ``n_obs_steps`` observations. Following Diffusion Policy, the executed
        actions start at the chunk index of the latest observation (n_obs_steps - 1).
        ``steps`` and ``sampler``: the method's sampler setting (its defaults when None).
        ``noise``: the initial noise: ``random`` (drawn from ``generator``), ``zero``, or
        ``mean:K``, the mean of the chunks from K random draws (the noise diagnostic).
        """
        self.check_obs(obs)
        draws, z_scale = parse_noise(noise)
        device = next(self.parameters()).device
        window = {
            k: torch.as_tensor(np.asarray(obs[k])[:, -self.n_obs_steps :], device=device)
            for k in [*self.low_dim, *self.image_keys]
        }
        batch = next(iter(window.values())).shape[0]
        normalized = self.normalize_obs(window)
        cond = self.obs_encoder(normalized)
        shape = (batch, self.horizon, self.action_dim)
        z = torch.zeros(shape, device=device, dtype=cond.dtype) if z_scale == 0 else None
        chunks = [
            self.method.sample(self.net, cond, shape, steps, generator, sampler, z)
            for _ in range(draws)
        ]
        chunk = chunks[0] if draws == 1 else torch.stack(chunks).mean(dim=0)
        action = self.normalizer.unnormalize("action", chunk)
        start = self.n_obs_steps - 1
        actions = action[:, start : start + self.n_action_steps].cpu().numpy()
        reasons = self.refusals(normalized, actions)
        if any(reasons):
            raise ActionRefused(reasons, actions)
        return actions

    def refusals(
        self, normalized: Mapping[str, torch.Tensor], actions: np.ndarray
    ) -> list[str | None]:
        """Per batch row, why its actions must not be sent (None: they may): observations
        beyond ``obs_limit`` (in normalised units, where the training range is [-1, 1]), or
        actions that are not finite (:func:`cm_policy.observations.refusal_reasons`)."""
        peaks = {k: normalized[k].abs().flatten(1).amax(dim=1).cpu().numpy() for k in self.low_dim}
        return refusal_reasons(peaks, self.obs_limit, actions)

    def set_obs_limit(self, limit: float | None) -> None:
        """Refuse observations more than ``limit`` half-ranges of the training data from its
        middle (normalised |value| > limit; 1 is the training range itself); None: no limit."""
        self.obs_limit = check_obs_limit(limit)


NOISE_MODES = "random | zero | mean:K"


def parse_noise(noise: str) -> tuple[int, float]:
    """(number of draws averaged, initial-noise scale) of a ``noise`` setting."""
    if noise == "random":
        return 1, 1.0
    if noise == "zero":
        return 1, 0.0
    kind, _, k = str(noise).partition(":")
    if kind == "mean" and k.isdigit() and int(k) >= 1:
        return int(k), 1.0
    raise ValueError(f"noise must be {NOISE_MODES}, got {noise!r}")


def _plain(obj: Any) -> Any:
    """Convert OmegaConf containers and tuples into plain dicts and lists."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
