"""Rozantsev, Salzmann, Fua (TPAMI 2019), "Beyond Sharing Weights for Deep Domain Adaptation": the weight-relation
regulariser and the RBF-kernel MMD against direct numpy computations, the two-stream network (which layers are
shared), unsupervised adaptation never reading a target label, the `only` domain partition, and the paper-scale
loaders (MNIST + USPS, Office-31) on small files written here. The kill-and-resume test of `two_stream` runs is in
tests/test_resume.py."""
import bz2

import numpy as np
import pytest
import torch

from common.adaptation import rbf_mmd2, target_domain
from common.data import Dataset, Split, load_dataset, missing_files
from common.data.partition import partition
from common.errors import DatasetMissing, SuiteError
from common.experiments import load_paper, paper_runs, resolve_cell
from common.models import build_model
from papers.beyond_sharing.method import TwoStream, resolve_layers, weight_relation
from common.fl.personal import parametrised_layers


def lenet(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=1, num_classes=10, input_size=28, channels=[4, 8], hidden=[16])


# --- MMD -----------------------------------------------------------------------------------------------------------
def np_mmd2(a, b, sigma):
    def k(u, v):
        return np.exp(-((u[:, None, :] - v[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2))
    return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_rbf_mmd2_equals_direct_formula(sigma):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(0.5, 1.3, size=(9, 5))
    got = rbf_mmd2(torch.tensor(a), torch.tensor(b), sigma).item()
    assert got == pytest.approx(np_mmd2(a, b, sigma), rel=1e-10)
    # the squared distance of the mean embeddings: zero for one sample against itself, positive otherwise
    assert rbf_mmd2(torch.tensor(a), torch.tensor(a), sigma).item() == pytest.approx(0.0, abs=1e-12)
    assert got > 0


def test_rbf_mmd2_median_bandwidth():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(6, 3))
    z = np.concatenate([a, b])
    dist = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    off = np.sort(dist[~np.eye(len(z), dtype=bool)])
    sigma = off[(len(off) - 1) // 2]  # the lower median (torch.median), as the median of an even count
    got = rbf_mmd2(torch.tensor(a), torch.tensor(b), None).item()
    assert got == pytest.approx(np_mmd2(a, b, sigma), rel=1e-6)


def test_rbf_mmd2_flattens_feature_maps():
    a, b = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    assert rbf_mmd2(a, b, 3.0).item() == pytest.approx(rbf_mmd2(a.flatten(1), b.flatten(1), 3.0).item())


# --- the weight regulariser ----------------------------------------------------------------------------------------
def test_weight_relation_equals_direct_formula():
    rng = np.random.default_rng(2)
    ws, bs = rng.normal(0, 0.1, (3, 4)), rng.normal(0, 0.1, 3)
    wt, bt = ws * 1.1 + 0.01 + rng.normal(0, 0.05, ws.shape), bs * 1.1 + 0.01 + rng.normal(0, 0.05, bs.shape)
    a, b = 0.9, 0.02
    direct = np.exp(((a * ws + b - wt) ** 2).sum() + ((a * bs + b - bt) ** 2).sum()) - 1
    got = weight_relation(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), [torch.tensor(ws), torch.tensor(bs)],
                          [torch.tensor(wt), torch.tensor(bt)])
    assert got.item() == pytest.approx(direct, rel=1e-12)
    # zero when the target weights are exactly the linear map of the source weights
    exact = weight_relation(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), [torch.tensor(ws)], [torch.tensor(a * ws + b)])
    assert exact.item() == 0.0


def test_regulariser_of_the_two_stream_network_and_its_gradient():
    model = TwoStream(lenet().double(), resolve_layers(parametrised_layers(lenet()), "all"))
    assert model.regulariser().item() == 0.0  # equal streams, a = 1, b = 0
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.a.copy_(torch.tensor([1.0, 0.9, 1.1, 0.95], dtype=torch.float64))
        model.b.copy_(torch.tensor([0.0, 0.01, -0.01, 0.002], dtype=torch.float64))
    a, b = model.a.detach().numpy(), model.b.detach().numpy()
    direct, grad_a = 0.0, []
    for j, name in enumerate(model.unshared):
        src = [p.detach().numpy() for p in model.source.get_submodule(name).parameters(recurse=False)]
        tgt = [p.detach().numpy() for p in model.target.get_submodule(name).parameters(recurse=False)]
        d2 = sum(((a[j] * s + b[j] - t) ** 2).sum() for s, t in zip(src, tgt))
        direct += np.exp(d2) - 1
        grad_a.append(np.exp(d2) * sum((2 * (a[j] * s + b[j] - t) * s).sum() for s, t in zip(src, tgt)))
    r = model.regulariser()
    assert r.item() == pytest.approx(direct, rel=1e-10)
    r.backward()
    np.testing.assert_allclose(model.a.grad.numpy(), grad_a, rtol=1e-8)


