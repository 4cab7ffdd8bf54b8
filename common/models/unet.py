"""A 2D U-Net for segmentation (FedDG, TDGAN's segmenter, FeSTA), width and depth as parameters.

The layout follows the U-Net of the FedDG authors' code (networks/unet2d.py): `depth` resolution levels, each an
encoder block of 3x3 convolutions with normalisation and ReLU, max-pooling between levels, channels doubling from
`width` at the top; the decoder upsamples, concatenates the skip connection and convolves back down; a 1x1
convolution gives one logit map per output channel. The authors use five levels, width 16, three convolutions per
block and instance normalisation; `depth`, `width` and `convs` are parameters here so that CPU analogs can be
small. `forward(x, features=True)` also returns the last decoder features (the embedding FedDG's boundary
contrastive loss pools over boundary and background regions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import SuiteError


def seg_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation of a U-Net block: instance (the authors' default, no parameters), batch, group (1 group,
    i.e. layer norm over the feature map) or none."""
    if kind == "in":
        return nn.InstanceNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise SuiteError(f"unknown U-Net norm '{kind}'; use in, bn, gn or none")


def conv_block(cin: int, cout: int, convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), seg_norm(norm, cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16, depth: int = 5, convs: int = 2,
                 norm: str = "in"):
        super().__init__()
        if depth < 1 or width < 1 or convs < 1:
            raise SuiteError(f"U-Net needs depth, width and convs >= 1, got {depth}, {width}, {convs}")
        chans = [width * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList(conv_block(in_channels if i == 0 else chans[i - 1], c, convs, norm)
                                  for i, c in enumerate(chans))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth - 1))
        self.dec = nn.ModuleList(conv_block(2 * chans[i], chans[i], convs, norm) for i in range(depth - 1))
        self.head = nn.Conv2d(width, num_classes, 1)
        self.feature_dim = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, features: bool = False):
        if x.shape[-1] % 2 ** (len(self.down) - 1) or x.shape[-2] % 2 ** (len(self.down) - 1):
            raise SuiteError(f"U-Net of depth {len(self.down)} needs image sides divisible by "
                             f"{2 ** (len(self.down) - 1)}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        logits = self.head(x)
        return (logits, x) if features else logits


def unet(in_channels: int, num_classes: int, width: int = 16, depth: int = 5, convs: int = 2, norm: str = "in",
         input_size: int | None = None) -> UNet:
    return UNet(in_channels, num_classes, width=width, depth=depth, convs=convs, norm=norm)
