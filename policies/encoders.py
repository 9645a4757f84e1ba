"""Observation encoders: a batch of observation histories -> one global conditioning vector.

Images go through a ResNet-18-style trunk with GroupNorm and a spatial-softmax keypoint head, as
diffusion_policy does for robomimic image tasks (one encoder per camera, 84x84 randomly cropped to
76x76 while training, center crop at eval). The trunk is written out here because torchvision
cannot be installed beside the pinned torch; it has torchvision's resnet18 layout up to layer4
(BasicBlocks [2, 2, 2, 2]), with every BatchNorm replaced by GroupNorm(channels // 16).
`image_width` scales the stage widths (64, 128, 256, 512 at the default 64): width 16 costs about
1/16 of the FLOPs, which is what lets an image policy train in an hour on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from robomosaic.data.spec import KeySpec


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(channels // 16, channels)


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    """Linear layers with Mish between them (none after the last)."""
    dims = [in_dim, *hidden_dims, out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Mish())
    return nn.Sequential(*layers)


class StateEncoder(nn.Module):
    """Concatenates the selected state keys over the observation history and applies an MLP.

    `dims` maps key -> flattened per-step size. With `out_dim=None` the flat concatenation is the
    feature (diffusion_policy's low-dim policies do this).
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        n_obs_steps: int,
        hidden_dims: Sequence[int] = (256,),
        out_dim: int | None = 128,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError("StateEncoder needs at least one state key")
        self.keys = list(dims)
        self.n_obs_steps = n_obs_steps
        in_dim = n_obs_steps * sum(dims.values())
        self.net = nn.Identity() if out_dim is None else mlp(in_dim, hidden_dims, out_dim)
        self.out_dim = in_dim if out_dim is None else out_dim

    def forward(self, states: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """states[key]: (B, n_obs_steps, ...) -> (B, out_dim)."""
        flat = torch.cat([states[k].flatten(2).float() for k in self.keys], dim=-1)
        return self.net(flat.flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), _group_norm(out_channels)
            )
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet18Trunk(nn.Sequential):
    """torchvision resnet18 without avgpool/fc (robomimic's ResNet18Conv), GroupNorm instead of BatchNorm."""

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        if width < 16 or width % 16:
            raise ValueError(f"image_width must be a positive multiple of 16 (GroupNorm groups), got {width}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            _group_norm(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
        channels = width
        for stage_width, stride in [(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]:
            layers += [BasicBlock(channels, stage_width, stride), BasicBlock(stage_width, stage_width, 1)]
            channels = stage_width
        super().__init__(*layers)
        self.out_channels = channels


class SpatialSoftmax(nn.Module):
    """robomimic's SpatialSoftmax: a 1x1 conv to num_kp maps, softmax over HxW, expected (x, y).

    Returns keypoints (B, num_kp, 2) in [-1, 1] image coordinates (x right, y down).
    """

    def __init__(self, in_channels: int, num_kp: int = 32, temperature: float = 1.0) -> None:
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_kp, 1)
        self.temperature = temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.keypoints(features)
        b, k, h, w = logits.shape
        attention = F.softmax(logits.flatten(2) / self.temperature, dim=-1).view(b, k, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=attention.dtype)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=attention.dtype)
        expected_x = (attention.sum(dim=2) * xs).sum(dim=-1)
        expected_y = (attention.sum(dim=3) * ys).sum(dim=-1)
        return torch.stack([expected_x, expected_y], dim=-1)


class ImageEncoder(nn.Module):
    """One camera: crop -> ResNet-18 trunk -> spatial softmax -> linear -> (N, feature_dim).

    Accepts uint8 images (scaled to [0, 1]) or float images used as given ([0, 1] or normalized),
    channels-last (N, H, W, C) as stored, or channels-first (N, C, H, W).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        crop_shape: Sequence[int] | None = None,
        num_kp: int = 32,
        feature_dim: int = 64,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
        self.height, self.width, self.channels = (int(s) for s in image_shape)
        crop = (self.height, self.width) if crop_shape is None else tuple(int(s) for s in crop_shape)
        if len(crop) != 2 or not (0 < crop[0] <= self.height and 0 < crop[1] <= self.width):
            raise ValueError(
                f"crop_shape {crop} must be (h, w) within the image size {self.height, self.width}"
            )
        self.crop_shape = crop
        self.trunk = ResNet18Trunk(self.channels, width)
        self.spatial_softmax = SpatialSoftmax(self.trunk.out_channels, num_kp)
        self.head = nn.Linear(2 * num_kp, feature_dim)
        self.out_dim = feature_dim

    def to_float_chw(self, images: torch.Tensor) -> torch.Tensor:
        hwc, chw = (self.height, self.width, self.channels), (self.channels, self.height, self.width)
        if images.ndim != 4 or tuple(images.shape[1:]) not in (hwc, chw):
            raise ValueError(f"images must be (N, *{hwc}) or (N, *{chw}), got {tuple(images.shape)}")
        if tuple(images.shape[1:]) == hwc:
            images = images.permute(0, 3, 1, 2)
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """Random crop per image in training mode (data augmentation), center crop in eval mode."""
        n, _, h, w = images.shape
        ch, cw = self.crop_shape
        if (ch, cw) == (h, w):
            return images
        if not self.training:
            top, left = (h - ch) // 2, (w - cw) // 2
            return images[:, :, top : top + ch, left : left + cw]
        top = torch.randint(0, h - ch + 1, (n, 1), device=images.device)
        left = torch.randint(0, w - cw + 1, (n, 1), device=images.device)
        rows = (top + torch.arange(ch, device=images.device))[:, :, None]  # (N, ch, 1)
        cols = (left + torch.arange(cw, device=images.device))[:, None, :]  # (N, 1, cw)
        batch = torch.arange(n, device=images.device)[:, None, None]
        return images[batch, :, rows, cols].permute(0, 3, 1, 2)  # indexing puts channels last

    def keypoints(self, images: torch.Tensor) -> torch.Tensor:
        """(N, num_kp, 2) in [-1, 1]."""
        return self.spatial_softmax(self.trunk(self.crop(self.to_float_chw(images))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.keypoints(images).flatten(1))


class TaskEncoder(nn.Module):
    """Task conditioning: a learned embedding per integer task id, and/or a linear projection of a
    precomputed text embedding (e.g. of a language instruction); when both are configured they are summed.
    """

    def __init__(self, out_dim: int, num_tasks: int | None = None, text_dim: int | None = None) -> None:
        super().__init__()
        if num_tasks is None and text_dim is None:
            raise ValueError("TaskEncoder needs num_tasks or text_dim")
        self.num_tasks = num_tasks
        self.ids = None if num_tasks is None else nn.Embedding(num_tasks, out_dim)
        self.text = None if text_dim is None else nn.Linear(text_dim, out_dim)
        self.out_dim = out_dim

    def forward(
        self, task_id: torch.Tensor | None = None, text_embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = []
        if self.ids is not None:
            if task_id is None:
                raise ValueError("task_id is required: the encoder was built with num_tasks")
            if task_id.numel() and (task_id.min() < 0 or task_id.max() >= self.num_tasks):
                raise ValueError(f"task_id out of range [0, {self.num_tasks}): {task_id.tolist()}")
            parts.append(self.ids(task_id.long()))
        if self.text is not None:
            if text_embedding is None:
                raise ValueError("text_embedding is required: the encoder was built with text_dim")
            parts.append(self.text(text_embedding.float()))
        return torch.stack(parts).sum(dim=0)


class ObservationEncoder(nn.Module):
    """Encodes a batch dict {key: (B, n_obs_steps, *shape)} into a global cond vector (B, out_dim).

    `obs_shapes` maps key -> per-step shape (or KeySpec). Keys in `image_keys` (default: KeySpecs
    with `is_image`) each get their own ImageEncoder applied to every history frame; the rest are
    state keys for one StateEncoder. Task conditioning, if configured, reads `batch[task_key]`
    (B,) integer ids and/or `batch[text_key]` (B, text_dim). A `task_key` among `obs_shapes` (a
    multitask dataset's per-step task id) is read as a history (B, n_obs_steps) whose latest id
    conditions, and needs `num_tasks`. Features are concatenated in the order
    [state, images in key order (frames in time order), task].
    """

    def __init__(
        self,
        obs_shapes: Mapping[str, Sequence[int] | KeySpec],
        n_obs_steps: int,
        image_keys: Sequence[str] | None = None,
        crop_shape: Sequence[int] | None = None,
        num_kp: int = 32,
        image_feature_dim: int = 64,
        image_width: int = 64,
        state_hidden_dims: Sequence[int] = (256,),
        state_feature_dim: int | None = 128,
        num_tasks: int | None = None,
        text_dim: int | None = None,
        task_feature_dim: int = 32,
        task_key: str = "task_id",
        text_key: str = "text_embedding",
    ) -> None:
        super().__init__()
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        shapes = {k: tuple(v.shape if isinstance(v, KeySpec) else v) for k, v in obs_shapes.items()}
        if image_keys is None:
            image_keys = [k for k, v in obs_shapes.items() if isinstance(v, KeySpec) and v.is_image]
        unknown = [k for k in image_keys if k not in shapes]
        if unknown:
            raise ValueError(f"image_keys {unknown} are not in obs_shapes {list(shapes)}")
        if task_key in shapes and num_tasks is None:
            raise ValueError(f"observation {task_key!r} (a task id) needs encoder num_tasks")
        self.n_obs_steps = n_obs_steps
        self.shapes = shapes
        self.obs_keys = list(shapes)  # the batch keys read besides the task inputs
        self.task_key, self.text_key = task_key, text_key
        state_dims = {
            k: int(torch.Size(s).numel()) for k, s in shapes.items() if k not in (*image_keys, task_key)
        }
        self.state = (
            StateEncoder(state_dims, n_obs_steps, state_hidden_dims, state_feature_dim)
            if state_dims
            else None
        )
        self.images = nn.ModuleDict(
            {
                k: ImageEncoder(shapes[k], crop_shape, num_kp, image_feature_dim, image_width)
                for k in image_keys
            }
        )
        has_task = num_tasks is not None or text_dim is not None
        self.task = TaskEncoder(task_feature_dim, num_tasks, text_dim) if has_task else None
        if self.state is None and not self.images and self.task is None:
            raise ValueError(
                "ObservationEncoder has nothing to encode: obs_shapes is empty and no task input"
            )
        self.out_dim = (
            (self.state.out_dim if self.state else 0)
            + n_obs_steps * sum(enc.out_dim for enc in self.images.values())
            + (self.task.out_dim if self.task else 0)
        )

    def _checked(self, batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"observation batch has no key {key!r} (has {sorted(batch)})")
        value = batch[key]
        expected = (self.n_obs_steps, *self.shapes[key])
        if tuple(value.shape[1:]) != expected:
            raise ValueError(f"observation {key!r} must be (batch, *{expected}), got {tuple(value.shape)}")
        return value

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = []
        if self.state is not None:
            features.append(self.state({k: self._checked(batch, k) for k in self.state.keys}))
        for key, encoder in self.images.items():
            frames = self._checked(batch, key)
            b = frames.shape[0]
            features.append(encoder(frames.flatten(0, 1)).view(b, -1))
        if self.task is not None:
            task_id = batch.get(self.task_key)
            if self.task_key in self.shapes:  # an observed history: the latest id conditions
                task_id = self._checked(batch, self.task_key)[:, -1].round()
            features.append(self.task(task_id, batch.get(self.text_key)))
        return torch.cat(features, dim=-1)
