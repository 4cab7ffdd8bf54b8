"""From paper.yaml to runs: translation per scale, shared runs, and clear errors for bad input."""
import shutil

import pytest

from common import experiments
from common.errors import SuiteError
from common.experiments import load_paper, paper_runs, resolve_cell, table_cells
from common.results import run_id


def cell_by_label(paper, table, row, col, scale):
    t = paper["tables"][table]
    r = [x["label"] for x in t["rows"]].index(row)
    c = [x["label"] for x in t["columns"]].index(col)
    return resolve_cell(paper, table, r, c, scale)


def test_mini_cell_translates_paper_values():
    p = load_paper("feddf")
    cell = cell_by_label(p, "table1", "FedAvg, E=40", "C=0.4, α=0.1", "mini")
    spec = cell.specs[0]
    assert spec["training"]["local_epochs"] == 4 and spec["training"]["client_fraction"] == 0.4
    assert cell_by_label(p, "table1", "FedAvg, E=40", "C=0.2, α=0.1", "mini").specs == ()  # not run at mini
    assert spec["partition"]["alpha"] == 0.1 and spec["dataset"]["name"] == "mnist5k"
    assert spec["method"] == {"name": "fedavg"}
    assert cell.eval == {"target": 0.92}
    paper_cell = cell_by_label(p, "table1", "FedAvg, E=40", "C=0.2, α=0.1", "paper")
    assert paper_cell.specs[0]["training"]["local_epochs"] == 40 and paper_cell.eval == {"target": 0.75}
    assert paper_cell.specs[0]["dataset"]["name"] == "cifar10"


def test_identical_runs_are_shared_between_tables():
    p = load_paper("feddf")
    for method_row, col in [("FedAvg, E=40", "FedAvg (BN)"), ("FedDF, E=40", "FedDF (BN)")]:
        t1 = cell_by_label(p, "table1", method_row, "C=0.4, α=0.1", "smoke")
        t2 = cell_by_label(p, "table2", "CIFAR-10, α=0.1", col, "smoke")
        assert t1.run_ids == t2.run_ids
    ids = paper_runs("feddf", "mini")  # the distillation table reads the rounds-to-target table's runs
    n_cells = sum(len(c.specs) for t in p["tables"] for row in table_cells(p, t, "mini") for c in row)
    assert len(ids) < n_cells


def test_cells_without_analog_are_skipped_with_a_reason():
    p = load_paper("feddf")
    cell = cell_by_label(p, "table1", "FedAvg, E=1", "C=0.2, α=1", "smoke")
    assert cell.specs == () and "client_fraction" in cell.skipped
    assert cell_by_label(p, "table2", "CIFAR-100, α=1", "FedAvg (BN)", "mini").specs == ()
    assert cell_by_label(p, "table2", "CIFAR-100, α=1", "FedDF (BN)", "paper").specs == ()
    assert cell_by_label(p, "table2", "CIFAR-100, α=1", "FedAvg (BN)", "paper").specs != ()


def test_seeds_override():
    runs = paper_runs("feddf", "smoke", seeds=[1, 2])
    assert {s["seed"] for s in runs.values()} == {1, 2}
    assert len(runs) == 2 * len(paper_runs("feddf", "smoke"))


def test_run_id_is_a_hash_of_content_not_key_order():
    a = {"x": 1, "y": {"b": 2, "a": 1}}
    assert run_id(a) == run_id({"y": {"a": 1, "b": 2}, "x": 1}) and run_id(a) != run_id({**a, "x": 2})


def test_unknown_paper_and_scale():
    with pytest.raises(SuiteError, match="unknown paper 'nope'; known papers: .*feddf"):
        load_paper("nope")
    with pytest.raises(SuiteError, match="no scale 'huge'"):
        paper_runs("feddf", "huge")


@pytest.fixture
def paper_dir(tmp_path, monkeypatch):
    """A copy of the papers folder whose feddf/paper.yaml a test may break."""
    shutil.copytree(experiments.PAPERS_DIR, tmp_path / "papers")
    monkeypatch.setattr(experiments, "PAPERS_DIR", tmp_path / "papers")
    experiments.load_paper.cache_clear()
    yield tmp_path / "papers" / "feddf" / "paper.yaml"
    experiments.load_paper.cache_clear()


@pytest.mark.parametrize("old,new,message", [
    ("target: {0.80: 0.94, 0.75: 0.92}", "target: {0.80: 0.94, 0.75: 0.92", "malformed YAML"),
    ("training.client_fraction: 0.4, partition.alpha: 1,", "training.client_fraction: 0.4, partition.alpha: 0,",
     "alpha"),
    ("training.client_fraction: 0.2, partition.alpha: 1,", "training.client_fraction: 1.5, partition.alpha: 1,",
     "client_fraction"),
    ("training.local_epochs: {20: 2, 40: 4}", "training.local_epochs: {20: 2, 40: -4}", "local_epochs"),
    ('set: {method: FedDF, training.local_epochs: 40}', 'set: {method: FedXX, training.local_epochs: 40}',
     "method 'FedXX' not defined"),
    ('["28±6", "80±25", "20±4", "39±10", "14±2", "20±4"]', '["28±6", "80±25"]', "paper values must be"),
    ("dataset: {name: mnist5k}", "dataset: {name: mnist6k}", "unknown dataset 'mnist6k'"),
    ("model: {name: cnn, norm: bn}", "model: {name: cnnn, norm: bn}", "unknown model 'cnnn'"),
    ("FedAvg: {name: fedavg}", "FedAvg: {name: fedavgg}", "unknown method 'fedavgg'"),
    ("FedProx: {name: fedprox, mu: 0.01}", "FedProx: {name: fedprox, muu: 0.01}", "no parameter(s) muu"),
])
def test_bad_paper_yaml_gives_one_clear_error(paper_dir, old, new, message):
    text = paper_dir.read_text()
    assert old in text
    paper_dir.write_text(text.replace(old, new, 1))
    with pytest.raises(SuiteError) as err:
        paper_runs("feddf", "mini")
    assert "feddf" in str(err.value) and message in str(err.value)


