"""Model zoo shared by all papers. Every model splits into `features` (penultimate representation) and `head`
(the linear classifier), which representation-level methods (MOON, CCVR, FedDF's fusion) rely on. The image
models live here; pretrained text encoders in `text.py`. `build_model` is the one entry point for every kind."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from common.errors import SuiteError
from common.models.gan import resnet_generator


def norm_layer(kind: str, channels: int, groups: int = 2) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise SuiteError(f"unknown norm '{kind}'; use bn, gn or none")


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def with_projection(model: Classifier, dim: int) -> Classifier:
    """MOON's network (Li et al. 2021, Sec. 3.2): the model's base encoder, a projection head (a two-layer MLP,
    Linear(d, d), ReLU, Linear(d, dim)) and a linear classifier on the projection's output. `features` becomes
    the encoder followed by the projection (`features.encoder`, `features.projection`), so `features(x)` is the
    representation z that MOON contrasts and that CCVR calibrates the classifier on."""
    d = model.feature_dim
    projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, dim))
    features = nn.Sequential(OrderedDict(encoder=model.features, projection=projection))
    return Classifier(features, dim, model.head.out_features)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = norm_layer(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x):
        out = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(out)) + self.shortcut(x))


def resnet(depth: int, in_channels: int, num_classes: int, norm: str = "bn", width: int = 16) -> Classifier:
    """CIFAR-style ResNet (He et al. 2016, Sec. 4.2): depth = 6n + 2, three stages of n basic blocks."""
    if (depth - 2) % 6:
        raise SuiteError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm_layer(norm, width), nn.ReLU()]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for b in range(n):
            layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, norm))
            cin = cout
    stage_ends = [3 + n * (s + 1) - 1 for s in range(3)]  # the last block of each stage
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = Classifier(nn.Sequential(*layers), cin, num_classes)
    model.stage_ends = stage_ends
    return model


def resnet18(in_channels: int, num_classes: int, norm: str = "bn", width: int = 64) -> Classifier:
    """ResNet-18 for 32x32 inputs (He et al. 2016's ImageNet layout with a 3x3 stem and no initial max-pool, as
    usual for CIFAR): four stages of two basic blocks with width, 2x, 4x and 8x channels. With norm='gn' it is
    the GroupNorm ResNet-18 of Reddi et al. (2021)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm_layer(norm, width), nn.ReLU()]
    cin = width
    for stage in range(4):
        cout = width * 2 ** stage
        for b in range(2):
            layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, norm))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), cin, num_classes)


