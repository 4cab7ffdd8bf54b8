"""Motion Representations for Articulated Animation (Siarohin, Woodford, Ren, Chai, Tulyakov, CVPR 2021) as an
algorithm of the shared engine, trained centrally (one client holding every training video).

The networks are `common/models/motion.py` (model `motion_transfer`); MRAA, its Table 4 ablations and the FOMM-style
keypoint baseline are its options (`affine`, `background`, `heatmap`), so one training objective serves all:

- Self-supervised reconstruction: per training video two frames, a source and a driving frame, drawn at random;
  the model animates the source with the driving frame's motion and is trained to reproduce the driving frame.
  Reconstruction loss (`reconstruction`): `pixel` (the offline scales): L1 over an image pyramid (scales 1, 1/2, 1/4,
  1/8, weight `perceptual` = 10 each), standing in for the authors' perceptual pyramid (no pretrained VGG offline);
  `vgg19` (paper scale): the authors' perceptual pyramid: at each level of the same pyramid, the L1 distance of
  ImageNet VGG-19 activations after relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 (torchvision `features` 1, 6, 11,
  20, 29) of the ImageNet-normalised generated and driving frames, the driving frame's detached, weighted per layer
  by `perceptual` (the authors' [10, 10, 10, 10, 10]) and summed over layers and levels. VGG-19 is frozen, in eval
  mode, its weights torchvision's `vgg19-dcbb9e9d.pth` read from the file `perceptual_weights` under data_root (a
  missing file is one error saying where to get it). A level too small for a layer (relu5_1 needs 16 pixels: four
  2x2 poolings) compares the layers it reaches.
- Equivariance (the authors' weights 10 and 10): the driving frame under a random transform T (affine, sigma
  0.05, plus thin-plate-spline, sigma 0.005 on a 5x5 grid) must give regions whose centres map back through T
  (shift) and whose affines agree with T's Jacobian (affine): A_d^-1 J_T A_t = I, up to PCA's axis sign.

Evaluation (`evaluate`), on the test videos in the reconstruction protocol (source = the first frame, each later
frame driving): L1 between generated and driving frame; AKD (pixels) and MKR with an evaluation network trained
with supervision on the training frames (identity classifier + part-centre regressor; see `Evaluator`): AKD is
the distance of the centres it finds in the generated frame from the driving frame's ground-truth centres, MKR the
share of parts it finds within `MKR_RADIUS` of the truth in the driving frame but not in the generated one; AED the
distance between its (unit-length) identity embeddings of generated and driving frame. test_accuracy is its
identity accuracy on generated frames, test_loss the L1. The same metrics are logged for three references:
`copy_` (the source frame itself as the prediction: no motion), `self_` (the model animating the driving frame
with itself: what the generator can reconstruct) and `driving_` (the driving frame: L1 and AED 0, AKD the
evaluation network's own error).
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.data import cache_dir, fingerprint
from common.errors import SuiteError
from common.fl.algorithms import Centralised, register_algorithm
from common.fl.engine import sub_seed
from common.models.motion import coordinate_grid, heatmap_moments, sign_fixed
from common.models.perceptual import VGG19_FILE, VGG19_PYRAMID_LAYERS, load_vgg_features, perceptual_loss

MKR_RADIUS = 0.125  # in [-1, 1] units: 2 pixels of a 32x32 frame
EVALUATOR_SEED = 0xE7A1  # fixed: every run on a dataset is scored by the same evaluation network
EVALUATOR_VERSION = "v1"
REFERENCES = ("copy", "self", "driving")


# --- equivariance ------------------------------------------------------------------------------------------------
class RandomTransform:
    """A random affine plus thin-plate-spline warp of the plane (as the authors' equivariance transform): the
    transformed frame at z shows the original frame at T(z)."""

    def __init__(self, batch: int, sigma_affine: float, sigma_tps: float, points_tps: int, device=None):
        self.theta = torch.eye(2, 3, device=device) + sigma_affine * torch.randn(batch, 2, 3, device=device)
        self.control = coordinate_grid(points_tps, points_tps, device).view(-1, 2)
        self.weights = sigma_tps * torch.randn(batch, 1, len(self.control), device=device)

    def _radial(self, coords):
        d = coords.unsqueeze(2) - self.control.view(1, 1, -1, 2)  # (B, N, C, 2)
        r2 = (d ** 2).sum(-1)
        return d, r2

    def warp_coordinates(self, coords: torch.Tensor) -> torch.Tensor:
        """T(coords) for coords (B, N, 2)."""
        out = coords @ self.theta[:, :, :2].transpose(1, 2) + self.theta[:, :, 2].unsqueeze(1)
        _, r2 = self._radial(coords)
        tps = (self.weights * r2 * torch.log(r2 + 1e-6)).sum(-1, keepdim=True)  # the same offset to x and y
        return out + tps

    def jacobian(self, coords: torch.Tensor) -> torch.Tensor:
        """dT/dz (B, N, 2, 2) at coords (B, N, 2), analytically."""
        d, r2 = self._radial(coords)
        # d/dz of r2 log(r2 + eps) is 2 d (log(r2 + eps) + r2 / (r2 + eps)); the offset is the same for x and y
        factor = (torch.log(r2 + 1e-6) + r2 / (r2 + 1e-6)).unsqueeze(-1)
        grad = (self.weights.unsqueeze(-1) * 2 * d * factor).sum(2)  # (B, N, 2)
        return self.theta[:, None, :, :2] + grad.unsqueeze(2).expand(-1, -1, 2, -1)

    def transform_frame(self, frame: torch.Tensor) -> torch.Tensor:
        b, _, h, w = frame.shape
        grid = coordinate_grid(h, w, frame.device).view(1, -1, 2).expand(b, -1, -1)
        grid = self.warp_coordinates(grid).view(b, h, w, 2)
        return F.grid_sample(frame, grid, padding_mode="reflection", align_corners=False)


PYRAMID_SCALES = (1, 0.5, 0.25, 0.125)  # the authors' `scales`
RECONSTRUCTIONS = ("pixel", "vgg19")


def pyramid_level(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` at one level of the image pyramid (area averaging; the authors blur with a Gaussian and subsample)."""
    return x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="area")


