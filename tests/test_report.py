"""Report maths: paper values, cell metrics, claim checks (on synthetic tables and on the papers' own numbers)."""
import pytest

from common.errors import SuiteError
from common.experiments import known_papers, load_paper
from common.report.claims import check_claim, good_range_along
from common.report.metrics import (CellValue, best_of, cell_value, paper_value, rounds_to_target,
                                   within_tolerance)


def result(accs, rounds=None, status="completed"):
    return {"status": status, "spec": {"training": {"rounds": rounds or len(accs)}},
            "metrics": {"round": list(range(1, len(accs) + 1)), "test_accuracy": accs}}


def test_paper_value_parsing():
    assert paper_value("350±31") == CellValue(350.0, 31.0, n=1)
    assert paper_value("76.01±1.53").mean == 76.01
    assert paper_value(65.25) == CellValue(65.25, None, n=1)
    assert not paper_value(None).available
    with pytest.raises(ValueError):
        paper_value("about 70")


def test_rounds_to_target_first_crossing_and_censoring():
    assert rounds_to_target(result([0.5, 0.81, 0.7, 0.9]), 0.8) == (2.0, False)
    assert rounds_to_target(result([0.5, 0.6], rounds=2), 0.8) == (3.0, True)


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


ROWS, COLS = ["A", "B", "C"], ["x", "y"]


def table(**cells):
    return {(k[0], k[1]): v for k, v in cells.items()}


def test_better_in_every_cell():
    vals = table(Ax=1, Ay=2, Bx=3, By=4)
    ok = check_claim({"kind": "better_in_every_cell", "table": "t", "pairs": [["A", "B"]]}, vals, ROWS, COLS, True)
    assert ok.holds is True and "2 comparisons" in ok.evidence
    bad = check_claim({"kind": "better_in_every_cell", "table": "t", "pairs": [["A", "B"]]}, vals, ROWS, COLS, False)
    assert bad.holds is False
    tie = table(Ax=1, Ay=2, Bx=1, By=4)
    strict = check_claim({"kind": "better_in_every_cell", "table": "t", "pairs": [["A", "B"]]}, tie, ROWS, COLS, True)
    loose = check_claim({"kind": "better_in_every_cell", "table": "t", "pairs": [["A", "B"]], "strict": False},
                        tie, ROWS, COLS, True)
    assert strict.holds is False and loose.holds is True
    none = check_claim({"kind": "better_in_every_cell", "table": "t", "pairs": [["A", "C"]]}, vals, ROWS, COLS, True)
    assert none.holds is None


def test_advantage_grows():
    vals = table(Ax=9, Bx=10, Ay=2, By=10)  # advantage of A: 1 on x, 8 on y (lower is better)
    chk = {"kind": "advantage_grows", "table": "t", "pairs": [["A", "B"]], "from_columns": ["x"], "to_columns": ["y"]}
    assert check_claim(chk, vals, ROWS, COLS, True).holds is True
    assert check_claim({**chk, "from_columns": ["y"], "to_columns": ["x"]}, vals, ROWS, COLS, True).holds is False


def test_best_and_worst_in_row():
    rows, cols = ["r1", "r2"], ["m1", "m2", "m3"]
    vals = {("r1", "m1"): 50, ("r1", "m2"): 60, ("r1", "m3"): 70, ("r2", "m1"): 50, ("r2", "m2"): 80, ("r2", "m3"): 70}
    best = check_claim({"kind": "best_in_row", "table": "t", "column": "m3"}, vals, rows, cols, False)
    assert best.holds is False and "r2" in best.evidence
    assert check_claim({"kind": "best_in_row", "table": "t", "column": "m3", "rows": ["r1"]}, vals, rows, cols,
                       False).holds is True
    assert check_claim({"kind": "worst_in_row", "table": "t", "column": "m1"}, vals, rows, cols, False).holds is True
    # with lower-is-better the same numbers make m1 the best
    assert check_claim({"kind": "best_in_row", "table": "t", "column": "m1"}, vals, rows, cols, True).holds is True


def test_claim_naming_an_unknown_row_is_an_error():
    with pytest.raises(SuiteError, match="unknown rows/columns: Z"):
        check_claim({"kind": "better_in_every_cell", "table": "t", "pairs": [["A", "Z"]]}, {}, ROWS, COLS, True)


