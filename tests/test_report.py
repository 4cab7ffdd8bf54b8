"""Report maths: paper values, cell metrics, claim checks (on synthetic tables and on the papers' own numbers)."""
import pytest

from common.errors import SuiteError
from common.experiments import known_papers, load_paper
from common.report.claims import good_range_along
from common.report.metrics import (CellValue, best_of, cell_value, paper_value, rounds_to_target,
                                   within_tolerance)


def result(accs, rounds=None, status="completed", seed=0):
    return {"status": status, "spec": {"training": {"rounds": rounds or len(accs)}, "seed": seed},
            "metrics": {"round": list(range(1, len(accs) + 1)), "test_accuracy": accs}}


def test_paper_value_parsing():
    assert (paper_value("350±31").mean, paper_value("350±31").std) == (350.0, 31.0)
    assert paper_value("76.01±1.53").mean == 76.01
    assert paper_value(65.25) == CellValue(65.25, None, n=1, per_seed=((None, 65.25),), exact=True)
    assert not paper_value(None).available
    with pytest.raises(ValueError):
        paper_value("about 70")


def test_rounds_to_target_first_crossing_and_censoring():
    assert rounds_to_target(result([0.5, 0.81, 0.7, 0.9]), 0.8) == (2.0, False)
    assert rounds_to_target(result([0.5, 0.6], rounds=2), 0.8) == (3.0, True)


def test_accuracy_at_round_reads_one_run_at_several_budgets():
    runs = [result([0.1, 0.3, 0.6, 0.7]), result([0.2, 0.5, 0.4, 0.9], seed=1)]
    at = {r: cell_value(runs, "accuracy_at_round", {"at_round": r}) for r in (2, 4)}
    assert at[2].mean == pytest.approx(40.0) and at[4].mean == pytest.approx(80.0)
    assert dict(at[2].per_seed) == pytest.approx({0: 30.0, 1: 50.0})
    with pytest.raises(SuiteError, match="has no round 5"):
        cell_value(runs, "accuracy_at_round", {"at_round": 5})


def test_cell_value_mean_std_and_display():
    v = cell_value([result([0.1, 0.9]), result([0.9, 0.9])], "rounds_to_target", {"target": 0.8})
    assert v.mean == 1.5 and abs(v.std - 0.7071) < 1e-3 and v.display(0) == "2±1"
    censored = cell_value([result([0.1, 0.2])], "rounds_to_target", {"target": 0.8})
    assert censored.display(0) == "> 2"
    acc = cell_value([result([0.5, 0.7512])], "final_accuracy", {})
    assert acc.display(2) == "75.12"
    div = cell_value([result([0.5], status="diverged")], "final_accuracy", {})
    assert div.display(2) == "diverged" and not div.available


def test_within_tolerance():
    assert within_tolerance(CellValue(78.0), CellValue(80.0), {"absolute": 2.0})
    assert not within_tolerance(CellValue(77.9), CellValue(80.0), {"absolute": 2.0})
    assert within_tolerance(CellValue(140.0), CellValue(100.0), {"relative": 0.5})
    assert within_tolerance(CellValue(None), CellValue(1.0), {"absolute": 1}) is None


def test_unverified_paper_numbers_are_never_numbers():
    value = paper_value("not verified")
    assert not value.available and value.display(2) == "not verified"
    with pytest.raises(ValueError, match="cannot read paper value"):
        paper_value("78.0 (second-hand)")


def test_best_of_skips_unavailable_and_takes_the_first_of_equals():
    values = [CellValue(None, n=1, diverged=1), CellValue(80.0, n=1), CellValue(90.0, n=1), CellValue(90.0, n=1)]
    assert best_of(values, lower_is_better=False) == 2
    assert best_of(values, lower_is_better=True) == 1
    assert best_of([CellValue(None, n=1, diverged=1)], False) is None


def grid(values: dict) -> list:
    """{(client lr, server lr): accuracy or None} -> grid points as the report passes them."""
    return [({"training.lr": lr, "method.server_lr": slr}, v) for (lr, slr), v in values.items()]


