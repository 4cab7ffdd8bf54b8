"""Client partitions: exact cover, determinism, Dirichlet label skew statistics, pathological shards, errors."""
import numpy as np
import pytest
import torch

from common.data.partition import partition, partition_fingerprint
from common.errors import SuiteError


def shuffled_labels(n=5000, classes=10, seed=123):
    """Class-balanced labels in a random order (so partitioners cannot rely on the input being sorted)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % classes)[torch.randperm(n, generator=g)]


def assert_exact_cover(parts, n):
    counts = np.bincount(np.concatenate([p.numpy() for p in parts]), minlength=n)
    assert len(counts) == n, "an index outside [0, n) was assigned"
    assert (counts == 1).all(), f"{(counts == 0).sum()} samples unassigned, {(counts > 1).sum()} assigned twice"


def class_counts(labels, parts, classes):
    """clients x classes matrix of sample counts."""
    return np.stack([np.bincount(labels[p].numpy(), minlength=classes) for p in parts])


SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("shards", {"shards_per_client": 2}),
]


@pytest.mark.parametrize("scheme,params", SCHEMES, ids=[s for s, _ in SCHEMES])
@pytest.mark.parametrize("clients", [1, 7, 20, 50])
@pytest.mark.parametrize("seed", [0, 1, 2024])
def test_every_sample_assigned_exactly_once(scheme, params, clients, seed):
    labels = shuffled_labels(n=3000)
    parts = partition(labels, scheme, seed, clients=clients, **params)
    assert len(parts) == clients
    for p in parts:
        assert p.dtype == torch.int64
        assert torch.equal(p, p.sort().values), "client indices must be sorted"
    assert_exact_cover(parts, len(labels))


@pytest.mark.parametrize("clients", [3, 7, 10, 64])
def test_iid_sizes_balanced(clients):
    parts = partition(shuffled_labels(n=1001), "iid", 5, clients=clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1001


@pytest.mark.parametrize("scheme,params", SCHEMES, ids=[s for s, _ in SCHEMES])
def test_deterministic_in_seed(scheme, params):
    labels = shuffled_labels()
    a = partition(labels, scheme, 7, clients=20, **params)
    b = partition(labels.clone(), scheme, 7, clients=20, **params)
    c = partition(labels, scheme, 8, clients=20, **params)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c)), "a different seed gave the same partition"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("alpha,min_size", [(0.1, 10), (0.1, 30), (0.5, 50), (1.0, 100)])
def test_dirichlet_min_size(seed, alpha, min_size):
    labels = shuffled_labels()
    parts = partition(labels, "dirichlet", seed, clients=20, alpha=alpha, min_size=min_size)
    assert min(len(p) for p in parts) >= min_size
    assert_exact_cover(parts, len(labels))


def test_dirichlet_infeasible_min_size_raises():
    with pytest.raises(SuiteError, match="at least"):
        partition(shuffled_labels(n=100), "dirichlet", 0, clients=20, alpha=1.0, min_size=10)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_dirichlet_share_variance_matches_alpha(alpha):
    """Per class, the client shares are Dirichlet(alpha * 1_N): Var = (1/N)(1 - 1/N) / (N alpha + 1)."""
    clients, classes, n = 20, 10, 5000
    labels = shuffled_labels(n, classes)
    sq_dev = []
    for seed in range(20):
        parts = partition(labels, "dirichlet", seed, clients=clients, alpha=alpha)
        counts = class_counts(labels, parts, classes)          # clients x classes
        shares = counts / counts.sum(axis=0, keepdims=True)    # each column sums to 1
        sq_dev.append(((shares - 1 / clients) ** 2).ravel())
    empirical = np.concatenate(sq_dev).mean()
    expected = (1 / clients) * (1 - 1 / clients) / (clients * alpha + 1)
    # 200 Dirichlet draws: the relative standard error of the estimate is about 3 %.
    assert empirical == pytest.approx(expected, rel=0.15)


def test_dirichlet_smaller_alpha_lower_label_entropy():
    clients, classes = 20, 10
    labels = shuffled_labels(5000, classes)

    def mean_entropy(alpha):
        ents = []
        for seed in range(5):
            counts = class_counts(labels, partition(labels, "dirichlet", seed, clients=clients, alpha=alpha),
                                  classes)
            p = counts / counts.sum(axis=1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                ents.append(-np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1))
        return np.concatenate(ents).mean()

    h = [mean_entropy(a) for a in (0.1, 1.0, 10.0, 1000.0)]
    assert h[0] < h[1] < h[2] < h[3], h
    assert h[3] == pytest.approx(np.log(classes), abs=0.02)  # near-uniform label mix per client
    assert h[0] < 0.6 * np.log(classes)                      # strong skew at alpha = 0.1


def test_dirichlet_nonpositive_alpha_raises():
    labels = shuffled_labels(n=500)
    for alpha in (0, 0.0, -1.0):
        with pytest.raises(SuiteError, match="alpha"):
            partition(labels, "dirichlet", 0, clients=5, alpha=alpha)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shards_at_most_k_classes_and_equal_sizes(seed):
    clients, k, classes, n = 100, 2, 10, 5000   # 200 shards of 25; each class is exactly 20 shards
    labels = shuffled_labels(n, classes, seed=seed + 100)
    parts = partition(labels, "shards", seed, clients=clients, shards_per_client=k)
    assert_exact_cover(parts, n)
    assert {len(p) for p in parts} == {n // clients}
    counts = class_counts(labels, parts, classes)
    classes_per_client = (counts > 0).sum(axis=1)
    assert classes_per_client.max() <= k
    # every held class comes in whole shards of 25 samples
    assert (counts % 25 == 0).all()
    # not all clients see the same class mix: the shards were actually shuffled between clients
    assert len({tuple(np.flatnonzero(r)) for r in counts}) > 10


def test_shards_k1_single_class_per_client():
    labels = shuffled_labels(1000, 10)
    parts = partition(labels, "shards", 3, clients=10, shards_per_client=1)
    counts = class_counts(labels, parts, 10)
    assert ((counts > 0).sum(axis=1) == 1).all()
    assert sorted(counts.argmax(axis=1).tolist()) == list(range(10))


def test_unknown_scheme_raises_with_known_names():
    with pytest.raises(SuiteError) as e:
        partition(shuffled_labels(n=100), "pathological", 0, clients=5)
    msg = str(e.value)
    assert "pathological" in msg
    for name in ("iid", "dirichlet", "shards"):
        assert name in msg


def test_partition_fingerprint():
    labels = shuffled_labels(n=1000)
    a = partition(labels, "dirichlet", 1, clients=10, alpha=0.5)
    b = partition(labels, "dirichlet", 1, clients=10, alpha=0.5)
    assert partition_fingerprint(a) == partition_fingerprint(b)
    assert partition_fingerprint(a) == partition_fingerprint([p.clone() for p in a])

    fps = {partition_fingerprint(a)}
    fps.add(partition_fingerprint(partition(labels, "dirichlet", 2, clients=10, alpha=0.5)))
    fps.add(partition_fingerprint(partition(labels, "iid", 1, clients=10)))
    fps.add(partition_fingerprint(a[::-1]))                              # clients swapped
    moved = [a[0][:-1], torch.cat([a[0][-1:], a[1]]).sort().values] + a[2:]  # one sample changes client
    fps.add(partition_fingerprint(moved))
    merged = [torch.cat([a[0], a[1]]).sort().values] + a[2:]             # same indices, two clients merged
    fps.add(partition_fingerprint(merged))
    assert len(fps) == 6
