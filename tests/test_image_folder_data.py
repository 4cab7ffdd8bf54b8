"""Tiny-ImageNet and CINIC-10 loaders, read from tiny fake trees written here in each dataset's extracted layout.
Each image is one flat colour that encodes its label, so labels can be checked against the pixels."""
import pytest
import torch
from PIL import Image

from common.data import load_dataset, missing_files
from common.data import vision
from common.errors import DatasetCorrupt, DatasetMissing

WNIDS = ["n03", "n01", "n02"]  # wnids.txt is not sorted; labels follow the sorted order n01, n02, n03
VAL = {"val_0.JPEG": "n02", "val_1.JPEG": "n03", "val_2.JPEG": "n01", "val_3.JPEG": "n02"}


def colour(label):
    return (20 + 23 * label, 100, 230 - 20 * label)


def write_image(path, label, size, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (size, size), colour(label))
    (im.convert("L") if mode == "L" else im).save(path)


def write_fake_tinyimagenet(root):
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for w in WNIDS:
        label = sorted(WNIDS).index(w)
        for k in range(2):
            write_image(base / "train" / w / "images" / f"{w}_{k}.JPEG", label, 64)
        (base / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
    (base / "val" / "images").mkdir(parents=True)
    for name, w in VAL.items():
        write_image(base / "val" / "images" / name, sorted(WNIDS).index(w), 64)
    # the official file lists the images out of order, with bounding boxes after the wnid
    (base / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{VAL[name]}\t0\t0\t63\t63\n" for name in reversed(VAL)))
    return base


def raw_pixels(split, mean, std):
    """Per-image mean colour in 0..255 before standardisation."""
    x = split.x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x * 255).mean(dim=(2, 3))


def assert_labels_match_colours(split, mean, std, tol):
    expected = torch.tensor([colour(int(y)) for y in split.y], dtype=torch.float32)
    assert (raw_pixels(split, mean, std) - expected).abs().max() < tol


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


TINY_STATS = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
CINIC_STATS = ((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835))


def test_fake_tinyimagenet_loads(tmp_path, cache):
    write_fake_tinyimagenet(tmp_path / "data")
    assert missing_files("tinyimagenet", tmp_path / "data") == []
    ds = load_dataset("tinyimagenet", data_root=tmp_path / "data")
    assert ds.num_classes == 3 and ds.input_shape == (3, 64, 64)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert ds.train.y.tolist() == [0, 0, 1, 1, 2, 2]  # n01, n02, n03: sorted wnids
    # the val images, sorted by name, labelled by val_annotations.txt
    assert ds.test.y.tolist() == [1, 2, 0, 1]
    for split in (ds.train, ds.test):
        assert_labels_match_colours(split, *TINY_STATS, tol=3)  # JPEG is lossy


def test_tinyimagenet_grey_image_becomes_rgb(tmp_path, cache):
    base = write_fake_tinyimagenet(tmp_path)
    write_image(base / "train" / "n01" / "images" / "n01_0.JPEG", 0, 64, mode="L")
    x = raw_pixels(load_dataset("tinyimagenet", data_root=tmp_path).train, *TINY_STATS)[0]
    assert (x - x.mean()).abs().max() < 1  # the same grey in every channel


def test_tinyimagenet_cache_is_used_and_follows_changes(tmp_path, cache, monkeypatch):
    base = write_fake_tinyimagenet(tmp_path)
    first = load_dataset("tinyimagenet", data_root=tmp_path)
    assert len(list(cache.glob("tinyimagenet-*.pt"))) == 1

    def no_decode(*args):
        raise AssertionError("decoded again although nothing changed")
    with monkeypatch.context() as m:
        m.setattr(vision, "_decode", no_decode)
        again = load_dataset("tinyimagenet", data_root=tmp_path)
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.test.y, again.test.y)

    write_image(base / "train" / "n03" / "images" / "n03_9.JPEG", 2, 64)  # a new image: decoded afresh
    assert load_dataset("tinyimagenet", data_root=tmp_path).train.y.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert len(list(cache.glob("tinyimagenet-*.pt"))) == 2


def test_tinyimagenet_missing_files_are_named(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    assert missing_files("tinyimagenet", tmp_path) == [
        str(base / "wnids.txt"), str(base / "val" / "val_annotations.txt"), str(base / "train") + "/",
        str(base / "val" / "images") + "/"]
    with pytest.raises(DatasetMissing, match="tiny-imagenet-200.zip"):
        load_dataset("tinyimagenet", data_root=tmp_path)

    write_fake_tinyimagenet(tmp_path)
    for f in (base / "train" / "n02" / "images").iterdir():
        f.unlink()
    assert missing_files("tinyimagenet", tmp_path) == [str(base / "train" / "n02" / "images") + "/"]
    with pytest.raises(DatasetMissing, match="n02"):
        load_dataset("tinyimagenet", data_root=tmp_path)


@pytest.mark.parametrize("damage,match", [
    (lambda b: (b / "val" / "images" / "val_2.JPEG").write_bytes(b"not a jpeg"), "val_2.JPEG"),
    (lambda b: write_image(b / "train" / "n01" / "images" / "n01_1.JPEG", 0, 32), "n01_1.JPEG is 32x32"),
    (lambda b: (b / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n"), "line 1"),
])
def test_tinyimagenet_corrupt_input_is_one_clear_error(tmp_path, cache, damage, match):
    damage(write_fake_tinyimagenet(tmp_path))
    with pytest.raises(DatasetCorrupt, match=match):
        load_dataset("tinyimagenet", data_root=tmp_path)


def write_fake_cinic10(root, per_class=(2, 1, 1)):
    """per_class images in train, valid and test; valid's labels are deliberately wrong to show it is unread."""
    base = root / "cinic-10"
    for split, n in zip(("train", "valid", "test"), per_class):
        for label, name in enumerate(vision.CINIC10_CLASSES):
            for k in range(n):
                write_image(base / split / name / f"{split}-{k}.png", (label + (split == "valid")) % 10, 32)
    return base


def test_fake_cinic10_loads_train_and_test_only(tmp_path, cache):
    write_fake_cinic10(tmp_path)
    assert missing_files("cinic10", tmp_path) == []
    ds = load_dataset("cinic10", data_root=tmp_path)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.train.x.dtype == torch.float32 and ds.test.y.dtype == torch.int64
    assert ds.train.y.tolist() == [c for c in range(10) for _ in range(2)]  # airplane = 0, ..., truck = 9
    assert ds.test.y.tolist() == list(range(10))
    for split in (ds.train, ds.test):
        assert_labels_match_colours(split, *CINIC_STATS, tol=0.01)  # PNG is lossless


def test_cinic10_missing_folders_are_named(tmp_path):
    missing = missing_files("cinic10", tmp_path)
    assert len(missing) == 20 and str(tmp_path / "cinic-10" / "train" / "airplane") + "/" in missing
    assert not any("valid" in m for m in missing)
    base = write_fake_cinic10(tmp_path)
    for f in (base / "test" / "truck").iterdir():
        f.unlink()
    assert missing_files("cinic10", tmp_path) == [str(base / "test" / "truck") + "/"]
    with pytest.raises(DatasetMissing, match="CINIC-10.tar.gz"):
        load_dataset("cinic10", data_root=tmp_path)


def test_cinic10_corrupt_image_is_one_clear_error(tmp_path, cache):
    base = write_fake_cinic10(tmp_path)
    (base / "test" / "cat" / "test-0.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DatasetCorrupt, match="cat/test-0.png"):
        load_dataset("cinic10", data_root=tmp_path)
