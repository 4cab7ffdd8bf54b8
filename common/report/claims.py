"""Claim checks: each kind reads a table's per-seed values (ours) or published means (the paper's) and returns one of
three outcomes with the statistic behind it.

Runs of one seed share the partition and the initialisation across methods, so every comparison is **paired by
seed**: for each seed the difference of the two cells (oriented so that positive is the claimed side), then the 95%
t-interval of the mean difference over seeds (scipy's Student t quantile). A comparison

- **holds** when the interval lies on the claimed side (above 0; at or above 0 for "at least as good"),
- is **contradicted** when it lies on the opposite side,
- is **inconclusive** otherwise: the difference is within seed noise (always so with one seed).

"A ≈ B within m" holds only when the interval lies inside [-m, m] (equivalence shown), is contradicted when it lies
outside, and is inconclusive otherwise. A claim over several cells holds when every comparison holds, is
contradicted when any is, and is inconclusive otherwise. The paper's published means have no seed spread: their
interval is the point itself, which makes each check the plain comparison of means (a test of the check).
Nothing here knows any paper: the claims and their parameters live in each paper.yaml.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from common.errors import SuiteError

CONFIDENCE = 0.95
PROCEDURE = (f"paired by seed; {CONFIDENCE:.0%} Student t-interval of the mean per-seed difference "
             f"(scipy.stats.t); n = number of seeds")

Samples = dict  # seed -> value (a published mean is the one entry {None: value})
Table = dict[tuple[str, str], Samples]  # (row label, column label) -> samples; cells not run are absent
# (row label, column label) -> [(grid point settings {dotted key: value}, samples), ...]
Grids = dict[tuple[str, str], list[tuple[dict, Samples]]]

HOLDS, CONTRADICTED, INCONCLUSIVE, NOT_EVALUABLE = "holds", "contradicted", "inconclusive", "not evaluable"
MARKS = {HOLDS: "✅", CONTRADICTED: "❌", INCONCLUSIVE: "≈", NOT_EVALUABLE: "➖"}


@dataclass(frozen=True)
class Verdict:
    outcome: str
    evidence: str
    stats: tuple = ()  # the comparisons behind it: ({"what", "mean", "low", "high", "n", "outcome"}, ...)

    @property
    def mark(self) -> str:
        return MARKS[self.outcome]


@dataclass(frozen=True)
class Interval:
    """Mean per-seed difference and its confidence interval; low == high == mean for published means."""
    mean: float
    low: float
    high: float
    n: int
    exact: bool

    def text(self) -> str:
        if self.exact:
            return f"{self.mean:+.3g}"
        if self.n < 2:
            return f"{self.mean:+.3g} (n=1: no interval)"
        return f"{self.mean:+.3g} [{self.low:+.3g}, {self.high:+.3g}], n={self.n}"


def interval(diffs: list[float], exact: bool) -> Interval | None:
    """The t-interval of the mean of per-seed differences; None without any difference."""
    if not diffs:
        return None
    x = np.asarray(diffs, dtype=float)
    mean = float(x.mean())
    if exact:
        return Interval(mean, mean, mean, len(x), True)
    if len(x) < 2:
        return Interval(mean, -math.inf, math.inf, len(x), False)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x), False)


def directional(iv: Interval, strict: bool = True) -> str:
    """Outcome of "the difference is positive" (strict) or "is not negative" (not strict)."""
    if iv.low > 0 or (not strict and iv.low >= 0):
        return HOLDS
    if iv.high < 0 or (strict and iv.high <= 0):
        return CONTRADICTED
    return INCONCLUSIVE


def equivalent(iv: Interval, margin: float) -> str:
    """Outcome of "|difference| <= margin": the whole interval inside the margin, or wholly outside it."""
    if -margin <= iv.low and iv.high <= margin:
        return HOLDS
    if iv.low > margin or iv.high < -margin:
        return CONTRADICTED
    return INCONCLUSIVE


def _exact(*samples: Samples) -> bool:
    return all(set(s) == {None} for s in samples)


def _seeds(*samples: Samples) -> list:
    common = set(samples[0])
    for s in samples[1:]:
        common &= set(s)
    return sorted(common, key=lambda k: (k is None, k))


def advantage(a: float, b: float, lower_is_better: bool) -> float:
    """How much better a is than b (positive: a is better)."""
    return b - a if lower_is_better else a - b


def paired_advantage(values: Table, a_cell, b_cell, lower_is_better: bool) -> Interval | None:
    """Interval of the per-seed advantage of cell a over cell b; None when they share no seed."""
    if a_cell not in values or b_cell not in values:
        return None
    a, b = values[a_cell], values[b_cell]
    seeds = _seeds(a, b)
    return interval([advantage(a[s], b[s], lower_is_better) for s in seeds], _exact(a, b))


def _comparison(what: str, iv: Interval, outcome: str) -> dict:
    finite = [x if math.isfinite(x) else None for x in (iv.low, iv.high)]  # no interval with one seed
    return {"what": what, "mean": iv.mean, "low": finite[0], "high": finite[1], "n": iv.n, "outcome": outcome}


def _combine(comparisons: list[dict], unit: str = "comparisons") -> Verdict:
    """Every comparison must hold; any contradicted one contradicts the claim; else it is inconclusive."""
    if not comparisons:
        return Verdict(NOT_EVALUABLE, f"no {unit[:-1]} of this claim is run at this scale")
    by = {o: [c for c in comparisons if c["outcome"] == o] for o in (HOLDS, CONTRADICTED, INCONCLUSIVE)}
    outcome = CONTRADICTED if by[CONTRADICTED] else HOLDS if len(by[HOLDS]) == len(comparisons) else INCONCLUSIVE
    counts = f"{len(by[HOLDS])} hold, {len(by[CONTRADICTED])} contradicted, {len(by[INCONCLUSIVE])} inconclusive " \
             f"of {len(comparisons)} {unit}"

    def show(items: list[dict], word: str) -> str:
        more = f"; and {len(items) - 3} more" if len(items) > 3 else ""
        return f"{word}: " + "; ".join(c["text"] for c in items[:3]) + more

    parts = [counts]
    if by[CONTRADICTED]:
        parts.append(show(by[CONTRADICTED], "contradicted"))
    if by[INCONCLUSIVE]:
        parts.append(show(sorted(by[INCONCLUSIVE], key=lambda c: -abs(c["mean"])), "inconclusive"))
    if outcome == HOLDS:  # the comparison closest to failing
        parts.append(show(sorted(comparisons, key=lambda c: -math.inf if c["low"] is None else c["low"]), "weakest"))
    return Verdict(outcome, "; ".join(parts), tuple({k: v for k, v in c.items() if k != "text"} for c in comparisons))


def _compare(what: str, iv: Interval, outcome: str) -> dict:
    return {**_comparison(what, iv, outcome), "text": f"{what}: {iv.text()}"}


def better_in_every_cell(values: Table, table_rows: list[str], table_cols: list[str], lower_is_better: bool, *, pairs,
                         columns=None, strict: bool = True) -> Verdict:
    """For every pair [a, b] and every column: row a is better than row b (at least as good, when strict is false)."""
    return _pairs_better(values, pairs, columns or table_cols, lambda r, c: (r, c), "{a} vs {b} at {o}",
                         lower_is_better, strict)


def _pairs_better(values: Table, pairs, others, cell, label: str, lower_is_better: bool, strict: bool) -> Verdict:
    """For every pair [a, b] and every o of `others`: cell(a, o) is better than cell(b, o), paired by seed."""
    comparisons = []
    for a, b in pairs:
        for o in others:
            iv = paired_advantage(values, cell(a, o), cell(b, o), lower_is_better)
            if iv is not None:
                comparisons.append(_compare(label.format(a=a, b=b, o=o), iv, directional(iv, strict)))
    return _combine(comparisons)


def close_in_every_cell(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, margin,
                        columns=None) -> Verdict:
    """For every pair [a, b] and every column: |a - b| <= margin (a paper's "a ≈ b"), in the table's units;
    with seeds, the interval of the difference must lie inside the margin."""
    comparisons = []
    for a, b in pairs:
        for c in columns or table_cols:
            iv = paired_advantage(values, (a, c), (b, c), False)
            if iv is not None:
                comparisons.append(_compare(f"{a} − {b} at {c} (margin ±{margin:g})", iv, equivalent(iv, margin)))
    return _combine(comparisons)


def ratio_at_least(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, factor,
                   columns=None) -> Verdict:
    """For every pair [a, b] and every column: a / b >= factor (e.g. "50x fewer bytes": dense / sparse >= 50; "93% of
    centralised": method / centralised >= 0.93); per seed the ratio, then its interval minus the factor."""
    comparisons = []
    for a, b in pairs:
        for c in columns or table_cols:
            if (a, c) not in values or (b, c) not in values:
                continue
            va, vb = values[a, c], values[b, c]
            seeds = _seeds(va, vb)
            iv = interval([va[s] / vb[s] - factor for s in seeds], _exact(va, vb))
            if iv is not None:
                shown = Interval(iv.mean + factor, iv.low + factor, iv.high + factor, iv.n, iv.exact)
                comparisons.append({**_comparison(f"{a} / {b} at {c} (at least {factor:g})", shown,
                                                  directional(iv, strict=False)),
                                    "text": f"{a} / {b} at {c} (at least {factor:g}): {shown.text()}"})
    return _combine(comparisons)


def column_better(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, rows=None,
                  strict: bool = True) -> Verdict:
    """For every pair [a, b] of columns and every row: column a is better than column b in that row, paired by seed
    (a table whose columns are metrics of the same runs, e.g. a student's accuracy above its teacher's)."""
    return _pairs_better(values, pairs, rows or table_rows, lambda c, r: (r, c), "{o}: {a} vs {b}",
                         lower_is_better, strict)


def at_most(values: Table, table_rows, table_cols, lower_is_better: bool, *, bound, rows=None,
            columns=None) -> Verdict:
    """Every listed cell lies below `bound`, in the table's units (e.g. "agreement stays far from 100%": at most
    95%): per seed bound - value, whose interval must lie above 0."""
    comparisons = []
    for r in rows or table_rows:
        for c in columns or table_cols:
            if (r, c) not in values or not values[r, c]:
                continue
            v = values[r, c]
            iv = interval([bound - v[s] for s in _seeds(v)], _exact(v))
            if iv is not None:
                comparisons.append(_compare(f"{bound:g} − {r}, {c}", iv, directional(iv)))
    return _combine(comparisons)


def _per_seed_mean_advantage(values: Table, pairs, columns, lower_is_better: bool) -> dict:
    """seed -> mean advantage of a over b over the pairs [a, b] and columns available for that seed."""
    per_seed: dict = {}
    for a, b in pairs:
        for c in columns:
            if (a, c) in values and (b, c) in values:
                va, vb = values[a, c], values[b, c]
                for s in _seeds(va, vb):
                    per_seed.setdefault(s, []).append(advantage(va[s], vb[s], lower_is_better))
    return {s: float(np.mean(v)) for s, v in per_seed.items()}


def _difference_of_advantages(values, pairs, to_columns, from_columns, lower_is_better) -> Interval | None:
    end = _per_seed_mean_advantage(values, pairs, to_columns, lower_is_better)
    start = _per_seed_mean_advantage(values, pairs, from_columns, lower_is_better)
    seeds = _seeds(end, start) if end and start else []
    return interval([end[s] - start[s] for s in seeds], seeds == [None])


def advantage_grows(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, from_columns,
                    to_columns) -> Verdict:
    """The mean advantage of a over b (over pairs and columns) is larger on `to_columns` than on `from_columns`:
    per seed, the mean advantage on `to_columns` minus that on `from_columns`."""
    iv = _difference_of_advantages(values, pairs, to_columns, from_columns, lower_is_better)
    if iv is None:
        return Verdict(NOT_EVALUABLE, "no cell of this claim is run at this scale")
    what = f"mean advantage on {', '.join(to_columns)} minus on {', '.join(from_columns)}"
    c = _compare(what, iv, directional(iv))
    return Verdict(c["outcome"], c["text"], (_comparison(what, iv, c["outcome"]),))


def _extreme_in_row(values: Table, table_rows, table_cols, lower_is_better: bool, column: str, best: bool,
                    rows=None) -> Verdict:
    """`column` better (or worse) than every other column of the row, for each row in `rows` (default: all)."""
    comparisons = []
    for r in rows or table_rows:
        for other in table_cols:
            if other == column:
                continue
            iv = paired_advantage(values, (r, column), (r, other), lower_is_better) if best else \
                paired_advantage(values, (r, other), (r, column), lower_is_better)
            if iv is not None:
                what = f"{r}: {column} vs {other}" if best else f"{r}: {other} vs {column}"
                comparisons.append(_compare(what, iv, directional(iv)))
    return _combine(comparisons)


def best_in_row(values, table_rows, table_cols, lower_is_better, *, column, rows=None) -> Verdict:
    return _extreme_in_row(values, table_rows, table_cols, lower_is_better, column, True, rows)


def worst_in_row(values, table_rows, table_cols, lower_is_better, *, column, rows=None) -> Verdict:
    return _extreme_in_row(values, table_rows, table_cols, lower_is_better, column, False, rows)


def largest_advantage_at(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, column,
                         columns=None) -> Verdict:
    """The mean advantage of a over b (over the pairs) is larger at `column` than at every other column."""
    comparisons = []
    for other in columns or table_cols:
        if other == column:
            continue
        iv = _difference_of_advantages(values, pairs, [column], [other], lower_is_better)
        if iv is not None:
            comparisons.append(_compare(f"advantage at {column} minus at {other}", iv, directional(iv)))
    return _combine(comparisons)


def all_of(verdicts: list[Verdict]) -> Verdict:
    """A claim made of several checks: contradicted if one is, holds if all do, else inconclusive (or, with no
    contradicted or inconclusive part, not evaluable when a part is not)."""
    outcomes = {v.outcome for v in verdicts}
    outcome = next(o for o in (CONTRADICTED, INCONCLUSIVE, NOT_EVALUABLE, HOLDS) if o in outcomes)
    return Verdict(outcome, "; ".join(f"{v.mark} {v.evidence}" for v in verdicts),
                   tuple(s for v in verdicts for s in v.stats))


def best_of_rows_beats(values: Table, table_rows, table_cols, lower_is_better: bool, *, rows, than,
                       columns=None) -> Verdict:
    """In every column, the best of `rows` (by its mean over seeds) is better than row `than`."""
    comparisons = []
    for c in columns or table_cols:
        group = [r for r in rows if (r, c) in values and values[r, c]]
        if (than, c) not in values or not group:
            continue
        pick = min if lower_is_better else max
        best = pick(group, key=lambda r: float(np.mean(list(values[r, c].values()))))
        iv = paired_advantage(values, (best, c), (than, c), lower_is_better)
        if iv is not None:
            comparisons.append(_compare(f"{c}: {best} (best of {', '.join(rows)}) vs {than}", iv, directional(iv)))
    return _combine(comparisons, "columns")


def good_range_along(points: list[tuple[dict, float | None]], axis: str, margin: float,
                     lower_is_better: bool, best_settings: dict | None = None) -> tuple[int, int] | None:
    """(how many values of `axis` come within `margin` of the best point, how many there are), along the line of
    the grid through the best point (the other axes held at the best point's values). The best point is the best
    of `points` unless given. None if nothing is available."""
    available = [(s, v) for s, v in points if v is not None]
    if not available:
        return None
    if best_settings is None:
        best_settings = (min if lower_is_better else max)(available, key=lambda p: p[1])[0]
    best = next((v for s, v in points if s == best_settings), None)
    if best is None:
        return None
    line = [v for s, v in points if all(s[k] == best_settings[k] for k in s if k != axis)]
    good = sum(v is not None and abs(v - best) <= margin for v in line)
    return good, len(line)


def _good_range_per_seed(points: list[tuple[dict, Samples]], axis, margin, lower_is_better) -> dict:
    """seed -> good range along `axis` through the best point by mean over seeds, in that seed's values."""
    means = [(s, float(np.mean(list(v.values()))) if v else None) for s, v in points]
    available = [(s, m) for s, m in means if m is not None]
    if not available:
        return {}
    best = (min if lower_is_better else max)(available, key=lambda p: p[1])[0]
    seeds = _seeds(*[v for _, v in points if v])
    out = {}
    for seed in seeds:
        g = good_range_along([(s, v.get(seed)) for s, v in points], axis, margin, lower_is_better, best)
        if g is not None:
            out[seed] = g[0]
    return out


def less_sensitive_along(values: Table, table_rows, table_cols, lower_is_better: bool, *, grids: Grids, axis,
                         margin, rows, than, columns=None) -> Verdict:
    """Sensitivity to one grid axis (e.g. the client learning rate): in every column, the number of values of
    `axis` whose run comes within `margin` of the cell's best point (best by the mean over seeds), along the grid
    line through it, is larger on average over `rows` than for row `than`; per seed, then paired. A diverged run is
    never within the margin."""
    comparisons = []
    for c in columns or table_cols:
        ref = _good_range_per_seed(grids.get((than, c), []), axis, margin, lower_is_better)
        group = [_good_range_per_seed(grids.get((r, c), []), axis, margin, lower_is_better) for r in rows]
        group = [g for g in group if g]
        if not ref or not group:
            continue
        seeds = _seeds(ref, *group)
        iv = interval([float(np.mean([g[s] for g in group])) - ref[s] for s in seeds], seeds == [None])
        if iv is not None:
            comparisons.append(_compare(f"{c}: values of {axis} within {margin:g} of the best, mean of "
                                        f"{', '.join(rows)} minus {than}", iv, directional(iv)))
    return _combine(comparisons, "columns")


KINDS = {"better_in_every_cell": better_in_every_cell, "close_in_every_cell": close_in_every_cell,
         "advantage_grows": advantage_grows, "best_in_row": best_in_row, "worst_in_row": worst_in_row,
         "largest_advantage_at": largest_advantage_at, "best_of_rows_beats": best_of_rows_beats,
         "less_sensitive_along": less_sensitive_along, "ratio_at_least": ratio_at_least,
         "column_better": column_better, "at_most": at_most}
GRID_KINDS = {"less_sensitive_along"}  # kinds that read every grid point of a cell, not only the cell's best


def check_claim(check: dict, values: Table, rows: list[str], cols: list[str], lower_is_better: bool,
                grids: Grids | None = None) -> Verdict:
    """Evaluate one check; kind `all_of` combines the checks listed under `checks` (on the same table).
    `grids` holds every grid point of a table with a grid (absent for the paper's numbers, which are only the best
    points): kinds that need them are not evaluable without."""
    if check["kind"] == "all_of":
        return all_of([check_claim({**sub, "table": check["table"]}, values, rows, cols, lower_is_better, grids)
                       for sub in check["checks"]])
    params = {k: v for k, v in check.items() if k not in ("kind", "table")}
    labels = set(rows) | set(cols)
    named = [x for p in params.get("pairs", []) for x in p] + params.get("from_columns", []) + \
        params.get("to_columns", []) + params.get("columns", []) + params.get("rows", []) + \
        ([params["column"]] if "column" in params else []) + ([params["than"]] if "than" in params else [])
    unknown = sorted(set(named) - labels)
    if unknown:
        raise SuiteError(f"claim check on table '{check['table']}' names unknown rows/columns: {', '.join(unknown)}")
    if check["kind"] in GRID_KINDS:
        if not grids:
            return Verdict(NOT_EVALUABLE, "needs every grid point's value; only the best point of each cell is known")
        params["grids"] = grids
    return KINDS[check["kind"]](values, rows, cols, lower_is_better, **params)


def beaten_labels(check: dict, cols: list[str]) -> set[str]:
    """The rows/columns a claim says are beaten (the baselines): the second of each pair, `than`, and the other
    columns of a best/worst-in-row claim. A table's headroom is measured from these."""
    if check["kind"] == "all_of":
        return set().union(*(beaten_labels(sub, cols) for sub in check["checks"]))
    if check["kind"] in ("close_in_every_cell", "ratio_at_least", "at_most"):  # "a ≈ b", "a >= f * b", "a <= x":
        # nothing is beaten
        return set()
    out = {b for _, b in check.get("pairs", [])} | ({check["than"]} if "than" in check else set())
    if check["kind"] == "best_in_row":
        out |= set(cols) - {check["column"]}
    if check["kind"] == "worst_in_row":
        out.add(check["column"])
    return out
