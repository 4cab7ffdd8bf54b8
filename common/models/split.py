"""A CNN split between an edge device and a server (FedGKT, He et al. 2020, and split learning).

The edge holds a feature extractor (a 3x3 convolution, norm and ReLU: the stem of a CIFAR ResNet) and a small
classifier on its features (a few residual blocks, global average pooling and a linear layer); the server holds a
ResNet body with its own classifier that reads the extractor's feature maps. The whole network of the extractor and
the server's body is the "large" CNN that FedAvg would have to train on the edge.

`split_resnet(part=...)` builds
- `gkt`: `SplitNet`, both classifiers over one extractor (FedGKT's edge model and server model in one module);
  calling it runs the large path (extractor, server body, server head);
- `edge`: the edge model alone (extractor and edge classifier) as a `Classifier` (FedAvg training the small CNN);
- `large`: the extractor and the server body as one `Classifier` (FedAvg training the large CNN).

Residual blocks are torchvision's (`BasicBlock`, or `Bottleneck` with expansion 4 as in the FedGKT code's ResNet-8
edge and ResNet-56/110 server). `client_model()` is the module a client runs (what `common.models.compute` counts).
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from common.errors import SuiteError
from common.models import Classifier

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _stage(block, cin: int, planes: int, blocks: int, stride: int) -> tuple[list[nn.Module], int]:
    """`blocks` residual blocks of `planes` (out channels planes * expansion); the first with `stride` and a 1x1
    projection shortcut when the shape changes (torchvision's ResNet._make_layer)."""
    layers, cout = [], planes * block.expansion
    for b in range(blocks):
        down = None
        if b == 0 and (stride != 1 or cin != cout):
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        layers.append(block(cin, planes, stride if b == 0 else 1, down))
        cin = cout
    return layers, cin


def _extractor(in_channels: int, channels: int, pool: bool) -> nn.Sequential:
    """The edge's feature extractor: conv3x3 (no bias), BatchNorm, ReLU (FedGKT's client `conv1, bn1, relu`);
    `pool` adds 2x2 max-pooling (the mini analog's cheaper server)."""
    layers = [nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


def _edge_body(channels: int, blocks: int, block: str, planes: int | None) -> tuple[nn.Sequential, int]:
    layers, cout = _stage(BLOCKS[block], channels, planes or channels, blocks, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), cout


def _server_body(channels: int, blocks: list[int], widths: list[int], block: str) -> tuple[nn.Sequential, int]:
    """Stages of residual blocks (the first stage at stride 1, the others halving the map), pooled and flattened."""
    layers, cin = [], channels
    for s, (n, w) in enumerate(zip(blocks, widths)):
        stage, cin = _stage(BLOCKS[block], cin, w, n, 1 if s == 0 else 2)
        layers += stage
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), cin


class SplitNet(nn.Module):
    """FedGKT's pair of models over one extractor: `edge(x)` = edge_head(edge_body(extractor(x))) (the client's
    small CNN), `server(features)` = server_head(server_body(features)), `forward(x)` = server(extractor(x))."""

    def __init__(self, extractor: nn.Module, edge_body: nn.Module, edge_dim: int, server_body: nn.Module,
                 server_dim: int, num_classes: int):
        super().__init__()
        self.extractor, self.edge_body, self.edge_head = extractor, edge_body, nn.Linear(edge_dim, num_classes)
        self.server_body, self.server_head = server_body, nn.Linear(server_dim, num_classes)

    def edge(self, x):
        return self.edge_head(self.edge_body(self.extractor(x)))

    def server(self, features):
        return self.server_head(self.server_body(features))

    def forward(self, x):
        return self.server(self.extractor(x))

    def edge_modules(self) -> list[str]:
        """Names of the submodules that live on the edge (their state entries start with these names)."""
        return ["extractor", "edge_body", "edge_head"]

    def server_modules(self) -> list[str]:
        return ["server_body", "server_head"]

    def client_model(self) -> nn.Module:
        return _EdgeView(self)


class _EdgeView(nn.Module):
    """The edge half of a SplitNet as a module of its own (forward = the edge model), for counting."""

    def __init__(self, net: SplitNet):
        super().__init__()
        self.extractor, self.edge_body, self.edge_head = net.extractor, net.edge_body, net.edge_head

    def forward(self, x):
        return self.edge_head(self.edge_body(self.extractor(x)))


class SplitClassifier(Classifier):
    """A `Classifier` trained whole on the client (FedAvg on the edge model or on the large model)."""

    def client_model(self) -> nn.Module:
        return self


def split_resnet(in_channels: int, num_classes: int, part: str = "gkt", channels: int = 16, pool: bool = False,
                 edge_blocks: int = 2, edge_block: str = "bottleneck", edge_planes: int | None = None,
                 server_blocks: tuple[int, ...] = (6, 6, 6), server_widths: tuple[int, ...] = (16, 32, 64),
                 server_block: str = "bottleneck") -> nn.Module:
    """The split network; defaults are FedGKT's CIFAR setting (ResNet-8 edge: 16-channel stem and two bottleneck
    blocks; ResNet-56 server: bottleneck stages 6, 6, 6 of 16, 32, 64 planes). See the module's docstring."""
    if part not in ("gkt", "edge", "large"):
        raise SuiteError(f"split_resnet part must be gkt, edge or large, got '{part}'")
    for b in (edge_block, server_block):
        if b not in BLOCKS:
            raise SuiteError(f"unknown residual block '{b}'; use basic or bottleneck")
    if len(server_blocks) != len(server_widths):
        raise SuiteError("split_resnet: server_blocks and server_widths must have one entry per stage")
    extractor = _extractor(in_channels, channels, pool)
    if part == "edge":
        body, dim = _edge_body(channels, edge_blocks, edge_block, edge_planes)
        return SplitClassifier(nn.Sequential(extractor, body), dim, num_classes)
    if part == "large":
        body, dim = _server_body(channels, list(server_blocks), list(server_widths), server_block)
        return SplitClassifier(nn.Sequential(extractor, body), dim, num_classes)
    edge, edge_dim = _edge_body(channels, edge_blocks, edge_block, edge_planes)
    server, server_dim = _server_body(channels, list(server_blocks), list(server_widths), server_block)
    return SplitNet(extractor, edge, edge_dim, server, server_dim, num_classes)
