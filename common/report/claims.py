"""Claim checks: each kind reads a table of cell means (ours or the paper's) and returns a verdict with evidence.

A verdict is True (holds), False (does not hold) or None (cannot be evaluated: the cells are not run at this
scale). Nothing here knows any paper: the claims and their parameters live in each paper.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import SuiteError

Table = dict[tuple[str, str], float]  # (row label, column label) -> mean; missing cells are absent
# (row label, column label) -> [(grid point settings {dotted key: value}, mean or None when diverged), ...]
Grids = dict[tuple[str, str], list[tuple[dict, float | None]]]


@dataclass(frozen=True)
class Verdict:
    holds: bool | None
    evidence: str

    @property
    def mark(self) -> str:
        return {True: "✅", False: "❌", None: "➖"}[self.holds]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _better(a: float, b: float, lower_is_better: bool, strict: bool = True) -> bool:
    if strict:
        return a < b if lower_is_better else a > b
    return a <= b if lower_is_better else a >= b


def better_in_every_cell(values: Table, table_rows: list[str], table_cols: list[str], lower_is_better: bool, *, pairs,
                         columns=None, strict: bool = True) -> Verdict:
    """For every pair [a, b] and every column: row a is better than row b (or equal, when strict is false)."""
    checked, failed = 0, []
    for a, b in pairs:
        for c in columns or table_cols:
            if (a, c) in values and (b, c) in values:
                checked += 1
                if not _better(values[a, c], values[b, c], lower_is_better, strict):
                    failed.append(f"{a} vs {b} at {c}: {_fmt(values[a, c])} vs {_fmt(values[b, c])}")
    if not checked:
        return Verdict(None, "no cell of this claim is run at this scale")
    if failed:
        shown = "; ".join(failed[:4]) + (f"; and {len(failed) - 4} more" if len(failed) > 4 else "")
        return Verdict(False, f"fails in {len(failed)} of {checked} comparisons: {shown}")
    return Verdict(True, f"holds in all {checked} comparisons")


def close_in_every_cell(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, margin,
                        columns=None) -> Verdict:
    """For every pair [a, b] and every column: |a - b| <= margin (a paper's "a ≈ b"), in the table's units."""
    checked, failed, gaps = 0, [], []
    for a, b in pairs:
        for c in columns or table_cols:
            if (a, c) in values and (b, c) in values:
                checked += 1
                gap = abs(values[a, c] - values[b, c])
                gaps.append(gap)
                if gap > margin:
                    failed.append(f"{a} vs {b} at {c}: {_fmt(values[a, c])} vs {_fmt(values[b, c])}")
    if not checked:
        return Verdict(None, "no cell of this claim is run at this scale")
    if failed:
        return Verdict(False, f"differ by more than {_fmt(margin)} in {len(failed)} of {checked} comparisons: "
                              + "; ".join(failed[:4]))
    return Verdict(True, f"within {_fmt(margin)} in all {checked} comparisons (largest gap {_fmt(max(gaps))})")


def _mean_advantage(values: Table, pairs, columns, lower_is_better: bool) -> tuple[float | None, int]:
    """Mean advantage of row a over row b, over the pairs [a, b] and columns where both are available."""
    advs = [(values[b, c] - values[a, c]) if lower_is_better else (values[a, c] - values[b, c])
            for a, b in pairs for c in columns if (a, c) in values and (b, c) in values]
    return (sum(advs) / len(advs), len(advs)) if advs else (None, 0)


def advantage_grows(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, from_columns,
                    to_columns) -> Verdict:
    """Mean advantage of a over b (over pairs and columns) is larger on `to_columns` than on `from_columns`."""
    start, n_start = _mean_advantage(values, pairs, from_columns, lower_is_better)
    end, n_end = _mean_advantage(values, pairs, to_columns, lower_is_better)
    if start is None or end is None:
        return Verdict(None, "no cell of this claim is run at this scale")
    text = (f"mean advantage {_fmt(end)} on {', '.join(to_columns)} ({n_end} comparisons) vs "
            f"{_fmt(start)} on {', '.join(from_columns)} ({n_start})")
    return Verdict(end > start, text)


def _extreme_in_row(values: Table, table_rows, table_cols, lower_is_better: bool, column: str, best: bool,
                    rows=None) -> Verdict:
    """`column` strictly best (or worst) among the row's cells, for each row in `rows` (default: all)."""
    failed, checked = [], 0
    pick_best = min if lower_is_better else max
    pick_worst = max if lower_is_better else min
    for r in rows or table_rows:
        others = [(c, values[r, c]) for c in table_cols if c != column and (r, c) in values]
        if (r, column) not in values or not others:
            continue
        checked += 1
        v = values[r, column]
        rival = (pick_best if best else pick_worst)(others, key=lambda x: x[1])
        beats = _better(v, rival[1], lower_is_better) if best else _better(rival[1], v, lower_is_better)
        if not beats:
            failed.append(f"{r}: {_fmt(v)} vs {rival[0]} {_fmt(rival[1])}")
    if not checked:
        return Verdict(None, "no row of this claim is run at this scale")
    word = "best" if best else "worst"
    if failed:
        return Verdict(False, f"not the {word} in {len(failed)} of {checked} rows: " + "; ".join(failed))
    return Verdict(True, f"{column} is the {word} in all {checked} rows")


def best_in_row(values, table_rows, table_cols, lower_is_better, *, column, rows=None) -> Verdict:
    return _extreme_in_row(values, table_rows, table_cols, lower_is_better, column, True, rows)


def worst_in_row(values, table_rows, table_cols, lower_is_better, *, column, rows=None) -> Verdict:
    return _extreme_in_row(values, table_rows, table_cols, lower_is_better, column, False, rows)


def largest_advantage_at(values: Table, table_rows, table_cols, lower_is_better: bool, *, pairs, column,
                         columns=None) -> Verdict:
    """The mean advantage of a over b (over the pairs) is larger at `column` than at any other column."""
    advs = {c: _mean_advantage(values, pairs, [c], lower_is_better)[0] for c in columns or table_cols}
    advs = {c: a for c, a in advs.items() if a is not None}
    others = {c: a for c, a in advs.items() if c != column}
    if column not in advs or not others:
        return Verdict(None, "no cell of this claim is run at this scale")
    rival = max(others, key=others.get)
    return Verdict(advs[column] > others[rival], f"mean advantage {_fmt(advs[column])} at {column}, "
                                                 f"largest elsewhere {_fmt(others[rival])} at {rival}")


def all_of(verdicts: list[Verdict]) -> Verdict:
    """A claim made of several checks holds when each does; it is not evaluable when one is not (and none fails)."""
    if any(v.holds is False for v in verdicts):
        holds = False
    else:
        holds = None if any(v.holds is None for v in verdicts) else True
    return Verdict(holds, "; ".join(f"{v.mark} {v.evidence}" for v in verdicts))


def best_of_rows_beats(values: Table, table_rows, table_cols, lower_is_better: bool, *, rows, than,
                       columns=None) -> Verdict:
    """In every column, the best of `rows` is strictly better than row `than`."""
    checked, failed, shown = 0, [], []
    for c in columns or table_cols:
        group = [(r, values[r, c]) for r in rows if (r, c) in values]
        if (than, c) not in values or not group:
            continue
        checked += 1
        best = (min if lower_is_better else max)(group, key=lambda x: x[1])
        text = f"{c}: {best[0]} {_fmt(best[1])} vs {than} {_fmt(values[than, c])}"
        shown.append(text)
        if not _better(best[1], values[than, c], lower_is_better):
            failed.append(text)
    if not checked:
        return Verdict(None, "no column of this claim is run at this scale")
    if failed:
        return Verdict(False, f"fails in {len(failed)} of {checked} columns: " + "; ".join(failed))
    return Verdict(True, "; ".join(shown))


def good_range_along(points: list[tuple[dict, float | None]], axis: str, margin: float,
                     lower_is_better: bool) -> tuple[int, int] | None:
    """(how many values of `axis` come within `margin` of the cell's best, how many there are), along the line of
    the grid through the best point (the other axes held at the best point's values). None if nothing is available."""
    available = [(s, v) for s, v in points if v is not None]
    if not available:
        return None
    best_settings, best = (min if lower_is_better else max)(available, key=lambda p: p[1])
    line = [v for s, v in points if all(s[k] == best_settings[k] for k in s if k != axis)]
    good = sum(v is not None and abs(v - best) <= margin for v in line)
    return good, len(line)


def less_sensitive_along(values: Table, table_rows, table_cols, lower_is_better: bool, *, grids: Grids, axis,
                         margin, rows, than, columns=None) -> Verdict:
    """Sensitivity to one grid axis (e.g. the client learning rate): in every column, the values of `axis` whose
    run comes within `margin` of the cell's best, along the grid line through the best point, are more on average
    over `rows` than for row `than`. A diverged run is never within the margin."""
    checked, failed, shown = 0, [], []
    for c in columns or table_cols:
        ref = good_range_along(grids.get((than, c), []), axis, margin, lower_is_better)
        group = {r: good_range_along(grids.get((r, c), []), axis, margin, lower_is_better) for r in rows}
        group = {r: g for r, g in group.items() if g is not None}
        if ref is None or not group:
            continue
        checked += 1
        mean = sum(g for g, _ in group.values()) / len(group)
        text = (f"{c}: " + ", ".join(f"{r} {g}/{n}" for r, (g, n) in group.items()) +
                f" (mean {mean:.3g}) vs {than} {ref[0]}/{ref[1]}")
        shown.append(text)
        if not mean > ref[0]:
            failed.append(text)
    if not checked:
        return Verdict(None, "no grid of this claim is run at this scale")
    intro = f"values of {axis} within {_fmt(margin)} of the best: "
    if failed:
        return Verdict(False, f"fails in {len(failed)} of {checked} columns: " + intro + "; ".join(failed))
    return Verdict(True, intro + "; ".join(shown))


KINDS = {"better_in_every_cell": better_in_every_cell, "close_in_every_cell": close_in_every_cell, "advantage_grows": advantage_grows,
         "best_in_row": best_in_row, "worst_in_row": worst_in_row, "largest_advantage_at": largest_advantage_at,
         "best_of_rows_beats": best_of_rows_beats, "less_sensitive_along": less_sensitive_along}
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
            return Verdict(None, "needs every grid point's value; only the best point of each cell is known")
        params["grids"] = grids
    return KINDS[check["kind"]](values, rows, cols, lower_is_better, **params)
