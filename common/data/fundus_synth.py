"""fundus4: a generated four-site, fundus-like segmentation benchmark (FedDG's Fundus analog), offline and seeded.

Every image is an RGB 32x32 "retinal photograph" with one optic disc and the optic cup inside it, and two masks
(disc, cup; the disc mask includes the cup, as in the FedDG authors' Fundus files):

- content (the same recipe at every site): a round field of view on a black frame with vignetting, an orange-red
  retina with smooth low-contrast texture; an elliptical optic disc (semi-axes 6-9 px, 11-25% of the image, as in
  the authors' regions around the disc; random position away from the border, random orientation) brighter and yellower than the retina, with soft edges; the cup a nested
  ellipse (0.4-0.7 of the disc's axes, slightly offset) brighter still; 3-5 dark vessels (sinusoidal curves)
  through the disc, which partly cover it; pixel noise.
- appearance, per site (the kind of shift FedDG targets, mostly LOW-FREQUENCY): a strong colour cast (per-channel
  gain and offset) and a linear illumination gradient (strength and direction), milder contrast (0.8-1.15) and
  gamma (0.85-1.15) changes and a slight Gaussian blur; each image draws its site's parameters with a small jitter. Shapes, sizes and
  positions of the structures do not depend on the site, so what separates sites is appearance, not anatomy: a
  model trained on three sites meets a new colour/illumination/contrast at the fourth (leave-one-site-out).

Sites A-D have 48 training and 24 test images each (a fixed recipe seed; every run sees the same images).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from common.data import Dataset, Split, cached, register

RECIPE = "fundus4-v5"
SEED = 20210306
SIZE = 32
TRAIN_PER_SITE, TEST_PER_SITE = 48, 24
SITES = ("A", "B", "C", "D")
STRUCTURES = ("disc", "cup")

# per site: channel gain, channel offset, contrast, gamma, illumination gradient (strength, angle in degrees), blur
STYLES = {
    "A": dict(gain=(1.00, 1.00, 1.00), offset=(0.00, 0.00, 0.00), contrast=1.0, gamma=1.0, grad=(0.15, 0), blur=0.0),
    "B": dict(gain=(0.45, 0.80, 1.10), offset=(0.00, 0.05, 0.15), contrast=0.85, gamma=1.15, grad=(0.60, 120), blur=0.5),
    "C": dict(gain=(1.35, 0.75, 0.45), offset=(0.05, 0.00, 0.00), contrast=1.15, gamma=0.85, grad=(0.80, 250), blur=0.0),
    "D": dict(gain=(0.75, 1.10, 1.25), offset=(0.20, 0.20, 0.20), contrast=0.8, gamma=1.0, grad=(0.40, 60), blur=0.8),
}


def _ellipse(xx, yy, cx, cy, a, b, theta):
    """Normalised elliptic radius: < 1 inside the ellipse."""
    c, s = np.cos(theta), np.sin(theta)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def render_content(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One site-independent image (3, size, size) in [0, 1] and its masks (2, size, size): disc, cup."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    r = np.hypot(xx - c, yy - c) / (size / 2)
    field = 1 / (1 + np.exp((r - 0.97) * 60))  # field of view with a soft rim
    retina = np.array([0.72, 0.33, 0.14])[:, None, None] * (1 - 0.35 * r ** 2)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), 3) * 0.25
    img = retina * (1 + texture)
    # optic disc and cup
    a, b = rng.uniform(12, 18, 2) * size / 64
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    rd = _ellipse(xx, yy, cx, cy, a, b, theta)
    k = rng.uniform(0.4, 0.7)
    ccx, ccy = cx + rng.uniform(-0.15, 0.15) * a, cy + rng.uniform(-0.15, 0.15) * b
    rc = _ellipse(xx, yy, ccx, ccy, k * a, k * b, theta + rng.uniform(-0.3, 0.3))
    disc_mask, cup_mask = rd < 1, (rc < 1) & (rd < 1)
    soft_disc = 1 / (1 + np.exp((rd - 1) * 8))
    soft_cup = 1 / (1 + np.exp((rc - 1) * 10)) * soft_disc
    img = img + soft_disc * np.array([0.18, 0.22, 0.08])[:, None, None] \
        + soft_cup * np.array([0.08, 0.12, 0.14])[:, None, None]
    # vessels leaving the disc
    vessel = np.zeros((size, size))
    for _ in range(rng.integers(3, 6)):
        phi, amp, freq = rng.uniform(0, 2 * np.pi), rng.uniform(2, 6), rng.uniform(0.05, 0.15)
        ang = rng.uniform(0, np.pi)
        ca, sa = np.cos(ang), np.sin(ang)
        u, v = (xx - cx) * ca + (yy - cy) * sa, -(xx - cx) * sa + (yy - cy) * ca
        d = np.abs(v - amp * np.sin(freq * u + phi))
        vessel = np.maximum(vessel, np.exp(-(d / rng.uniform(0.6, 1.2)) ** 2))
    img = img * (1 - 0.45 * vessel)
    img = img * field + rng.normal(0, 0.015, img.shape)
    return np.clip(img, 0, 1), np.stack([disc_mask, cup_mask]).astype(np.float32)


def apply_style(img: np.ndarray, style: dict, rng: np.random.Generator, jitter: float = 0.05) -> np.ndarray:
    """A site's appearance on a content image: gain/offset per channel, contrast, gamma, illumination gradient,
    blur; every parameter jittered by a relative `jitter` per image."""
    size = img.shape[-1]
    j = lambda v: np.asarray(v, dtype=np.float64) * (1 + rng.uniform(-jitter, jitter, np.shape(v)))  # noqa: E731
    out = img * j(style["gain"])[:, None, None] + j(style["offset"])[:, None, None] * (img.sum(0) > 0.05)
    mean = out.mean(axis=(1, 2), keepdims=True)
    out = mean + j(style["contrast"]) * (out - mean)
    out = np.clip(out, 0, 1) ** j(style["gamma"])
    strength, angle = style["grad"]
    angle = np.deg2rad(angle + rng.uniform(-15, 15))
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    out = out * (1 + j(strength) * (np.cos(angle) * xx + np.sin(angle) * yy) * 2)
    if style["blur"] > 0:
        out = ndimage.gaussian_filter(out, (0, j(style["blur"]), j(style["blur"])))
    return np.clip(out, 0, 1)


def generate(seed: int = SEED, train_per_site: int = TRAIN_PER_SITE, test_per_site: int = TEST_PER_SITE,
             size: int = SIZE) -> dict:
    """Images, masks and site index of every training and test image (numpy), deterministic per `seed`."""
    out = {f"{s}_{k}": [] for s in ("train", "test") for k in ("x", "y", "site")}
    for d, site in enumerate(SITES):
        rng = np.random.default_rng([seed, d])
        for split, n in (("train", train_per_site), ("test", test_per_site)):
            for _ in range(n):
                img, masks = render_content(rng, size)
                out[f"{split}_x"].append(apply_style(img, STYLES[site], rng).astype(np.float32))
                out[f"{split}_y"].append(masks)
                out[f"{split}_site"].append(d)
    return {k: np.stack(v) if not k.endswith("site") else np.array(v, dtype=np.int64) for k, v in out.items()}


@register("fundus4")
def fundus4(root=None) -> Dataset:
    def build():
        g = generate()
        return {k: torch.from_numpy(v) for k, v in g.items()}
    t = cached("fundus4", ("numpy", "scipy"), build, key=f"{RECIPE}-{SEED}")
    return Dataset("fundus4", Split(t["train_x"], t["train_y"], t["train_site"]),
                   Split(t["test_x"], t["test_y"], t["test_site"]), num_classes=len(STRUCTURES),
                   description=(f"fundus4: generated fundus-like images ({SIZE}x{SIZE} RGB) of 4 sites A-D with "
                                f"site-specific low-frequency appearance (colour cast, contrast, gamma, illumination "
                                f"gradient, blur), {TRAIN_PER_SITE} training and {TEST_PER_SITE} test images per "
                                f"site; masks: optic disc, optic cup (recipe {RECIPE}, seed {SEED})"),
                   extra={"structures": STRUCTURES, "task": "segmentation"}, domains=SITES)
