"""Perceptual losses on ImageNet VGG features: the one VGG feature extractor of the suite.

- `VGGFeatures`: torchvision's VGG-16 or VGG-19 convolutional layers (`features`), truncated after the deepest layer
  asked for, frozen and always in eval mode; `forward` returns the activations after the given `features` indices,
  in order, optionally after ImageNet normalisation of the input (images in [0, 1]). The weights are torchvision's
  ImageNet state dict read from a local file (`load_vgg_features`: `vgg16-397923af.pth`, `vgg19-dcbb9e9d.pth`);
  only its `features.*` entries up to the deepest layer are read, nothing is downloaded, and a missing or unreadable
  file is one SuiteError saying how to get it.
- `perceptual_loss`: the distance of two images' activations, per layer the mean squared (`mse`) or absolute (`l1`)
  difference; averaged over the layers, or summed with per-layer weights. Gradients reach the image only: the
  target's activations are computed without them (the authors' `.detach()`).

Users: TDGAN (Johnson et al.'s loss as the TDGAN code has it: VGG-16 relu1_2, relu2_2, relu3_3, relu4_3, MSE averaged
over the layers, no normalisation; `VGG16_LAYERS`, `load_vgg16_features`) and MRAA (the FOMM/MRAA perceptual
pyramid: VGG-19 relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 after ImageNet normalisation, L1, weight 10 per layer,
at every level of an image pyramid; `VGG19_PYRAMID_LAYERS`).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import SuiteError

# torchvision's ImageNet weights (VGG16_Weights.IMAGENET1K_V1, VGG19_Weights.IMAGENET1K_V1)
VGG_FILES = {16: "vgg16-397923af.pth", 19: "vgg19-dcbb9e9d.pth"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# `features` indices of the ReLUs the two papers' losses compare
VGG16_LAYERS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3"}  # TDGAN (Johnson et al.)
VGG19_PYRAMID_LAYERS = {1: "relu1_1", 6: "relu2_1", 11: "relu3_1", 20: "relu4_1", 29: "relu5_1"}  # FOMM / MRAA
VGG16_FILE, VGG19_FILE = VGG_FILES[16], VGG_FILES[19]


def vgg_howto(depth: int) -> str:
    """How to obtain torchvision's ImageNet VGG-`depth` state dict."""
    file = VGG_FILES[depth]
    return (f"it is torchvision's ImageNet VGG-{depth} state dict (VGG{depth}_Weights.IMAGENET1K_V1): on a machine "
            f"with internet access, download https://download.pytorch.org/models/{file} (or run "
            f"`python -c \"import torchvision; torchvision.models.vgg{depth}(weights='IMAGENET1K_V1')\"` and take it "
            "from ~/.cache/torch/hub/checkpoints/) and copy it there; nothing is downloaded at run time")


VGG16_HOWTO = vgg_howto(16)


