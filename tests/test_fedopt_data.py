"""Data and models added for Adaptive Federated Optimization: mnist1d, EMNIST (on tiny fake files), ResNet-18, cnn1d."""
import random
import struct

import numpy as np
import pytest
import torch

from common.data import load_dataset, missing_files, train_test_overlap
from common.errors import DatasetCorrupt, DatasetMissing
from common.models import build_model


def test_mnist1d_shapes_determinism_and_no_leak():
    d = load_dataset("mnist1d")
    assert d.input_shape == (1, 40) and (len(d.train), len(d.test)) == (4000, 1000) and d.num_classes == 10
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert sorted(d.train.y.unique().tolist()) == list(range(10))
    assert train_test_overlap(d) == 0
    again = load_dataset("mnist1d")
    assert torch.equal(d.train.x, again.train.x) and torch.equal(d.test.y, again.test.y)


def test_mnist1d_generation_leaves_global_generators_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERBENCH_CACHE", str(tmp_path))  # force a fresh generation
    np.random.seed(7)
    random.seed(7)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(7)
    random.seed(7)
    load_dataset("mnist1d")
    assert (np.random.random(), random.random()) == (expected_np, expected_py)


def write_idx(path, array: np.ndarray):
    """An IDX file (the MNIST/EMNIST format): magic with the number of dimensions, sizes, then uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x800 + array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_fake_emnist(root, n_train=5, n_test=3):
    raw = root / "EMNIST" / "raw"
    rng = np.random.default_rng(0)
    for part, n in (("train", n_train), ("test", n_test)):
        write_idx(raw / f"emnist-byclass-{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"emnist-byclass-{part}-labels-idx1-ubyte", rng.integers(0, 62, n))
    return raw


def test_fake_emnist_loads_upright(tmp_path):
    raw = write_fake_emnist(tmp_path)
    d = load_dataset("emnist", data_root=tmp_path)
    assert (len(d.train), len(d.test), d.num_classes, d.input_shape) == (5, 3, 62, (1, 28, 28))
    assert 0 <= d.train.x.min() and d.train.x.max() <= 1
    with open(raw / "emnist-byclass-train-images-idx3-ubyte", "rb") as f:
        stored = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(5, 28, 28)
    np.testing.assert_allclose(d.train.x[0, 0].numpy(), stored[0].T / 255.0, rtol=1e-6)  # files hold transposes


def test_emnist_missing_files_are_named(tmp_path):
    assert len(missing_files("emnist", tmp_path)) == 4
    raw = write_fake_emnist(tmp_path)
    (raw / "emnist-byclass-test-labels-idx1-ubyte").unlink()
    assert missing_files("emnist", tmp_path) == [str(raw / "emnist-byclass-test-labels-idx1-ubyte")]
    with pytest.raises(DatasetMissing, match="emnist-byclass-test-labels-idx1-ubyte.*torchvision.datasets.EMNIST"):
        load_dataset("emnist", data_root=tmp_path)


def test_emnist_corrupt_file(tmp_path):
    raw = write_fake_emnist(tmp_path)
    (raw / "emnist-byclass-train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DatasetCorrupt, match="could not be read"):
        load_dataset("emnist", data_root=tmp_path)


def test_resnet18_has_resnet18_size_and_groupnorm():
    m = build_model("resnet18", in_channels=3, num_classes=10, input_size=32, norm="gn")
    assert sum(p.numel() for p in m.parameters()) == 11_173_962  # ResNet-18 for CIFAR-10
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10) and m.feature_dim == 512


def test_cnn1d_on_mnist1d_shapes():
    m = build_model("cnn1d", in_channels=1, num_classes=10, input_size=40)
    assert m(torch.randn(4, 1, 40)).shape == (4, 10) and m.features(torch.randn(4, 1, 40)).shape == (4, 16 * 5)