@pytest.mark.parametrize("paper", known_papers())
def test_every_claim_holds_on_the_papers_own_numbers(paper):
    """The claim checks are encoded correctly: evaluated on the paper's numbers they confirm the paper (or, where the
    table's numbers are not verified, are not evaluable rather than guessed)."""
    p = load_paper(paper)
    for claim in p["claims"]:
        t = p["tables"][claim["check"]["table"]]
        rows, cols = [r["label"] for r in t["rows"]], [c["label"] for c in t["columns"]]
        vals = {(rows[i], cols[j]): paper_value(v).mean for i, row in enumerate(t["paper"])
                for j, v in enumerate(row) if paper_value(v).available}
        verdict = check_claim(claim["check"], vals, rows, cols, t.get("lower_is_better", False))
        assert verdict.holds is (True if vals else None), (claim["id"], verdict.evidence)


def test_unverified_paper_numbers_are_never_numbers():
    value = paper_value("not verified")
    assert not value.available and value.display(2) == "not verified"
    with pytest.raises(ValueError, match="cannot read paper value"):
        paper_value("78.0 (second-hand)")


def test_largest_advantage_at():
    cols = ["x", "y", "z"]
    vals = {("A", "x"): 70, ("B", "x"): 60, ("C", "x"): 62,   # advantage of A: 10 and 8 at x
            ("A", "y"): 90, ("B", "y"): 88, ("C", "y"): 89,   # 2 and 1 at y
            ("A", "z"): 50, ("B", "z"): 45, ("C", "z"): 30}   # 5 and 20 at z: mean 12.5, the largest
    chk = {"kind": "largest_advantage_at", "table": "t", "pairs": [["A", "B"], ["A", "C"]], "column": "z"}
    ok = check_claim(chk, vals, ROWS, cols, False)
    assert ok.holds is True and "12.5" in ok.evidence and "at x" in ok.evidence
    assert check_claim({**chk, "column": "x"}, vals, ROWS, cols, False).holds is False
    # with lower-is-better the advantages change sign: the smallest difference (at y) is the largest advantage
    assert check_claim({**chk, "column": "y"}, vals, ROWS, cols, True).holds is True
    assert check_claim({**chk, "column": "z"}, {k: v for k, v in vals.items() if k[1] == "z"}, ROWS, cols,
                       False).holds is None


def test_all_of_combines_checks():
    vals = table(Ax=1, Ay=2, Bx=3, By=4)
    good = {"kind": "better_in_every_cell", "pairs": [["A", "B"]]}
    bad = {"kind": "better_in_every_cell", "pairs": [["B", "A"]]}
    missing = {"kind": "better_in_every_cell", "pairs": [["A", "C"]]}
    both = check_claim({"kind": "all_of", "table": "t", "checks": [good, good]}, vals, ROWS, COLS, True)
    assert both.holds is True and both.evidence.count("✅") == 2
    assert check_claim({"kind": "all_of", "table": "t", "checks": [good, bad]}, vals, ROWS, COLS, True).holds is False
    assert check_claim({"kind": "all_of", "table": "t", "checks": [good, missing]}, vals, ROWS, COLS, True).holds \
        is None
    assert check_claim({"kind": "all_of", "table": "t", "checks": [bad, missing]}, vals, ROWS, COLS, True).holds \
        is False
    with pytest.raises(SuiteError, match="unknown rows/columns: Z"):
        check_claim({"kind": "all_of", "table": "t", "checks": [{"kind": "better_in_every_cell",
                                                                 "pairs": [["A", "Z"]]}]}, vals, ROWS, COLS, True)


def test_domain_accuracy_cell_reads_the_last_round():
    res = {"status": "completed", "metrics": {"domain_accuracy": [{"SVHN": 0.2, "USPS": 0.5},
                                                                  {"SVHN": 0.4, "USPS": 0.9}]}}
    other = {"status": "completed", "metrics": {"domain_accuracy": [{"SVHN": 0.6, "USPS": 0.9}]}}
    v = cell_value([res, other], "domain_accuracy", {"domain": "SVHN"})
    assert v.mean == pytest.approx(50.0) and v.n == 2


def test_mean_last_accuracy_averages_the_last_rounds():
    accs = [0.1, 0.5, 0.6, 0.9]
    assert cell_value([result(accs)], "mean_last_accuracy", {"last_rounds": 2}).mean == pytest.approx(75.0)
    assert cell_value([result(accs)], "mean_last_accuracy", {"last_rounds": 10}).mean == pytest.approx(52.5)


def test_best_of_skips_unavailable_and_takes_the_first_of_equals():
    values = [CellValue(None, n=1, diverged=1), CellValue(80.0, n=1), CellValue(90.0, n=1), CellValue(90.0, n=1)]
    assert best_of(values, lower_is_better=False) == 2
    assert best_of(values, lower_is_better=True) == 1
    assert best_of([CellValue(None, n=1, diverged=1)], False) is None


