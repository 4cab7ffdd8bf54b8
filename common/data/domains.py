"""Multi-domain image datasets read from `data_root` (paper scale): one domain per client in feature-shift papers.

- `digits_five`: MNIST, SVHN, USPS, SynthDigits, MNIST-M in the preprocessed layout of the FedBN code
  (github.com/med-air/FedBN): `<data_root>/<DIR>/partitions/train_part{0..9}.pkl` (each tenth of the training
  set) and `<data_root>/<DIR>/test.pkl`, each a pickled `(images, labels)` pair of numpy arrays, images uint8
  (N, H, W) or (N, H, W, 3); DIR is MNIST, SVHN, USPS, SynthDigits, MNIST_M. Images are resized to 28x28 and
  grey ones replicated to three channels, values in [0, 1].
- `office_caltech10`: `<data_root>/office_caltech_10/<domain>/<class>/*.jpg` (torchvision ImageFolder layout)
  for the domains amazon, caltech, dslr, webcam and the ten shared classes.
- `domainnet10`: `<data_root>/domainnet/<domain>/<class>/*.jpg` for the domains clipart, infograph, painting,
  quickdraw, real, sketch; only the ten classes used by FedBN are read (other class folders are ignored).

The ImageFolder datasets have no official per-domain split: a fixed, stratified 20% of each domain is the test
split. Their images are resized to 256x256 (FedBN's resolution) and kept in memory as float tensors: about
0.8 MB per image, so DomainNet's ten classes need tens of GB of memory.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data import Dataset, Split, register
from common.errors import DatasetCorrupt, DatasetMissing

SPLIT_SEED = 20240601
TEST_FRACTION = 0.2
IMAGE_SIZE = 256

DIGITS_FIVE = {"MNIST": "MNIST", "SVHN": "SVHN", "USPS": "USPS", "SynthDigits": "SynthDigits", "MNIST-M": "MNIST_M"}
DIGITS_FIVE_HOWTO = ("Download the preprocessed digits archive linked from the FedBN repository's README "
                     "(github.com/med-air/FedBN, 'Dataset & Pretrained Modes') and unpack it so that "
                     "<data_root>/MNIST/partitions/train_part0.pkl exists")
OFFICE_DOMAINS = ("amazon", "caltech", "dslr", "webcam")
OFFICE_CLASSES = ("back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor",
                  "mouse", "mug", "projector")
OFFICE_HOWTO = ("Obtain Office-Caltech-10 (Gong et al., CVPR 2012; the FedBN repository's README links a copy) "
                "and arrange it as <data_root>/office_caltech_10/<domain>/<class>/<image>.jpg")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill",
                     "wine_glass", "zebra")
DOMAINNET_HOWTO = ("Download DomainNet's six domain archives from http://ai.bu.edu/M3SDA/ and unpack them into "
                   "<data_root>/domainnet/ (giving <data_root>/domainnet/<domain>/<class>/<image>.jpg)")


OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICE31_CLASSES = ("back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair", "desk_lamp",
                    "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer", "letter_tray",
                    "mobile_phone", "monitor", "mouse", "mug", "paper_notebook", "pen", "phone", "printer", "projector",
                    "punchers", "ring_binder", "ruler", "scissors", "speaker", "stapler", "tape_dispenser", "trash_can")
OFFICE31_HOWTO = ("Obtain Office-31 (Saenko et al., ECCV 2010; domain_adaptation_images.tar.gz) and unpack it into "
                  "<data_root>/office31/, giving <data_root>/office31/<domain>/images/<class>/<image>.jpg for the "
                  "domains amazon, dslr and webcam")
USPS_FILES = ("usps.bz2", "usps.t.bz2")
USPS_HOWTO = ("Put USPS in LIBSVM format (torchvision.datasets.USPS's files usps.bz2 and usps.t.bz2, from "
              "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps) into <data_root>/usps/, "
              "and MNIST in torchvision's layout (<data_root>/MNIST/raw/)")
# the usual MNIST -> USPS protocol (Long et al. 2013): 2,000 MNIST and 1,800 USPS training images, drawn once
MNIST_USPS_TRAIN = {"MNIST": 2000, "USPS": 1800}


def _digits_five_files(root: Path) -> list[Path]:
    return [root / d / f for d in DIGITS_FIVE.values()
            for f in [*(f"partitions/train_part{i}.pkl" for i in range(10)), "test.pkl"]]


def _image_folders(root: Path, folder: str, domains, classes) -> list[Path]:
    return [root / folder / d / c for d in domains for c in classes]


def missing_files(name: str, root: Path) -> list[str]:
    """Files or class folders a dataset of this module needs under `root` that are absent (or empty)."""
    if name == "digits_five":
        return [str(p) for p in _digits_five_files(root) if not p.is_file()]
    if name == "mnist_usps":
        from common.data.vision import missing_files as vision_missing
        return vision_missing("mnist", root) + [str(root / "usps" / f) for f in USPS_FILES
                                                if not (root / "usps" / f).is_file()]
    if name == "office31":
        return [str(root / "office31" / d / "images" / c) + "/" for d in OFFICE31_DOMAINS for c in OFFICE31_CLASSES
                if not ((root / "office31" / d / "images" / c).is_dir()
                        and any((root / "office31" / d / "images" / c).iterdir()))]
    folders = {"office_caltech10": ("office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES),
               "domainnet10": ("domainnet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES)}.get(name)
    if folders is None:
        return []
    return [str(p) + "/" for p in _image_folders(root, *folders) if not (p.is_dir() and any(p.iterdir()))]


def _require(name: str, root: Path, howto: str) -> None:
    missing = missing_files(name, root)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise DatasetMissing(f"{name} is not in data_root '{root}': missing {shown}. {howto}.")


def _to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, 3, size, size) in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images)).float() / 255.0
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.contiguous()


def multi_domain(name: str, per_domain: list[tuple[Split, Split]], domains, num_classes: int,
                 description: str) -> Dataset:
    """One Dataset from each domain's (train, test) splits, with `Split.domain` telling the domains apart."""
    def cat(splits: list[Split]) -> Split:
        return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]),
                     torch.cat([torch.full((len(s),), d, dtype=torch.int64) for d, s in enumerate(splits)]))
    return Dataset(name, cat([tr for tr, _ in per_domain]), cat([te for _, te in per_domain]), num_classes,
                   description, domains=tuple(domains))


