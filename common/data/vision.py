"""Real image datasets read from `data_root` with torchvision (paper scale). Nothing is downloaded at run time."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from common.data import Dataset, Split, register
from common.errors import DatasetCorrupt, DatasetMissing

CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"


TORCHVISION_CLASSES = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


# EMNIST's 'byclass' split: 62 classes (digits, upper- and lower-case letters), the EMNIST CR task of Reddi et al.
EMNIST_SPLIT = "byclass"
EMNIST_SOURCE = "https://www.nist.gov/itl/products-and-services/emnist-dataset"


def _emnist_files(root: Path) -> list[Path]:
    raw = root / "EMNIST" / "raw"  # torchvision.datasets.EMNIST's layout
    return [raw / f"emnist-{EMNIST_SPLIT}-{part}-{kind}-ubyte" for part in ("train", "test")
            for kind in ("images-idx3", "labels-idx1")]


def missing_files(name: str, root: Path) -> list[str]:
    if name == "emnist":
        return [str(f) for f in _emnist_files(root) if not f.is_file()]
    cls = TORCHVISION_CLASSES.get(name)
    if cls is None:
        return []
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
    return _load_cifar(datasets.CIFAR10, root, "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@register("cifar100")
def cifar100(root: Path) -> Dataset:
    return _load_cifar(datasets.CIFAR100, root, "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@register("emnist")
def emnist(root: Path) -> Dataset:
    missing = missing_files("emnist", root)
    if missing:
        raise DatasetMissing(
            f"emnist is not in data_root '{root}': missing {', '.join(missing)}. Obtain it with "
            f"`python -c \"import torchvision; torchvision.datasets.EMNIST('{root}', split='{EMNIST_SPLIT}', "
            f"download=True)\"` on a machine with internet access, or unpack the gzip files from {EMNIST_SOURCE} "
            f"into '{root / 'EMNIST' / 'raw'}'.")
    try:
        train, test = (datasets.EMNIST(str(root), split=EMNIST_SPLIT, train=t) for t in (True, False))
    except (RuntimeError, ValueError, AssertionError) as e:  # torchvision asserts on a malformed IDX header
        raise DatasetCorrupt(f"emnist in '{root / 'EMNIST' / 'raw'}' could not be read ({e}); re-download the files "
                             f"listed in torchvision.datasets.EMNIST") from None

    def to_split(ds) -> Split:
        # EMNIST's files store each image transposed; turn it upright, as MNIST
        x = ds.data.transpose(1, 2).unsqueeze(1).float() / 255.0
        return Split(x.contiguous(), ds.targets.to(torch.int64))

    return Dataset("emnist", to_split(train), to_split(test), len(datasets.EMNIST.classes_split_dict[EMNIST_SPLIT]),
                   f"EMNIST {EMNIST_SPLIT} from {root / 'EMNIST' / 'raw'} (torchvision format), 28x28x1, "
                   f"values in [0, 1]")
