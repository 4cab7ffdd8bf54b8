"""FedAlign (Mendieta et al., CVPR 2022) and the local-generality regularisers it is compared with: GradAug, mixup
and stochastic depth, each a local objective on the suite's ResNets (common/models: the CIFAR ResNets and ResNet-18,
BatchNorm); the server is FedAvg's.

Width-reduced ("slim") passes use the same weights: a layer run at width w uses the first round(w * C) output
channels of each convolution (and the input channels its input has), the first channels of each BatchNorm's affine
parameters with the batch's statistics (its running statistics are neither used nor updated, as the authors'
slimmable BatchNorm with track_running_stats=False), and the classifier's first input features. A slim pass is thus a
slice of the full network's weights, and its gradients flow into that slice.

FedAlign (authors' code, github.com/mmendiet/FedAlign, methods/fedalign.py, models/resnet_fedalign.py): the network
runs at full width with cross-entropy; the input of its last stage ("final block": layer3 of the CIFAR ResNet-56,
layer4 of ResNet-18) is detached, cut to its first round(w C) channels, and the last stage runs again at width w (0.25).
For each stage (full and slim) the transmission matrix is the FSP matrix between its input (average-pooled to the
output's size) and output maps, G = F_in F_out^T / (H W) (C_in x C_out per sample), and its spectral norm sigma = the
square root of the top eigenvalue of G G^T, estimated by power iteration (10 steps from the ones vector, differentiable
as in the authors' code). The alignment loss is L_Lip = MSE(sigma_slim, sigma_full.detach()) over the batch, scaled to
the cross-entropy's size as in the authors' code: loss = CE + mu * (CE / L_Lip) * L_Lip, with the ratio a constant
(no gradient). The slim path has no cross-entropy of its own (the authors' code has none).

GradAug (Yang et al. 2020; the authors' methods/gradaug.py): CE of the full network, plus for n sub-networks (the
smallest width w_min and n - 1 widths drawn from U(w_min, 1), largest first) the KL divergence from the full
network's detached softmax to the sub-network's on the batch resized to a random resolution (bilinear, one of
`scales` times the input's side).

Mixup (Zhang et al. 2018): inputs mixed with a permutation of the batch at lambda ~ Beta(alpha, alpha), the
cross-entropy mixed with the same lambda. Stochastic depth (Huang et al. 2016): each residual block's residual
branch is dropped for the whole batch with probability 1 - p_l, with survival p_l falling linearly from 1 at the
first block to p_L (0.5) at the last (torchvision.ops.stochastic_depth, which scales a kept branch by 1 / p_l during
training so the evaluated network is the plain one; the authors' code scales by p_l at evaluation instead).

Every random draw (mixup's lambda and permutation, GradAug's widths and resolutions, stochastic depth's drops) comes
from torch's global generator, seeded by the run and saved in its checkpoints, so a resumed run is bit-identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm
from common.models import BasicBlock, _stage_ends


# --- width-sliced (slim) passes through the suite's ResNets -----------------------------------------------------------
def slim_channels(channels: int, width: float) -> int:
    """Channels of a layer with `channels` at width `width`: round(width * channels), at least 1."""
    return max(1, int(round(width * channels)))


def slim_conv(conv: nn.Conv2d, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """`conv` on `x` with its first `out_channels` filters over the first x.shape[1] input channels."""
    weight = conv.weight[:out_channels, :x.shape[1]]
    bias = None if conv.bias is None else conv.bias[:out_channels]
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)


def slim_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm layer on the first x.shape[1] channels: the layer itself at full width, otherwise BatchNorm with the
    batch's statistics and the first channels' affine parameters (running statistics untouched)."""
    if isinstance(norm, nn.Identity):
        return x
    if not isinstance(norm, nn.BatchNorm2d):
        raise SuiteError(f"width-sliced passes support BatchNorm or no norm, not {type(norm).__name__}")
    c = x.shape[1]
    if c == norm.num_features:
        return norm(x)
    return F.batch_norm(x, None, None, norm.weight[:c], norm.bias[:c], True, 0.0, norm.eps)


def slim_block(block: BasicBlock, x: torch.Tensor, width: float) -> torch.Tensor:
    """A BasicBlock at `width`: every convolution keeps its first round(width * C_out) filters."""
    cout = slim_channels(block.conv1.out_channels, width)
    out = torch.relu(slim_norm(block.n1, slim_conv(block.conv1, x, cout)))
    out = slim_norm(block.n2, slim_conv(block.conv2, out, cout))
    shortcut = x if len(block.shortcut) == 0 else slim_norm(block.shortcut[1], slim_conv(block.shortcut[0], x, cout))
    return torch.relu(out + shortcut)


