"""FedDG / ELCFS: episodic learning in continuous frequency space (Liu et al., CVPR 2021).

Before training, every client computes the amplitude spectrum |FFT(x)| of each of its training images and shares
it (the "distribution bank"; the images never leave the client). In local training, each image x of a batch is
moved towards another client's appearance by **continuous frequency space interpolation** (CFSI): in the centred
low-frequency window of half-size floor(r * min(H, W)) the amplitude becomes (1 - lam) A_x + lam A_n, with A_n the
amplitude of a random image of a random other client and lam ~ U(0, 1); the phase of x is kept and the inverse FFT
gives x_t (same anatomy, another site's low-frequency "style").

**Boundary-oriented episodic learning** (BEL), per batch: meta-train on x (Dice loss L_in, gradient g), an inner
step theta' = theta - meta_lr * clip(g, +-clip) (first order: g is a constant, as in the authors' code, so the
outer gradient flows into theta through theta' as the identity), meta-test on x_t with theta' (Dice loss), plus
`contrastive_weight` times an NT-Xent loss (temperature 0.05) between boundary and background embeddings of each
structure: the decoder's last features averaged over the boundary ring (mask minus its erosion) and over the
background ring (dilation by 5 minus the mask), from both the meta-train and the meta-test pass; boundary
embeddings are positives of each other, background ones their negatives. The client minimises L_in + L_out.

Ablations are parameters of the same method: `cfsi: false` meta-tests on the untransformed image (no amplitude
exchange); `bel: false` drops the episodic step and the contrastive loss and trains on x and x_t with the Dice
loss (frequency-space augmentation only). FedAvg is the suite's `fedavg` (Dice loss on x).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.func import functional_call

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.communication import dense_bytes
from common.fl.engine import sub_seed
from common.segmentation import segmentation_loss

# ---- continuous frequency space interpolation -------------------------------------------------------------------


def amplitude(x: torch.Tensor) -> torch.Tensor:
    """Amplitude spectrum |FFT2| per channel of images (..., H, W) (unshifted)."""
    return torch.fft.fft2(x.double() if x.dtype == torch.float64 else x.float()).abs()


def low_window(h: int, w: int, ratio: float) -> tuple[slice, slice]:
    """Rows and columns of the centred (fftshift-ed) low-frequency window: half-size floor(ratio * min(h, w)),
    i.e. (2b + 1) x (2b + 1) frequencies around the zero frequency (b = 0: the mean colour only)."""
    b = int(math.floor(min(h, w) * ratio))
    ch, cw = h // 2, w // 2
    return slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1)


def interpolate_amplitude(x: torch.Tensor, amp_other: torch.Tensor, lam: torch.Tensor, ratio: float,
                          clip: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """CFSI: images `x` (N, C, H, W) with their low-frequency amplitude moved towards `amp_other` (N, C, H, W,
    unshifted amplitude spectra) by `lam` (N,) in [0, 1], the phase kept; values clipped to `clip` (None: not)."""
    f = torch.fft.fft2(x)
    amp, phase = f.abs(), f.angle()
    a = torch.fft.fftshift(amp, dim=(-2, -1))
    t = torch.fft.fftshift(amp_other, dim=(-2, -1))
    rows, cols = low_window(x.shape[-2], x.shape[-1], ratio)
    lam = lam.to(a.dtype).view(-1, 1, 1, 1)
    a = a.clone()
    a[..., rows, cols] = (1 - lam) * a[..., rows, cols] + lam * t[..., rows, cols]
    a = torch.fft.ifftshift(a, dim=(-2, -1))
    out = torch.fft.ifft2(torch.polar(a, phase)).real.to(x.dtype)
    return out if clip is None else out.clamp(*clip)


# ---- boundary-oriented contrastive loss ---------------------------------------------------------------------------


def boundary_background(masks: np.ndarray, erosion: int = 1, dilation: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """For binary masks (N, H, W): the boundary ring (mask minus its binary erosion, `erosion` iterations) and
    the background ring (the mask's binary dilation by `dilation` iterations minus the mask), as in the authors'
    data loader (scipy.ndimage, its default cross-shaped structuring element)."""
    masks = masks.astype(bool)
    bound = np.stack([m & ~ndimage.binary_erosion(m, iterations=erosion) for m in masks])
    back = np.stack([ndimage.binary_dilation(m, iterations=dilation) & ~m for m in masks])
    return bound, back


def region_embeddings(features: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean feature vector (N, D) over each image's region (N, H, W) of features (N, D, H, W); zero for an empty
    region."""
    region = region.to(features.dtype).unsqueeze(1)
    return (features * region).sum((-2, -1)) / region.sum((-2, -1)).clamp(min=1.0)


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """NT-Xent over labelled embeddings (pytorch-metric-learning's NTXentLoss): for every positive pair (i, j)
    (same label, i != j), -log(exp(s_ij / t) / (exp(s_ij / t) + sum over k with another label of exp(s_ik / t)))
    with cosine similarity s; the mean over positive pairs."""
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    pos, neg = same & ~eye, ~same
    neg_sum = torch.where(neg, sim.exp(), torch.zeros_like(sim)).sum(1, keepdim=True)  # per anchor i
    losses = -sim + torch.log(sim.exp() + neg_sum)
    return losses[pos].mean()


def boundary_contrastive(feat_in: torch.Tensor, feat_out: torch.Tensor, y: torch.Tensor, erosion: int = 1,
                         dilation: int = 5, temperature: float = 0.05) -> torch.Tensor:
    """Sum over structures of NT-Xent between boundary (label 1) and background (label 0) embeddings of the
    meta-train (`feat_in`) and meta-test (`feat_out`) passes."""
    total = feat_in.new_zeros(())
    for s in range(y.shape[1]):
        bound, back = boundary_background(y[:, s].cpu().numpy() > 0.5, erosion, dilation)
        bound, back = torch.from_numpy(bound).to(y.device), torch.from_numpy(back).to(y.device)
        emb = torch.cat([region_embeddings(feat_in, bound), region_embeddings(feat_out, bound),
                         region_embeddings(feat_in, back), region_embeddings(feat_out, back)])
        labels = torch.cat([torch.ones(2 * len(y)), torch.zeros(2 * len(y))]).to(y.device)
        total = total + nt_xent(emb, labels, temperature)
    return total


# ---- the episodic step ----------------------------------------------------------------------------------------------


def episodic_loss(model: torch.nn.Module, x: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, meta_lr: float,
                  clip: float, contrastive_weight: float, temperature: float = 0.05, erosion: int = 1,
                  dilation: int = 5) -> tuple[torch.Tensor, dict]:
    """L_in + L_out of one batch: meta-train on `x`, a first-order inner step, meta-test on `x_t` with the fast
    weights (Dice + `contrastive_weight` x boundary contrastive loss). Returns (loss, parts as floats)."""
    params = dict(model.named_parameters())
    logits_in, feat_in = model(x, features=True)
    loss_in = segmentation_loss(logits_in, y)
    grads = torch.autograd.grad(loss_in, list(params.values()), retain_graph=True)
    fast = {n: p - meta_lr * g.clamp(-clip, clip) for (n, p), g in zip(params.items(), grads)}
    logits_out, feat_out = functional_call(model, fast, (x_t,), {"features": True})
    dice_out = segmentation_loss(logits_out, y)
    cont = boundary_contrastive(feat_in, feat_out, y, erosion, dilation, temperature) \
        if contrastive_weight else torch.zeros(())
    loss = loss_in + dice_out + contrastive_weight * cont
    return loss, {"inner": loss_in.item(), "outer_dice": dice_out.item(), "contrastive": cont.item()}


@register_algorithm("elcfs")
class ELCFS(Algorithm):
    """FedDG's ELCFS on the FedAvg server (sample-weighted averaging, as the authors' `client_weight`)."""
    transient = Algorithm.transient + ("bank", "gen", "client")

    def __init__(self, window: float = 0.05, cfsi: bool = True, bel: bool = True, meta_lr: float = 1e-3,
                 clip: float = 100.0, contrastive_weight: float = 0.1, temperature: float = 0.05, erosion: int = 1,
                 dilation: int = 5):
        super().__init__()
        if not 0 <= window < 0.5:
            raise SuiteError(f"elcfs window ratio must be in [0, 0.5), got {window}")
        self.window, self.cfsi, self.bel = window, cfsi, bel
        self.meta_lr, self.clip, self.contrastive_weight = meta_lr, clip, contrastive_weight
        self.temperature, self.erosion, self.dilation = temperature, erosion, dilation

    def setup(self, ctx):
        super().setup(ctx)
        x = ctx.data.train.x
        if ctx.data.train.y.dim() != 4:
            raise SuiteError("elcfs segments images: its dataset needs masks (N, S, H, W), e.g. fundus4")
        # the distribution bank: each client's amplitude spectra, computed locally and shared once
        self.bank = [amplitude(x[idx]).to(ctx.device) for idx in ctx.parts]
        self.gen, self.client = None, None

    def bank_bytes(self, client: int) -> int:
        return dense_bytes([self.bank[client]]) if self.cfsi else 0

    def upload_bytes(self, client_state, client, round_index):
        """The model, and in the first round the client's amplitude spectra (the distribution bank)."""
        return super().upload_bytes(client_state, client, round_index) + \
            (self.bank_bytes(client) if round_index == 0 else 0)

    def download_bytes(self, global_state, client, round_index):
        """The model, and in the first round the other clients' amplitude spectra."""
        others = sum(self.bank_bytes(k) for k in range(len(self.bank)) if k != client)
        return super().download_bytes(global_state, client, round_index) + (others if round_index == 0 else 0)

    def train_client(self, run, client, round_index):
        self.client = client
        self.gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client, 0xFD6))
        return super().train_client(run, client, round_index)

    def transformed(self, x: torch.Tensor) -> torch.Tensor:
        """x moved towards other clients' appearance by CFSI (x itself without CFSI or without other clients)."""
        others = [k for k in range(len(self.bank)) if k != self.client]
        if not self.cfsi or not others:
            return x
        pick = torch.randint(len(others), (len(x),), generator=self.gen)
        amps = torch.stack([self.bank[others[p]][torch.randint(len(self.bank[others[p]]), (1,), generator=self.gen)[0]]
                            for p in pick.tolist()])
        lam = torch.rand(len(x), generator=self.gen).to(x.device)
        return interpolate_amplitude(x, amps, lam, self.window)

    def local_loss(self, model, x, y):
        x_t = self.transformed(x)
        if not self.bel:
            return 0.5 * (segmentation_loss(model(x), y) + segmentation_loss(model(x_t), y))
        loss, _ = episodic_loss(model, x, x_t, y, self.meta_lr, self.clip, self.contrastive_weight,
                                self.temperature, self.erosion, self.dilation)
        return loss
