"""Conditional image generation (pix2pix, Isola et al. 2017): a label map -> image generator and a PatchGAN
discriminator that judges (label map, image) pairs patch by patch.

- `ResnetGenerator`: pix2pix's ResNet generator (Johnson et al.'s architecture): a 7x7 convolution, `downsamples`
  stride-2 convolutions, `blocks` residual blocks, as many transposed convolutions, a 7x7 convolution and tanh;
  instance normalisation. pix2pix's `resnet_9blocks` is width 64, 2 downsamples, 9 blocks.
- `PatchDiscriminator`: pix2pix's `basic` (n_layers) PatchGAN: 4x4 convolutions, stride 2 for the first `layers`,
  then stride 1, one logit per overlapping patch.
- `VGG16Features`, `load_vgg16_features` and `perceptual_loss` (defined in `common/models/perceptual.py`, the
  suite's one VGG feature extractor, and re-exported here): the perceptual loss of image-synthesis papers (Johnson
  et al. 2016): the mean squared difference of two images' ImageNet VGG-16 activations after relu1_2, relu2_2,
  relu3_3 and relu4_3, averaged over the four layers. The weights are torchvision's `vgg16` state dict read from a
  local file; nothing is downloaded.

Label maps are float masks (N, S, H, W), one channel per structure (common/segmentation.py); images are in
[-1, 1] (tanh).
"""
from __future__ import annotations

import torch
from torch import nn

# TDGAN's perceptual loss lives with the suite's one VGG feature extractor; its names stay importable from here
from common.models.perceptual import (VGG16_FILE, VGG16_HOWTO, VGG16_LAYERS, VGG16Features,  # noqa: F401
                                      load_vgg16_features, perceptual_loss)


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