def test_grid_cells_run_every_point_and_method_axes_only_where_they_apply():
    p = load_paper("fedopt")
    grid = p["scales"]["mini"]["grids"]["table1"]
    adam = cell_by_label(p, "table1", "FedAdam", "EMNIST CR", "mini")
    assert len(adam.points) == len(grid["training.lr"]) * len(grid["method.server_lr"]) == len(adam.specs)
    assert {(s["training"]["lr"], s["method"]["server_lr"]) for s in adam.specs} == \
        {(lr, slr) for lr in grid["training.lr"] for slr in grid["method.server_lr"]}
    fedavg = cell_by_label(p, "table1", "FedAvg", "EMNIST CR", "mini")   # FedAvg has no server_lr at mini
    assert [dict(pt.settings) for pt in fedavg.points] == [{"training.lr": lr} for lr in grid["training.lr"]]
    assert all("server_lr" not in s["method"] for s in fedavg.specs)
    assert len(set(adam.run_ids)) == len(adam.specs)
    assert adam.eval == {"last_rounds": 5}


def test_task_bundles_are_the_scales_own_settings():
    p = load_paper("fedopt")
    cifar10 = cell_by_label(p, "table1", "FedYogi", "CIFAR-10", "mini").specs[0]
    assert cifar10["dataset"]["name"] == "mnist1d" and cifar10["partition"]["clients"] == 100
    assert cifar10["model"]["name"] == "cnn1d" and cifar10["training"]["rounds"] == 60
    skipped = cell_by_label(p, "table1", "FedYogi", "CIFAR-100", "mini")
    assert not skipped.specs and "task cifar100" in skipped.skipped
    paper = cell_by_label(p, "table1", "FedYogi", "CIFAR-100", "paper").specs[0]
    assert paper["dataset"]["name"] == "cifar100" and paper["model"] == {"name": "resnet18", "norm": "gn"}


def test_fedavg_run_shared_by_fedopt_and_feddf():
    """FedAvg at client lr 0.1 on EMNIST CR's mini analog is FedDF's mini FedAvg run: trained once for both."""
    fedopt, feddf = set(paper_runs("fedopt", "mini")), set(paper_runs("feddf", "mini"))
    p = load_paper("fedopt")
    fedavg = cell_by_label(p, "table1", "FedAvg", "EMNIST CR", "mini")
    at_01 = next(pt for pt in fedavg.points if dict(pt.settings) == {"training.lr": 0.1})
    assert set(at_01.run_ids) <= fedopt & feddf
    assert set(at_01.run_ids) == fedopt & feddf


def test_unknown_task_is_a_clear_error(tmp_path, monkeypatch):
    shutil.copytree(experiments.PAPERS_DIR, tmp_path / "papers")
    monkeypatch.setattr(experiments, "PAPERS_DIR", tmp_path / "papers")
    experiments.load_paper.cache_clear()
    path = tmp_path / "papers" / "fedopt" / "paper.yaml"
    path.write_text(path.read_text().replace("{task: emnist_cr}", "{task: emnist_xx}", 1))
    try:
        with pytest.raises(SuiteError, match="fedopt/paper.yaml .*task 'emnist_xx' is not defined"):
            paper_runs("fedopt", "mini")
    finally:
        experiments.load_paper.cache_clear()


def test_ceiling_is_centralised_training_of_the_longest_cell():
    from common.experiments import table_ceilings
    fedbn = load_paper("fedbn")
    digits, convergence = table_ceilings(fedbn, "digits", "mini"), table_ceilings(fedbn, "convergence", "mini")
    assert [c.eval["domain"] for c in digits] == ["SVHN", "USPS", "SynthDigits", "MNIST-M", "MNIST"]
    assert len({tuple(c.run_ids) for c in digits}) == 1  # one run per seed serves every domain
    # every convergence cell trains 40 local epochs in all (rounds x E); the longest is the first, 40 x 1
    (conv,) = convergence
    spec = conv.specs[0]
    assert conv.run_ids == digits[0].run_ids and (spec["training"]["rounds"], spec["training"]["local_epochs"]) == (40, 1)
    assert spec["method"] == {"name": "centralised"} and spec["partition"]["scheme"] == "domain"  # a share stays one
    feddf = load_paper("feddf")
    (table1,) = table_ceilings(feddf, "table1", "mini")
    t = table1.specs[0]["training"]
    assert table1.specs[0]["partition"] == {"scheme": "iid", "clients": 1} and t["client_fraction"] == 1.0
    assert (t["rounds"], t["local_epochs"]) == (30, 4) and [s["seed"] for s in table1.specs] == [0, 1, 2]
    assert table_ceilings(load_paper("fedntd"), "forgetting", "mini") == []  # not an accuracy table


def test_centralised_pools_every_client_into_one():
    import torch
    from types import SimpleNamespace
    from common.fl import get_algorithm
    parts = [torch.tensor([4, 0]), torch.tensor([2]), torch.tensor([1, 3])]
    ctx = SimpleNamespace(parts=parts, model=torch.nn.Linear(2, 2))
    get_algorithm({"name": "centralised"}).setup(ctx)
    assert len(ctx.parts) == 1 and ctx.parts[0].tolist() == [0, 1, 2, 3, 4]
