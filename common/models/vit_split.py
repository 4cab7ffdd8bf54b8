"""A Vision Transformer split into per-client heads and tails around one shared body (FeSTA's network).

- **head** (per client, on the client): a small CNN encoder, two 3x3 convolutions with BatchNorm and ReLU, then a `patch` x `patch`
  convolution with stride `patch` into `dim`-dimensional patch features: the tokens (N, T, dim) it sends.
- **body** (one, on the server): learned position embeddings added to the tokens, `layers` transformer encoder layers
  (`transformers`' `ViTLayer`, built from a `ViTConfig`, randomly initialised as `ViTModel` initialises them; no
  dropout), and the final LayerNorm: the tokens (N, T, dim) it returns.
- **tail** (per client, on the client), by the client's task:
  classification: LayerNorm and a linear layer on the tokens' mean and maximum (class logits);
  detection: LayerNorm, each token reduced to 8 features, a two-layer MLP on the flattened map and a sigmoid: one
  box (cx, cy, w, h) in [0, 1];
  segmentation: the tokens as a (dim, H/patch, W/patch) map, a 1x1 convolution, bilinear upsampling to the image
  size and a 3x3 convolution: one logit map.

Client k's task is `tasks[k % len(tasks)]` (`task_of`). `forward(x, client)` is the unsplit composition
tail_k(body(head_k(x))).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("classification", "detection", "segmentation")


class Head(nn.Module):
    def __init__(self, in_channels: int, width: int, hidden: int, patch: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Conv2d(width, hidden, patch, stride=patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)  # (N, T, dim)


class Body(nn.Module):
    def __init__(self, tokens: int, hidden: int, layers: int, heads: int, mlp: int):
        super().__init__()
        from transformers import ViTConfig, ViTModel
        config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=mlp, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           image_size=4, patch_size=4, num_channels=1)
        vit = ViTModel(config, add_pooling_layer=False)  # its initialisation; the patch embedding is not used
        self.layers, self.norm = vit.layers, vit.layernorm
        self.position = nn.Parameter(torch.randn(1, tokens, hidden) * 0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.position
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class ClassificationTail(nn.Module):
    """LayerNorm, then a linear layer on the tokens' mean and maximum (the maximum keeps a small lesion's token)."""

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(hidden), nn.Linear(2 * hidden, num_classes)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        b = self.norm(b)
        return self.fc(torch.cat([b.mean(1), b.amax(1)], 1))


class DetectionTail(nn.Module):
    """Each token reduced to 8 features (keeping where it is), the flattened map through a two-layer MLP and a
    sigmoid: one box (cx, cy, w, h) as fractions of the image."""

    def __init__(self, hidden: int, tokens: int):
        super().__init__()
        self.norm, self.reduce = nn.LayerNorm(hidden), nn.Linear(hidden, 8)
        self.mlp = nn.Sequential(nn.Linear(8 * tokens, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(F.relu(self.reduce(self.norm(b))).flatten(1)))


class SegmentationTail(nn.Module):
    def __init__(self, hidden: int, grid: int, size: int, width: int):
        super().__init__()
        self.grid, self.size = grid, size
        self.reduce, self.out = nn.Conv2d(hidden, width, 1), nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        m = b.transpose(1, 2).reshape(len(b), -1, self.grid, self.grid)
        m = F.interpolate(F.relu(self.reduce(m)), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.out(m)


class SplitViT(nn.Module):
    """Per-client heads and tails around one ViT body; `forward(x, client)` composes them."""

    def __init__(self, in_channels: int, num_classes: int, input_size: int, clients: int = 3,
                 tasks: tuple[str, ...] = TASKS, dim: int = 64, layers: int = 2, heads: int = 4, mlp: int = 128,
                 patch: int = 4, width: int = 16):
        super().__init__()
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(TASKS)}")
        self.tasks, self.clients = tuple(tasks), clients
        hidden, grid = dim, input_size // patch
        self.heads = nn.ModuleList(Head(in_channels, width, hidden, patch) for _ in range(clients))
        self.body = Body(grid * grid, hidden, layers, heads, mlp)

        def tail(task: str) -> nn.Module:
            if task == "classification":
                return ClassificationTail(hidden, num_classes)
            if task == "detection":
                return DetectionTail(hidden, grid * grid)
            return SegmentationTail(hidden, grid, input_size, width)
        self.tails = nn.ModuleList(tail(self.task_of(k)) for k in range(clients))

    def task_of(self, client: int) -> str:
        return self.tasks[client % len(self.tasks)]

    def forward(self, x: torch.Tensor, client: int = 0) -> torch.Tensor:
        return self.tails[client](self.body(self.heads[client](x)))


def split_vit(**params) -> SplitViT:
    if "tasks" in params:
        params["tasks"] = tuple(params["tasks"])
    return SplitViT(**params)
