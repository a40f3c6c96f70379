"""The policy: normaliser + observation encoder + network + method behind ``predict_action``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from cm_policy.data.normalizer import LinearNormalizer
from cm_policy.methods import Method, make_method
from cm_policy.models.encoders import ImageEncoder, LowDimEncoder
from cm_policy.models.unet import ConditionalUnet1D


class Policy(nn.Module):
    """Maps the last ``n_obs_steps`` raw observations to ``n_action_steps`` raw actions.

    ``spec`` is a plain dict (the ``policy`` part of a resolved config): ``task`` (``low_dim``
    {key: dim}, ``image_keys``, ``image_shape``, ``action_dim``), ``horizon``, ``n_obs_steps``,
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
        if self.image_keys:
            self.obs_encoder: nn.Module = ImageEncoder(
                self.image_keys,
                self.low_dim,
                self.n_obs_steps,
                crop=int(model.get("crop", 84)),
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
        expected.update({k: tuple(self.spec["task"]["image_shape"]) for k in self.image_keys})
        missing = sorted(set(expected) - set(obs))
        if missing:
            raise ValueError(f"observation is missing keys {missing}; expected {sorted(expected)}")
        batch = None
        for key, tail in expected.items():
            shape = tuple(np.shape(obs[key]))
            if len(shape) != 2 + len(tail) or shape[2:] != tail or shape[1] < self.n_obs_steps:
                raise ValueError(
                    f"obs[{key!r}] must have shape (batch, >={self.n_obs_steps}, "
                    f"{', '.join(map(str, tail))}), got {shape}"
                )
            if batch is not None and shape[0] != batch:
                raise ValueError(f"obs[{key!r}] has batch {shape[0]}, other keys have {batch}")
            batch = shape[0]

    @torch.no_grad()
    def predict_action(
        self,
        obs: Mapping[str, Any],
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """Raw actions (B, n_action_steps, action_dim) for raw observations (B, >=n_obs_steps, ...).

        Uses the last ``n_obs_steps`` observations. Following Diffusion Policy, the executed
        actions start at the chunk index of the latest observation (n_obs_steps - 1).
        """
        self.check_obs(obs)
        device = next(self.parameters()).device
        window = {
            k: torch.as_tensor(np.asarray(obs[k])[:, -self.n_obs_steps :], device=device)
            for k in [*self.low_dim, *self.image_keys]
        }
        batch = next(iter(window.values())).shape[0]
        cond = self.obs_encoder(self.normalize_obs(window))
        shape = (batch, self.horizon, self.action_dim)
        chunk = self.method.sample(self.net, cond, shape, steps=steps, generator=generator)
        action = self.normalizer.unnormalize("action", chunk)
        start = self.n_obs_steps - 1
        return action[:, start : start + self.n_action_steps].cpu().numpy()

    # --- persistence ---------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """Network and normaliser tensors, flat, for safetensors."""
        out = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        out.update({f"normalizer.{k}": v for k, v in self.normalizer.state_dict().items()})
        return out

    @classmethod
    def from_weights(cls, spec: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> Policy:
        prefix = "normalizer."
        norm = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        policy = cls(spec, LinearNormalizer.from_state_dict(norm))
        policy.load_state_dict({k: v for k, v in weights.items() if not k.startswith(prefix)})
        return policy.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema") -> Policy:
        """Load a checkpoint folder (or its ``latest`` pointer's parent) for evaluation."""
        from cm_policy.training.checkpoint import load_policy

        return load_policy(path, weights=weights)


def _plain(obj: Any) -> Any:
    """Convert OmegaConf containers and tuples into plain dicts and lists."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
