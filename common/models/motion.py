"""Region-based motion transfer networks (MRAA, Siarohin et al. CVPR 2021) and the FOMM-style keypoint model
(Siarohin et al. NeurIPS 2019) as options of one model, so that their differences are switches, not copies:

- `affine: pca` (MRAA): each region's affine is the square root of its heatmap's covariance by PCA,
  A = U diag(sqrt(s)) with U the principal axes (a rotation) and s the variances; `affine: jacobian` (FOMM, and
  MRAA's "no PCA" ablation): a 2x2 matrix regressed per region, four maps weighted by the region's heatmap.
- `background: affine` (MRAA): a global affine from a small encoder on (source, driving), initialised to the
  identity, is the motion of the background; `none`: the background does not move (the identity transform).
- `heatmap: region` (MRAA): the dense-motion network sees Gaussians with each region's covariance; `keypoint`
  (FOMM): isotropic Gaussians of variance 0.01 at the keypoints.

FOMM-style = jacobian + none + keypoint. Coordinates are grid_sample's ([-1, 1], x then y, pixel centres,
align_corners False). Every sub-network is a small encoder-decoder ("hourglass") with BatchNorm, as in the
authors' code, at a fraction of its width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import SuiteError

KEYPOINT_VAR = 0.01  # FOMM's (and MRAA's region_var) isotropic variance of the keypoint Gaussians
EPS = 1e-6


def coordinate_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h, w, 2) pixel-centre coordinates in [-1, 1], x then y (grid_sample with align_corners=False)."""
    ys = (torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1)


def warp(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The image sampled at `grid` (B, h, w, 2): out(z) = image(grid(z)); bilinear, zeros outside."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def heatmap_moments(heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (B, K, 2) and covariance (B, K, 2, 2) of normalised heatmaps (B, K, h, w) (first and second moments)."""
    grid = coordinate_grid(*heatmap.shape[2:], heatmap.device, heatmap.dtype)
    w = heatmap.unsqueeze(-1)
    mean = (w * grid).sum((2, 3))
    d = grid - mean[:, :, None, None, :]
    covar = (w.unsqueeze(-1) * d.unsqueeze(-1) * d.unsqueeze(-2)).sum((2, 3))
    return mean, covar


def pca_affine(covar: torch.Tensor) -> torch.Tensor:
    """A = U diag(sqrt(s)) of symmetric 2x2 covariances: U the principal axes (major first, det U = +1), s the
    variances; A A^T = covar. In closed form (a differentiable SVD of a 2x2 symmetric matrix): the major axis is
    the half-angle vector of (a - c, 2b), taken in whichever of its two equivalent forms is better conditioned."""
    a, b, c = covar[..., 0, 0], covar[..., 0, 1], covar[..., 1, 1]
    r = torch.sqrt((a - c) ** 2 + 4 * b ** 2 + EPS ** 2)
    big = torch.stack([r + (a - c), 2 * b], -1)
    small = torch.stack([2 * b, r - (a - c)], -1)
    u = torch.where((a >= c).unsqueeze(-1), big, small)
    u = u / torch.sqrt((u ** 2).sum(-1, keepdim=True) + EPS ** 2)
    v = torch.stack([-u[..., 1], u[..., 0]], -1)
    major = ((a + c) / 2 + r / 2).clamp_min(EPS)
    minor = ((a + c) / 2 - r / 2).clamp_min(EPS)
    U = torch.stack([u, v], -1)  # columns: major axis, minor axis
    return U * torch.stack([major.sqrt(), minor.sqrt()], -1).unsqueeze(-2)


def gaussians(mean: torch.Tensor, covar, h: int, w: int) -> torch.Tensor:
    """(B, K, h, w) unnormalised Gaussians exp(-d^T covar^-1 d / 2) at `mean` (B, K, 2); covar (B, K, 2, 2) or a
    scalar variance."""
    grid = coordinate_grid(h, w, mean.device, mean.dtype)
    d = grid - mean[:, :, None, None, :]
    if isinstance(covar, float):
        q = (d ** 2).sum(-1) / covar
    else:
        inv = torch.linalg.inv(covar + EPS * torch.eye(2, device=mean.device))
        q = torch.einsum("bkhwi,bkij,bkhwj->bkhw", d, inv, d)
    return torch.exp(-0.5 * q)


def conv_block(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class Hourglass(nn.Module):
    """U-Net-like encoder-decoder: `blocks` downsamplings (conv, pool), as many upsamplings with skips; its output
    is the decoder's last features concatenated with the input (as the authors' Hourglass)."""

    def __init__(self, cin: int, width: int, blocks: int, max_width: int = 128):
        super().__init__()
        chans = [cin] + [min(max_width, width * 2 ** i) for i in range(blocks)]
        self.down = nn.ModuleList(conv_block(chans[i], chans[i + 1]) for i in range(blocks))
        self.up = nn.ModuleList()
        for i in reversed(range(blocks)):
            extra = chans[i + 1] if i < blocks - 1 else 0
            self.up.append(conv_block(chans[i + 1] + extra, chans[i] if i > 0 else width))
        self.out_channels = width + cin

    def forward(self, x):
        skips, h = [], x
        for d in self.down:
            h = F.avg_pool2d(d(h), 2)
            skips.append(h)
        h = skips.pop()
        for i, u in enumerate(self.up):
            if i > 0:
                h = torch.cat([h, skips.pop()], 1)
            h = u(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return torch.cat([h, x], 1)


class RegionPredictor(nn.Module):
    """K heatmaps (softmax over space with a temperature) -> centre, covariance and affine per region."""

    def __init__(self, regions: int, width: int, blocks: int, affine: str, temperature: float = 0.1,
                 scale: float = 0.5):
        super().__init__()
        self.scale, self.temperature, self.mode = scale, temperature, affine
        self.net = Hourglass(3, width, blocks)
        self.regions = nn.Conv2d(self.net.out_channels, regions, 7, padding=3)
        if affine == "jacobian":
            self.jacobian = nn.Conv2d(self.net.out_channels, 4, 7, padding=3)
            nn.init.zeros_(self.jacobian.weight)
            with torch.no_grad():
                self.jacobian.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> dict:
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="area")
        feats = self.net(x)
        logits = self.regions(feats)
        b, k, h, w = logits.shape
        heat = F.softmax(logits.view(b, k, -1) / self.temperature, -1).view(b, k, h, w)
        shift, covar = heatmap_moments(heat)
        out = {"shift": shift, "heatmap": heat}
        if self.mode == "pca":
            out["affine"], out["covar"] = pca_affine(covar), covar
        else:
            jac = self.jacobian(feats).view(b, 1, 4, h, w)
            jac = (heat.unsqueeze(2) * jac).sum((3, 4)).view(b, k, 2, 2)
            out["affine"], out["covar"] = jac, jac @ jac.transpose(-1, -2)
        return out


class BackgroundPredictor(nn.Module):
    """A global affine (B, 3, 3) mapping driving coordinates to source coordinates, from (source, driving)."""

    def __init__(self, width: int, blocks: int = 3):
        super().__init__()
        layers, cin = [], 6
        for i in range(blocks):
            layers += [conv_block(cin, width * 2 ** i), nn.AvgPool2d(2)]
            cin = width * 2 ** i
        self.encoder = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 6)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]))

    def forward(self, source, driving):
        theta = self.fc(self.encoder(torch.cat([source, driving], 1)).mean((2, 3))).view(-1, 2, 3)
        bottom = torch.tensor([0.0, 0.0, 1.0], device=theta.device).expand(len(theta), 1, 3)
        return torch.cat([theta, bottom], 1)


