"""Verdicts from per-seed values: each claim kind on synthetic tables whose right outcome is known (a clear effect
holds, a clear opposite effect is contradicted, pure seed noise is inconclusive), the interval against a hand
computation, and every paper's claims on the paper's own published means."""
import math

import numpy as np
import pytest

from common.errors import SuiteError
from common.experiments import known_papers, load_paper
from common.report.claims import (CONTRADICTED, GRID_KINDS, HOLDS, INCONCLUSIVE, NOT_EVALUABLE, beaten_labels,
                                  check_claim, interval)
from common.report.metrics import paper_value

ROWS, COLS = ["A", "B", "C"], ["x", "y"]
SEEDS = [0, 1, 2, 3, 4]
RNG = np.random.default_rng(12345)
NOISE = RNG.normal(0.0, 1.0, size=(3, 2, len(SEEDS)))  # fixed noise per (row, column, seed)


def cells(means: dict, spread: float = 0.2, noise=NOISE) -> dict:
    """{"Ax": mean, ...} -> {(row, column): {seed: value}} with per-seed noise of the given spread."""
    return {(k[0], k[1]): {s: m + spread * noise[ROWS.index(k[0]), COLS.index(k[1]), i] for i, s in enumerate(SEEDS)}
            for k, m in means.items()}


def published(means: dict) -> dict:
    return {(k[0], k[1]): {None: m} for k, m in means.items()}


def check(kind, values, lower=False, table_rows=ROWS, table_cols=COLS, grids=None, **params):
    return check_claim({"kind": kind, "table": "t", **params}, values, table_rows, table_cols, lower, grids)


def test_interval_is_the_paired_t_interval():
    diffs = [1.0, 2.0, 4.0]
    iv = interval(diffs, exact=False)
    t_975_2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom, from the table
    sd = math.sqrt(sum((d - 7 / 3) ** 2 for d in diffs) / 2)
    assert iv.mean == pytest.approx(7 / 3)
    assert iv.low == pytest.approx(7 / 3 - t_975_2 * sd / math.sqrt(3))
    assert iv.high == pytest.approx(7 / 3 + t_975_2 * sd / math.sqrt(3))
    one = interval([3.0], exact=False)
    assert one.low == -math.inf and one.high == math.inf  # one seed: no interval, so never a finding
    assert interval([3.0], exact=True).low == 3.0 and interval([], exact=False) is None


def test_better_in_every_cell_three_outcomes():
    kw = {"pairs": [["A", "B"]]}
    assert check("better_in_every_cell", cells({"Ax": 80, "Ay": 70, "Bx": 75, "By": 65}), **kw).outcome == HOLDS
    assert check("better_in_every_cell", cells({"Ax": 70, "Ay": 60, "Bx": 75, "By": 65}), **kw).outcome == CONTRADICTED
    noisy = check("better_in_every_cell", cells({"Ax": 75, "Ay": 65, "Bx": 75, "By": 65}, spread=3.0), **kw)
    assert noisy.outcome == INCONCLUSIVE and "inconclusive" in noisy.evidence
    # one clear cell and one opposite cell: contradicted; one clear and one noisy: inconclusive
    assert check("better_in_every_cell", cells({"Ax": 80, "Ay": 60, "Bx": 75, "By": 65}), **kw).outcome == CONTRADICTED
    mixed = cells({"Ax": 80, "Bx": 75}) | cells({"Ay": 65, "By": 65}, spread=3.0)
    assert check("better_in_every_cell", mixed, **kw).outcome == INCONCLUSIVE
    # lower is better flips the direction
    assert check("better_in_every_cell", cells({"Ax": 10, "Ay": 10, "Bx": 20, "By": 20}), lower=True,
                 **kw).outcome == HOLDS
    assert check("better_in_every_cell", cells({"Ax": 1}), **kw).outcome == NOT_EVALUABLE