# --- the two-stream network ----------------------------------------------------------------------------------------
def test_resolve_layers():
    layers = parametrised_layers(lenet())
    assert layers == ["features.0", "features.4", "features.9", "head"]
    assert resolve_layers(layers, "all") == layers and resolve_layers(layers, "none") == []
    assert resolve_layers(layers, [-2, -1]) == ["features.9", "head"]
    assert resolve_layers(layers, [1, 0]) == ["features.0", "features.4"]  # in the network's order
    with pytest.raises(SuiteError, match="out of range"):
        resolve_layers(layers, [4])
    with pytest.raises(SuiteError, match="'all', 'none' or a list"):
        resolve_layers(layers, "last")


def test_shared_layers_are_one_module_and_unshared_are_copies():
    base = lenet()
    model = TwoStream(base, ["features.9", "head"])
    for name in ("features.0", "features.4"):
        assert model.target.get_submodule(name) is model.source.get_submodule(name)
    for name in ("features.9", "head"):
        assert model.target.get_submodule(name) is not model.source.get_submodule(name)
        torch.testing.assert_close(model.target.get_submodule(name).weight, model.source.get_submodule(name).weight)
    n_base = sum(p.numel() for p in base.parameters())
    n_unshared = sum(p.numel() for n in ("features.9", "head") for p in base.get_submodule(n).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_base + n_unshared + 2 * 2  # + a, b per unshared layer
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), base(x))  # equal streams at the start; forward is the target stream
    # one stream (DDC): every module shared
    ddc = TwoStream(lenet(), [])
    assert all(ddc.target.get_submodule(n) is ddc.source.get_submodule(n) for n in parametrised_layers(ddc.source))
    assert ddc.regulariser().item() == 0.0 and ddc.a.numel() == 0


# --- domain adaptation on the engine --------------------------------------------------------------------------------
def test_target_domain_needs_a_held_out_domain():
    assert target_domain({"partition": {"scheme": "domain", "clients": 1, "hold_out": "USPS"}}, ("MNIST", "USPS")) == 1
    with pytest.raises(SuiteError, match="hold_out"):
        target_domain({"partition": {"scheme": "iid", "clients": 1}}, ("MNIST", "USPS"))


