"""TDGAN's brain experiment (paper scale): three centres learned in sequence, read from the h5 files the official
code's scripts build (github.com/huiqu18/TDGAN-PyTorch, `data/preprocess/brats_dataset_build.py`) and its loaders
consume (`data/brain_split_dataset.py`: task 1 `NucleiDataset(opt, 4)`, tasks 2 and 3 `BratsDataset(opt, 1)` and
`BratsDataset(opt, 2)`), all under the scripts' `--dataroot ./db/brain`, here `<data_root>/brain/`:

1. `train_nuclei.h5`: the MoNuSeg nuclei patches of all four organs (256x256 RGB, label maps 0/255), the file
   `nuclei_dataset_build.py`'s `build_h5` writes (as `train_nulei.h5`, under `db/nuclei/for_gan_training`).
2. `train_brats_0.1.h5`: BraTS 2018 HGG T2 slices of 10% of the training patients.
3. `train_brats_t1_0.1.h5`: T1 slices of another 10% of the patients (the 20-30% share of the same shuffle).

A BraTS file holds datasets images/<patient>_<slice> (240, 240, 3) uint8 (the slice scaled to a maximum of 255,
repeated to three channels) and labels/<patient>_<slice> (240, 240) uint8 with the BraTS labels (0 background,
1 necrosis / non-enhancing tumour, 2 oedema, 4 enhancing tumour); only slices with at least 10 labelled pixels
within 20 slices of the tumour are kept. As in the official loader, the label map is the whole tumour (every label
above 0) plus the brain's outline: the pixels just outside the brain (the slice's non-zero region with its holes
filled), where a 4-neighbour is inside it (what the official `merge_skull`'s Laplacian marks).

Label maps here are float 0/1 masks with two structures (common/segmentation.py): "nucleus or tumour" (the nuclei
of the first centre, the whole tumour of the others; the structure the downstream segmenter is scored on) and
"brain outline" (empty for the nuclei centre). The official loaders instead write both into one grey map whose
intensity codes the task (nuclei 1/3, T2 2/3 of 255, T1 255), so their generator knows which centre's appearance a
map calls for; TDGAN's `label_code` multiplies the 0/1 masks by the same levels (papers/tdgan/method.py). The BraTS
slices are zero-padded to the nuclei patches' size (240 -> 256; the official loader resizes every image to 286 and crops 256). Per centre, the
samples of a fixed, seeded 20% of the sources (MoNuSeg images, BraTS patients) are the test split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common.data import Dataset, Split, register
from common.data.nuclei import held_out, read_pairs
from common.errors import DatasetCorrupt, DatasetMissing

BRAIN_DIR = "brain"
BRAIN_CENTRES = (("nuclei", "train_nuclei.h5"), ("BraTS T2", "train_brats_0.1.h5"),
                 ("BraTS T1", "train_brats_t1_0.1.h5"))
BRAIN_STRUCTURES = ("nucleus or tumour", "brain outline")
BRAIN_HOWTO = ("Build them with github.com/huiqu18/TDGAN-PyTorch: data/preprocess/brats_dataset_build.py (from the "
               "BraTS 2018 HGG cases) writes train_brats_0.1.h5 and train_brats_t1_0.1.h5, "
               "data/preprocess/nuclei_dataset_build.py (build_h5, from the MoNuSeg images) writes train_nulei.h5, "
               f"to be renamed train_nuclei.h5; put all three under <data_root>/{BRAIN_DIR}/")
BRAIN_TEST_FRACTION, BRAIN_SPLIT_SEED = 0.2, 20200824


def missing_files(name: str, root: Path) -> list[str]:
    if name != "brats_centres":
        return []
    return [str(p) for p in (Path(root) / BRAIN_DIR / f for _, f in BRAIN_CENTRES) if not p.is_file()]


def brain_outline(image: np.ndarray) -> np.ndarray:
    """The pixels just outside the brain of an MRI slice (H, W): outside the non-zero region with its holes filled,
    with a 4-neighbour inside it."""
    brain = ndimage.binary_fill_holes(image > 0)
    return ndimage.binary_dilation(brain) & ~brain


def _pad_to(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """`a` (N, C, H', W') zero-padded centrally to (N, C, h, w)."""
    dh, dw = h - a.shape[2], w - a.shape[3]
    return np.pad(a, ((0, 0), (0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)))


@register("brats_centres")
def brats_centres(data_root) -> Dataset:
    """The brain experiment's three centres (nuclei, BraTS T2, BraTS T1, in the official order), images in [0, 1]
    (N, 3, 256, 256) and two-structure masks; a fixed, seeded 20% of each centre's sources is the test split."""
    root = Path(data_root)
    missing = missing_files("brats_centres", root)
    if missing:
        raise DatasetMissing(f"brats_centres is not in data_root '{root}': missing {', '.join(missing)}. "
                             f"{BRAIN_HOWTO}.")
    rng = np.random.default_rng(BRAIN_SPLIT_SEED)
    centres = []
    for centre, file in BRAIN_CENTRES:
        names, images, labels = read_pairs(root / BRAIN_DIR / file, f"TDGAN {centre}", BRAIN_HOWTO)
        masks = np.zeros((len(images), 2, *images.shape[1:3]), dtype=np.float32)
        masks[:, 0] = labels > 0
        if centre.startswith("BraTS"):  # MRI: the brain's outline is part of the label map
            masks[:, 1] = np.stack([brain_outline(img[..., 0]) for img in images])
        centres.append((images.transpose(0, 3, 1, 2), masks, held_out(names, BRAIN_TEST_FRACTION, rng)))
    h = max(c[0].shape[2] for c in centres)
    w = max(c[0].shape[3] for c in centres)
    if h % 4 or w % 4:
        raise DatasetCorrupt(f"the images under {root / BRAIN_DIR} are at most {h}x{w}; the generator needs sides "
                             f"divisible by 4 (the official files: 256x256 nuclei patches, 240x240 BraTS slices)")
    x = torch.from_numpy(np.concatenate([_pad_to(c[0], h, w) for c in centres])).float() / 255
    y = torch.from_numpy(np.concatenate([_pad_to(c[1], h, w) for c in centres]))
    dom = torch.cat([torch.full((len(c[0]),), k) for k, c in enumerate(centres)])
    t = torch.from_numpy(np.concatenate([c[2] for c in centres]))
    return Dataset("brats_centres", Split(x[~t], y[~t], dom[~t]), Split(x[t], y[t], dom[t]), num_classes=2,
                   description="TDGAN's brain experiment: MoNuSeg nuclei, BraTS 2018 T2, BraTS 2018 T1 "
                               "(the official h5 files)",
                   extra={"structures": BRAIN_STRUCTURES}, domains=tuple(c for c, _ in BRAIN_CENTRES))