def test_a_gap_inside_seed_noise_is_never_a_finding():
    """The case that motivated verdicts: a mean gap of 0.1 with a spread of 2 points."""
    values = cells({"Ax": 94.03, "Bx": 94.13}, spread=2.0)
    verdict = check("better_in_every_cell", values, pairs=[["A", "B"]])
    assert verdict.outcome == INCONCLUSIVE
    assert check("better_in_every_cell", values, pairs=[["B", "A"]]).outcome == INCONCLUSIVE


def test_not_strict_holds_on_exact_ties_and_strict_does_not():
    tie = {("A", "x"): {0: 5, 1: 7, 2: 6}, ("B", "x"): {0: 5, 1: 7, 2: 6}}
    assert check("better_in_every_cell", tie, lower=True, pairs=[["A", "B"]], strict=False).outcome == HOLDS
    assert check("better_in_every_cell", tie, lower=True, pairs=[["A", "B"]]).outcome == CONTRADICTED


def test_pairing_by_seed_removes_the_shared_seed_effect():
    """Seeds move both methods together (a shared partition); A is always 1 better: paired, that is clear."""
    seed_effect = {0: -5.0, 1: 0.0, 2: 5.0, 3: 2.0, 4: -3.0}
    values = {("A", "x"): {s: 81 + e for s, e in seed_effect.items()},
              ("B", "x"): {s: 80 + e + 0.01 * s for s, e in seed_effect.items()}}
    assert check("better_in_every_cell", values, pairs=[["A", "B"]]).outcome == HOLDS


def test_missing_seeds_are_left_out_of_the_pairing():
    values = {("A", "x"): {0: 80, 1: 81, 2: 80.5}, ("B", "x"): {0: 75, 2: 75.2}}  # seed 1 of B diverged
    verdict = check("better_in_every_cell", values, pairs=[["A", "B"]])
    assert verdict.stats[0]["n"] == 2


def test_close_in_every_cell_needs_equivalence_shown():
    kw = {"pairs": [["A", "B"]], "margin": 1.0}
    assert check("close_in_every_cell", cells({"Ax": 70.1, "Bx": 70.0}, spread=0.05), **kw).outcome == HOLDS
    assert check("close_in_every_cell", cells({"Ax": 75, "Bx": 70}), **kw).outcome == CONTRADICTED
    # close means, wide spread: equivalence is not shown
    assert check("close_in_every_cell", cells({"Ax": 70.2, "Bx": 70}, spread=3.0), **kw).outcome == INCONCLUSIVE


def test_advantage_grows():
    kw = {"pairs": [["A", "B"]], "from_columns": ["x"], "to_columns": ["y"]}
    grows = cells({"Ax": 71, "Bx": 70, "Ay": 68, "By": 60})  # advantage 1 on x, 8 on y
    assert check("advantage_grows", grows, **kw).outcome == HOLDS
    assert check("advantage_grows", grows, pairs=[["A", "B"]], from_columns=["y"], to_columns=["x"]).outcome \
        == CONTRADICTED
    flat = cells({"Ax": 71, "Bx": 70, "Ay": 61, "By": 60}, spread=2.0)
    assert check("advantage_grows", flat, **kw).outcome == INCONCLUSIVE


def test_best_and_worst_in_row():
    rows, cols = ["r1", "r2"], ["m1", "m2", "m3"]
    noise = RNG.normal(0.0, 1.0, size=(2, 3, len(SEEDS)))

    def table(means, spread=0.2):
        return {(r, c): {s: means[r, c] + spread * noise[rows.index(r), cols.index(c), i] for i, s in enumerate(SEEDS)}
                for r, c in means}
    clear = table({("r1", "m1"): 50, ("r1", "m2"): 60, ("r1", "m3"): 70,
                   ("r2", "m1"): 50, ("r2", "m2"): 60, ("r2", "m3"): 70})
    assert check("best_in_row", clear, table_rows=rows, table_cols=cols, column="m3").outcome == HOLDS
    assert check("worst_in_row", clear, table_rows=rows, table_cols=cols, column="m1").outcome == HOLDS
    assert check("best_in_row", clear, table_rows=rows, table_cols=cols, column="m1").outcome == CONTRADICTED
    assert check("best_in_row", clear, lower=True, table_rows=rows, table_cols=cols, column="m1").outcome == HOLDS
    close = table({("r1", "m1"): 50, ("r1", "m2"): 69.8, ("r1", "m3"): 70}, spread=3.0)
    assert check("best_in_row", close, table_rows=rows, table_cols=cols, column="m3", rows=["r1"]).outcome == INCONCLUSIVE