def slim_layer(layer: nn.Module, x: torch.Tensor, width: float) -> torch.Tensor:
    if isinstance(layer, BasicBlock):
        return slim_block(layer, x, width)
    if isinstance(layer, nn.Conv2d):
        return slim_conv(layer, x, slim_channels(layer.out_channels, width))
    if isinstance(layer, (nn.BatchNorm2d, nn.Identity)):
        return slim_norm(layer, x)
    if isinstance(layer, (nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten)):
        return layer(x)
    raise SuiteError(f"width-sliced passes need a ResNet (resnet8/20/32/56 or resnet18), not a {type(layer).__name__}")


def slim_forward(model: nn.Module, x: torch.Tensor, width: float) -> torch.Tensor:
    """The whole network at `width` (GradAug's sub-network): the stem keeps all input channels, the classifier all
    its outputs; every layer in between uses its first channels."""
    for layer in model.features:
        x = slim_layer(layer, x, width)
    return F.linear(x, model.head.weight[:, :x.shape[1]], model.head.bias)


def last_stage(model: nn.Module) -> tuple[int, int]:
    """(first, last) index into `model.features` of the last stage's blocks (the authors' "final block")."""
    ends = _stage_ends(model)
    if len(ends) < 2:
        raise SuiteError("FedAlign needs a network with at least two stages")
    return ends[-2] + 1, ends[-1]


def stage_passes(model: nn.Module, x: torch.Tensor, width: float):
    """One full-width forward pass and the slim pass of the last stage: (logits, (full stage input, full stage
    output), (slim stage input, slim stage output)). The slim stage starts from the detached full input cut to its
    first round(width * C_in) channels, as the authors' `reuse_feature`."""
    first, last = last_stage(model)
    layers = list(model.features)
    for layer in layers[:first]:
        x = layer(x)
    stage_in = x
    for layer in layers[first:last + 1]:
        x = layer(x)
    stage_out = x
    for layer in layers[last + 1:]:
        x = layer(x)
    logits = model.head(x)
    s = stage_in.detach()[:, :slim_channels(stage_in.shape[1], width)]
    s_in = s
    for layer in layers[first:last + 1]:
        s = slim_layer(layer, s, width)
    return logits, (stage_in, stage_out), (s_in, s)


# --- the Lipschitz alignment -----------------------------------------------------------------------------------------
def transmission_matrix(fm_in: torch.Tensor, fm_out: torch.Tensor) -> torch.Tensor:
    """FSP matrix between a stage's input (N, C_in, H', W') and output (N, C_out, H, W) maps: the input
    average-pooled to H x W, then G = F_in F_out^T / (H W), (N, C_in, C_out)."""
    if fm_in.shape[2:] != fm_out.shape[2:]:
        fm_in = F.adaptive_avg_pool2d(fm_in, fm_out.shape[2:])
    a = fm_in.flatten(2)
    b = fm_out.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]


