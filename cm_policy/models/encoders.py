"""Observation encoders: a window of n_obs_steps observations -> one condition vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LowDimEncoder(nn.Module):
    """Concatenates normalised low-dim keys and flattens them over the observation window."""

    def __init__(self, key_dims: Mapping[str, int], n_obs_steps: int):
        super().__init__()
        self.keys = list(key_dims)
        self.out_dim = sum(key_dims.values()) * n_obs_steps

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([obs[k].flatten(1) for k in self.keys], dim=-1)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (BatchNorm is a poor fit for EMA weights and batch 1)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.GroupNorm(groups, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks) with GroupNorm and a global average pool."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), groups_per: int = 16):
        super().__init__()
        w0 = widths[0]

        def groups(width: int) -> int:  # Diffusion Policy's choice: 16 channels per group
            return max(1, width // groups_per)

        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 7, 2, 3, bias=False),
            nn.GroupNorm(groups(w0), w0),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, in_ch = [], w0
        for k, w in enumerate(widths):
            stride = 1 if k == 0 else 2
            layers += [BasicBlock(in_ch, w, stride, groups(w)), BasicBlock(w, w, 1, groups(w))]
            in_ch = w
        self.layers = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


Crop = int | float | Sequence[int]
DEFAULT_CROP = 84  # specs written before the crop was a setting used Diffusion Policy's 84


def crop_sizes(
    crop: Crop | Mapping[str, Crop], shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, int]]:
    """Each camera's crop (height, width) in pixels, from ``model.crop``: pixels (``84``: a
    square, ``[h, w]``: a rectangle), a fraction of each side (``0.875``: 84 of 96), or a
    mapping camera -> either. A crop larger than its camera's frames is refused in one line
    naming the camera and both sizes."""
    if isinstance(crop, Mapping):
        missing = [k for k in shapes if k not in crop]
        if missing:
            raise ValueError(
                f"model.crop names cameras {sorted(map(str, crop))} but not {missing}: give "
                "every camera its crop, or one crop for all"
            )
    out = {}
    for key, shape in shapes.items():
        value = crop[key] if isinstance(crop, Mapping) else crop
        height, width = int(shape[0]), int(shape[1])
        out[key] = _crop_size(key, value, height, width)
        if out[key][0] > height or out[key][1] > width:
            h, w = out[key]
            raise ValueError(
                f"camera {key!r}: its frames are {height}x{width}, smaller than the crop "
                f"model.crop={_shown(value)} ({h}x{w}): set model.crop to at most "
                f"{min(height, width)} (pixels), [{height},{width}], or a fraction such as 0.875"
            )
    return out


def _crop_size(key: str, value: Crop, height: int, width: int) -> tuple[int, int]:
    if isinstance(value, float) and 0 < value <= 1:
        return max(1, int(value * height)), max(1, int(value * width))
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(
        f"model.crop for camera {key!r} must be pixels (84), [height, width] or a fraction of "
        f"each side in (0, 1] (0.875), got {value!r}"
    )


def _shown(value: Crop) -> str:
    return f"[{value[0]},{value[1]}]" if isinstance(value, Sequence) else str(value)


class ImageEncoder(nn.Module):
    """One ResNet-18-GN per camera on cropped images, concatenated with low-dim keys.

    Images arrive as (B, T, H, W, 3) uint8 or float in 0..255, each camera at its own size
    (``image_shapes``). Training takes a random crop per sample, evaluation the centre crop,
    each camera its own (:func:`crop_sizes`; Diffusion Policy's 84 of 96 for PushT).
    """

    def __init__(
        self,
        image_shapes: Mapping[str, Sequence[int]],
        low_dim: Mapping[str, int],
        n_obs_steps: int,
        crop: Crop | Mapping[str, Crop] = DEFAULT_CROP,
        widths: Sequence[int] = (64, 128, 256, 512),
    ):
        super().__init__()
        self.image_keys = list(image_shapes)
        self.frames = {k: (int(s[0]), int(s[1])) for k, s in image_shapes.items()}
        self.low_dim_keys = list(low_dim)
        self.crops = crop_sizes(crop, image_shapes)
        self.backbones = nn.ModuleDict({k: ResNet18GN(widths) for k in self.image_keys})
        per_step = widths[-1] * len(self.image_keys) + sum(low_dim.values())
        self.out_dim = per_step * n_obs_steps

    def _crop(self, x: torch.Tensor, key: str) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != self.frames[key]:
            raise ValueError(
                f"camera {key!r}: frames of {h}x{w}, this encoder takes "
                f"{self.frames[key][0]}x{self.frames[key][1]}"
            )
        ch, cw = self.crops[key]
        if self.training:
            n = x.shape[0]
            top = torch.randint(0, h - ch + 1, (n,), device=x.device)
            left = torch.randint(0, w - cw + 1, (n,), device=x.device)
            # Every ch x cw window as a view (n, C, h-ch+1, w-cw+1, ch, cw), then one gather of
            # each sample's window (7x faster on the CPU than an index per pixel).
            windows = x.unfold(2, ch, 1).unfold(3, cw, 1)
            return windows[torch.arange(n, device=x.device), :, top, left]
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[..., top : top + ch, left : left + cw]

    @staticmethod
    def _conv_layout(img: torch.Tensor) -> torch.Tensor:
        """Channels-last on the CPU, where oneDNN's convolutions run faster on it (a crop of
        the (N, H, W, C) frames already is; eval/bench_image_step.py), contiguous (N, C, H, W)
        elsewhere. The weights keep their layout either way (safetensors needs that)."""
        if img.device.type == "cpu":
            return img.contiguous(memory_format=torch.channels_last)
        return img.contiguous()

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch, steps = next(iter(obs.values())).shape[:2]
        feats = []
        for k in self.image_keys:
            # Cropped while still uint8: a quarter fewer pixels to convert and normalise.
            img = self._crop(obs[k].flatten(0, 1).permute(0, 3, 1, 2), k).float() / 255.0
            feats.append(self.backbones[k](self._conv_layout(img)).view(batch, steps, -1))
        feats += [obs[k].float() for k in self.low_dim_keys]
        return torch.cat(feats, dim=-1).flatten(1)