class VGGFeatures(nn.Module):
    """torchvision's VGG-`depth` (16 or 19) `features` up to the deepest of `layers`, frozen and in eval mode:
    `forward(x)` returns the activations after each `features` index in `layers`, in increasing order. With
    `normalize`, the input (in [0, 1]) is first normalised with ImageNet's mean and std; otherwise it is used as
    given. One-channel inputs are repeated to three channels. `state_dict` is torchvision's (keys `features.<i>.*`;
    other keys and layers deeper than needed are ignored)."""

    def __init__(self, state_dict: dict, depth: int = 16, layers: Sequence[int] = tuple(VGG16_LAYERS),
                 normalize: bool = False):
        super().__init__()
        import torchvision
        if depth not in VGG_FILES:
            raise SuiteError(f"VGG depth {depth} is not supported; use 16 or 19")
        self.depth, self.indices, self.normalize = depth, tuple(sorted(set(int(i) for i in layers))), normalize
        if not self.indices:
            raise SuiteError("VGGFeatures needs at least one layer")
        with torch.device("meta"):  # only the shapes: the weights come from `state_dict`
            full = getattr(torchvision.models, f"vgg{depth}")(weights=None).features
        if not 0 <= self.indices[0] or self.indices[-1] >= len(full):
            raise SuiteError(f"VGG-{depth} has features 0..{len(full) - 1}; asked for {list(self.indices)}")
        last = self.indices[-1]
        features = full[:last + 1].to_empty(device="cpu")
        for m in features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # an activation handed out is never overwritten by the next layer
        prefix = "features."
        features.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items()
                                  if k.startswith(prefix) and int(k.split(".")[1]) <= last})
        self.layers = features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always in eval mode

    def reachable(self, height: int, width: int) -> int:
        """How many of the requested layers an input of height x width reaches with a non-empty activation (each
        2x2 max-pooling halves the size, rounding down)."""
        h, w, n = height, width, 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.MaxPool2d):
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                break
            if i in self.indices:
                n += 1
        return n

    def forward(self, x: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
        """The activations of the requested layers (the first `count` of them, if given: the layers beyond the
        last of them are not run)."""
        wanted = self.indices if count is None else self.indices[:count]
        if not wanted:
            return []
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.normalize:
            x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in wanted:
                out.append(x)
                if i == wanted[-1]:
                    break
        return out


def load_vgg_features(path: str | Path, depth: int, layers: Sequence[int], normalize: bool = False) -> VGGFeatures:
    """`VGGFeatures` with the weights of a torchvision vgg`depth` state dict saved at `path` (only its `features.*`
    entries up to the deepest layer are needed; the classifier's, if present, are ignored). A missing or unreadable
    file is one SuiteError saying how to get it."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"the perceptual loss needs VGG-{depth} weights at {path}: {vgg_howto(depth)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return VGGFeatures(state, depth, layers, normalize)
    except (RuntimeError, OSError, ValueError, TypeError, AttributeError, KeyError, pickle.UnpicklingError) as e:
        raise SuiteError(f"{path} is not a torchvision vgg{depth} state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {vgg_howto(depth)}") from None


def perceptual_loss(features: VGGFeatures, image: torch.Tensor, target: torch.Tensor, distance: str = "mse",
                    weights: Sequence[float] | None = None, count: int | None = None) -> torch.Tensor:
    """The distance of `image`'s and `target`'s activations: per layer the mean squared (`distance="mse"`) or mean
    absolute (`"l1"`) difference; without `weights` the mean over the layers (TDGAN: per layer the summed squared
    difference over the activation count, then / 4), with `weights` their weighted sum (FOMM/MRAA: sum of w_i *
    mean |a_i - b_i|). `count` limits the comparison to the first `count` layers (and weights). Gradients reach
    `image` only; the target's activations are computed without them."""
    if distance not in ("mse", "l1"):
        raise SuiteError(f"unknown perceptual distance '{distance}'; use mse or l1")
    with torch.no_grad():
        wanted = features(target, count)
    got = features(image, count)
    diff = F.mse_loss if distance == "mse" else F.l1_loss
    if weights is None:
        return sum(diff(a, b) for a, b in zip(got, wanted)) / len(got)
    return sum(w * diff(a, b) for w, a, b in zip(weights, got, wanted))


# TDGAN's names (VGG-16 relu1_2..relu4_3, inputs as given)
class VGG16Features(VGGFeatures):
    """torchvision's VGG-16 convolutional layers up to relu4_3, frozen and in eval mode: `forward` returns the
    activations of `VGG16_LAYERS` in order. Inputs are used as given (no ImageNet normalisation)."""

    def __init__(self, state_dict: dict):
        super().__init__(state_dict, 16, tuple(VGG16_LAYERS), normalize=False)


def load_vgg16_features(path: str | Path) -> VGGFeatures:
    """`VGGFeatures` of TDGAN's perceptual loss (VGG-16, `VGG16_LAYERS`, no normalisation) from the torchvision
    vgg16 state dict at `path`."""
    return load_vgg_features(path, 16, tuple(VGG16_LAYERS), normalize=False)