def sign_fixed(m: torch.Tensor) -> torch.Tensor:
    """m times the sign of its (0, 0) entry: PCA's axes are defined up to sign, so A_s A_d^-1 may come out rotated
    by 180 degrees; the authors' `revert_axis_swap`."""
    return m * torch.where(m[..., 0:1, 0:1] >= 0, 1.0, -1.0)


def sparse_motions(src: dict, drv: dict, bg: torch.Tensor | None, h: int, w: int, use_affine: bool = True):
    """(B, K+1, h, w, 2): for every driving pixel z, where it comes from in the source under the background motion
    (first) and each region's motion A_s A_d^-1 (z - mu_d) + mu_s."""
    b, k, _ = src["shift"].shape
    grid = coordinate_grid(h, w, src["shift"].device, src["shift"].dtype)
    z = grid.view(1, 1, h, w, 2) - drv["shift"].view(b, k, 1, 1, 2)
    if use_affine:
        m = sign_fixed(src["affine"] @ torch.linalg.inv(drv["affine"]))
        z = torch.einsum("bkij,bkhwj->bkhwi", m, z)
    regions = z + src["shift"].view(b, k, 1, 1, 2)
    if bg is None:
        background = grid.expand(b, 1, h, w, 2)
    else:
        homog = torch.cat([grid, torch.ones(h, w, 1, device=grid.device)], -1)
        background = torch.einsum("bij,hwj->bhwi", bg[:, :2, :], homog).unsqueeze(1)
    return torch.cat([background, regions], 1)


class DenseMotion(nn.Module):
    """Combines the K region motions and the background's into one flow with softmax masks, and an occlusion map,
    from the heatmap representation (driving minus source Gaussians) and the source deformed by each motion."""

    def __init__(self, regions: int, width: int, blocks: int, heatmap: str, scale: float = 0.5):
        super().__init__()
        self.scale, self.heatmap = scale, heatmap
        self.net = Hourglass((regions + 1) * 4, width, blocks)
        self.mask = nn.Conv2d(self.net.out_channels, regions + 1, 7, padding=3)
        self.occlusion = nn.Conv2d(self.net.out_channels, 1, 7, padding=3)

    def forward(self, source, src: dict, drv: dict, bg):
        small = F.interpolate(source, scale_factor=self.scale, mode="area") if self.scale != 1 else source
        b, _, h, w = small.shape
        k = src["shift"].shape[1]
        if self.heatmap == "region":
            heat = gaussians(drv["shift"], drv["covar"], h, w) - gaussians(src["shift"], src["covar"], h, w)
        else:
            heat = gaussians(drv["shift"], KEYPOINT_VAR, h, w) - gaussians(src["shift"], KEYPOINT_VAR, h, w)
        heat = torch.cat([heat.new_zeros(b, 1, h, w), heat], 1).unsqueeze(2)
        motions = sparse_motions(src, drv, bg, h, w)
        deformed = warp(small.repeat_interleave(k + 1, 0), motions.view(b * (k + 1), h, w, 2)).view(b, k + 1, 3, h, w)
        feats = self.net(torch.cat([heat, deformed], 2).view(b, -1, h, w))
        mask = F.softmax(self.mask(feats), 1)
        flow = (mask.unsqueeze(-1) * motions).sum(1)
        return {"flow": flow, "occlusion": torch.sigmoid(self.occlusion(feats)), "mask": mask}


