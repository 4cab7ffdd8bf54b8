"""Multi-site segmentation datasets read from `data_root` (FedDG's paper scale), in the FedDG authors' layout of
preprocessed 2D slices (github.com/liuquande/FedDG-ELCFS): one `.npy` file per image, an array (H, W, C + S) with
the C image channels first and the S binary mask channels last.

- `fundus`: `<data_root>/Fundus/client{1,2,3,4}/data_npy/*.npy` (the authors' `data_npy` folders; sites A-D are
  client1-4), arrays (384, 384, 5): RGB in [0, 255], then the optic disc and the optic cup masks.
- `prostate`: `<data_root>/Prostate/<site>/*.npy` for the sites ISBI, ISBI_1.5, I2CVB, UCL, BIDMC, HK (the
  authors' `transferred_data/raw/<site>` folders, named by their released loader), arrays (H, W, C + 1): image
  channels, then the prostate mask. Sites A-F are taken in that order (the order of the SAML/FedDG papers: RUNMC,
  BMC, HCRUDB, UCL, BIDMC, HK); this loader of the authors is released only as compiled bytecode, so its
  preprocessing (slice stacking, intensity normalisation) is not reproduced beyond what the files hold.

Images with values above 1 are divided by 255. Each site's files (sorted by name) are split into a fixed 80%
training and 20% test share (seeded); FedDG tests on all slices of the unseen site, see papers/feddg/README.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.data import Dataset, Split, register
from common.errors import DatasetCorrupt, DatasetMissing

SPLIT_SEED = 20210306
TEST_FRACTION = 0.2
FUNDUS_SITES = {"A": "client1", "B": "client2", "C": "client3", "D": "client4"}
PROSTATE_SITES = {"A": "ISBI", "B": "ISBI_1.5", "C": "I2CVB", "D": "UCL", "E": "BIDMC", "F": "HK"}
HOWTO = {"fundus": "Download the preprocessed Fundus data linked from the FedDG-ELCFS README "
                   "(github.com/liuquande/FedDG-ELCFS) and place each client's folder so that "
                   "<data_root>/Fundus/client1/data_npy/<slice>.npy exists",
         "prostate": "Obtain the preprocessed multi-site prostate MRI slices of FedDG-ELCFS / SAML "
                     "(github.com/liuquande/SAML) as .npy arrays (H, W, image channels + mask) and place them as "
                     "<data_root>/Prostate/<site>/<slice>.npy for the sites ISBI, ISBI_1.5, I2CVB, UCL, BIDMC, HK"}


def _site_dirs(name: str, root: Path) -> dict[str, Path]:
    if name == "fundus":
        return {s: root / "Fundus" / d / "data_npy" for s, d in FUNDUS_SITES.items()}
    return {s: root / "Prostate" / d for s, d in PROSTATE_SITES.items()}


def missing_files(name: str, root: Path) -> list[str]:
    """Site folders without any .npy slice."""
    if name not in ("fundus", "prostate"):
        return []
    return [f"{p}/*.npy" for p in _site_dirs(name, Path(root)).values() if not (p.is_dir() and any(p.glob("*.npy")))]


def _read_site(folder: Path, masks: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in sorted(folder.glob("*.npy")):
        try:
            a = np.load(f)
        except (ValueError, OSError) as e:
            raise DatasetCorrupt(f"cannot read {f}: {e}") from None
        if a.ndim != 3 or a.shape[-1] <= masks:
            raise DatasetCorrupt(f"{f} holds an array of shape {a.shape}; expected (H, W, image channels + {masks})")
        img = a[..., :-masks].astype(np.float32)
        xs.append(img / 255.0 if img.max() > 1 else img)
        ys.append((a[..., -masks:] > 0.5).astype(np.float32))
    return np.stack(xs).transpose(0, 3, 1, 2), np.stack(ys).transpose(0, 3, 1, 2)


def _load(name: str, root: Path, masks: int, structures: tuple[str, ...]) -> Dataset:
    missing = missing_files(name, root)
    if missing:
        raise DatasetMissing(f"{name} is not in data_root '{root}': missing {', '.join(missing)}. {HOWTO[name]}.")
    splits = {"train": ([], [], []), "test": ([], [], [])}
    for d, (site, folder) in enumerate(_site_dirs(name, root).items()):
        x, y = _read_site(folder, masks)
        test = np.zeros(len(x), dtype=bool)
        test[np.random.default_rng([SPLIT_SEED, d]).permutation(len(x))[:max(1, round(TEST_FRACTION * len(x)))]] = True
        for split, keep in (("train", ~test), ("test", test)):
            splits[split][0].append(x[keep])
            splits[split][1].append(y[keep])
            splits[split][2].append(np.full(int(keep.sum()), d, dtype=np.int64))
    sites = tuple(_site_dirs(name, root))
    make = {k: Split(*(torch.from_numpy(np.concatenate(v)) for v in parts)) for k, parts in splits.items()}
    return Dataset(name, make["train"], make["test"], num_classes=masks,
                   description=f"{name} from {root} (FedDG-ELCFS slices), sites {', '.join(sites)}, fixed "
                               f"{TEST_FRACTION:.0%} test split per site",
                   extra={"structures": structures, "task": "segmentation"}, domains=sites)


@register("fundus")
def fundus(root: Path) -> Dataset:
    return _load("fundus", Path(root), 2, ("disc", "cup"))


@register("prostate")
def prostate(root: Path) -> Dataset:
    return _load("prostate", Path(root), 1, ("prostate",))