def test_partition_only_selects_the_source_domains():
    labels = torch.arange(12) % 2
    domains = torch.arange(12) // 4  # three domains of 4 samples
    parts = partition(labels, "domain", seed=0, domains=domains, domain_names=("a", "d", "w"), clients=1,
                      hold_out="w", only=["a"])
    assert len(parts) == 1 and parts[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(SuiteError, match="clients must be 1"):
        partition(labels, "domain", seed=0, domains=domains, domain_names=("a", "d", "w"), clients=2,
                  hold_out="w", only=["a"])
    with pytest.raises(SuiteError, match="not a domain"):
        partition(labels, "domain", seed=0, domains=domains, domain_names=("a", "d", "w"), clients=1, only=["x"])



def smoke_spec(method_label="Ours", column=0):
    paper = load_paper("beyond_sharing")
    row = next(i for i, r in enumerate(paper["tables"]["mnist_usps"]["rows"]) if r["set"]["method"] == method_label)
    return resolve_cell(paper, "mnist_usps", row, column, "smoke").specs[0]


def test_target_labels_are_never_read(monkeypatch):
    """The same run with the target domain's training labels scrambled gives the same model and metrics."""
    from common import data as data_mod
    from common.train import execute
    spec = smoke_spec("Ours")
    assert spec["partition"]["hold_out"] == "USPS"
    reference = execute(spec, progress=False)
    original = data_mod.LOADERS["mnist_usps_digits"]

    def scrambled(root):
        ds = original(root)
        y = ds.train.y.clone()
        target = ds.train.domain == 1
        y[target] = (y[target] + 3) % 10
        return Dataset(ds.name, Split(ds.train.x, y, ds.train.domain), ds.test, ds.num_classes, ds.description,
                       ds.extra, ds.domains)
    monkeypatch.setitem(data_mod.LOADERS, "mnist_usps_digits", scrambled)
    again = execute(spec, progress=False)
    for key in ("test_accuracy", "train_loss", "domain_accuracy", "regulariser", "relation_a"):
        assert again["metrics"][key] == reference["metrics"][key]


def test_two_stream_run_logs_both_domains_and_the_relation():
    from common.train import execute
    result = execute(smoke_spec("Ours", column=0), progress=False)
    last = result["metrics"]["domain_accuracy"][-1]
    assert set(last) == {"MNIST", "USPS"}
    assert len(result["metrics"]["relation_a"][-1]) == 4  # all 4 layers of the smoke CNN unshared
    assert result["metrics"]["regulariser"][0] == 0.0  # after the source epoch the streams are equal
    assert result["metrics"]["regulariser"][-1] > 0.0
    assert result["metrics"]["test_accuracy"][-1] == pytest.approx(np.mean(list(last.values())))


def test_paper_grid_and_ceiling():
    paper = load_paper("beyond_sharing")
    mini = paper_runs("beyond_sharing", "mini")
    methods = {r["method"]["name"] for r in mini.values()}
    assert methods == {"centralised", "two_stream"}
    ceilings = [s for s in mini.values() if s["method"]["name"] == "centralised" and "hold_out" not in s["partition"]]
    # the oracle of each direction: the same network on the target domain's labelled training data alone
    assert sorted(s["partition"]["only"][0] for s in ceilings) == ["MNIST"] * 3 + ["USPS"] * 3
    assert all(s["partition"] == {"scheme": "domain", "clients": 1, "only": s["partition"]["only"]} for s in ceilings)
    assert all(s["model"] == mini[next(iter(mini))]["model"] for s in ceilings)
    office = resolve_cell(paper, "office", 2, 0, "paper").specs[0]
    assert office["partition"] == {"scheme": "domain", "clients": 1, "hold_out": "webcam", "only": ["amazon"]}
    assert office["method"]["unshared"] == [-2, -1] and office["model"]["name"] == "alexnet_bn"
    assert not resolve_cell(paper, "office", 2, 0, "mini").specs  # no offline analog
    from common.experiments import table_ceilings
    (office_ceiling,) = table_ceilings(paper, "office", "paper")
    assert office_ceiling.specs[0]["partition"] == {"scheme": "domain", "clients": 1, "only": ["webcam"]}


def test_target_only_oracle_trains_on_the_target_alone():
    from common.experiments import table_ceilings
    from common.train import load_data_and_partition
    paper = load_paper("beyond_sharing")
    (ceiling,) = table_ceilings(paper, "mnist_usps", "smoke")
    data, parts = load_data_and_partition(ceiling.specs[0], "data")
    assert ceiling.eval == {"domain": "USPS"}
    assert len(parts) == 1 and (data.train.domain[parts[0]] == 1).all()
    assert len(parts[0]) == int((data.train.domain == 1).sum())


# --- paper-scale loaders on small files -----------------------------------------------------------------------------
def write_usps(path, n, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(n):
        label = int(rng.integers(1, 11))  # LIBSVM USPS: labels 1..10
        vals = rng.uniform(-1, 1, 256)
        lines.append(f"{label} " + " ".join(f"{i + 1}:{v:.4f}" for i, v in enumerate(vals)))
    with bz2.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def test_mnist_usps_loads_from_files(tmp_path):
    from test_fedopt_data import write_idx
    with pytest.raises(DatasetMissing, match="usps.bz2"):
        load_dataset("mnist_usps", data_root=tmp_path)
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    for part, n in (("train", 40), ("t10k", 6)):
        write_idx(raw / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{part}-labels-idx1-ubyte", np.arange(n) % 10)
    write_usps(tmp_path / "usps" / "usps.bz2", 30, rng)
    write_usps(tmp_path / "usps" / "usps.t.bz2", 5, rng)
    assert missing_files("mnist_usps", tmp_path) == []
    d = load_dataset("mnist_usps", data_root=tmp_path)
    assert d.domains == ("MNIST", "USPS") and d.input_shape == (1, 28, 28)
    assert (d.train.domain == 0).sum() == 40 and (d.train.domain == 1).sum() == 30  # fewer than 2,000 / 1,800
    assert (d.test.domain == 0).sum() == 6 and (d.test.domain == 1).sum() == 5
    assert 0 <= d.train.x.min() and d.train.x.max() <= 1 and d.train.y.max() <= 9


def test_office31_loads_from_image_folders(tmp_path, monkeypatch):
    from PIL import Image

    from common.data import domains
    monkeypatch.setattr(domains, "IMAGE_SIZE", 16)
    with pytest.raises(DatasetMissing, match="office31"):
        load_dataset("office31", data_root=tmp_path)
    for d, domain in enumerate(domains.OFFICE31_DOMAINS):
        for c, cls in enumerate(domains.OFFICE31_CLASSES):
            folder = tmp_path / "office31" / domain / "images" / cls
            folder.mkdir(parents=True)
            for k in range(2 if c < 5 else 1):
                Image.new("RGB", (20, 24), (8 * c, 60 * d, 100 + k)).save(folder / f"frame_{k}.jpg")
    assert missing_files("office31", tmp_path) == []
    ds = load_dataset("office31", data_root=tmp_path)
    assert ds.domains == ("amazon", "dslr", "webcam") and ds.num_classes == 31 and ds.input_shape == (3, 16, 16)
    assert len(ds.train) + len(ds.test) == 3 * (31 + 5)
    parts = partition(ds.train.y, "domain", seed=0, domains=ds.train.domain, domain_names=ds.domains, clients=1,
                      hold_out="webcam", only=["amazon"])
    assert (ds.train.domain[parts[0]] == 0).all()