class Generator(nn.Module):
    """Encoder, warp of the encoder's features by the flow (times the occlusion map), residual bottleneck,
    decoder with skips from the warped encoder features."""

    def __init__(self, width: int, down: int = 2, bottleneck: int = 2):
        super().__init__()
        self.first = conv_block(3, width, 7)
        chans = [width * 2 ** i for i in range(down + 1)]
        self.down = nn.ModuleList(conv_block(chans[i], chans[i + 1]) for i in range(down))
        self.res = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(chans[-1]), nn.ReLU(),
                                               nn.Conv2d(chans[-1], chans[-1], 3, padding=1),
                                               nn.BatchNorm2d(chans[-1]), nn.ReLU(),
                                               nn.Conv2d(chans[-1], chans[-1], 3, padding=1))
                                 for _ in range(bottleneck))
        self.up = nn.ModuleList(conv_block(chans[i + 1] * 2, chans[i]) for i in reversed(range(down)))
        self.final = nn.Conv2d(chans[0] * 2, 3, 7, padding=3)

    @staticmethod
    def deform(feats, flow, occlusion):
        h, w = feats.shape[2:]
        if flow.shape[1:3] != (h, w):
            flow = F.interpolate(flow.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        out = warp(feats, flow)
        if occlusion is not None:
            if occlusion.shape[2:] != (h, w):
                occlusion = F.interpolate(occlusion, size=(h, w), mode="bilinear", align_corners=False)
            out = out * occlusion
        return out

    def forward(self, source, flow, occlusion):
        feats = [self.first(source)]
        for d in self.down:
            feats.append(F.avg_pool2d(d(feats[-1]), 2))
        warped = [self.deform(f, flow, occlusion) for f in feats]
        h = warped[-1]
        for r in self.res:
            h = h + r(h)
        for i, u in enumerate(self.up):  # skip of the same resolution, then upsample
            h = F.interpolate(u(torch.cat([h, warped[-1 - i]], 1)), scale_factor=2.0, mode="nearest")
        return torch.sigmoid(self.final(torch.cat([h, warped[0]], 1)))


AFFINES, BACKGROUNDS, HEATMAPS = ("pca", "jacobian"), ("affine", "none"), ("region", "keypoint")


class MotionTransfer(nn.Module):
    """Animate `source` with the motion of `driving`: regions (or keypoints) of both, background motion, dense
    motion, warping generator. `forward` returns the generated frame and every intermediate."""

    def __init__(self, regions: int = 5, affine: str = "pca", background: str = "affine", heatmap: str = "region",
                 width: int = 16, blocks: int = 3, temperature: float = 0.1):
        super().__init__()
        for value, allowed, key in ((affine, AFFINES, "affine"), (background, BACKGROUNDS, "background"),
                                    (heatmap, HEATMAPS, "heatmap")):
            if value not in allowed:
                raise SuiteError(f"motion_transfer: unknown {key} '{value}'; use one of {', '.join(allowed)}")
        self.options = {"regions": regions, "affine": affine, "background": background, "heatmap": heatmap}
        self.region_predictor = RegionPredictor(regions, width, blocks, affine, temperature)
        self.bg_predictor = BackgroundPredictor(width) if background == "affine" else None
        self.dense_motion = DenseMotion(regions, width, blocks, heatmap)
        self.generator = Generator(width)

    def animate(self, source, driving, src: dict | None = None, drv: dict | None = None) -> dict:
        src = self.region_predictor(source) if src is None else src
        drv = self.region_predictor(driving) if drv is None else drv
        bg = None if self.bg_predictor is None else self.bg_predictor(source, driving)
        motion = self.dense_motion(source, src, drv, bg)
        out = self.generator(source, motion["flow"], motion["occlusion"])
        return {"prediction": out, "source_regions": src, "driving_regions": drv, "bg": bg, **motion}

    def forward(self, source, driving):
        return self.animate(source, driving)["prediction"]


def motion_transfer(in_channels: int = 3, num_classes: int = 0, input_size: int = 32, **params) -> MotionTransfer:
    if in_channels != 3:
        raise SuiteError(f"motion_transfer animates RGB videos (3 channels), not {in_channels}")
    return MotionTransfer(**params)
