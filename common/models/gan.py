"""Conditional image generation (pix2pix, Isola et al. 2017): a label map -> image generator and a PatchGAN
discriminator that judges (label map, image) pairs patch by patch.

- `ResnetGenerator`: pix2pix's ResNet generator (Johnson et al.'s architecture): a 7x7 convolution, `downsamples`
  stride-2 convolutions, `blocks` residual blocks, as many transposed convolutions, a 7x7 convolution and tanh;
  instance normalisation. pix2pix's `resnet_9blocks` is width 64, 2 downsamples, 9 blocks.
- `PatchDiscriminator`: pix2pix's `basic` (n_layers) PatchGAN: 4x4 convolutions, stride 2 for the first `layers`,
  then stride 1, one logit per overlapping patch.
- `VGG16Features` and `perceptual_loss`: the perceptual loss of image-synthesis papers (Johnson et al. 2016): the
  mean squared difference of two images' ImageNet VGG-16 activations after relu1_2, relu2_2, relu3_3 and relu4_3,
  averaged over the four layers. The weights are torchvision's `vgg16` state dict read from a local file
  (`load_vgg16_features`); nothing is downloaded.

Label maps are float masks (N, S, H, W), one channel per structure (common/segmentation.py); images are in
[-1, 1] (tanh).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import SuiteError


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width))

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    def __init__(self, label_channels: int, image_channels: int, width: int = 64, downsamples: int = 2,
                 blocks: int = 9):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(label_channels, width, 7),
                                   nn.InstanceNorm2d(width), nn.ReLU(True)]
        w = width
        for _ in range(downsamples):
            layers += [nn.Conv2d(w, 2 * w, 3, 2, 1), nn.InstanceNorm2d(2 * w), nn.ReLU(True)]
            w *= 2
        layers += [ResidualBlock(w) for _ in range(blocks)]
        for _ in range(downsamples):
            layers += [nn.ConvTranspose2d(w, w // 2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(w // 2),
                       nn.ReLU(True)]
            w //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w, image_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, S, H, W) label map -> (N, image_channels, H, W) image in [-1, 1]."""
        return self.net(masks)


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        w = width
        for n in range(1, layers + 1):
            w_next = width * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(w, w_next, 4, stride, 1), nn.InstanceNorm2d(w_next), nn.LeakyReLU(0.2, True)]
            w = w_next
        seq += [nn.Conv2d(w, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)

    def forward(self, masks: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Patch logits (N, 1, h, w) of (label map, image) pairs: real pairs high, generated ones low."""
        return self.net(torch.cat([masks, image], 1))


def resnet_generator(in_channels: int, num_classes: int, width: int = 64, downsamples: int = 2,
                     blocks: int = 9) -> ResnetGenerator:
    """The generator of a segmentation dataset's images from its label maps: `num_classes` (its structures) mask
    channels in, its `in_channels` image channels out."""
    return ResnetGenerator(num_classes, in_channels, width, downsamples, blocks)


# VGG-16 `features` indices of the ReLUs whose activations the perceptual loss compares.
VGG16_LAYERS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3"}
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet weights (VGG16_Weights.IMAGENET1K_V1)
VGG16_HOWTO = ("it is torchvision's ImageNet VGG-16 state dict (VGG16_Weights.IMAGENET1K_V1): on a machine with "
               "internet access, download https://download.pytorch.org/models/vgg16-397923af.pth (or run "
               "`python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` and take it "
               "from ~/.cache/torch/hub/checkpoints/) and copy it there; nothing is downloaded at run time")


class VGG16Features(nn.Module):
    """torchvision's VGG-16 convolutional layers up to relu4_3, frozen and in eval mode: `forward` returns the
    activations of `VGG16_LAYERS` in order. Inputs are used as given (no ImageNet normalisation)."""

    def __init__(self, state_dict: dict):
        super().__init__()
        import torchvision
        with torch.device("meta"):  # only the shapes: the weights come from `state_dict`
            features = torchvision.models.vgg16(weights=None).features[:max(VGG16_LAYERS) + 1]
        features = features.to_empty(device="cpu")
        prefix = "features."
        features.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items()
                                  if k.startswith(prefix) and int(k.split(".")[1]) <= max(VGG16_LAYERS)})
        self.layers = features
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always in eval mode

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in VGG16_LAYERS:
                out.append(x)
        return out


def load_vgg16_features(path: str | Path) -> VGG16Features:
    """`VGG16Features` with the weights of a torchvision vgg16 state dict saved at `path` (the classifier's
    weights, if present, are ignored). A missing or unreadable file is one SuiteError saying how to get it."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"the perceptual loss needs VGG-16 weights at {path}: {VGG16_HOWTO}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return VGG16Features(state)
    except (RuntimeError, OSError, ValueError, TypeError, AttributeError, KeyError, pickle.UnpicklingError) as e:
        raise SuiteError(f"{path} is not a torchvision vgg16 state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {VGG16_HOWTO}") from None


def perceptual_loss(features: VGG16Features, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over `features`' layers of the mean squared difference of the activations of `image` and `target`
    (as the TDGAN code computes it: per layer the summed square difference over the activation count, then / 4).
    Gradients reach `image` only; the target's activations are computed without them."""
    with torch.no_grad():
        wanted = features(target)
    got = features(image)
    return sum(F.mse_loss(a, b) for a, b in zip(got, wanted)) / len(got)