def test_best_of_rows_beats():
    vals = table(Ax=70, Bx=75, Cx=72, Ay=57, By=58, Cy=59)
    check = {"kind": "best_of_rows_beats", "table": "t", "rows": ["A", "B"], "than": "C"}
    verdict = check_claim(check, vals, ROWS, COLS, False)
    assert verdict.holds is False and "fails in 1 of 2" in verdict.evidence and "y: B 58 vs C 59" in verdict.evidence
    vals[("A", "y")] = 59.5
    assert check_claim(check, vals, ROWS, COLS, False).holds is True
    vals[("A", "y")] = 59.0   # a tie is not better
    assert check_claim(check, vals, ROWS, COLS, False).holds is False


def grid(values: dict) -> list:
    """{(client lr, server lr): accuracy or None} -> grid points as the report passes them."""
    return [({"training.lr": lr, "method.server_lr": slr}, v) for (lr, slr), v in values.items()]


def test_good_range_along_follows_the_line_through_the_best_point():
    points = grid({(0.1, 1): 90, (0.3, 1): 88, (1.0, 1): None, (0.1, 3): 95, (0.3, 3): 70, (1.0, 3): 93})
    # best: (0.1, 3) = 95; along training.lr at server lr 3: 95 and 93 are within 3, 70 is not
    assert good_range_along(points, "training.lr", 3.0, False) == (2, 3)
    assert good_range_along(points, "training.lr", 30.0, False) == (3, 3)
    assert good_range_along(grid({(0.1, 1): None}), "training.lr", 3.0, False) is None


def test_less_sensitive_along_compares_mean_good_range_with_the_reference_row():
    wide = grid({(0.1, 1): 90, (0.3, 1): 89, (1.0, 1): 88})
    narrow = grid({(0.1, 1): 90, (0.3, 1): 80, (1.0, 1): None})
    fedavg = [({"training.lr": lr}, v) for lr, v in [(0.1, 91), (0.3, 85), (1.0, 60)]]
    check = {"kind": "less_sensitive_along", "table": "t", "axis": "training.lr", "margin": 3.0,
             "rows": ["A", "B"], "than": "C", "columns": ["x"]}
    vals = table(Ax=90, Bx=90, Cx=91)
    # A: 3 of 3 within 3 points, B: 1 of 3, mean 2 > C's 1
    grids = {("A", "x"): wide, ("B", "x"): narrow, ("C", "x"): fedavg}
    verdict = check_claim(check, vals, ROWS, COLS, False, grids)
    assert verdict.holds is True and "A 3/3, B 1/3 (mean 2) vs C 1/3" in verdict.evidence
    grids[("A", "x")] = narrow  # mean 1, not more than 1
    assert check_claim(check, vals, ROWS, COLS, False, grids).holds is False
    # the paper's numbers are only the best points: not evaluable
    assert check_claim(check, vals, ROWS, COLS, False).holds is None


def test_reference_row_sets_the_target_to_its_final_accuracy(tmp_path):
    """MOON's Table 2: rounds each method needs to reach FedAvg's final accuracy in the same column."""
    import json
    from common.report.build import ReportBuilder
    from common.experiments import paper_runs
    accs = {"moon": [0.5, 0.65, 0.7], "fedprox": [0.3, 0.4, 0.55], "fedavg": [0.4, 0.62, 0.6]}
    for rid, spec in paper_runs("moon", "smoke").items():
        r = {**result(accs.get(spec["method"]["name"], [0.1] * 3), rounds=spec["training"]["rounds"]), "spec": spec}
        (tmp_path / f"{rid}.json").write_text(json.dumps(r))
    b = ReportBuilder("moon", "smoke", tmp_path, calibrations_dir=tmp_path)
    moon, fedprox, fedavg = (row[0] for row in b.ours("table2"))
    assert b.metric_args("table2", b.cells["table2"][0][0]) == {"target": pytest.approx(0.6)}
    assert (moon.mean, fedprox.mean, fedavg.mean) == (2.0, 4.0, 2.0)  # FedAvg first reaches 0.6 at round 2
    assert fedprox.display(0) == "> 3" and "60%" in b._targets("table2")


def test_reference_must_be_a_row_of_a_rounds_to_target_table():
    from common.experiments import _check_tables
    import copy
    paper = copy.deepcopy(load_paper("moon"))
    paper["tables"]["table2"]["columns"][0]["set"]["reference"] = "FedAvgg"
    with pytest.raises(SuiteError, match="needs a rounds_to_target table with a row labelled 'FedAvgg'"):
        _check_tables("moon", paper)
