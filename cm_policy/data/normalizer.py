"""Per-key affine normalization ``y = x * scale + offset``, fitted from data, saved as tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar

import numpy as np
import torch

Mode = Literal["limits", "gaussian", "identity"]
MODES: tuple[str, ...] = ("limits", "gaussian", "identity")
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# Dimensions whose range (limits) or std (gaussian) is below this are treated as constant: they
# get scale 1 and are only shifted to 0, instead of being blown up by a near-zero denominator.
SAFE_RANGE_EPS = 1e-4
# "limits" maps [min, max] of each dimension onto this interval.
OUTPUT_MIN, OUTPUT_MAX = -1.0, 1.0

_PARAMS = ("scale", "offset")
_STATS = ("min", "max", "mean", "std")


def _fit_key(x: torch.Tensor, mode: str, last_n_dims: int) -> dict[str, torch.Tensor]:
    if x.ndim < last_n_dims:
        raise ValueError(f"expected at least {last_n_dims} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"cannot fit statistics on an empty array of shape {tuple(x.shape)}")
    feature_shape = x.shape[x.ndim - last_n_dims :]
    # float64 keeps mean/std accurate over millions of samples before rounding to float32.
    flat = x.reshape(-1, *feature_shape).to(torch.float64)
    stats = {
        "min": flat.amin(dim=0),
        "max": flat.amax(dim=0),
        "mean": flat.mean(dim=0),
        "std": flat.std(dim=0, correction=0),
    }
    if mode == "limits":
        span = stats["max"] - stats["min"]
        constant = span < SAFE_RANGE_EPS
        # The clamp only guards the discarded branch of `where`: non-constant spans exceed it.
        scale = torch.where(
            constant, 1.0, (OUTPUT_MAX - OUTPUT_MIN) / span.clamp_min(SAFE_RANGE_EPS)
        )
        center = (stats["max"] + stats["min"]) / 2
        # Maps min -> OUTPUT_MIN and max -> OUTPUT_MAX; constant dims map their value to 0.
        offset = torch.where(constant, -center, OUTPUT_MIN - scale * stats["min"])
    else:
        constant = stats["std"] < SAFE_RANGE_EPS
        scale = torch.where(constant, 1.0, 1 / stats["std"].clamp_min(SAFE_RANGE_EPS))
        offset = -scale * stats["mean"]
    params = {"scale": scale, "offset": offset, **stats}
    return {name: t.to(torch.float32).contiguous() for name, t in params.items()}


class LinearNormalizer:
    """Affine normalizers keyed by name, e.g. ``"action"`` or ``"obs.state"``.

    Parameters broadcast over leading dims, so one fitted on (N, D) data applies to (B, T, D).
    """

    def __init__(self) -> None:
        self._params: dict[str, dict[str, torch.Tensor]] = {}
        # (key, device, dtype) -> scale and offset already there: a GPU policy then copies the
        # parameters once, not at every call. Emptied whenever a key is (re)set.
        self._moved: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def fit(
        self,
        data: Mapping[str, np.ndarray | torch.Tensor],
        mode: Mode | Mapping[str, Mode] = "limits",
        last_n_dims: int = 1,
    ) -> LinearNormalizer:
        """Fit each key of `data` with statistics over all but its last `last_n_dims` dims.

        `mode` is one mode for all keys or a mapping per key (keys it omits use "limits").
        "identity" keys are not scanned, which keeps large image arrays cheap.
        """
        if last_n_dims < 0:
            raise ValueError(f"last_n_dims must be >= 0, got {last_n_dims}")
        for key, value in data.items():
            key_mode = mode.get(key, "limits") if isinstance(mode, Mapping) else mode
            if key_mode not in MODES:
                raise ValueError(f"{key}: unknown normalizer mode {key_mode!r}, expected {MODES}")
            if key_mode == "identity":
                self.set_identity(key)
                continue
            self._params[key] = _fit_key(torch.as_tensor(value), key_mode, last_n_dims)
            self._moved.clear()
        return self

    def set_identity(self, key: str) -> None:
        """Pass `key` through unchanged (e.g. images scaled elsewhere)."""
        self.set_scale_offset(key, torch.tensor(1.0), torch.tensor(0.0))

    def set_scale_offset(
        self, key: str, scale: torch.Tensor | float, offset: torch.Tensor | float
    ) -> None:
        """Use a fixed affine map for `key`, e.g. scale 2/255 and offset -1 for uint8 images."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        offset = torch.as_tensor(offset, dtype=torch.float32)
        if scale.shape != offset.shape:
            raise ValueError(
                f"{key}: scale and offset need the same shape, got {tuple(scale.shape)} "
                f"and {tuple(offset.shape)}"
            )
        if (scale == 0).any():
            raise ValueError(f"{key}: scale must be non-zero to be invertible")
        self._params[key] = {"scale": scale.contiguous(), "offset": offset.contiguous()}
        self._moved.clear()

    def keys(self) -> list[str]:
        return list(self._params)

    def __contains__(self, key: object) -> bool:
        return key in self._params

    def stats(self, key: str) -> dict[str, torch.Tensor]:
        """min/max/mean/std recorded when `key` was fitted (empty for fixed maps)."""
        return {k: v for k, v in self._get(key).items() if k in _STATS}

    def _get(self, key: str) -> dict[str, torch.Tensor]:
        if key not in self._params:
            raise KeyError(f"normalizer has no key {key!r} (fitted keys: {self.keys()})")
        return self._params[key]

    def _scale_offset(
        self, key: str, x: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
        params = self._get(key)
        scale, offset = params["scale"], params["offset"]
        if scale.ndim and tuple(x.shape[x.ndim - scale.ndim :]) != tuple(scale.shape):
            raise ValueError(
                f"normalizer for {key!r} expects trailing shape {tuple(scale.shape)}, "
                f"got an array of shape {tuple(x.shape)}"
            )
        if isinstance(x, np.ndarray):
            return scale.numpy(), offset.numpy()
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if x.device.type == "cpu":
            return scale.to(x.device, dtype), offset.to(x.device, dtype)
        where = (key, x.device, dtype)
        if where not in self._moved:
            self._moved[where] = (scale.to(x.device, dtype), offset.to(x.device, dtype))
        return self._moved[where]

    def normalize(self, key: str, x: ArrayT) -> ArrayT:
        """Map raw values of `key` to normalized ones; numpy in, numpy out."""
        scale, offset = self._scale_offset(key, x)
        if isinstance(x, np.ndarray):
            return x * scale + offset
        return x.to(scale.dtype) * scale + offset

    def unnormalize(self, key: str, x: ArrayT) -> ArrayT:
        """Inverse of `normalize`."""
        scale, offset = self._scale_offset(key, x)
        if isinstance(x, np.ndarray):
            return (x - offset) / scale
        return (x.to(scale.dtype) - offset) / scale

    def to(self, device: torch.device | str) -> LinearNormalizer:
        """Move parameters to `device` so normalizing there needs no per-call copies."""
        for params in self._params.values():
            for name, tensor in params.items():
                params[name] = tensor.to(device)
        self._moved.clear()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat CPU tensors named ``"<key>.<param>"``, ready for safetensors."""
        return {
            f"{key}.{name}": tensor.detach().cpu().contiguous()
            for key, params in self._params.items()
            for name, tensor in params.items()
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> LinearNormalizer:
        """Rebuild a normalizer from `state_dict` output."""
        normalizer = cls()
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in state.items():
            key, sep, param = name.rpartition(".")
            if not sep or param not in _PARAMS + _STATS:
                raise ValueError(
                    f"unexpected normalizer entry {name!r}: expected '<key>.<param>' with param "
                    f"in {_PARAMS + _STATS}"
                )
            grouped.setdefault(key, {})[param] = torch.as_tensor(tensor, dtype=torch.float32)
        for key, params in grouped.items():
            missing = [p for p in _PARAMS if p not in params]
            if missing:
                raise ValueError(
                    f"normalizer entry {key!r} lacks {missing} (found {sorted(params)})"
                )
            normalizer.set_scale_offset(key, params["scale"], params["offset"])
            normalizer._params[key].update({k: v for k, v in params.items() if k in _STATS})
        return normalizer