def _read_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            images, labels = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DatasetCorrupt(f"{path} is not a pickled (images, labels) pair ({e}); re-extract it. "
                             f"{DIGITS_FIVE_HOWTO}.") from None
    return np.asarray(images), np.asarray(labels).astype(np.int64).reshape(-1)


@register("digits_five")
def digits_five(root: Path) -> Dataset:
    _require("digits_five", root, DIGITS_FIVE_HOWTO)
    per_domain = []
    for folder in DIGITS_FIVE.values():
        parts = [_read_pair(root / folder / "partitions" / f"train_part{i}.pkl") for i in range(10)]
        test_x, test_y = _read_pair(root / folder / "test.pkl")
        train = Split(_to_tensor(np.concatenate([x for x, _ in parts]), 28),
                      torch.as_tensor(np.concatenate([y for _, y in parts])))
        per_domain.append((train, Split(_to_tensor(test_x, 28), torch.as_tensor(test_y))))
    return multi_domain("digits_five", per_domain, DIGITS_FIVE, 10,
                        f"Digits-Five from {root} (FedBN's preprocessed files): MNIST, SVHN, USPS, SynthDigits, "
                        f"MNIST-M, resized to 3x28x28 in [0, 1]")


def _stratified_test_mask(y: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:int(round(TEST_FRACTION * len(idx)))]] = True
    return test


def _image_folder_domain(folder: Path, classes) -> tuple[Split, Split]:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    images = []
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)))
        except OSError as e:
            raise DatasetCorrupt(f"cannot read image {path}: {e}") from None
    x = _to_tensor(np.stack(images), IMAGE_SIZE)
    y = np.array([label for _, label in samples], dtype=np.int64)
    test = _stratified_test_mask(y)
    yt = torch.as_tensor(y)
    return Split(x[~test], yt[~test]), Split(x[test], yt[test])