def pyramid_l1(pred: torch.Tensor, target: torch.Tensor, scales=PYRAMID_SCALES, weight: float = 10.0):
    loss = 0.0
    for s in scales:
        loss = loss + weight * (pyramid_level(pred, s) - pyramid_level(target, s)).abs().mean()
    return loss


def pyramid_perceptual(features, pred: torch.Tensor, target: torch.Tensor, weights, scales=PYRAMID_SCALES):
    """The authors' perceptual pyramid: over the levels of the image pyramid, the sum of weights[i] * mean |VGG_i(pred)
    - VGG_i(target)| over `features`' layers (the target's activations without gradient). A level too small for a
    layer (its activation would be empty) compares only the layers it reaches."""
    loss = 0.0
    for s in scales:
        p, t = pyramid_level(pred, s), pyramid_level(target, s)
        n = features.reachable(*p.shape[-2:])
        if n:
            loss = loss + perceptual_loss(features, p, t, distance="l1", weights=weights, count=n)
    return loss


# --- evaluation network (AKD, MKR, AED) ----------------------------------------------------------------------------
class Evaluator(nn.Module):
    """Small CNN trained with supervision on the training frames: the parts' centres by soft-argmax of one heatmap
    per part at half resolution (AKD, MKR), and identity classes from pooled features, whose unit-length
    penultimate features are the identity embedding of AED."""

    def __init__(self, identities: int, parts: int, size: int, width: int = 16, dim: int = 64):
        super().__init__()
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.trunk = nn.Sequential(*block(3, width), *block(width, 2 * width), nn.MaxPool2d(2),
                                   *block(2 * width, 2 * width), *block(2 * width, 2 * width))
        self.heat = nn.Conv2d(2 * width, max(parts, 1), 3, padding=1)
        self.embed = nn.Sequential(nn.MaxPool2d(2), *block(2 * width, 4 * width), nn.MaxPool2d(2),
                                   *block(4 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4 * width, dim), nn.ReLU())
        self.identity = nn.Linear(dim, identities)
        self.parts = parts

    def forward(self, x):
        f = self.trunk(x)
        e = self.embed(f)
        logits = self.heat(f)
        b, p, h, w = logits.shape
        heat = F.softmax(logits.view(b, p, -1), -1).view(b, p, h, w)
        centres = heatmap_moments(heat)[0][:, :self.parts]
        return F.normalize(e, dim=1), self.identity(e), centres