def test_largest_advantage_at():
    cols = ["x", "y", "z"]
    noise = RNG.normal(0.0, 1.0, size=(3, 3, len(SEEDS)))

    def table(means, spread=0.2):
        return {(r, c): {s: m + spread * noise[ROWS.index(r), cols.index(c), i] for i, s in enumerate(SEEDS)}
                for (r, c), m in means.items()}
    means = {("A", "x"): 70, ("B", "x"): 60, ("C", "x"): 62,   # advantage of A: 10 and 8 at x
             ("A", "y"): 90, ("B", "y"): 88, ("C", "y"): 89,   # 2 and 1 at y
             ("A", "z"): 50, ("B", "z"): 45, ("C", "z"): 30}   # 5 and 20 at z: mean 12.5, the largest
    kw = {"pairs": [["A", "B"], ["A", "C"]]}
    assert check("largest_advantage_at", table(means), table_cols=cols, column="z", **kw).outcome == HOLDS
    assert check("largest_advantage_at", table(means), table_cols=cols, column="y", **kw).outcome == CONTRADICTED
    # x (mean 9) vs z (12.5) with a 10-point spread: within seed noise
    assert check("largest_advantage_at", table(means, 10.0), table_cols=cols, column="x", columns=["x", "z"],
                 **kw).outcome == INCONCLUSIVE


def test_best_of_rows_beats():
    kw = {"rows": ["A", "B"], "than": "C"}
    assert check("best_of_rows_beats", cells({"Ax": 70, "Bx": 75, "Cx": 72, "Ay": 57, "By": 60, "Cy": 58}),
                 **kw).outcome == HOLDS
    assert check("best_of_rows_beats", cells({"Ax": 70, "Bx": 75, "Cx": 72, "Ay": 57, "By": 55, "Cy": 59}),
                 **kw).outcome == CONTRADICTED
    assert check("best_of_rows_beats", cells({"Ax": 70, "Bx": 72.2, "Cx": 72}, spread=3.0), **kw).outcome \
        == INCONCLUSIVE


def grid(values: dict, spread: float = 0.0) -> list:
    """{client lr: mean} -> grid points with per-seed samples (the report's form)."""
    return [({"training.lr": lr}, {s: v + spread * ((-1) ** s) * (i + 1) for s in SEEDS})
            for i, (lr, v) in enumerate(values.items())]


def test_less_sensitive_along():
    kw = {"axis": "training.lr", "margin": 3.0, "rows": ["A", "B"], "than": "C", "columns": ["x"]}
    wide, narrow = grid({0.1: 90, 0.3: 89, 1.0: 88}), grid({0.1: 90, 0.3: 80, 1.0: 70})
    fedavg = grid({0.1: 91, 0.3: 85, 1.0: 60})
    values = cells({"Ax": 90, "Bx": 90, "Cx": 91})
    # A: 3 of 3 within 3 points, B: 1 of 3, mean 2 > C's 1, in every seed
    assert check("less_sensitive_along", values, grids={("A", "x"): wide, ("B", "x"): wide, ("C", "x"): fedavg},
                 **kw).outcome == HOLDS
    assert check("less_sensitive_along", values, grids={("A", "x"): narrow, ("B", "x"): narrow, ("C", "x"): wide},
                 **kw).outcome == CONTRADICTED
    # the paper's numbers are only the best points: not evaluable
    assert check("less_sensitive_along", values, **kw).outcome == NOT_EVALUABLE