def _image_folder_dataset(name: str, root: Path, folder: str, domains, classes, howto: str) -> Dataset:
    _require(name, root, howto)
    per_domain = [_image_folder_domain(root / folder / d, classes) for d in domains]
    return multi_domain(name, per_domain, domains, len(classes),
                        f"{name} from {root / folder} (ImageFolder layout): {', '.join(domains)}; "
                        f"{len(classes)} classes, {IMAGE_SIZE}x{IMAGE_SIZE}, fixed stratified "
                        f"{TEST_FRACTION:.0%} test split per domain")


@register("office_caltech10")
def office_caltech10(root: Path) -> Dataset:
    return _image_folder_dataset("office_caltech10", root, "office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES,
                                 OFFICE_HOWTO)


@register("domainnet10")
def domainnet10(root: Path) -> Dataset:
    return _image_folder_dataset("domainnet10", root, "domainnet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES,
                                 DOMAINNET_HOWTO)


@register("office31")
def office31(root: Path) -> Dataset:
    """Office-31 (amazon, dslr, webcam; 31 classes) in its archive's layout, <domain>/images/<class>/, each domain
    with a fixed stratified 20% test split, 3x256x256 in [0, 1] (one domain per client, or a source and a held-out
    target domain for domain adaptation)."""
    _require("office31", root, OFFICE31_HOWTO)
    per_domain = [_image_folder_domain(root / "office31" / d / "images", OFFICE31_CLASSES) for d in OFFICE31_DOMAINS]
    return multi_domain("office31", per_domain, OFFICE31_DOMAINS, len(OFFICE31_CLASSES),
                        f"Office-31 from {root / 'office31'} (<domain>/images/<class>/): "
                        f"{', '.join(OFFICE31_DOMAINS)}; 31 classes, {IMAGE_SIZE}x{IMAGE_SIZE}, fixed stratified "
                        f"{TEST_FRACTION:.0%} test split per domain")


def _draw(split: Split, n: int, seed: int) -> Split:
    """A fixed, class-stratified draw of about n samples (largest remainders per class) from a split."""
    y = split.y.numpy()
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    share = counts / counts.sum() * min(n, len(y))
    k = np.floor(share).astype(int)
    k[np.argsort(-(share - k), kind="stable")[:min(n, len(y)) - k.sum()]] += 1
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:m] for c, m in zip(classes, k)]))
    return split.subset(torch.as_tensor(idx))


@register("mnist_usps")
def mnist_usps(root: Path) -> Dataset:
    """MNIST and USPS as two domains (domain adaptation MNIST <-> USPS): MNIST from torchvision's layout, USPS from
    its LIBSVM files (16x16, resized to 28x28 bilinearly), both 1x28x28 in [0, 1]. Training splits: a fixed
    stratified draw of 2,000 MNIST and 1,800 USPS images (the usual protocol); test splits: the full test sets."""
    missing = missing_files("mnist_usps", root)
    if missing:
        raise DatasetMissing(f"mnist_usps is not in data_root '{root}': missing {', '.join(missing)}. {USPS_HOWTO}.")
    from common.data import load_dataset
    from common.data.vision import _datasets
    m = load_dataset("mnist", root)
    try:
        usps = [_datasets().USPS(str(root / "usps"), train=t) for t in (True, False)]
    except (OSError, ValueError, IndexError, EOFError) as e:
        raise DatasetCorrupt(f"USPS in '{root / 'usps'}' could not be read ({e}). {USPS_HOWTO}.") from None

    def usps_split(ds) -> Split:
        x = torch.as_tensor(ds.data, dtype=torch.float32).unsqueeze(1) / 255.0
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
        return Split(x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64))

    per_domain = [(_draw(m.train, MNIST_USPS_TRAIN["MNIST"], SPLIT_SEED), m.test),
                  (_draw(usps_split(usps[0]), MNIST_USPS_TRAIN["USPS"], SPLIT_SEED), usps_split(usps[1]))]
    return multi_domain("mnist_usps", per_domain, ("MNIST", "USPS"), 10,
                        f"MNIST ({root / 'MNIST' / 'raw'}) and USPS ({root / 'usps'}), 2,000 / 1,800 training "
                        f"images drawn once, full test sets, 1x28x28 in [0, 1]")