def test_good_range_along_follows_the_line_through_the_best_point():
    points = grid({(0.1, 1): 90, (0.3, 1): 88, (1.0, 1): None, (0.1, 3): 95, (0.3, 3): 70, (1.0, 3): 93})
    # best: (0.1, 3) = 95; along training.lr at server lr 3: 95 and 93 are within 3, 70 is not
    assert good_range_along(points, "training.lr", 3.0, False) == (2, 3)
    assert good_range_along(points, "training.lr", 30.0, False) == (3, 3)
    assert good_range_along(grid({(0.1, 1): None}), "training.lr", 3.0, False) is None


def write_results(folder, paper: str, accs_by_method: dict, default: list) -> None:
    """A results file per smoke-scale run of `paper`, with the test accuracies given for its method."""
    import json
    from common.experiments import paper_runs
    for rid, spec in paper_runs(paper, "smoke").items():
        r = result(accs_by_method.get(spec["method"]["name"], default), rounds=spec["training"]["rounds"])
        n = len(r["metrics"]["test_accuracy"])
        r = {**r, "spec": spec, "run_id": rid, "final": {"test_accuracy": r["metrics"]["test_accuracy"][-1]},
             "data": {}, "metrics": {**r["metrics"], "test_loss": [1.0] * n, "train_loss": [1.0] * n}}
        (folder / f"{rid}.json").write_text(json.dumps(r))


def test_reference_row_sets_the_target_to_its_final_accuracy(tmp_path):
    """MOON's Table 2: rounds each method needs to reach FedAvg's final accuracy in the same column."""
    from common.report.build import ReportBuilder
    write_results(tmp_path, "moon", {"moon": [0.5, 0.65, 0.7], "fedprox": [0.3, 0.4, 0.55],
                                     "fedavg": [0.4, 0.62, 0.6]}, [0.1] * 3)
    b = ReportBuilder("moon", "smoke", tmp_path, calibrations_dir=tmp_path)
    moon, fedprox, fedavg = (row[0] for row in b.ours("table2"))
    assert b.metric_args("table2", b.cells["table2"][0][0]) == {"target": pytest.approx(0.6)}
    assert (moon.mean, fedprox.mean, fedavg.mean) == (2.0, 4.0, 2.0)  # FedAvg first reaches 0.6 at round 2
    assert fedprox.display(0) == "> 3" and "60%" in b._targets("table2")


def test_room_under_the_ceiling_is_measured_from_the_highest_target(tmp_path):
    """FedDF's Table 1 has one analog with two targets (smoke: 50% at alpha = 1, 40% at 0.1): the room is the
    ceiling minus the higher one, whichever cell comes first."""
    from common.report.build import ReportBuilder
    write_results(tmp_path, "feddf", {"centralised": [0.7, 0.8, 0.9]}, [0.3, 0.45, 0.6])
    b = ReportBuilder("feddf", "smoke", tmp_path, calibrations_dir=tmp_path)
    targets = {b.metric_args("table1", cell)["target"] for row in b.cells["table1"] for cell in row if cell.specs}
    assert sorted(targets) == pytest.approx([0.4, 0.5])
    import dataclasses
    for order in (1, -1):  # either target first
        (c,) = b.ceiling_runs["table1"]
        b.ceiling_runs["table1"] = [dataclasses.replace(c, cells=tuple(sorted(c.cells)[::order]))]
        (room,) = b.headroom("table1")
        assert room["of"] == "target" and room["baseline"].mean == pytest.approx(50.0)
        assert room["ceiling"].mean == pytest.approx(90.0) and room["room"] == pytest.approx(40.0)


def test_reference_must_be_a_row_of_a_rounds_to_target_table():
    from common.experiments import _check_tables
    import copy
    paper = copy.deepcopy(load_paper("moon"))
    paper["tables"]["table2"]["columns"][0]["set"]["reference"] = "FedAvgg"
    with pytest.raises(SuiteError, match="needs a rounds_to_target table with a row labelled 'FedAvgg'"):
        _check_tables("moon", paper)
