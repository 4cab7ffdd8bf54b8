"""CCVR: pooled class statistics, virtual features, head-only retraining, calibration specs and the calibrate step."""
import json

import pytest
import torch

from common.calibrate import execute as calibrate
from common.errors import SuiteError
from common.experiments import is_calibration, load_paper, paper_calibrations, paper_runs, resolve_cell
from common.results import run_id
from common.train import execute as train
from papers.ccvr.method import CCVR, class_statistics, pool_statistics, sample_virtual


def clients_features():
    """Three clients with skewed labels (one lacks class 2, one holds a single sample of class 0)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, classes in [(40, [0, 1, 2]), (25, [1, 3]), (30, [0, 1, 2, 3])]:
        x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 1
        y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
        out.append((x, y))
    x, y = out[1]
    out[1] = (torch.cat([x, torch.randn(1, 6, generator=g, dtype=torch.float64)]), torch.cat([y, torch.tensor([0])]))
    return out


def test_pooled_statistics_equal_those_of_the_union_of_the_clients_features():
    clients = clients_features()
    pooled = pool_statistics(class_statistics(x, y, 5) for x, y in clients)
    x = torch.cat([x for x, _ in clients])
    y = torch.cat([y for _, y in clients])
    for c in range(5):
        xc = x[y == c]
        assert pooled.counts[c] == len(xc)
        if len(xc) == 0:
            continue
        assert torch.allclose(pooled.means[c], xc.mean(0), rtol=0, atol=1e-12)
        assert torch.allclose(pooled.covs[c], torch.cov(xc.T), rtol=0, atol=1e-12)
    assert pooled.counts[4] == 0  # a class nobody holds


def test_virtual_features_follow_the_pooled_gaussians():
    clients = clients_features()
    stats = pool_statistics(class_statistics(x, y, 5) for x, y in clients)
    x, y = sample_virtual(stats, 20000, torch.Generator().manual_seed(0))
    assert sorted(set(y.tolist())) == [0, 1, 2, 3]  # no draws for the class nobody holds
    for c in range(4):
        xc = x[y == c].double()
        assert torch.allclose(xc.mean(0), stats.means[c], atol=0.1)
        assert torch.allclose(torch.cov(xc.T), stats.covs[c], atol=0.25)


SPEC = {"dataset": {"name": "mnist5k", "train_limit": 600, "test_limit": 200},
        "partition": {"scheme": "dirichlet", "clients": 4, "alpha": 0.3, "min_size": 5},
        "model": {"name": "cnn", "norm": "bn", "channels": [6, 16], "projection": 32},
        "method": {"name": "fedavg"},
        "training": {"rounds": 2, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.1,
                     "momentum": 0.0, "weight_decay": 0.0},
        "seed": 0}
CAL = {"name": "ccvr", "virtual_per_class": 50, "epochs": 2, "lr": 0.01, "momentum": 0.9, "batch_size": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    result = train(SPEC, progress=False, model_out=d / "model.pt")
    return result, d / "model.pt"


def test_calibration_changes_only_the_classifier_head(trained, monkeypatch):
    result, model_path = trained
    before = torch.load(model_path, weights_only=True)["state_dict"]
    seen = {}
    original = CCVR.calibrate

    def spy(self, model, ctx):
        info = original(self, model, ctx)
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return info

    monkeypatch.setattr(CCVR, "calibrate", spy)
    record = calibrate({"base": SPEC, "calibration": CAL}, model_path, result)
    assert set(seen) == set(before)
    changed = {k for k in before if not torch.equal(before[k], seen[k])}
    assert changed == {"head.weight", "head.bias"}  # BatchNorm statistics included: untouched
    assert record["status"] == "completed" and record["base_run"] == result["run_id"]
    assert record["before"]["test_accuracy"] == result["metrics"]["test_accuracy"][-1]
    assert record["metrics"]["round"] == [2] and len(record["metrics"]["test_accuracy"]) == 1
    assert record["calibration"]["virtual_samples"] == 50 * sum(c > 0 for c in record["calibration"]["class_counts"])


def test_calibration_is_deterministic_and_depends_on_the_seed(trained):
    result, model_path = trained
    a = calibrate({"base": SPEC, "calibration": CAL}, model_path, result)
    b = calibrate({"base": SPEC, "calibration": CAL}, model_path, result)
    assert a["metrics"] == b["metrics"]
    other = calibrate({"base": SPEC, "calibration": {**CAL, "virtual_per_class": 51}}, model_path, result)
    assert other["metrics"]["train_loss"] != a["metrics"]["train_loss"]


def test_calibration_refuses_a_model_of_another_run(trained, tmp_path):
    result, model_path = trained
    other = {**SPEC, "seed": 1}
    with pytest.raises(SuiteError, match="not that of run"):
        calibrate({"base": other, "calibration": CAL}, model_path, result)
    ck = torch.load(model_path, weights_only=True)
    torch.save({**ck, "run_id": "0" * 12}, tmp_path / "wrong.pt")
    with pytest.raises(SuiteError, match="holds the model of run"):
        calibrate({"base": SPEC, "calibration": CAL}, tmp_path / "wrong.pt", result)


def test_calibration_of_a_diverged_run_is_marked_diverged(trained):
    result, model_path = trained
    record = calibrate({"base": SPEC, "calibration": CAL}, model_path, {**result, "status": "diverged"})
    assert record["status"] == "diverged" and record["metrics"]["test_accuracy"] == []


def test_ccvr_cells_reference_the_base_runs():
    paper = load_paper("ccvr")
    rows = [r["label"] for r in paper["tables"]["table1"]["rows"]]
    for base in ["FedAvg", "FedProx", "FedAvgM", "MOON"]:
        plain = resolve_cell(paper, "table1", rows.index(base), 1, "mini")
        cal = resolve_cell(paper, "table1", rows.index(f"{base} + CCVR"), 1, "mini")
        assert not any(is_calibration(s) for s in plain.specs)
        assert [s["base"] for s in cal.specs] == list(plain.specs)
        assert all(s["calibration"]["name"] == "ccvr" and "base" not in s["calibration"] for s in cal.specs)
    runs, cals = paper_runs("ccvr", "mini"), paper_calibrations("ccvr", "mini")
    trained = {rid for rid, spec in runs.items() if spec["method"]["name"] != "centralised"}  # not the ceiling
    assert {run_id(s["base"]) for s in cals.values()} == trained  # every run is a base; none trained twice
    # the α = 0.5 base runs of FedAvg, FedProx and MOON are MOON's Table 1 runs, FedAvg's α = 0.1 run its Table 4
    # run, and both papers' ceiling on the analog is one run per seed
    seeds = len(paper["scales"]["mini"]["seeds"])
    shared = set(runs) & set(paper_runs("moon", "mini"))
    assert len(shared & trained) == 4 * seeds and len(shared - trained) == seeds


def test_a_calibration_with_an_unknown_base_is_rejected(tmp_path, monkeypatch):
    from common import experiments
    paper = json.loads(json.dumps(load_paper("ccvr")))
    paper["methods"]["Broken"] = {"name": "ccvr", "base": "Nope"}
    with pytest.raises(SuiteError, match="has base 'Nope'"):
        experiments._check_tables("ccvr", paper)
