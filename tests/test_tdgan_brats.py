"""TDGAN's brain experiment data (`brats_centres`): tiny h5 files in the official layout, read back."""
import numpy as np
import pytest
import torch

from common.data import load_dataset, missing_files
from common.data.brats import BRAIN_CENTRES, BRAIN_DIR, brain_outline
from common.data.nuclei import held_out, source_of
from common.errors import DatasetCorrupt, DatasetMissing

BRATS_SIZE, NUCLEI_SIZE = 12, 16  # BraTS slices are padded to the nuclei patches' size, 2 pixels on each side


def disc(size, radius=4.0):
    r, c = np.mgrid[:size, :size]
    return (r - size / 2 + 0.5) ** 2 + (c - size / 2 + 0.5) ** 2 <= radius ** 2


def outline_by_hand(inside):
    """Pixels outside `inside` with one of their 4-neighbours (in the image) inside."""
    h, w = inside.shape
    out = np.zeros_like(inside)
    for i in range(h):
        for j in range(w):
            if not inside[i, j]:
                out[i, j] = any(0 <= i + di < h and 0 <= j + dj < w and inside[i + di, j + dj]
                                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    return out


def write_brats(path, patients, slices=3, seed=0):
    """The layout of brats_dataset_build.py's train_brats*_0.1.h5: images/<patient>_<slice> (H, W, 3) uint8 (a grey
    slice repeated to three channels), labels/<patient>_<slice> (H, W) uint8 with BraTS labels 0, 1, 2, 4. The
    brain is a disc with a dark hole (filled when its outline is taken)."""
    import h5py
    rng = np.random.default_rng(seed)
    brain = disc(BRATS_SIZE)
    with h5py.File(path, "w") as f:
        for p in patients:
            for s in range(slices):
                grey = np.where(brain, rng.integers(30, 256, brain.shape), 0).astype(np.uint8)
                grey[BRATS_SIZE // 2, BRATS_SIZE // 2] = 0  # a hole inside the brain
                label = np.zeros(brain.shape, np.uint8)
                label[4:7, 4:7] = rng.choice([0, 1, 2, 4], (3, 3))
                f.create_dataset(f"images/{p}_{s}", data=np.repeat(grey[..., None], 3, axis=2))
                f.create_dataset(f"labels/{p}_{s}", data=label)


def write_nuclei(path, sources, patches=2, seed=0):
    """The layout of nuclei_dataset_build.py's h5 files: images/<image>_<patch> RGB uint8, labels/<image>_<patch>
    0/255 (plus the segmentation targets, which the loader does not read)."""
    import h5py
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for src in sources:
            for k in range(patches):
                f.create_dataset(f"images/{src}_{k}", data=rng.integers(0, 256, (NUCLEI_SIZE, NUCLEI_SIZE, 3),
                                                                        dtype=np.uint8))
                f.create_dataset(f"labels/{src}_{k}",
                                 data=(rng.random((NUCLEI_SIZE, NUCLEI_SIZE)) > 0.5).astype(np.uint8) * 255)
                f.create_dataset(f"weight_maps/{src}_{k}", data=np.zeros((NUCLEI_SIZE, NUCLEI_SIZE), np.uint8))


def write_brain(root):
    folder = root / BRAIN_DIR
    folder.mkdir(parents=True)
    write_nuclei(folder / "train_nuclei.h5", [f"TCGA-{i}" for i in range(5)])
    write_brats(folder / "train_brats_0.1.h5", [str(p) for p in (41, 45, 52, 60, 77)], seed=1)
    write_brats(folder / "train_brats_t1_0.1.h5", [str(p) for p in (43, 50, 58, 63, 90)], seed=2)
    return folder


def test_sources_and_the_split_by_source():
    assert source_of("TCGA-18-5592-01Z-00-DX1_3") == "TCGA-18-5592-01Z-00-DX1"
    assert source_of("117_64") == "117" and source_of("img4") == "img4" and source_of("a_b") == "a_b"
    names = [f"{p}_{s}" for p in range(10) for s in range(4)]
    test = held_out(names, 0.2, np.random.default_rng(0))
    assert test.sum() == 8  # 2 of 10 patients, all 4 slices of each
    by_patient = {}
    for n, t in zip(names, test):
        by_patient.setdefault(source_of(n), set()).add(bool(t))
    assert all(len(v) == 1 for v in by_patient.values())
    assert np.array_equal(test, held_out(names, 0.2, np.random.default_rng(0)))


def test_brain_outline_is_the_ring_just_outside_the_filled_brain():
    image = np.where(disc(BRATS_SIZE), 100, 0)
    image[6, 6] = 0  # a hole: filled, so no outline around it
    expected = outline_by_hand(disc(BRATS_SIZE))
    assert np.array_equal(brain_outline(image), expected) and expected.sum() > 0


def test_brats_centres_reads_the_official_layout(tmp_path):
    folder = write_brain(tmp_path)
    ds = load_dataset("brats_centres", tmp_path)
    assert ds.domains == ("nuclei", "BraTS T2", "BraTS T1") == tuple(c for c, _ in BRAIN_CENTRES)
    assert ds.num_classes == 2 and ds.extra["structures"] == ("nucleus or tumour", "brain outline")
    for split in (ds.train, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.float32
        assert split.x.shape[1:] == (3, NUCLEI_SIZE, NUCLEI_SIZE) and split.y.shape[1:] == (2, NUCLEI_SIZE, NUCLEI_SIZE)
        assert 0 <= split.x.min() and split.x.max() <= 1
        assert set(split.y.unique().tolist()) <= {0.0, 1.0}
    # per centre 5 sources (10 nuclei patches, 15 BraTS slices); one source (20%) is the test split
    assert [int((ds.train.domain == k).sum()) for k in range(3)] == [8, 12, 12]
    assert [int((ds.test.domain == k).sum()) for k in range(3)] == [2, 3, 3]
    # nuclei: label map 0/255 -> the first structure; no brain outline
    nuclei = torch.cat([ds.train.y[ds.train.domain == 0], ds.test.y[ds.test.domain == 0]])
    assert nuclei[:, 0].sum() > 0 and nuclei[:, 1].sum() == 0
    # BraTS: the whole tumour (labels 1, 2, 4) and the outline, padded by 2 zero pixels on each side
    import h5py
    with h5py.File(folder / "train_brats_0.1.h5") as f:
        names = sorted(f["images"])
        labels = {n: f["labels"][n][()] for n in names}
        images = {n: f["images"][n][()] for n in names}
    x = torch.cat([ds.train.x[ds.train.domain == 1], ds.test.x[ds.test.domain == 1]])
    y = torch.cat([ds.train.y[ds.train.domain == 1], ds.test.y[ds.test.domain == 1]])
    assert y[..., :2, :].sum() == 0 and y[..., -2:, :].sum() == 0 and x[..., :, :2].sum() == 0
    inner_x, inner_y = x[..., 2:-2, 2:-2], y[..., 2:-2, 2:-2]
    outline = outline_by_hand(disc(BRATS_SIZE))
    found = 0
    for n in names:  # match each stored slice to its sample by its pixels
        image = torch.tensor(images[n]).permute(2, 0, 1).float() / 255
        k = [i for i in range(len(inner_x)) if torch.equal(inner_x[i], image)]
        assert len(k) == 1
        assert np.array_equal(inner_y[k[0], 0].numpy(), (labels[n] > 0).astype(np.float32))
        assert np.array_equal(inner_y[k[0], 1].numpy(), outline.astype(np.float32))
        found += 1
    assert found == 15
    # a test patient's slices are all in the test split
    test_images = ds.test.x[ds.test.domain == 1][..., 2:-2, 2:-2]
    test_names = [n for n in names if any(torch.equal(t, torch.tensor(images[n]).permute(2, 0, 1).float() / 255)
                                          for t in test_images)]
    assert len({source_of(n) for n in test_names}) == 1 and len(test_names) == 3
    again = load_dataset("brats_centres", tmp_path)
    assert torch.equal(again.test.x, ds.test.x) and torch.equal(again.train.y, ds.train.y)


def test_brats_centres_missing_or_damaged_files_are_one_clear_error(tmp_path):
    assert len(missing_files("brats_centres", tmp_path)) == 3
    with pytest.raises(DatasetMissing, match="train_nuclei.h5.*train_brats_0.1.h5.*train_brats_t1_0.1.h5.*"
                                             "brats_dataset_build.py"):
        load_dataset("brats_centres", tmp_path)
    folder = write_brain(tmp_path)
    assert missing_files("brats_centres", tmp_path) == []
    (folder / "train_brats_t1_0.1.h5").write_bytes(b"not an h5 file")
    with pytest.raises(DatasetCorrupt, match="train_brats_t1_0.1.h5 is not a readable TDGAN BraTS T1 file"):
        load_dataset("brats_centres", tmp_path)