def frames_of(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, H, W) videos -> (N*T, 3, H, W) frames."""
    return x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])


def train_evaluator(data, steps: int, batch: int = 64, lr: float = 2e-3) -> Evaluator:
    """The dataset's evaluation network, trained once (fixed seed) and cached by the training data's fingerprint."""
    centres = data.extra["centres"]["train"]
    x = data.train.x
    parts = 0 if centres is None else centres.shape[2]
    key = hashlib.sha256(f"{fingerprint(x, data.train.y)}-{steps}-{batch}-{lr}-{EVALUATOR_VERSION}".encode())
    path = cache_dir() / f"mraa-evaluator-{key.hexdigest()[:16]}.pt"
    model = Evaluator(data.num_classes, parts, x.shape[-1])
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception:
            path.unlink(missing_ok=True)
    frames = frames_of(x)
    ids = data.train.y.repeat_interleave(x.shape[2])
    cs = None if centres is None else centres.reshape(-1, parts, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVALUATOR_SEED)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        gen = torch.Generator().manual_seed(EVALUATOR_SEED)
        opt = torch.optim.Adam(model.parameters(), lr)
        model.train()
        for step in range(steps):
            b = torch.randint(len(frames), (batch,), generator=gen)
            _, logits, pred = model(frames[b])
            loss = F.cross_entropy(logits, ids[b])
            if cs is not None:
                loss = loss + 10 * F.smooth_l1_loss(pred, cs[b], beta=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def keypoint_errors(pred: torch.Tensor, true: torch.Tensor, size: int) -> torch.Tensor:
    """Distances (pixels of a size x size frame) between predicted and true centres (..., P, 2) in [-1, 1]."""
    return (pred - true).norm(dim=-1) * size / 2


def akd(pred: torch.Tensor, true: torch.Tensor, size: int) -> float:
    """Average keypoint distance in pixels."""
    return keypoint_errors(pred, true, size).mean().item()


def mkr(pred_generated: torch.Tensor, pred_real: torch.Tensor, true: torch.Tensor,
        radius: float = MKR_RADIUS) -> float:
    """Missing keypoint rate: among the (frame, part) pairs found in the real frame (within `radius` of the truth,
    in [-1, 1] units), the share not found in the generated frame."""
    found_real = (pred_real - true).norm(dim=-1) <= radius
    found_gen = (pred_generated - true).norm(dim=-1) <= radius
    n = found_real.sum().item()
    return float((found_real & ~found_gen).sum().item() / n) if n else math.nan


def to_uint8_strip(frames: torch.Tensor) -> list:
    """(T, 3, H, W) in [0, 1] -> nested lists of bytes (for a results file)."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).tolist()


