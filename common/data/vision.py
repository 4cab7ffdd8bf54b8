"""Real image datasets read from `data_root` with torchvision (paper scale). Nothing is downloaded at run time.

- `cifar10`, `cifar100`, `emnist`: torchvision's own formats and file lists.
- `tinyimagenet`: Tiny-ImageNet-200 as extracted from its zip: `tiny-imagenet-200/wnids.txt`,
  `train/<wnid>/images/*.JPEG` and `val/images/*.JPEG` with `val/val_annotations.txt` naming each image's wnid.
  The official test images have no labels, so the validation images are the test split (as in MOON's code).
  Labels are indices into the sorted wnids.
- `cinic10`: CINIC-10 as `cinic-10/{train,valid,test}/<class>/*.png`; train is the training split and test the
  test split. `valid` is not read: the papers train on train only.

Decoding an image-folder dataset (about 100,000 small files) is slow, so the decoded uint8 images are cached
(`cached`), keyed by every file's path, size and modification time: a changed, added or removed file means a fresh
decode.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from common.data import Dataset, Split, cached, register
from common.errors import DatasetCorrupt, DatasetMissing

CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _datasets():
    """torchvision.datasets, imported on first use: importing torchvision costs seconds, which every training run
    on offline data would otherwise pay for nothing."""
    from torchvision import datasets
    return datasets


TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


# EMNIST's 'byclass' split: 62 classes (digits, upper- and lower-case letters), the EMNIST CR task of Reddi et al.
EMNIST_SPLIT = "byclass"
EMNIST_SOURCE = "https://www.nist.gov/itl/products-and-services/emnist-dataset"


def _emnist_files(root: Path, split: str = EMNIST_SPLIT) -> list[Path]:
    raw = root / "EMNIST" / "raw"  # torchvision.datasets.EMNIST's layout
    return [raw / f"emnist-{split}-{part}-{kind}-ubyte" for part in ("train", "test")
            for kind in ("images-idx3", "labels-idx1")]


TINYIMAGENET_DIR = "tiny-imagenet-200"
TINYIMAGENET_HOWTO = ("Download http://cs231n.stanford.edu/tiny-imagenet-200.zip on a machine with internet access "
                      "and unzip it into data_root (giving <data_root>/tiny-imagenet-200/wnids.txt)")
# CIFAR-10's class order, which CINIC-10 shares
CINIC10_DIR = "cinic-10"
CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CelebA's smiling attribute as an image folder (FedGen's CelebA task: LEAF's celebrities, images resized to 84x84)
CELEBA_DIR = "celeba-smiling"
CELEBA_CLASSES = ("not_smiling", "smiling")
CELEBA_SIZE = 84
CELEBA_HOWTO = ("Build it from CelebA (e.g. with LEAF's data/celeba scripts, as FedGen's data/CelebA/README.md does): "
                "images resized to 84x84 under <data_root>/celeba-smiling/{train,test}/{not_smiling,smiling}/*.png "
                "(or .jpg) by the Smiling attribute")
CINIC10_HOWTO = ("Download CINIC-10.tar.gz from https://datashare.ed.ac.uk/handle/10283/3192 on a machine with "
                 "internet access and unpack it into <data_root>/cinic-10/ (giving <data_root>/cinic-10/train/"
                 "airplane/*.png)")


def _nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def _wnids(base: Path) -> list[str]:
    return sorted(set((base / "wnids.txt").read_text().split()))


def _folder_missing(name: str, root: Path) -> list[str]:
    """Files and folders (with a trailing /) of the image-folder datasets that are absent or empty."""
    if name == "tinyimagenet":
        base = root / TINYIMAGENET_DIR
        files = [base / "wnids.txt", base / "val" / "val_annotations.txt"]
        # without wnids.txt the class folders are unknown: name the train folder itself
        folders = ([base / "train" / w / "images" for w in _wnids(base)] if files[0].is_file() else [base / "train"])
        folders.append(base / "val" / "images")
    elif name == "cinic10":
        files, folders = [], [root / CINIC10_DIR / s / c for s in ("train", "test") for c in CINIC10_CLASSES]
    elif name == "celeba_smiling":
        files, folders = [], [root / CELEBA_DIR / s / c for s in ("train", "test") for c in CELEBA_CLASSES]
    else:
        return []
    return ([str(f) for f in files if not f.is_file()] +
            [str(p) + "/" for p in folders if not _nonempty_dir(p)])


def missing_files(name: str, root: Path) -> list[str]:
    if name in ("tinyimagenet", "cinic10", "celeba_smiling"):
        return _folder_missing(name, root)
    if name == "emnist":
        return [str(f) for f in _emnist_files(root) if not f.is_file()]
    if name == "emnist_letters":
        return [str(f) for f in _emnist_files(root, "letters") if not f.is_file()]
    if name == "mnist":
        return [str(f) for f in _mnist_files(root) if not f.is_file()]
    if name not in TORCHVISION_CLASSES:
        return []
    cls = getattr(_datasets(), TORCHVISION_CLASSES[name])
    folder = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [str(folder / f) for f in files if not (folder / f).is_file()]


def _load_cifar(cls, root: Path, name: str, num_classes: int, mean, std) -> Dataset:
    folder = root / cls.base_folder
    missing = missing_files(name, root)
    if missing:
        raise DatasetMissing(
            f"{name} is not in data_root '{root}': missing {', '.join(missing)}. Obtain it with "
            f"`python -c \"import torchvision; torchvision.datasets.{cls.__name__}('{root}', download=True)\"` "
            f"on a machine with internet access, or unpack the python version from {CIFAR_SOURCE} into '{root}'.")
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as e:
        raise DatasetCorrupt(f"{name} in '{folder}' failed torchvision's checksum check ({e}); "
                             f"re-download the files listed in torchvision.datasets.{cls.__name__}") from None

    def to_split(ds) -> Split:
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return Split(x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))

    return Dataset(name, to_split(train), to_split(test), num_classes,
                   f"{name} from {folder} (torchvision format), per-channel standardised")


@register("cifar10")
def cifar10(root: Path) -> Dataset:
    return _load_cifar(_datasets().CIFAR10, root, "cifar10", 10, (0.4914, 0.4822, 0.4465),
                       (0.2470, 0.2435, 0.2616))


@register("cifar100")
def cifar100(root: Path) -> Dataset:
    return _load_cifar(_datasets().CIFAR100, root, "cifar100", 100, (0.5071, 0.4865, 0.4409),
                       (0.2673, 0.2564, 0.2762))


def _idx_dataset(name: str, cls, root: Path, source: str, read, **options) -> tuple:
    """(train, test) of a torchvision IDX-format dataset (MNIST, EMNIST) read by `read`: missing files are named with
    how to obtain them (torchvision's download with `options`, or the gzip files from `source`); a file torchvision
    cannot parse is DatasetCorrupt."""
    raw = root / cls.__name__ / "raw"  # torchvision's layout
    missing = missing_files(name, root)
    if missing:
        extra = "".join(f"{k}='{v}', " for k, v in options.items())
        raise DatasetMissing(
            f"{name} is not in data_root '{root}': missing {', '.join(missing)}. Obtain it with "
            f"`python -c \"import torchvision; torchvision.datasets.{cls.__name__}('{root}', {extra}"
            f"download=True)\"` on a machine with internet access, or unpack the gzip files from {source} "
            f"into '{raw}'.")
    try:
        return read()
    except (RuntimeError, ValueError, AssertionError) as e:  # torchvision asserts on a malformed IDX header
        raise DatasetCorrupt(f"{name} in '{raw}' could not be read ({e}); re-download the files "
                             f"listed in torchvision.datasets.{cls.__name__}") from None


@register("emnist")
def emnist(root: Path) -> Dataset:
    emnist_cls = _datasets().EMNIST
    train, test = _idx_dataset("emnist", emnist_cls, root, EMNIST_SOURCE, lambda: tuple(
        emnist_cls(str(root), split=EMNIST_SPLIT, train=t) for t in (True, False)), split=EMNIST_SPLIT)

    def to_split(ds) -> Split:
        # EMNIST's files store each image transposed; turn it upright, as MNIST
        x = ds.data.transpose(1, 2).unsqueeze(1).float() / 255.0
        return Split(x.contiguous(), ds.targets.to(torch.int64))

    return Dataset("emnist", to_split(train), to_split(test), len(emnist_cls.classes_split_dict[EMNIST_SPLIT]),
                   f"EMNIST {EMNIST_SPLIT} from {root / 'EMNIST' / 'raw'} (torchvision format), 28x28x1, "
                   f"values in [0, 1]")


@register("emnist_letters")
def emnist_letters(root: Path) -> Dataset:
    """EMNIST 'letters' (26 classes, a-z with upper and lower case merged; FedGen's EMNIST): torchvision's labels
    1..26 become 0..25."""
    emnist_cls = _datasets().EMNIST
    train, test = _idx_dataset("emnist_letters", emnist_cls, root, EMNIST_SOURCE, lambda: tuple(
        emnist_cls(str(root), split="letters", train=t) for t in (True, False)), split="letters")

    def to_split(ds) -> Split:
        x = ds.data.transpose(1, 2).unsqueeze(1).float() / 255.0  # stored transposed, as in `emnist`
        y = ds.targets.to(torch.int64) - 1
        if len(y) and (y.min() < 0 or y.max() > 25):
            raise DatasetCorrupt(f"emnist_letters in '{root / 'EMNIST' / 'raw'}': labels outside 1..26; re-download it")
        return Split(x.contiguous(), y)

    return Dataset("emnist_letters", to_split(train), to_split(test), 26,
                   f"EMNIST letters from {root / 'EMNIST' / 'raw'} (torchvision format), 26 classes, 28x28x1, "
                   f"values in [0, 1]")


MNIST_SOURCE = "http://yann.lecun.com/exdb/mnist/"


def _mnist_files(root: Path) -> list[Path]:
    raw = root / "MNIST" / "raw"  # torchvision.datasets.MNIST's layout
    return [raw / f"{part}-{kind}-ubyte" for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


@register("mnist")
def mnist(root: Path) -> Dataset:
    """The full MNIST (60,000 / 10,000), 28x28 grey, values in [0, 1] like the offline MNIST 5k subset."""
    mnist_cls = _datasets().MNIST
    train, test = _idx_dataset("mnist", mnist_cls, root, MNIST_SOURCE, lambda: tuple(
        mnist_cls(str(root), train=t) for t in (True, False)))

    def to_split(ds) -> Split:
        return Split((ds.data.unsqueeze(1).float() / 255.0).contiguous(), ds.targets.to(torch.int64))

    return Dataset("mnist", to_split(train), to_split(test), 10,
                   f"MNIST from {root / 'MNIST' / 'raw'} (torchvision format), 28x28x1, values in [0, 1]")


def _require(name: str, root: Path, howto: str) -> None:
    missing = missing_files(name, root)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise DatasetMissing(f"{name} is not in data_root '{root}': missing {shown}. {howto}.")


def _image_files(folder: Path, classes, extension: str) -> list[tuple[str, int]]:
    """(path, label) of every image under folder/<class>/ (recursively), sorted by class, then path."""
    try:
        from torchvision.datasets.folder import make_dataset
        return make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=(extension,))
    except FileNotFoundError as e:  # a class folder with no image of this extension
        raise DatasetMissing(f"{folder}: {e}") from None


def _files_key(root: Path, paths) -> str:
    """Hash of the files' paths (relative to root, so the same files moved elsewhere still match), sizes and mtimes."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise DatasetMissing(f"cannot read {p}: {e.strerror}") from None
        h.update(f"{os.path.relpath(p, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode(samples: list[tuple[str, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, size, size) images (grey ones replicated to RGB) and int64 labels."""
    from PIL import Image  # torchvision.io's decoders are deprecated
    x = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as im:
                img = np.array(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DatasetCorrupt(f"cannot read image {path} ({e}); re-extract it") from None
        if img.shape[:2] != (size, size):
            raise DatasetCorrupt(f"image {path} is {img.shape[1]}x{img.shape[0]}, expected {size}x{size}; "
                                 f"re-extract it")
        x[i] = torch.from_numpy(img).permute(2, 0, 1)
    return x, torch.tensor([label for _, label in samples], dtype=torch.int64)


def _cached_images(name: str, root: Path, train, test, extra_files, size: int) -> dict:
    key = _files_key(root, [*extra_files, *(p for p, _ in train), *(p for p, _ in test)])

    def build():
        (train_x, train_y), (test_x, test_y) = _decode(train, size), _decode(test, size)
        return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    return cached(name, "pillow", build, key=key)


def _standardised(x: torch.Tensor, y: torch.Tensor, mean, std) -> Split:
    x = x.float().div_(255.0)
    x.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1))
    return Split(x, y)


@register("tinyimagenet")
def tinyimagenet(root: Path) -> Dataset:
    _require("tinyimagenet", root, TINYIMAGENET_HOWTO)
    base = root / TINYIMAGENET_DIR
    wnids = _wnids(base)
    train = _image_files(base / "train", wnids, ".jpeg")
    index = {w: i for i, w in enumerate(wnids)}
    test = []
    annotations = base / "val" / "val_annotations.txt"
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetCorrupt(f"{annotations}, line {n}: expected '<image>\\t<wnid>...' with a wnid from "
                                 f"wnids.txt, got '{line[:80]}'; re-extract it")
        test.append((str(base / "val" / "images" / fields[0]), index[fields[1]]))
    test.sort()
    data = _cached_images("tinyimagenet", root, train, test, [base / "wnids.txt", annotations], 64)
    # the commonly used per-channel mean and std of Tiny-ImageNet's training images
    mean, std = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
    return Dataset("tinyimagenet", _standardised(data["train_x"], data["train_y"], mean, std),
                   _standardised(data["test_x"], data["test_y"], mean, std), len(wnids),
                   f"Tiny-ImageNet from {base} (train: train/, test: val/ with val_annotations.txt), "
                   f"{len(wnids)} classes, 64x64x3, per-channel standardised")


@register("celeba_smiling")
def celeba_smiling(root: Path) -> Dataset:
    """CelebA's smiling attribute from `celeba-smiling/{train,test}/{not_smiling,smiling}/`: .png or .jpg images
    of 84x84, RGB in [0, 1] (the authors' CelebA input), labels not_smiling = 0, smiling = 1."""
    _require("celeba_smiling", root, CELEBA_HOWTO)
    base = root / CELEBA_DIR

    def files(split: str):
        out = []
        for ext in (".png", ".jpg"):
            folder_files = [(p, label) for label, c in enumerate(CELEBA_CLASSES)
                            for p in sorted(str(f) for f in (base / split / c).rglob(f"*{ext}"))]
            out += folder_files
        return sorted(out, key=lambda t: (t[1], t[0]))
    train, test = files("train"), files("test")
    data = _cached_images("celeba_smiling", root, train, test, [], CELEBA_SIZE)
    to_split = lambda x, y: Split(x.float().div_(255.0), y)
    return Dataset("celeba_smiling", to_split(data["train_x"], data["train_y"]),
                   to_split(data["test_x"], data["test_y"]), 2,
                   f"CelebA smiling from {base} (train/, test/; not_smiling = 0, smiling = 1), 84x84x3, values in [0, 1]")


@register("cinic10")
def cinic10(root: Path) -> Dataset:
    _require("cinic10", root, CINIC10_HOWTO)
    base = root / CINIC10_DIR
    train, test = (_image_files(base / s, CINIC10_CLASSES, ".png") for s in ("train", "test"))
    data = _cached_images("cinic10", root, train, test, [], 32)
    # CINIC-10's per-channel mean and std as published with it (github.com/BayesWatch/cinic-10)
    mean, std = (0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)
    return Dataset("cinic10", _standardised(data["train_x"], data["train_y"], mean, std),
                   _standardised(data["test_x"], data["test_y"], mean, std), len(CINIC10_CLASSES),
                   f"CINIC-10 from {base} (train: train/, test: test/; valid/ unused), 32x32x3, "
                   f"per-channel standardised")