def test_all_of_combines_outcomes():
    vals = cells({"Ax": 80, "Ay": 70, "Bx": 75, "By": 65})
    good = {"kind": "better_in_every_cell", "pairs": [["A", "B"]]}
    bad = {"kind": "better_in_every_cell", "pairs": [["B", "A"]]}
    missing = {"kind": "better_in_every_cell", "pairs": [["A", "C"]]}
    noisy_vals = {**vals, **cells({"Cx": 75, "Cy": 65}, spread=3.0)}
    noisy = {"kind": "better_in_every_cell", "pairs": [["C", "B"]]}

    def all_of(*checks, values=vals):
        return check("all_of", values, checks=list(checks)).outcome
    assert all_of(good, good) == HOLDS
    assert all_of(good, bad) == CONTRADICTED and all_of(bad, missing) == CONTRADICTED
    assert all_of(good, missing) == NOT_EVALUABLE
    assert all_of(good, noisy, values=noisy_vals) == INCONCLUSIVE
    with pytest.raises(SuiteError, match="unknown rows/columns: Z"):
        check("all_of", vals, checks=[{"kind": "better_in_every_cell", "pairs": [["A", "Z"]]}])


def test_published_means_are_compared_as_they_are():
    """The paper's numbers (no seeds) decide by the plain comparison of means, ties not counting as better."""
    assert check("better_in_every_cell", published({"Ax": 70.1, "Bx": 70.0}), pairs=[["A", "B"]]).outcome == HOLDS
    assert check("better_in_every_cell", published({"Ax": 70.0, "Bx": 70.0}), pairs=[["A", "B"]]).outcome \
        == CONTRADICTED
    assert check("close_in_every_cell", published({"Ax": 70.9, "Bx": 70.0}), pairs=[["A", "B"]],
                 margin=1.0).outcome == HOLDS


def test_beaten_labels_are_the_claims_baselines():
    assert beaten_labels({"kind": "better_in_every_cell", "pairs": [["A", "B"], ["A", "C"]]}, COLS) == {"B", "C"}
    assert beaten_labels({"kind": "best_in_row", "column": "x"}, COLS) == {"y"}
    assert beaten_labels({"kind": "all_of", "checks": [{"kind": "best_of_rows_beats", "rows": ["A"], "than": "C"}]},
                         COLS) == {"C"}


@pytest.mark.parametrize("paper", known_papers())
def test_every_claim_holds_on_the_papers_own_numbers(paper):
    """The claim checks are encoded correctly: on the paper's numbers they confirm the paper (or, where the table's
    numbers are not verified or not recovered for the compared rows, or the check needs every grid point, they are
    not evaluable rather than guessed)."""
    p = load_paper(paper)

    def needs_grid(chk):
        return chk["kind"] in GRID_KINDS or any(needs_grid(c) for c in chk.get("checks", []))

    def compared(chk):  # the rows/columns a check names
        names = {x for pair in chk.get("pairs", []) for x in pair}
        names |= {chk[k] for k in ("than", "column", "row") if k in chk} | set(chk.get("rows", []))
        if chk.get("kind") == "at_most":  # a bound on the listed columns' cells: those are what it compares
            names |= set(chk.get("columns", []))
        return names.union(*(compared(c) for c in chk.get("checks", [])))
    for claim in p["claims"]:
        t = p["tables"][claim["check"]["table"]]
        rows, cols = [r["label"] for r in t["rows"]], [c["label"] for c in t["columns"]]
        vals = {(rows[i], cols[j]): dict(paper_value(v).per_seed) for i, row in enumerate(t["paper"])
                for j, v in enumerate(row) if paper_value(v).available}
        verdict = check_claim(claim["check"], vals, rows, cols, t.get("lower_is_better", False))
        published = all(any(name in cell for cell in vals) for name in compared(claim["check"]))
        expected = HOLDS if published and not needs_grid(claim["check"]) else NOT_EVALUABLE
        assert verdict.outcome == expected, (claim["id"], verdict.evidence)