@register_algorithm("motion_transfer")
class MotionTransferTraining(Centralised):
    """Self-supervised training of a `motion_transfer` model on videos (x: (N, 3, T, H, W))."""
    transient = (*Centralised.transient, "evaluator", "vgg")

    def __init__(self, perceptual: float | list[float] = 10.0, equivariance_shift: float = 10.0,
                 equivariance_affine: float = 10.0, sigma_affine: float = 0.05, sigma_tps: float = 0.005,
                 points_tps: int = 5, evaluator_steps: int = 600, server_lr: float = 1.0,
                 reconstruction: str = "pixel", perceptual_weights: str = VGG19_FILE):
        super().__init__(server_lr=server_lr)
        if reconstruction not in RECONSTRUCTIONS:
            raise SuiteError(f"method '{self.name}': unknown reconstruction '{reconstruction}'; "
                             f"use one of {', '.join(RECONSTRUCTIONS)}")
        layers = len(VGG19_PYRAMID_LAYERS)
        if isinstance(perceptual, (list, tuple)):
            if reconstruction != "vgg19" or len(perceptual) != layers:
                raise SuiteError(f"method '{self.name}': perceptual is one weight per pyramid level, or with "
                                 f"reconstruction vgg19 a list of {layers} (one per VGG-19 layer); got {perceptual}")
            perceptual = [float(w) for w in perceptual]
        elif reconstruction == "vgg19":
            perceptual = [float(perceptual)] * layers
        self.reconstruction, self.perceptual_weights = reconstruction, perceptual_weights
        self.perceptual, self.eq_shift, self.eq_affine = perceptual, equivariance_shift, equivariance_affine
        self.transform = {"sigma_affine": sigma_affine, "sigma_tps": sigma_tps, "points_tps": points_tps}
        self.evaluator_steps = evaluator_steps

    def setup(self, ctx):
        if not ctx.data.extra.get("video"):
            raise SuiteError(f"method '{self.name}' trains on videos; dataset '{ctx.spec['dataset']['name']}' is not one")
        if not hasattr(ctx.model, "animate"):
            raise SuiteError(f"method '{self.name}' needs model motion_transfer, not '{ctx.spec['model']['name']}'")
        super().setup(ctx)
        self.vgg = None  # VGG-19 features of the perceptual pyramid, read from data_root only when it is used
        if self.reconstruction == "vgg19" and any(self.perceptual):
            self.vgg = load_vgg_features(Path(ctx.data_root) / self.perceptual_weights, 19,
                                         tuple(VGG19_PYRAMID_LAYERS), normalize=True).to(ctx.device)
        self.evaluator = train_evaluator(ctx.data, self.evaluator_steps).to(ctx.device)

    def reconstruction_loss(self, prediction: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
        """The pixel-L1 pyramid, or (`reconstruction: vgg19`) the authors' VGG-19 perceptual pyramid."""
        if self.reconstruction == "vgg19":
            return pyramid_perceptual(self.vgg, prediction, driving, self.perceptual) if self.vgg is not None else 0.0
        return pyramid_l1(prediction, driving, weight=self.perceptual)

    def local_loss(self, model, x, y):
        b, _, t = x.shape[:3]
        i = torch.randint(t, (b,))
        j = (i + 1 + torch.randint(t - 1, (b,))) % t  # a different frame of the same video
        rows = torch.arange(b)
        source, driving = x[rows, :, i], x[rows, :, j]
        out = model.animate(source, driving)
        loss = self.reconstruction_loss(out["prediction"], driving)
        if self.eq_shift or self.eq_affine:
            tr = RandomTransform(b, device=x.device, **self.transform)
            transformed = model.region_predictor(tr.transform_frame(driving))
            drv = out["driving_regions"]
            if self.eq_shift:
                loss = loss + self.eq_shift * (drv["shift"] - tr.warp_coordinates(transformed["shift"])).abs().mean()
            if self.eq_affine:
                value = torch.linalg.inv(drv["affine"]) @ (tr.jacobian(transformed["shift"]) @ transformed["affine"])
                loss = loss + self.eq_affine * (torch.eye(2, device=x.device) - sign_fixed(value)).abs().mean()
        return loss

    @torch.no_grad()
    def evaluate(self, run, global_state):
        model = run.ctx.model
        model.load_state_dict(global_state)
        model.eval()
        x = run.x_test
        n, _, t, h, w = x.shape
        centres = run.ctx.data.extra["centres"]["test"]
        source = x[:, :, :1].expand(-1, -1, t - 1, -1, -1)
        driving = x[:, :, 1:]
        src, drv = frames_of(source.contiguous()), frames_of(driving.contiguous())
        true = None if centres is None else centres[:, 1:].reshape(-1, centres.shape[2], 2).to(x.device)
        ids = run.y_test.repeat_interleave(t - 1)
        preds = {"": [], "self": []}
        for k in range(0, len(drv), 64):
            preds[""].append(model(src[k:k + 64], drv[k:k + 64]))
            preds["self"].append(model(drv[k:k + 64], drv[k:k + 64]))
        preds = {k: torch.cat(v) for k, v in preds.items()}
        preds["copy"], preds["driving"] = src, drv
        real_emb, _, real_kp = self.evaluator(drv)
        metrics = {}
        for name, pred in preds.items():
            emb, logits, kp = self.evaluator(pred)
            p = f"{name}_" if name else ""
            metrics[f"{p}l1"] = (pred - drv).abs().mean().item()
            metrics[f"{p}aed"] = (emb - real_emb).norm(dim=1).mean().item()
            metrics[f"{p}identity_accuracy"] = (logits.argmax(1) == ids).double().mean().item()
            metrics[f"{p}akd"] = None if true is None else akd(kp, true, w)
            metrics[f"{p}mkr"] = None if true is None else mkr(kp, real_kp, true)
        hist = run.ctx.history
        last = hist is not None and len(hist.rounds) + 1 == run.rounds
        # the animation of the first test video (frames 1..T-1), for the report's frame strips
        metrics["animation"] = to_uint8_strip(preds[""][:t - 1].cpu()) if last else None
        return {"test_accuracy": metrics["identity_accuracy"], "test_loss": metrics["l1"], **metrics}
