"""Datasets as in-memory tensors, looked up by name.

Every dataset is a `Dataset` with a train and a test `Split` of float tensors (N, C, H, W) (text: int64 token ids
(N, length), `common/data/text.py`) and int64 labels.
Offline datasets are built from files that ship with installed packages; real datasets (CIFAR-10/100) are
read from `data_root` and never downloaded at run time.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.errors import SuiteError


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor | None = None  # int64 domain index of each sample (multi-domain datasets only)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.x[index], self.y[index], None if self.domain is None else self.domain[index])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    description: str = ""
    extra: dict = field(default_factory=dict)
    domains: tuple[str, ...] = ()  # names of the domains that `Split.domain` indexes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def cache_dir() -> Path:
    return Path(os.environ.get("PAPERBENCH_CACHE", Path.home() / ".cache" / "paper-benchmarks"))


def cached(name: str, source_package: str | tuple[str, ...], build: Callable[[], dict], key: str = "") -> dict:
    """Tensors built from installed packages, cached per package version (building can take seconds).

    Generated data also depends on its recipe: `key` (e.g. a recipe version and seed) is part of the cache name,
    so changing the recipe never reads a stale cache entry."""
    from importlib.metadata import version
    packages = (source_package,) if isinstance(source_package, str) else source_package
    parts = [name, *(f"{p}-{version(p)}" for p in packages), *([key] if key else [])]
    path = cache_dir() / ("-".join(parts) + ".pt")
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


LOADERS: dict[str, Callable[..., Dataset]] = {}


def register(name: str):
    def deco(fn):
        LOADERS[name] = fn
        return fn
    return deco


# How reports name each loader's data, so an analog is never mistaken for the paper's dataset.
DATASET_NAMES = {"mnist": "MNIST", "mnist5k": "MNIST 5k", "mnist1d": "mnist1d", "digits5": "digits5 (offline)", "fundus4": "fundus4 (generated)", "fundus": "Fundus",
                 "prostate": "Prostate MRI", "digits28": "sklearn digits",
                 "mnist_usps_digits": "MNIST 5k ↔ sklearn digits (USPS-like)", "mnist_usps": "MNIST ↔ USPS",
                 "office31": "Office-31",
                 "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "emnist": "EMNIST", "emnist_letters": "EMNIST letters",
                 "celeba_smiling": "CelebA (smiling)", "tinyimagenet": "Tiny-ImageNet",
                 "cinic10": "CINIC-10", "digits_five": "Digits-Five", "office_caltech10": "Office-Caltech-10",
                 "domainnet10": "DomainNet (10 classes)", "imdb": "IMDB", "trec6": "TREC-6",
                 "reviews": "templated reviews", "superglue_boolq": "SuperGLUE BoolQ", "superglue_cb": "SuperGLUE CB",
                 "superglue_rte": "SuperGLUE RTE", "superglue_wic": "SuperGLUE WiC",
                 "articulated": "articulated figures", "articulated_smoke": "articulated figures (smoke)",
                 "taichi": "TaiChiHD", "ted": "TED-talks", "vox": "VoxCeleb", "mgif": "MGif",
                 "nuclei": "nuclei-like centres (generated)", "nuclei_organs": "nuclei of four organs (MoNuSeg)",
                 "brats_centres": "nuclei, BraTS T2, BraTS T1",
                 "reid_synth": "generated ReID identities", "reid_synth_smoke": "generated ReID identities (smoke)",
                 "reid9": "nine ReID datasets",
                 "cxr3": "cxr3 (generated CXR-like)", "cxr3_smoke": "cxr3 (generated CXR-like, smoke)",
                 "festa_cxr": "CXR (classification, detection, segmentation)"}


def dataset_name(name: str, train_limit: int | None = None) -> str:
    """A loader's data as a report names it, with the training-set size when a scale limits it."""
    return DATASET_NAMES.get(name, name) + (f" ({train_limit} train)" if train_limit else "")


def known_loaders() -> dict[str, Callable[..., Dataset]]:
    """Every registered loader. The modules that register them are imported here, lazily, so that importing
    common.data stays cheap."""
    from common.data import (brats, cxr, digits5, domains, fundus_synth, medical, nuclei, offline, reid,  # noqa: F401
                             text, videos, vision)
    return LOADERS


def load_dataset(name: str, data_root: str | Path = "data", train_limit: int | None = None,
                 test_limit: int | None = None) -> Dataset:
    """Load a dataset by name; `*_limit` keep a fixed, seed-independent, class-balanced prefix (smoke scale)."""
    known_loaders()
    if name not in LOADERS:
        raise SuiteError(f"unknown dataset '{name}'; known datasets: {', '.join(sorted(LOADERS))}")
    ds = LOADERS[name](Path(data_root))
    if train_limit or test_limit:
        ds = Dataset(ds.name, _balanced_prefix(ds.train, train_limit), _balanced_prefix(ds.test, test_limit),
                     ds.num_classes, ds.description, ds.extra, ds.domains)
    return ds


def _balanced_prefix(split: Split, limit: int | None) -> Split:
    """The first `limit` samples in an order that interleaves the classes (and the domains, where there are
    several), so small slices stay balanced."""
    if not limit or limit >= len(split):
        return split
    y = split.y if split.y.dim() == 1 else torch.zeros(len(split), dtype=torch.int64)  # masks: one class
    group = y if split.domain is None else split.domain * (int(y.max()) + 1) + y
    rank = torch.empty_like(group)
    for g in group.unique():
        idx = (group == g).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    order = torch.argsort(rank * (int(group.max()) + 1) + group, stable=True)
    return split.subset(order[:limit].sort().values)


def fingerprint(*tensors: torch.Tensor) -> str:
    """Content hash of tensors (shape, dtype and bytes), short enough to print in a report."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def train_test_overlap(ds: Dataset) -> int:
    """How many test samples also occur (byte-identical) in the training split: a leaked split is a silent bug."""
    def row_hashes(x):
        flat = x.reshape(len(x), -1).contiguous().numpy()
        return {hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in flat}
    return len(row_hashes(ds.train.x) & row_hashes(ds.test.x))


def missing_files(name: str, data_root: str | Path) -> list[str]:
    """Files a dataset needs under data_root that are absent (empty for datasets that ship with packages)."""
    from common.data import brats, cxr, domains, medical, nuclei, reid, text, videos, vision
    return (vision.missing_files(name, Path(data_root)) + domains.missing_files(name, Path(data_root))
            + reid.missing_files(name, Path(data_root))
            + text.missing_files(name, Path(data_root)) + medical.missing_files(name, Path(data_root))
            + videos.missing_files(name, Path(data_root)) + nuclei.missing_files(name, Path(data_root))
            + brats.missing_files(name, Path(data_root)) + cxr.missing_files(name, Path(data_root)))
