"""Segmentation: the loss, the metrics per structure and the evaluation of a model on one site's images.

A segmentation dataset (e.g. `common/data/fundus.py`) holds images (N, C, H, W) and float 0/1 masks (N, S, H, W),
one channel per structure (FedDG's fundus: optic disc, optic cup; the cup lies inside the disc, so the structures
may overlap, as in the FedDG authors' code). A model outputs one logit map per structure; a pixel belongs to a
structure where the sigmoid of its logit exceeds `THRESHOLD`.

Metrics, per image and structure, then averaged over images:
- Dice = 2|P ∩ T| / (|P| + |T|), 1 when both masks are empty;
- HD95: the 95th percentile of the symmetric surface distances (in pixels) between the predicted and the true
  mask's boundary pixels, as medpy's `hd95` defines it (the percentile over the union of both directed distance
  sets). A boundary pixel is a mask pixel with a background pixel among its 4-neighbours (the mask minus its
  binary erosion); distances come from scipy.ndimage's exact Euclidean distance transform. Undefined (NaN, left
  out of the mean and counted) when either mask is empty.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

THRESHOLD = 0.5


def is_mask_target(y: torch.Tensor) -> bool:
    """A segmentation target (N, S, H, W) rather than class labels (N,)."""
    return y.dim() == 4


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - the mean over structures of the soft Dice of the batch (probabilities against 0/1 masks), the loss of
    the FedDG authors' code (utils/losses.py dice_loss)."""
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    dice = (2 * inter + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)
    return 1 - dice.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss of a segmentation model: soft Dice on the sigmoid of its logits."""
    return soft_dice_loss(torch.sigmoid(logits), target)


def dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice per image of boolean masks (N, H, W): 1 where both are empty."""
    pred, target = pred.astype(bool), target.astype(bool)
    inter = (pred & target).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + target.sum(axis=(1, 2))
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D boolean mask: the mask minus its erosion (4-connected structuring element; pixels
    outside the image count as background)."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Distances (pixels) from every boundary pixel of `pred` to the nearest boundary pixel of `target` and from
    every boundary pixel of `target` to `pred`'s, concatenated (2D boolean masks, both non-empty)."""
    bp, bt = boundary(pred), boundary(target)
    to_t = ndimage.distance_transform_edt(~bt)  # distance of each pixel to the nearest target boundary pixel
    to_p = ndimage.distance_transform_edt(~bp)
    return np.concatenate([to_t[bp], to_p[bt]])


def hd95(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """95% Hausdorff distance per image of boolean masks (N, H, W); NaN where either mask is empty."""
    out = np.full(len(pred), np.nan)
    for i, (p, t) in enumerate(zip(pred.astype(bool), target.astype(bool))):
        if p.any() and t.any():
            out[i] = np.percentile(surface_distances(p, t), 95)
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-structure probabilities (N, S, H, W) of `model` in eval mode."""
    model.eval()
    return torch.cat([torch.sigmoid(model(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, structures: tuple[str, ...],
                          batch_size: int = 64) -> dict:
    """Mean Dice and HD95 per structure of `model` on images `x` with masks `y`, and the mean Dice loss:
    {"dice": {structure: value}, "hd95": {structure: value or None}, "hd95_undefined": {structure: images},
    "loss": value}."""
    probs = predict(model, x, batch_size)
    loss = float(soft_dice_loss(probs, y))
    pred = (probs > THRESHOLD).cpu().numpy()
    target = y.cpu().numpy() > 0.5
    out = {"dice": {}, "hd95": {}, "hd95_undefined": {}, "loss": loss}
    for s, name in enumerate(structures):
        out["dice"][name] = float(dice(pred[:, s], target[:, s]).mean())
        h = hd95(pred[:, s], target[:, s])
        out["hd95"][name] = None if np.isnan(h).all() else float(np.nanmean(h))
        out["hd95_undefined"][name] = int(np.isnan(h).sum())
    return out