def spectral_norm_power(tm: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Largest singular value of each matrix of a batch (N, p, q) by power iteration on K = G G^T from the ones
    vector: sqrt(||K v_k||) with v_{k+1} = K v_k / ||K v_k||; (N,)."""
    k = torch.bmm(tm, tm.transpose(1, 2))
    v = torch.ones(k.shape[0], k.shape[1], 1, dtype=k.dtype, device=k.device)
    norm = None
    for _ in range(iterations):
        m = torch.bmm(k, v)
        norm = m.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a map of zeros (dead ReLUs) gives 0, not nan
        v = m / norm
    return norm.flatten().sqrt()


def lipschitz_loss(full: tuple[torch.Tensor, torch.Tensor], slim: tuple[torch.Tensor, torch.Tensor],
                   iterations: int = 10) -> torch.Tensor:
    """MSE between the spectral norms of the slim stage's transmission matrices and the full stage's (a target: no
    gradient flows into the full pass)."""
    target = spectral_norm_power(transmission_matrix(full[0].detach(), full[1].detach()), iterations)
    return F.mse_loss(spectral_norm_power(transmission_matrix(*slim), iterations), target)


@register_algorithm("fedalign")
class FedAlign(Algorithm):
    """CE of the full network + mu * (CE / L_Lip) * L_Lip (the ratio without gradient), L_Lip between the last
    stage at full width and at `width`."""

    def __init__(self, mu: float = 0.45, width: float = 0.25, power_iterations: int = 10, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if not 0 < width < 1:
            raise SuiteError(f"fedalign: width must lie in (0, 1), got {width}")
        self.mu, self.width, self.power_iterations = mu, width, power_iterations

    def local_loss(self, model, x, y):
        logits, full, slim = stage_passes(model, x, self.width)
        ce = F.cross_entropy(logits, y)
        lip = lipschitz_loss(full, slim, self.power_iterations)
        scale = (ce.detach() / lip.detach().clamp_min(1e-12))
        return ce + self.mu * scale * lip


@register_algorithm("gradaug")
class GradAug(Algorithm):
    """CE of the full network + mult * sum over n sub-networks of KL(full.detach() || sub-network)."""

    def __init__(self, subnets: int = 2, min_width: float = 0.25, scales: list[float] | None = None,
                 mult: float = 1.0, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if subnets < 1:
            raise SuiteError(f"gradaug: subnets must be at least 1, got {subnets}")
        self.subnets, self.min_width, self.mult = subnets, min_width, mult
        # each sub-network sees the batch resized to round(scale * side) for a scale drawn from `scales` (the authors'
        # CIFAR resolutions 32, 28, 24, 20 are 32 x (1, 0.875, 0.75, 0.625)); empty: the input's own size only
        self.scales = [float(s) for s in scales] if scales else []

    def widths(self) -> list[float]:
        """w_min and subnets - 1 widths from U(w_min, 1), largest first."""
        drawn = (self.min_width + (1 - self.min_width) * torch.rand(self.subnets - 1)).tolist()
        return sorted([self.min_width] + drawn, reverse=True)

    def local_loss(self, model, x, y):
        full = model(x)
        loss = F.cross_entropy(full, y)
        target = F.softmax(full.detach(), dim=1)
        for w in self.widths():
            xs = x
            if self.scales:
                r = round(self.scales[int(torch.randint(len(self.scales), ()).item())] * x.shape[-1])
                if r != x.shape[-1]:
                    xs = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=True)
            out = slim_forward(model, xs, w)
            loss = loss + self.mult * F.kl_div(F.log_softmax(out, dim=1), target, reduction="batchmean")
        return loss


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """(mixed inputs, y, y of the partners, lambda): lambda ~ Beta(alpha, alpha) (1 when alpha is 0), partners a
    random permutation of the batch."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(len(y)).to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


@register_algorithm("mixup")
class Mixup(Algorithm):
    def __init__(self, alpha: float = 1.0, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.alpha = alpha

    def local_loss(self, model, x, y):
        xm, ya, yb, lam = mixup_batch(x, y, self.alpha)
        out = model(xm)
        return lam * F.cross_entropy(out, ya) + (1 - lam) * F.cross_entropy(out, yb)


def survival_probabilities(blocks: int, last: float) -> list[float]:
    """Linear decay of the survival probability from 1 at the first residual block to `last` at the last."""
    if blocks == 1:
        return [last]
    return [1 - (1 - last) * i / (blocks - 1) for i in range(blocks)]


def stochastic_depth_forward(model: nn.Module, x: torch.Tensor, survival: list[float]) -> torch.Tensor:
    """Training pass with each BasicBlock's residual branch dropped for the whole batch with probability 1 - p_l
    (torchvision.ops.stochastic_depth, mode "batch"; kept branches scaled by 1 / p_l)."""
    i = 0
    for layer in model.features:
        if isinstance(layer, BasicBlock):
            branch = layer.n2(layer.conv2(torch.relu(layer.n1(layer.conv1(x)))))
            branch = stochastic_depth(branch, 1 - survival[i], "batch", training=True)
            x = torch.relu(branch + layer.shortcut(x))
            i += 1
        else:
            x = layer(x)
    return model.head(x)


@register_algorithm("stochdepth")
class StochDepth(Algorithm):
    def __init__(self, last_survival: float = 0.5, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.last_survival = last_survival

    def local_loss(self, model, x, y):
        blocks = sum(isinstance(m, BasicBlock) for m in model.features)
        if blocks == 0:
            raise SuiteError("stochdepth needs a ResNet (resnet8/20/32/56 or resnet18)")
        return F.cross_entropy(stochastic_depth_forward(model, x, survival_probabilities(blocks, self.last_survival)), y)
