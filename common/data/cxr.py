"""Chest X-ray data with three tasks (FeSTA): a class per image, a lesion bounding box, a lesion mask.

A multi-task dataset keeps `train.y` / `test.y` as class labels (0 where an image has none, so partitioners work) and
puts every task's targets in `extra`:

- `extra["targets"][split][task]`: classification int64 (N,), detection float (N, 4) boxes (x0, y0, x1, y1) as
  fractions of the image, segmentation float 0/1 masks (N, 1, H, W);
- `extra["has"][split][task]`: bool (N,), which images carry that task's target.

**cxr3** (generated, offline, seeded; `cxr3_smoke` is a smaller draw): 32x32 grayscale "chest radiographs" of one
distribution, every image with all three targets. Anatomy: a bright mediastinum and soft tissue, two dark lung fields
(ellipses with soft edges, size and position jittered), faint rib shadows across the lungs, a bright spine, smooth
background texture and pixel noise, a global contrast and brightness jitter. Each image has one lesion in a random
lung (an ellipse of semi-axes 2.5-6 px, random orientation; the mask is the ellipse, the box its extent) whose
appearance is the class: 0 "nodular" (solid, sharp-edged), 1 "ground-glass" (faint, blurred edges), 2 "reticular"
(striped texture). The sizes of the three overlap, so the class is read from the lesion's texture at its place.

**festa_cxr** (paper scale, from `data_root`): one folder per task, each with train/ and test/:
`festa_cxr/classification/{train,test}/<class>/*.png` (classes in sorted folder order),
`festa_cxr/detection/{train,test}/images/*.png` with `boxes.csv` (file,x0,y0,x1,y1 in pixels of the file),
`festa_cxr/segmentation/{train,test}/images/*.png` with `masks/<same name>.png` (non-zero = lesion). Images are read
as grayscale and resized to 224x224 (boxes scaled, masks resized by nearest neighbour); each task is one domain
(client k of a `domain` partition holds task k's images).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.draw import ellipse

from common.data import Dataset, Split, register
from common.errors import DatasetCorrupt, DatasetMissing

TASKS = ("classification", "detection", "segmentation")
CLASSES = ("nodular", "ground-glass", "reticular")
SEED = 20211102
SIZE = 32


def _lesion(cls: int, size: int, rng: np.random.Generator, lung_c: tuple[float, float], lung_r: tuple[float, float]):
    """(intensity map to add, boolean mask) of one lesion of class `cls` inside the lung at lung_c (row, col) with
    semi-axes lung_r (rows, cols), in pixels."""
    ang = rng.uniform(0, 2 * np.pi)
    rad = np.sqrt(rng.uniform(0, 0.35))
    r0, c0 = lung_c[0] + rad * lung_r[0] * np.sin(ang), lung_c[1] + rad * lung_r[1] * np.cos(ang)
    a, b = rng.uniform(2.5, 6.0), rng.uniform(2.5, 6.0)
    rr, cc = ellipse(r0, c0, a, b, shape=(size, size), rotation=rng.uniform(0, np.pi))
    mask = np.zeros((size, size), dtype=bool)
    mask[rr, cc] = True
    if not mask.any():  # a degenerate draw: one pixel at the centre
        mask[int(np.clip(r0, 0, size - 1)), int(np.clip(c0, 0, size - 1))] = True
    m = mask.astype(np.float64)
    yy, xx = np.mgrid[:size, :size]
    if cls == 0:  # nodular: solid, sharp
        add = rng.uniform(0.22, 0.30) * m
    elif cls == 1:  # ground-glass: faint, blurred edges
        add = rng.uniform(0.12, 0.18) * ndimage.gaussian_filter(m, 1.5)
    else:  # reticular: stripes
        theta = rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / 4.0 + rng.uniform(0, 6.3)) > 0
        add = rng.uniform(0.26, 0.34) * m * stripes
    return add, mask


def generate(n: int, seed: int, size: int = SIZE) -> dict:
    """n images (n, 1, size, size) in [0, 1], class labels, boxes (fractions) and masks (n, 1, size, size)."""
    rng = np.random.default_rng(seed)
    xs = np.zeros((n, 1, size, size), np.float32)
    masks = np.zeros((n, 1, size, size), np.float32)
    boxes = np.zeros((n, 4), np.float32)
    labels = rng.integers(0, len(CLASSES), n)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    for i in range(n):
        img = 0.55 + 0.08 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 3.0) * 4
        lungs = np.zeros((size, size))
        centres = []
        for side in (-1, 1):
            c = (size * rng.uniform(0.48, 0.56), size * (0.5 + side * rng.uniform(0.19, 0.23)))
            r = (size * rng.uniform(0.28, 0.34), size * rng.uniform(0.13, 0.17))
            lungs += ((yy - c[0]) / r[0]) ** 2 + ((xx - c[1]) / r[1]) ** 2 <= 1
            centres.append((c, r))
        lungs = ndimage.gaussian_filter(np.clip(lungs, 0, 1), 0.8)
        ribs = 0.05 * np.clip(np.sin(2 * np.pi * yy / rng.uniform(4.5, 6.0) + rng.uniform(0, 6.3)), 0, None)
        img = img - 0.33 * lungs + ribs * lungs
        img += 0.12 * np.exp(-((xx - size / 2) / 1.5) ** 2)  # spine
        c, r = centres[rng.integers(2)]
        add, mask = _lesion(int(labels[i]), size, rng, c, r)
        img = img + add
        img = rng.uniform(0.85, 1.15) * (img - 0.5) + 0.5 + rng.uniform(-0.05, 0.05)
        img += rng.normal(0, 0.04, size=(size, size))
        xs[i, 0] = np.clip(img, 0, 1)
        masks[i, 0] = mask
        rows, cols = np.nonzero(mask)
        boxes[i] = (cols.min() / size, rows.min() / size, (cols.max() + 1) / size, (rows.max() + 1) / size)
    return {"x": torch.from_numpy(xs), "y": torch.from_numpy(labels.astype(np.int64)),
            "boxes": torch.from_numpy(boxes), "masks": torch.from_numpy(masks)}


def multitask_dataset(name: str, train: dict, test: dict, description: str, classes=CLASSES,
                      domains: tuple[str, ...] = ()) -> Dataset:
    """A Dataset from per-split dicts with x, y, boxes, masks, has (task -> bool (N,)) and optionally domain."""
    def split(d):
        return Split(d["x"], d["y"], d.get("domain"))
    targets = {s: {"classification": d["y"], "detection": d["boxes"], "segmentation": d["masks"]}
               for s, d in (("train", train), ("test", test))}
    has = {s: d["has"] for s, d in (("train", train), ("test", test))}
    return Dataset(name, split(train), split(test), len(classes), description,
                   extra={"targets": targets, "has": has, "tasks": TASKS, "classes": tuple(classes)},
                   domains=domains)


def _generated(name: str, n_train: int, n_test: int) -> Dataset:
    train, test = generate(n_train, SEED), generate(n_test, SEED + 1)
    for d in (train, test):
        d["has"] = {t: torch.ones(len(d["y"]), dtype=torch.bool) for t in TASKS}
    return multitask_dataset(name, train, test,
                             f"{name}: generated 32x32 CXR-like images with one lesion each (class, box, mask), "
                             f"{n_train} training / {n_test} test, seed {SEED}")


@register("cxr3")
def cxr3(root: Path) -> Dataset:
    return _generated("cxr3", 720, 300)


@register("cxr3_smoke")
def cxr3_smoke(root: Path) -> Dataset:
    return _generated("cxr3_smoke", 72, 36)


# ---- paper scale: the tasks' CXR datasets in an image-folder layout ----------------------------------------------

PAPER_SIZE = 224
HOWTO = ("Put each task's CXR data under <data_root>/festa_cxr/: classification/{train,test}/<class>/*.png (the "
         "COVID-19 classification data), detection/{train,test}/images/*.png with boxes.csv (file,x0,y0,x1,y1 in "
         "pixels; the pneumonia detection data, e.g. RSNA Pneumonia Detection), segmentation/{train,test}/images/*.png "
         "with masks/<same name>.png (the pneumothorax segmentation data, e.g. SIIM-ACR), converted from the datasets' "
         "own formats (DICOM, run-length masks) to PNG")


def missing_files(name: str, root: Path) -> list[str]:
    if name != "festa_cxr":
        return []
    base = Path(root) / "festa_cxr"
    need = []
    for split in ("train", "test"):
        c = base / "classification" / split
        if not (c.is_dir() and any(p.is_dir() and any(p.glob("*.png")) for p in c.iterdir())):
            need.append(f"{c}/<class>/*.png")
        d = base / "detection" / split
        if not (d / "boxes.csv").is_file() or not any((d / "images").glob("*.png")):
            need.append(f"{d}/images/*.png and {d}/boxes.csv")
        s = base / "segmentation" / split
        if not any((s / "images").glob("*.png")):
            need.append(f"{s}/images/*.png and {s}/masks/*.png")
    return need


def _gray(path: Path, size: int, nearest: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
            im = im.convert("L").resize((size, size), Image.NEAREST if nearest else Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0, (w, h)
    except OSError as e:
        raise DatasetCorrupt(f"cannot read image {path}: {e}") from None


def _read_split(base: Path, split: str, classes: list[str], size: int) -> dict:
    xs, ys, boxes, masks, domain = [], [], [], [], []
    blank_mask, no_box = np.zeros((size, size), np.float32), np.zeros(4, np.float32)
    for label, cls in enumerate(classes):
        for f in sorted((base / "classification" / split / cls).glob("*.png")):
            xs.append(_gray(f, size)[0]), ys.append(label), boxes.append(no_box), masks.append(blank_mask)
            domain.append(0)
    det = base / "detection" / split
    with open(det / "boxes.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        try:
            img, (w, h) = _gray(det / "images" / row["file"], size)
            box = np.array([float(row["x0"]) / w, float(row["y0"]) / h, float(row["x1"]) / w, float(row["y1"]) / h],
                           np.float32)
        except (KeyError, ValueError) as e:
            raise DatasetCorrupt(f"{det / 'boxes.csv'}: bad row {row} ({e}); expected columns file,x0,y0,x1,y1") \
                from None
        xs.append(img), ys.append(0), boxes.append(np.clip(box, 0, 1)), masks.append(blank_mask), domain.append(1)
    seg = base / "segmentation" / split
    for f in sorted((seg / "images").glob("*.png")):
        m = seg / "masks" / f.name
        if not m.is_file():
            raise DatasetCorrupt(f"segmentation image {f} has no mask {m}")
        xs.append(_gray(f, size)[0]), ys.append(0), boxes.append(no_box)
        masks.append((_gray(m, size, nearest=True)[0] > 0).astype(np.float32)), domain.append(2)
    domain = torch.tensor(domain, dtype=torch.int64)
    return {"x": torch.from_numpy(np.stack(xs)[:, None]), "y": torch.tensor(ys, dtype=torch.int64),
            "boxes": torch.from_numpy(np.stack(boxes)), "masks": torch.from_numpy(np.stack(masks)[:, None]),
            "domain": domain, "has": {t: domain == d for d, t in enumerate(TASKS)}}


@register("festa_cxr")
def festa_cxr(root: Path, size: int = PAPER_SIZE) -> Dataset:
    missing = missing_files("festa_cxr", Path(root))
    if missing:
        raise DatasetMissing(f"festa_cxr is not in data_root '{root}': missing {', '.join(missing)}. {HOWTO}.")
    base = Path(root) / "festa_cxr"
    classes = sorted(p.name for p in (base / "classification" / "train").iterdir() if p.is_dir())
    train, test = _read_split(base, "train", classes, size), _read_split(base, "test", classes, size)
    return multitask_dataset("festa_cxr", train, test,
                             f"festa_cxr from {root}: classification ({', '.join(classes)}), detection, segmentation",
                             classes=classes, domains=TASKS)