class ResidualConv1d(nn.Module):
    """relu(x + conv(x)) with a 3-tap convolution of the same channels: a stride-1 layer that deepens a stage of
    cnn1d (without the skip, a plain stack of them does not train from the default initialisation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


def _stage_ends(model: Classifier) -> list[int]:
    """Indices into `model.features` of the last layer of each stage: `model.stage_ends` where the builder set it
    (cnn1d, the CIFAR ResNets), otherwise (resnet18) each BasicBlock whose successor is not a BasicBlock of stride
    1 (the next stage's first block halves the map)."""
    ends = getattr(model, "stage_ends", None)
    if ends is not None:
        return list(ends)
    children = list(model.features)
    ends = [i for i, m in enumerate(children) if isinstance(m, BasicBlock)
            and not (i + 1 < len(children) and isinstance(children[i + 1], BasicBlock)
                     and children[i + 1].conv1.stride == (1, 1))]
    if not ends:
        raise SuiteError(f"{type(model.features).__name__} has no stages: feature maps per stage need cnn1d, a CIFAR "
                         "ResNet (resnet8/20/32/56) or resnet18")
    return ends


def stage_channels(model: Classifier) -> list[int]:
    """The channels of each stage's output map (see `stage_maps`): those of the last convolution up to its end."""
    children = list(model.features)
    convs = lambda i: [m for c in children[:i + 1] for m in c.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    return [convs(i)[-1].out_channels for i in _stage_ends(model)]


def stage_maps(model: Classifier, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The output map of every stage (after its ReLU, finest first) and the logits, in one forward pass: the
    multi-scale features that feature distillation (FSP, KD-SVD, attention transfer, FRSKD's self-teacher) works on."""
    ends, maps, out = set(_stage_ends(model)), [], x
    for i, layer in enumerate(model.features):
        out = layer(out)
        if i in ends:
            maps.append(out)
    return maps, model.head(out)


def cnn1d(in_channels: int, num_classes: int, norm: str = "none", channels: tuple[int, ...] = (16, 16, 16),
          input_size: int = 40, hidden: tuple[int, ...] = (), blocks: int = 1) -> Classifier:
    """Small 1-D CNN for sequences such as mnist1d's 40-sample signals: 5-tap convolutions with stride 2 and ReLU,
    each halving the length. Convolutions matter on mnist1d: its digits are shifted and sheared templates.
    `hidden` adds fully connected layers with ReLU before the head (a LeNet-like 1-D network). `blocks` convolutions
    per stage (the first with stride 2, the others residual 3-tap convolutions with stride 1, `ResidualConv1d`): a
    deeper network of the same widths, whose stage outputs (`stage_ends`) match the shallow one's in shape (feature
    distillation)."""
    if norm != "none":
        raise SuiteError(f"cnn1d has no normalisation layers; use norm 'none', not '{norm}'")
    if blocks < 1:
        raise SuiteError(f"cnn1d needs at least one convolution per stage, got blocks={blocks}")
    layers: list[nn.Module] = []
    stage_ends: list[int] = []
    cin, length = in_channels, input_size
    for cout in channels:
        layers += [nn.Conv1d(cin, cout, 5, 2, 2), nn.ReLU()]
        layers += [ResidualConv1d(cout) for _ in range(blocks - 1)]
        stage_ends.append(len(layers) - 1)
        cin, length = cout, (length + 1) // 2
    layers.append(nn.Flatten())
    width = cin * length
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = Classifier(nn.Sequential(*layers), width, num_classes)
    model.stage_ends = stage_ends
    return model


def cnn(in_channels: int, num_classes: int, norm: str = "none", channels: tuple[int, int] = (8, 16),
        input_size: int = 28, hidden: tuple[int, ...] = ()) -> Classifier:
    """Small two-conv CNN (5x5 conv, norm, ReLU, 2x2 max-pool, twice): cheap enough for laptop-CPU federated runs.
    `hidden` adds fully connected layers with ReLU before the head: channels (6, 16) with hidden (120, 84) is the
    LeNet-style CNN of MOON's and CCVR's CIFAR-10 experiments."""
    c1, c2 = channels
    side = ((input_size - 4) // 2 - 4) // 2
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, c1, 5), norm_layer(norm, c1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), norm_layer(norm, c2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    width = c2 * side * side
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return Classifier(nn.Sequential(*layers), width, num_classes)


def _bn_block(layer: nn.Module, norm: str, width: int, dims: int) -> list[nn.Module]:
    """layer, its norm (BatchNorm1d after a linear layer), ReLU."""
    if norm == "bn" and dims == 1:
        return [layer, nn.BatchNorm1d(width), nn.ReLU()]
    if dims == 1 and norm != "none":
        raise SuiteError(f"norm '{norm}' is not defined after a linear layer; use bn or none")
    return [layer, norm_layer(norm, width), nn.ReLU()]


def digit_cnn(in_channels: int, num_classes: int, norm: str = "bn", channels: tuple[int, int, int] = (64, 64, 128),
              hidden: tuple[int, int] = (2048, 512), input_size: int = 28) -> Classifier:
    """FedBN's digits CNN (Li et al. 2021, Appendix): three 5x5 convolutions (64, 64, 128; padding 2) and two
    hidden linear layers (2048, 512), each followed by BatchNorm and ReLU, max-pooling after the first two
    convolutions; the head is the last linear layer. `channels`/`hidden` give narrower variants."""
    c1, c2, c3 = channels
    h1, h2 = hidden
    side = input_size // 4
    feats = nn.Sequential(
        *_bn_block(nn.Conv2d(in_channels, c1, 5, 1, 2), norm, c1, 2), nn.MaxPool2d(2),
        *_bn_block(nn.Conv2d(c1, c2, 5, 1, 2), norm, c2, 2), nn.MaxPool2d(2),
        *_bn_block(nn.Conv2d(c2, c3, 5, 1, 2), norm, c3, 2), nn.Flatten(),
        *_bn_block(nn.Linear(c3 * side * side, h1), norm, h1, 1),
        *_bn_block(nn.Linear(h1, h2), norm, h2, 1))
    return Classifier(feats, h2, num_classes)


def alexnet_bn(in_channels: int, num_classes: int, norm: str = "bn") -> Classifier:
    """AlexNet with BatchNorm after every convolution and hidden linear layer, FedBN's model for
    Office-Caltech-10 and DomainNet (256x256 inputs; adaptive pooling to 6x6 before the classifier)."""
    convs = [(in_channels, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1),
             (256, 256, 3, 1, 1)]
    layers: list[nn.Module] = []
    for i, (cin, cout, k, stride, pad) in enumerate(convs):
        layers += _bn_block(nn.Conv2d(cin, cout, k, stride, pad), norm, cout, 2)
        if i in (0, 1, 4):
            layers.append(nn.MaxPool2d(3, 2))
    layers += [nn.AdaptiveAvgPool2d(6), nn.Flatten(), *_bn_block(nn.Linear(256 * 36, 4096), norm, 4096, 1),
               *_bn_block(nn.Linear(4096, 4096), norm, 4096, 1)]
    return Classifier(nn.Sequential(*layers), 4096, num_classes)


def fedavg_cnn(in_channels: int, num_classes: int, norm: str = "none", channels: tuple[int, int] = (32, 64),
               fc_width: int = 512, input_size: int = 28) -> Classifier:
    """McMahan et al.'s CNN as in FedNTD's code (fedavg_mnist / fedavg_cifar): two 5x5 convolutions with padding 2
    (32, 64), ReLU and 2x2 max-pooling each, a hidden linear layer (512) with ReLU; the head is the last linear
    layer. `channels`/`fc_width` give narrower variants."""
    if norm != "none":
        raise SuiteError(f"fedavg_cnn has no normalisation layers; use norm 'none', not '{norm}'")
    c1, c2 = channels
    side = input_size // 4
    feats = nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * side * side, fc_width), nn.ReLU())
    return Classifier(feats, fc_width, num_classes)


def mlp(in_channels: int, num_classes: int, norm: str = "none", hidden: tuple[int, ...] = (256,),
        input_size: int = 28) -> Classifier:
    """Fully connected network on the flattened input: hidden linear layers with ReLU, then the linear head."""
    if norm != "none":
        raise SuiteError(f"mlp has no normalisation layers; use norm 'none', not '{norm}'")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * input_size * input_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return Classifier(nn.Sequential(*layers), width, num_classes)
def strided_cnn(in_channels: int, num_classes: int, norm: str = "bn", channels: tuple[int, ...] = (6, 16),
                pool: bool = False, latent: int = 32, input_size: int = 28) -> Classifier:
    """FedGen's CNN (Zhu et al. 2021, authors' `Net` with `CONFIGS_`): 3x3 convolutions with stride 2 and padding 1,
    each followed by the norm and ReLU (and a 2x2 max-pool with `pool`), flattened, then one linear layer to a
    `latent`-dim representation *without* an activation; the head is the linear classifier on that representation
    (the latent space in which FedGen's generator produces samples). MNIST/EMNIST: channels (6, 16), latent 32;
    CelebA: channels (16, 32, 64) with pooling."""
    layers: list[nn.Module] = []
    cin, side = in_channels, input_size
    for cout in channels:
        layers += [nn.Conv2d(cin, cout, 3, 2, 1), norm_layer(norm, cout), nn.ReLU()]
        side = (side + 1) // 2
        if pool:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        cin = cout
    if side < 1:
        raise SuiteError(f"strided_cnn: {len(channels)} stages reduce a {input_size}-pixel input to nothing")
    layers += [nn.Flatten(), nn.Linear(cin * side * side, latent)]
    return Classifier(nn.Sequential(*layers), latent, num_classes)


def pretrained_encoder(**params) -> Classifier:
    """A pretrained text encoder with a linear head (`common/models/text.py`; imported here only when used, as it
    imports `transformers`)."""
    from common.models import text
    return text.pretrained_encoder(**params)


def motion_transfer(**params):
    """Region-based motion transfer (MRAA) and the FOMM-style keypoint model (`common/models/motion.py`)."""
    from common.models import motion
    return motion.motion_transfer(**params)


MODELS = {
    "resnet8": lambda **kw: resnet(8, **kw),
    "resnet20": lambda **kw: resnet(20, **kw),
    "resnet32": lambda **kw: resnet(32, **kw),  # Lee et al.'s benchmark teacher (KD_methods_with_TF)
    "resnet56": lambda **kw: resnet(56, **kw),  # Stanton et al. (2021): CIFAR-100 teachers and students
    "resnet18": resnet18,
    "cnn": cnn,
    "cnn1d": cnn1d,
    "digit_cnn": digit_cnn,
    "alexnet_bn": alexnet_bn,
    "fedavg_cnn": fedavg_cnn,
    "mlp": mlp,
    "strided_cnn": strided_cnn,
    "pretrained_encoder": pretrained_encoder,
    "unet": lambda **kw: _unet(**kw),
    "motion_transfer": motion_transfer,
    "resnet_generator": resnet_generator,
    "split_resnet": lambda **kw: _split_resnet(**kw),
    "split_vit": lambda **kw: _split_vit(**kw),
}


def _split_resnet(**params):
    """A CNN split between edge and server (FedGKT; `common/models/split.py`)."""
    from common.models.split import split_resnet
    return split_resnet(**params)


def _split_vit(**params):
    """FeSTA's per-client CNN heads and task tails around one ViT body (`common/models/vit_split.py`)."""
    from common.models.vit_split import split_vit
    return split_vit(**params)


def _unet(**params):
    """The segmentation U-Net (`common/models/unet.py`): one logit map per output channel."""
    from common.models.unet import unet
    return unet(**params)


def build_model(name: str, in_channels: int, num_classes: int, input_size: int, data_root: str = "data",
                **params) -> Classifier:
    """`projection: <dim>` adds MOON's projection head (see `with_projection`) to any model; `data_root` is where
    pretrained checkpoints that do not ship with a package are read from."""
    if name not in MODELS:
        raise SuiteError(f"unknown model '{name}'; known models: {', '.join(MODELS)}")
    if name in ("cnn", "digit_cnn", "cnn1d", "fedavg_cnn", "mlp", "strided_cnn", "unet", "motion_transfer",
                "split_vit"):
        params = {"input_size": input_size, **params}
    if name == "pretrained_encoder":
        params = {"data_root": data_root, **params}
    for key in ("channels", "hidden", "server_blocks", "server_widths"):
        if key in params and isinstance(params[key], list):
            params[key] = tuple(params[key])
    projection = params.pop("projection", None)
    model = MODELS[name](in_channels=in_channels, num_classes=num_classes, **params)
    return model if projection is None else with_projection(model, projection)
