"""Build `reports/<paper>.md` from paper.yaml and the run results.

    python -m common.report.build feddf --scale mini --results results/runs --out reports/feddf.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common.errors import SuiteError, entry_point
from common.data import dataset_name
from common.experiments import (ACCURACY_METRICS, Cell, Ceiling, confirmation_name, is_calibration, load_paper,
                                scale_config, table_ceilings, table_cells, table_grid, training_spec)
from common.report.claims import MARKS, PROCEDURE, Verdict, beaten_labels, check_claim
from common.report.metrics import (CellValue, best_grid_point, cell_value, grid_point_values, paper_value,
                                   round_bytes, within_tolerance)
from common.report.plots import accuracy_per_round, curves, grid_heatmaps, sample_grid, sample_texts, scaling, scatter
from common.results import git_commit, read_result, run_id, write_json_atomic, write_text_atomic

SCALE_NOTE = {
    "paper": "This report ran the paper's setting: each cell is compared with the paper's value within the "
             "table's stated tolerance.",
    "mini": "This report ran the **mini** scale, an offline analog of the paper's setting on a laptop CPU. Absolute "
            "numbers are not comparable with the paper's; only the paper's claims are checked, on our numbers.",
    "smoke": "This report ran the **smoke** scale, which exercises the pipeline in seconds. Its numbers check that "
             "the code runs and is deterministic; they say nothing about the paper's claims.",
}


def load_results(run_ids, results_dir: Path) -> dict[str, dict]:
    out, missing = {}, []
    for rid in run_ids:
        path = results_dir / f"{rid}.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        out[rid] = read_result(path)
    if missing:
        raise SuiteError(f"{len(missing)} result file(s) missing, e.g. {missing[0]}; build them with "
                         f"`snakemake <report>` instead of calling the report builder directly")
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _g(value) -> str:
    """A grid value as written in paper.yaml: numbers in their shortest form."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _lrs(spec: dict) -> str:
    """Client learning rate, and the server's where the method has one."""
    server = spec["method"].get("server_lr")
    return _g(spec["training"]["lr"]) + ("" if server is None else f" / {_g(server)}")


def table_decimals(table: dict) -> int:
    """Rounds are whole numbers; trainable shares go down to thousandths of a percent (the paper's "< 0.01%")."""
    if "decimals" in table:  # a table's own precision (e.g. L1 errors of a few hundredths)
        return table["decimals"]
    return {"rounds_to_target": 0, "trainable_share": 4}.get(table["metric"], 2)


class ReportBuilder:
    def __init__(self, paper_name: str, scale: str, results_dir: Path, seeds=None, data_root: str | Path = "data",
                 calibrations_dir: Path | None = None):
        self.name, self.scale, self.data_root = paper_name, scale, data_root
        self.paper = load_paper(paper_name)
        self.sc = scale_config(self.paper, scale)
        self.seeds = list(seeds) if seeds else self.sc["seeds"]
        self.cells = {t: table_cells(self.paper, t, scale, seeds) for t in self.paper["tables"]}
        self.ceiling_runs = {t: table_ceilings(self.paper, t, scale, seeds) for t in self.paper["tables"]}
        # the paper-scale cells, to name the paper's dataset behind each analog
        self.paper_cells = {t: table_cells(self.paper, t, "paper") for t in self.paper["tables"]} \
            if "paper" in self.paper["scales"] and scale != "paper" else None
        specs = [s for grid in self.cells.values() for row in grid for cell in row for s in cell.specs]
        specs += [s for ceilings in self.ceiling_runs.values() for c in ceilings for s in c.specs]
        # training runs (the base runs of calibrations included) and calibrations, both looked up by id
        self.run_ids = sorted({run_id(training_spec(s)) for s in specs})
        self.calibration_ids = sorted({run_id(s) for s in specs if is_calibration(s)})
        self.results = load_results(self.run_ids, results_dir)
        self.confirmed = self._load_confirmations(results_dir.parent / "confirmations")
        if self.calibration_ids:
            self.results.update(load_results(self.calibration_ids, calibrations_dir or
                                             results_dir.parent / "calibrations"))

    def _load_confirmations(self, folder: Path) -> dict:
        """(table, row, column) -> the results of a grid cell's best point re-run with the other seeds."""
        out = {}
        for table, grid in self.cells.items():
            for row in grid:
                for cell in row:
                    for seed in cell.confirm_seeds:
                        path = folder / f"{confirmation_name(self.name, cell, seed)}.json"
                        if not path.is_file():
                            raise SuiteError(f"confirmation run {path} is missing; build it with `snakemake <report>`")
                        res = read_result(path, validate=False)  # a grid whose points all diverged: no run
                        if res.get("run_id"):
                            self.results[res["run_id"]] = res
                        out.setdefault((table, cell.row, cell.col), []).append(res)
        return out

    # --- numbers ---------------------------------------------------------------------------------------------
    def point_values(self, table: str, cell: Cell) -> list[tuple[dict, CellValue]]:
        """(settings, value) of every grid point of a cell of a table with a grid."""
        values = grid_point_values(cell.points, self.results, self.paper["tables"][table]["metric"],
                                   self.metric_args(table, cell))
        return [(dict(p.settings), v) for p, v in zip(cell.points, values)]

    def best_point(self, table: str, cell: Cell):
        """The cell's grid point with the best value; None when every point diverged."""
        t = self.paper["tables"][table]
        i = best_grid_point(cell.points, self.results, t["metric"], self.metric_args(table, cell),
                            t.get("lower_is_better", False))
        return None if i is None else cell.points[i]

    def cell_run_ids(self, table: str, cell: Cell) -> list[str]:
        """The runs a cell's value is computed from: all of them, or the best grid point's in a table with a grid."""
        if not cell.points:
            return cell.run_ids
        best = self.best_point(table, cell)
        if best is None:
            return []
        others = self.confirmed.get((table, cell.row, cell.col), [])
        stale = [r for r in others if r["spec"] != {**best.specs[0], "seed": r["spec"]["seed"]}]
        if stale:
            raise SuiteError(f"table {table}: a confirmation run of cell ({cell.row}, {cell.col}) trained another grid "
                             f"point than the best one now; delete results/confirmations/ and rebuild")
        return best.run_ids + [r["run_id"] for r in others]

    def ours(self, table: str) -> list[list[CellValue]]:
        t = self.paper["tables"][table]
        grid = []
        for row in self.cells[table]:
            out = []
            for cell in row:
                ids = self.cell_run_ids(table, cell)
                if not cell.specs:
                    out.append(CellValue(None, note="not run at this scale"))
                elif not ids:
                    out.append(CellValue(None, n=len(cell.points), diverged=len(cell.points)))
                elif None in (self.metric_args(table, cell).get("target", 0.0),
                              self.metric_args(table, cell).get("budget", 0.0)):
                    out.append(CellValue(None, note="no reference value"))
                else:
                    out.append(cell_value([self.results[r] for r in ids], t["metric"], self.metric_args(table, cell)))
            grid.append(out)
        return grid

    def metric_args(self, table: str, cell: Cell) -> dict:
        """The metric's arguments for a cell. `reference: <row label>` in a rounds_to_target table makes the target
        that row's final accuracy in the same column (mean over seeds; None when it has none, e.g. it diverged):
        the rounds each method needs to reach what the reference reaches in all its rounds (MOON's Table 2)."""
        args = cell.eval
        if "reference" in args:
            rows, _ = self.labels(table)
            ref = self.cells[table][rows.index(args.pop("reference"))][cell.col]
            value = cell_value([self.results[r] for r in ref.run_ids], "final_accuracy", {}) if ref.specs else None
            args["target"] = value.mean / 100 if value is not None and value.available else None
        if "budget_of" in args:  # accuracy_at_bytes: the bytes that row's runs sent in all their rounds
            rows, _ = self.labels(table)
            ref = self.cells[table][rows.index(args.pop("budget_of"))][cell.col]
            scale = args.get("scale", 1e-6)
            args["budget"] = float(np.mean([scale * sum(round_bytes(self.results[r], args.get("direction", "both")))
                                            for r in ref.run_ids])) if ref.specs else None
        return args

    def grids(self, table: str) -> dict | None:
        """(row, column) -> [(settings, mean or None), ...] over every grid point; None for a table without grid."""
        if not table_grid(self.paper, table, self.scale):
            return None
        rows, cols = self.labels(table)
        return {(rows[i], cols[j]): [(s, dict(v.per_seed)) for s, v in self.point_values(table, cell)]
                for i, row in enumerate(self.cells[table]) for j, cell in enumerate(row) if cell.points}

    def theirs(self, table: str) -> list[list[CellValue]]:
        return [[paper_value(v) for v in row] for row in self.paper["tables"][table]["paper"]]

    def labels(self, table: str) -> tuple[list[str], list[str]]:
        t = self.paper["tables"][table]
        return [r["label"] for r in t["rows"]], [c["label"] for c in t["columns"]]

    def as_samples(self, table: str, grid) -> dict:
        """(row, column) -> {seed: value} of the seeds that completed (the paper's: {None: published mean})."""
        rows, cols = self.labels(table)
        return {(rows[i], cols[j]): dict(v.per_seed) for i, r in enumerate(grid) for j, v in enumerate(r)
                if v.per_seed}

    def ceilings(self, table: str) -> list[tuple[Ceiling, CellValue]]:
        """Each dataset analog's ceiling and its value: the table's metric for accuracy tables, the final accuracy
        for rounds-to-target tables."""
        metric = self.paper["tables"][table]["metric"]
        metric = metric if metric in ACCURACY_METRICS else "final_accuracy"
        return [(c, cell_value([self.results[r] for r in c.run_ids], metric, c.eval)) for c in self.ceiling_runs[table]]

    def headroom(self, table: str) -> list[dict]:
        """Per dataset analog: the ceiling, the best baseline a claim says is beaten (or the target of a
        rounds-to-target table) and the room between them, in points."""
        t = self.paper["tables"][table]
        rows, cols = self.labels(table)
        beaten = set().union(*(beaten_labels(c["check"], cols) for c in self.paper["claims"]
                               if c["check"]["table"] == table))
        ours = self.ours(table)
        out = []
        for ceiling, value in self.ceilings(table):
            analog = dataset_name(ceiling.dataset, ceiling.train_limit) + \
                (f", domain {ceiling.eval['domain']}" if "domain" in ceiling.eval else "") + \
                (f", {ceiling.eval['structure']}" if "structure" in ceiling.eval else "") + \
                (f", {ceiling.where}" if ceiling.where else "")
            entry = {"analog": analog, "ceiling": value, "cells": len(ceiling.cells), "baseline": None, "of": None,
                     "room": None, "rounds": ceiling.specs[0]["training"]["rounds"],
                     "local_epochs": ceiling.specs[0]["training"]["local_epochs"]}
            if t["metric"] == "rounds_to_target":
                # the highest target on this analog: the one with the least room under the ceiling
                targets = [self.metric_args(table, self.cells[table][i][j]).get("target") for i, j in ceiling.cells]
                targets = [x for x in targets if x is not None]
                if targets:
                    entry.update(baseline=CellValue(100 * max(targets), n=1), of="target")
            else:
                base = [(ours[i][j], f"{rows[i]}, {cols[j]}") for i, j in ceiling.cells
                        if (rows[i] in beaten or cols[j] in beaten) and ours[i][j].available]
                if base:
                    best, where = max(base, key=lambda b: b[0].mean)
                    entry.update(baseline=best, of=where)
            if value.available and entry["baseline"] is not None:
                entry["room"] = value.mean - entry["baseline"].mean
            out.append(entry)
        return out

    def analogs(self, table: str) -> tuple[list[str], list[str], list[str]]:
        """Row and column labels of our table, each naming the analog it ran on when the label names a paper
        dataset ("CIFAR-10 → MNIST 5k"), and every "paper dataset → analog" of the table."""
        rows, cols = self.labels(table)
        if self.paper_cells is None:
            return rows, cols, []
        pairs = {}
        for i, row in enumerate(self.cells[table]):
            for j, cell in enumerate(row):
                theirs = self.paper_cells[table][i][j]
                if cell.specs and theirs.specs:
                    ds = training_spec(cell.specs[0])["dataset"]
                    pairs[i, j] = (dataset_name(training_spec(theirs.specs[0])["dataset"]["name"]),
                                   dataset_name(ds["name"], ds.get("train_limit")))

        def relabel(label: str, line: list) -> str:
            found = {pairs[k] for k in line if k in pairs}
            if len(found) == 1:
                paper_ds, ours = next(iter(found))
                if paper_ds in label and paper_ds != ours:
                    return f"{label} → {ours}"
            return label
        new_rows = [relabel(r, [(i, j) for j in range(len(cols))]) for i, r in enumerate(rows)]
        new_cols = [relabel(c, [(i, j) for i in range(len(rows))]) for j, c in enumerate(cols)]
        mappings = sorted({f"{p} → {o}" for p, o in pairs.values() if p != o})
        return new_rows, new_cols, mappings

    # --- sections --------------------------------------------------------------------------------------------
    def header(self) -> str:
        p = self.paper
        return "\n".join([
            f"# {p['title']}",
            "",
            f"{', '.join(p['authors'])}. *{p['venue']}*. arXiv:{p.get('arxiv', '—')}. Code: {p.get('code', '—')}.",
            "",
            f"**Scale: `{self.scale}`** — {self.sc['summary']}. {SCALE_NOTE[self.scale]}",
        ])

    def table_section(self, table: str) -> str:
        t = self.paper["tables"][table]
        rows, cols = self.labels(table)
        d = table_decimals(t)
        ours, theirs = self.ours(table), self.theirs(table)
        out = [f"## {t['title']}", "", f"Source: {t['source']}. Metric: {t['how']}", ""]
        out += ["**Paper**", "", _md_table([""] + cols, [[r] + [v.display(d) for v in row]
                                                          for r, row in zip(rows, theirs)]), ""]
        targets = self._targets(table)
        our_rows, our_cols, analogs = self.analogs(table)
        data = f" — analog data, not the paper's: {'; '.join(analogs)}" if analogs else ""
        out += [f"**Ours ({self.scale} scale{data})**" + (f" — targets at this scale: {targets}" if targets else ""),
                "", _md_table([""] + our_cols, [[r] + [v.display(d) for v in row] for r, row in zip(our_rows, ours)]),
                "", self._seeds_note(ours), ""]
        out += self._ceiling_lines(table)
        if self.scale == "paper":
            tol = t.get("tolerance", {"relative": 0.1})
            marks = [[{True: "✅", False: "❌", None: "—"}[within_tolerance(o, p, tol)] for o, p in zip(ro, rp)]
                     for ro, rp in zip(ours, theirs)]
            out += [f"**Reproduced within tolerance {tol}**", "", _md_table([""] + cols, [[r] + m for r, m in
                                                                                          zip(rows, marks)]), ""]
        out += self._best_points(table)
        return "\n".join(out)

    def _seeds_note(self, grid: list[list[CellValue]]) -> str:
        ns = sorted({v.n for row in grid for v in row if v.n})
        if not ns:
            return "_No cell of this table is run at this scale._"
        n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        return (f"_Mean ± standard deviation over n = {n} seeds per cell (seeds {self.seeds}); the same seed gives "
                f"every method the same partition and initialisation._")

    def _ceiling_lines(self, table: str) -> list[str]:
        """The centralised ceiling of each dataset analog and the room below it for the claimed effects."""
        rooms = self.headroom(table)
        if not rooms:
            return []
        d = 2
        rounds = self.paper["tables"][table]["metric"] == "rounds_to_target"
        lines = []
        for e in rooms:
            room = "—" if e["room"] is None else f"{e['room']:.{d}f}" + (" ⚠ < 3 points" if e["room"] < 3 else "")
            base = "—" if e["baseline"] is None else f"{e['baseline'].display(d)} ({e['of']})"
            lines.append([e["analog"], f"{e['rounds']} × {e['local_epochs']}", e["ceiling"].display(d), base, room])
        what = "target accuracy (%)" if rounds else "best baseline a claim says is beaten"
        how = self.paper["tables"][table].get("ceiling", {})
        if how.get("per_client"):
            evaluated = ("evaluated as the cells are: on each client's own test split of its column's partition "
                         "(one ceiling per partition)" +
                         (", its predictions restricted to the classes in that client's training data (an oracle "
                          "that knows each client's label set)" if how.get("restrict_to_client_labels") else "") +
                         ", combined over clients with the table's weighting, in %")
        else:
            evaluated = "in the table's metric (%)"
        if "row" in how:
            what_row = how.get("text", "the larger model trained centrally on the pooled training data: the reference "
                                       "the other rows learn from")
            return [f"**Ceiling ({self.scale} scale)** — row {how['row']} of the table, per column ({what_row}), in the "
                    f"table's metric (%); the room is the ceiling minus the best baseline a claim says is beaten. A room "
                    f"under 3 points leaves no space for the claimed effect.", "",
                    _md_table(["dataset analog", "rounds × epochs", "ceiling", what, "room (points)"], lines), ""]
        trained_on = ("the labelled training split of the held-out (target) domain alone (the oracle that sees the "
                      "target labels)" if how.get("held_out_only") else
                      "the pooled training data of all clients (in a leave-one-site-out table: of every site, the "
                      "held-out one's training split included)")
        own = scale_config(self.paper, self.scale).get("ceiling")  # a centralised paper's own ceiling run
        model = (f"{own['text'].rstrip('.')}, trained centrally on the pooled training data" if own else
                 f"the same model trained centrally on {trained_on} for the rounds × local epochs of the longest cell")
        return [f"**Ceiling ({self.scale} scale)** — {model}, {evaluated}; the room is the ceiling minus "
                f"the {'target' if rounds else 'best such baseline'}. A room under 3 points leaves no space for the "
                f"claimed effect. The paper reports no centralised number for this table.", "",
                _md_table(["dataset analog", "rounds × epochs", "ceiling", what, "room (points)"], lines), ""]

    def _best_points(self, table: str) -> list[str]:
        """For a table with a grid: the grid at this scale and the grid point behind each of our cells."""
        grid = table_grid(self.paper, table, self.scale)
        if not grid:
            return []
        rows, cols = self.labels(table)

        def best(cell: Cell) -> str:
            if not cell.specs:
                return "—"
            point = self.best_point(table, cell)
            return "all diverged" if point is None else ", ".join(f"{k}={_g(v)}" for k, v in point.settings)

        axes = "; ".join(f"`{k}` ∈ {{{', '.join(_g(v) for v in values)}}}" for k, values in grid.items())
        return [f"**Best grid point per cell (ours)** — grid at this scale: {axes}. The grid runs on seed "
                f"{self.seeds[0]}; each cell above is its best point there, re-run with the other seeds. A `method.*` "
                f"axis applies only to the methods that have that hyper-parameter.", "",
                _md_table([""] + cols, [[r] + [best(c) for c in row] for r, row in zip(rows, self.cells[table])]), ""]

    def _targets(self, table: str) -> str:
        """The accuracy targets, byte budgets and communication-cost model of a table's cells (once when every
        column has the same, else per column)."""
        t = self.paper["tables"][table]
        targets, models = [], []
        for j, col in enumerate(t["columns"]):
            cell = next((row[j] for row in self.cells[table] if row[j].specs), None)
            args = self.metric_args(table, cell) if cell else {}
            target, budget = args.get("target"), args.get("budget")
            if target is not None:
                of = f" ({cell.eval['reference']}'s final accuracy)" if "reference" in cell.eval else ""
                targets.append((col["label"], f"{100 * target:.4g}%{of}"))
            if budget is not None:
                targets.append((col["label"], f"budget {budget:.4g} MB ({cell.eval['budget_of']}'s bytes)"))
            if "bandwidth_mbit" in args:
                models.append((col["label"], f"a {_g(args['bandwidth_mbit'])} Mbit/s link per client with "
                                             f"{_g(args['latency_ms'])} ms latency each way"))

        def listed(pairs):
            if len({v for _, v in pairs}) == 1 and len(pairs) == len(t["columns"]):
                return pairs[0][1]
            return ", ".join(f"{c}: {v}" for c, v in pairs)
        out = listed(targets) if targets else ""
        if models:
            out += ("; " if out else "") + f"communication-cost model: {listed(models)}, beside the measured compute time"
        return out

    def verdicts(self) -> list[tuple[dict, Verdict, Verdict]]:
        """(claim, verdict on the paper's numbers, verdict on ours) for every claim of the paper."""
        out = []
        for claim in self.paper["claims"]:
            chk = claim["check"]
            t = self.paper["tables"][chk["table"]]
            r, c = self.labels(chk["table"])
            lower = t.get("lower_is_better", False)
            on_paper = check_claim(chk, self.as_samples(chk["table"], self.theirs(chk["table"])), r, c, lower)
            on_ours = check_claim(chk, self.as_samples(chk["table"], self.ours(chk["table"])), r, c, lower,
                                  self.grids(chk["table"]))
            out.append((claim, on_paper, on_ours))
        return out

    def claims_section(self, verdicts) -> str:
        rows = [[claim["text"], claim["source"], on_paper.mark, f"{on_ours.mark} {on_ours.outcome}: {on_ours.evidence}"]
                for claim, on_paper, on_ours in verdicts]
        intro = ("Each claim is evaluated by the check written in `paper.yaml` (kind and cells), on the paper's own "
                 "published means (a test of the check itself) and on our per-seed values. "
                 f"{MARKS['holds']} holds: the confidence interval of the claimed difference lies on the claimed side; "
                 f"{MARKS['contradicted']} contradicted: it lies on the opposite side; {MARKS['inconclusive']} "
                 f"inconclusive: the interval straddles it, the difference is within seed noise; "
                 f"{MARKS['not evaluable']} not evaluable at this scale. A claim over several cells holds when every "
                 f"comparison holds and is contradicted when any is. \"≈ within m\" holds only when the whole "
                 f"interval lies within ±m. Procedure: {PROCEDURE}. Evidence: mean difference (positive = the claimed "
                 "side) [interval], n." + (" A ratio claim (a at least f × b) gives the mean per-seed ratio a / b "
                                           "[interval], n, and holds when the interval lies at or above f."
                                           if any(c["check"]["kind"] == "ratio_at_least"
                                                  for c in self.paper["claims"]) else ""))
        return "\n".join(["## Claims", "", intro, "", _md_table(["Claim", "Source", "Paper's numbers", "Ours"], rows)])

    def plots_section(self, figures_dir: Path, report_dir: Path) -> str:
        out = []
        for plot in self.paper.get("plots", []):
            if plot.get("kind") == "curves":
                out += self._curves_plot(plot, figures_dir, report_dir)
                continue
            if plot.get("kind") == "grid_heatmap":
                out += self._heatmap_plot(plot, figures_dir, report_dir)
                continue
            if plot.get("kind") == "scaling":
                out += self._scaling_plot(plot, figures_dir, report_dir)
                continue
            if plot.get("kind") == "generated":
                out += self._generated_plot(plot, figures_dir, report_dir)
                continue
            if plot.get("kind") == "scatter":
                out += self._scatter_plot(plot, figures_dir, report_dir)
                continue
            t = self.paper["tables"][plot["table"]]
            rows, cols = self.labels(plot["table"])
            panels = []
            for col in plot["column"] if isinstance(plot["column"], list) else [plot["column"]]:
                j = cols.index(col)
                series = []
                for label in plot["rows"]:
                    ids = self.cell_run_ids(plot["table"], self.cells[plot["table"]][rows.index(label)][j])
                    if ids:
                        series.append((label, [self.results[r] for r in ids]))
                target = next((self.metric_args(plot["table"], self.cells[plot["table"]][i][j]).get("target")
                               for i in range(len(rows)) if self.cells[plot["table"]][i][j].specs), None)
                if series:
                    panels.append((col, series, target))
            if not panels:
                continue
            path = figures_dir / f"{self.name}_{plot['name']}.png"
            if plot.get("x") == "bytes":  # accuracy against the cumulative megabytes of all clients, up and down
                accuracy_per_round(panels, f"{plot['title']} — {self.scale} scale", path,
                                   lambda r: 1e-6 * np.cumsum(round_bytes(r)),
                                   "cumulative communication, MB (all clients, up + down; log scale)")
            else:
                accuracy_per_round(panels, f"{plot['title']} — {self.scale} scale", path)
            rel = Path(os.path.relpath(path, report_dir))
            out += [f"### {plot['title']}", "", f"![{plot['title']}]({rel.as_posix()})", "",
                    "Mean over seeds; the dashed line is the target accuracy." if t["metric"] == "rounds_to_target"
                    else "Mean over seeds" + (", at each cell's best grid point." if self.cells[plot["table"]][0][0]
                                              .points else "."), ""]
        return "\n".join(["## Plots", "", *out]) if out else ""

    def _generated_plot(self, plot: dict, figures_dir: Path, report_dir: Path) -> list[str]:
        """A generative method's images after every round (its `generated` log: per round, one 8-bit image per
        site of the site's first test label map), first seed, one row per (table row, round), below the real
        images and label maps."""
        import torch
        from common.data import load_dataset
        rows, cols = self.labels(plot["table"])
        ds = load_dataset(self.sc["base"]["dataset"]["name"], self.data_root)
        sites = range(len(ds.domains))
        first = [int((ds.test.domain == d).nonzero()[0]) for d in sites]
        grid = [[ds.test.x[i] for i in first], [ds.test.y[i].float().mean(0, keepdim=True) for i in first]]
        labels = ["real image", "label map"]
        for label in plot["rows"]:
            ids = self.cell_run_ids(plot["table"], self.cells[plot["table"]][rows.index(label)][cols.index(plot["column"])])
            if not ids:
                continue
            res = self.results[ids[0]]
            for r, images in zip(res["metrics"]["round"], res["metrics"]["generated"]):
                grid.append([torch.tensor(img, dtype=torch.float32) / 255 for img in images])
                labels.append(f"{label}, stage {r}")
        path = figures_dir / f"{self.name}_{plot['name']}.png"
        sample_grid(grid, labels, list(ds.domains), f"{plot['title']} — {self.scale} scale", path)
        rel = Path(os.path.relpath(path, report_dir))
        return [f"### {plot['title']}", "", f"![{plot['title']}]({rel.as_posix()})", "",
                f"Columns: the sites (centres) in the order they are visited. Seed {res['spec']['seed']}.", ""]

    def _curves_plot(self, plot: dict, figures_dir: Path, report_dir: Path) -> list[str]:
        """Per-round metrics of every (row, column) cell of a table, one panel per metric."""
        rows, cols = self.labels(plot["table"])
        by_epochs = plot.get("x", "rounds") == "epochs"
        series = []
        for col in plot["column"] if isinstance(plot["column"], list) else [plot["column"]]:
            for label in plot["rows"]:
                cell = self.cells[plot["table"]][rows.index(label)][cols.index(col)]
                ids = self.cell_run_ids(plot["table"], cell)
                if ids:
                    step = cell.specs[0]["training"]["local_epochs"] if by_epochs else 1
                    series.append((label, col, [self.results[r] for r in ids], step))
        if not series:
            return []
        path = figures_dir / f"{self.name}_{plot['name']}.png"
        metrics = plot.get("metrics", ["test_accuracy"])
        curves(metrics, series, f"{plot['title']} — {self.scale} scale", path,
               "local epochs (rounds x E)" if by_epochs else "communication round")
        rel = Path(os.path.relpath(path, report_dir))
        return [f"### {plot['title']}", "", f"![{plot['title']}]({rel.as_posix()})", "",
                "Mean over seeds" + (", against local epochs (rounds x E), the paper's axis." if by_epochs else "."),
                ""]

    def _scaling_plot(self, plot: dict, figures_dir: Path, report_dir: Path) -> list[str]:
        """The rows of a table as lines across the listed columns (model sizes, left to right), the paper's values
        and ours side by side; our tick labels add the size of the model each column ran (parameters counted by
        the runs)."""
        table = plot["table"]
        t = self.paper["tables"][table]
        rows, cols = self.labels(table)
        ours, theirs = self.ours(table), self.theirs(table)
        columns = plot["column"] if isinstance(plot["column"], list) else [plot["column"]]
        our_ticks = []
        for col in columns:
            j = cols.index(col)
            res = [self.results[r] for row in self.cells[table] for r in row[j].run_ids if r in self.results]
            sizes = {r["model"]["parameters"] for r in res if "model" in r}
            our_ticks.append(col + ("\n(not run)" if not res else
                                    f"\n{max(sizes) / 1e6:.1f}M params" if sizes else ""))

        def series(grid, with_std: bool):
            return [(label, [grid[rows.index(label)][cols.index(c)].mean
                             if grid[rows.index(label)][cols.index(c)].available else None for c in columns],
                     [grid[rows.index(label)][cols.index(c)].std for c in columns] if with_std else None)
                    for label in plot["rows"]]

        _, our_cols, analogs = self.analogs(table)
        panels = [("Paper", columns, series(theirs, False)),
                  (f"Ours ({self.scale} scale)", our_ticks, series(ours, True))]
        path = figures_dir / f"{self.name}_{plot['name']}.png"
        label = {"final_accuracy": "test accuracy (%)"}.get(t["metric"], t["metric"].replace("_", " "))
        scaling(panels, f"{plot['title']} — {self.scale} scale", path, label)
        rel = Path(os.path.relpath(path, report_dir))
        return [f"### {plot['title']}", "", f"![{plot['title']}]({rel.as_posix()})", "",
                "Left: the paper's values; right: ours, mean over seeds with a band of ± one standard deviation, "
                "each column labelled with the size of the model it ran. A row without a value in a column was not "
                "run there (or the paper gives none).", ""]

    def _scatter_plot(self, plot: dict, figures_dir: Path, report_dir: Path) -> list[str]:
        """Each listed row of a table as a point in the plane of two of its columns (`column: [x, y]`, e.g. student
        accuracy and agreement), the paper's values and ours side by side."""
        table = plot["table"]
        rows, cols = self.labels(table)
        x_col, y_col = plot["column"]
        i_x, i_y = cols.index(x_col), cols.index(y_col)

        def points(grid, with_std: bool):
            out = []
            for label in plot["rows"]:
                vx, vy = grid[rows.index(label)][i_x], grid[rows.index(label)][i_y]
                if vx.available and vy.available:
                    out.append((label, vx.mean, vy.mean, vx.std if with_std else None, vy.std if with_std else None))
            return out

        panels = [("Paper", points(self.theirs(table), False)),
                  (f"Ours ({self.scale} scale)", points(self.ours(table), True))]
        if not panels[1][1]:
            return []
        path = figures_dir / f"{self.name}_{plot['name']}.png"
        scatter(panels, f"{plot['title']} — {self.scale} scale", path, x_col, y_col)
        rel = Path(os.path.relpath(path, report_dir))
        return [f"### {plot['title']}", "", f"![{plot['title']}]({rel.as_posix()})", "",
                "Left: the paper's values (where it gives both); right: ours, mean over seeds with error bars of ± one "
                "standard deviation.", ""]

    def _heatmap_plot(self, plot: dict, figures_dir: Path, report_dir: Path) -> list[str]:
        """A table with a grid of at most two axes: a heat map per cell, a figure row per column of the table."""
        table = plot["table"]
        t = self.paper["tables"][table]
        grid = table_grid(self.paper, table, self.scale)
        if not 1 <= len(grid) <= 2:
            raise SuiteError(f"plot '{plot['name']}': a grid_heatmap needs a table with a grid of one or two axes")
        x_key, y_key = (*grid, None)[:2]
        rows, cols = self.labels(table)
        panels, shown = [], []
        for col in plot["column"] if isinstance(plot["column"], list) else [plot["column"]]:
            line = []
            for label in plot["rows"]:
                cell = self.cells[table][rows.index(label)][cols.index(col)]
                if not cell.points:
                    line.append(None)
                    continue
                values = {tuple(s.get(k) for k in (x_key, y_key)): v for s, v in self.point_values(table, cell)}
                swept = dict(cell.points[0].settings)
                # an axis the cell's method does not have is drawn as one "not swept" line
                xs, ys = ([*grid[k]] if k in swept else [None] for k in (x_key, y_key))
                line.append({"x_label": x_key if xs != [None] else f"{x_key} (not swept)", "x": xs,
                             "y_label": y_key if ys != [None] else f"{y_key or ''} (not swept)", "y": ys,
                             "z": [[values[x, y].mean if values[x, y].available else None for x in xs] for y in ys]})
            if any(line):
                panels.append(line)
                shown.append(col)
        if not panels:
            return []
        path = figures_dir / f"{self.name}_{plot['name']}.png"
        grid_heatmaps(panels, shown, plot["rows"], f"{plot['title']} — {self.scale} scale", path,
                      t["metric"].replace("_", " "), t.get("lower_is_better", False))
        rel = Path(os.path.relpath(path, report_dir))
        return [f"### {plot['title']}", "", f"![{plot['title']}]({rel.as_posix()})", "",
                "One heat map per method and task: every grid point's value (mean over seeds), the best outlined, "
                "'div' where the run diverged. Colours compare within a task.", ""]

    def samples_section(self, figures_dir: Path, report_dir: Path) -> str:
        """Sample test images of the scale's dataset (paper.yaml `samples`): a row per domain, one per class."""
        spec = self.paper.get("samples")
        if not spec:
            return ""
        from common.data import load_dataset
        ds = load_dataset(self.sc["base"]["dataset"]["name"], self.data_root)
        if "texts" in ds.extra:
            return self._text_samples(spec, ds, figures_dir, report_dir)
        if "structures" in ds.extra:
            return self._segmentation_samples(spec, ds, figures_dir, report_dir)
        if ds.extra.get("video"):
            return self._video_samples(spec, ds, figures_dir, report_dir)
        if ds.extra.get("retrieval"):
            return self._reid_samples(spec, ds, figures_dir, report_dir)
        test = ds.test
        names = ds.domains or ("",)
        domain = test.domain if test.domain is not None else test.y.new_zeros(len(test))
        grid = []
        for d in range(len(names)):
            row = []
            for c in range(ds.num_classes):
                idx = ((domain == d) & (test.y == c)).nonzero().flatten()
                row.append(test.x[idx[0]] if len(idx) else None)
            grid.append(row)
        path = figures_dir / f"{self.name}_{spec['name']}.png"
        sample_grid(grid, list(names), [str(c) for c in range(ds.num_classes)], f"{spec['title']} — {self.scale} scale",
                    path)
        rel = Path(os.path.relpath(path, report_dir))
        return "\n".join([f"## {spec['title']}", "", f"![{spec['title']}]({rel.as_posix()})", "",
                          f"The first test image of each class. Dataset: {ds.description}.", ""])

    def _reid_samples(self, spec: dict, ds, figures_dir: Path, report_dir: Path, identities: int = 3,
                      cameras: int = 4) -> str:
        """A person re-identification dataset: per domain, its first test identities, each in every camera."""
        test, cams = ds.test, ds.extra["test_camera"]
        grid = []
        for d in range(len(ds.domains)):
            row = []
            for i in test.y[test.domain == d].unique()[:identities]:
                for c in range(cameras):
                    idx = ((test.domain == d) & (test.y == i) & (cams == c)).nonzero().flatten()
                    row.append(test.x[idx[0]] if len(idx) else None)
            grid.append(row)
        path = figures_dir / f"{self.name}_{spec['name']}.png"
        sample_grid(grid, list(ds.domains), [f"id {k + 1} cam {c + 1}" for k in range(identities) for c in range(cameras)],
                    f"{spec['title']} — {self.scale} scale", path)
        rel = Path(os.path.relpath(path, report_dir))
        return "\n".join([f"## {spec['title']}", "", f"![{spec['title']}]({rel.as_posix()})", "",
                          f"Per dataset (row), its first {identities} test identities, each seen by cameras 1-{cameras} "
                          f"(empty: the dataset has fewer cameras). Dataset: {ds.description}.", ""])

    def _segmentation_samples(self, spec: dict, ds, figures_dir: Path, report_dir: Path, per_site: int = 6) -> str:
        """The first test images of each site of a segmentation dataset, each structure outlined."""
        test, names = ds.test, ds.domains
        grid, masks = [], []
        for d in range(len(names)):
            idx = (test.domain == d).nonzero().flatten()[:per_site]
            grid.append([test.x[i] for i in idx])
            masks.append([test.y[i] for i in idx])
        path = figures_dir / f"{self.name}_{spec['name']}.png"
        sample_grid(grid, [f"site {n}" for n in names], [str(i + 1) for i in range(per_site)],
                    f"{spec['title']} — {self.scale} scale", path, masks=masks)
        rel = Path(os.path.relpath(path, report_dir))
        outline = ", ".join(f"{s} ({c})" for s, c in zip(ds.extra["structures"], ("cyan", "yellow", "lime", "magenta")))
        return "\n".join([f"## {spec['title']}", "", f"![{spec['title']}]({rel.as_posix()})", "",
                          f"The first {per_site} test images of each site, outlines: {outline}. Dataset: "
                          f"{ds.description}.", *([spec["caption"].strip()] if spec.get("caption") else []), ""])
    def _video_samples(self, spec: dict, ds, figures_dir: Path, report_dir: Path) -> str:
        """Frame strips of a video dataset: the first test video of each identity; and, with `animations: <table>`
        (or a list of tables), the first test video reconstructed by each row's first-seed run (the frames the run
        logged as `animation` after its last round), below its source and driving frames."""
        import torch
        x, y = ds.test.x, ds.test.y
        t = x.shape[2]
        firsts = [int((y == c).nonzero()[0]) for c in range(ds.num_classes) if (y == c).any()][:8]
        grid = [[x[i, :, f] for f in range(t)] for i in firsts]
        path = figures_dir / f"{self.name}_{spec['name']}.png"
        sample_grid(grid, [f"identity {int(y[i])}" for i in firsts], [f"t={f}" for f in range(t)],
                    f"{spec['title']} — test videos, {self.scale} scale", path)
        rel = Path(os.path.relpath(path, report_dir))
        out = [f"## {spec['title']}", "", f"![{spec['title']}]({rel.as_posix()})", "",
               f"The first test video of each identity (up to 8), every frame. Dataset: {ds.description}.", ""]
        tables = spec.get("animations") or []
        tables = [tables] if isinstance(tables, str) else tables
        rows, seen = [], set()
        for table in tables:
            labels, _ = self.labels(table)
            for label, cells in zip(labels, self.cells[table]):
                cell = cells[0]
                if not cell.specs or "prefix" in cell.eval:
                    continue
                first = min(cell.specs, key=lambda s: training_spec(s)["seed"])
                rid = run_id(training_spec(first))
                frames = [f for f in self.results[rid]["metrics"].get("animation", []) if f is not None]
                if rid in seen or not frames:
                    continue
                seen.add(rid)
                rows.append((label, torch.tensor(frames[-1], dtype=torch.float32) / 255))
        if rows:
            strip = [[x[0, :, 0]] + [None] * (t - 2), [x[0, :, f] for f in range(1, t)]]
            strip += [[frame for frame in frames] for _, frames in rows]
            path = figures_dir / f"{self.name}_{spec['name']}_animation.png"
            sample_grid(strip, ["source (t=0)", "driving", *(label for label, _ in rows)], [f"t={f}" for f in range(1, t)],
                        f"Reconstruction of test video 0 (source: its frame 0) — {self.scale} scale, seed "
                        f"{min(training_spec(s)['seed'] for s in self.cells[tables[0]][0][0].specs)}", path)
            rel = Path(os.path.relpath(path, report_dir))
            out += [f"![Reconstructions]({rel.as_posix()})", "",
                    "Test video 0 reconstructed from its first frame (top row) with the motion of each later frame "
                    "(second row) by each method's first-seed run after its last round.", ""]
        return "\n".join(out)

    def _text_samples(self, spec: dict, ds, figures_dir: Path, report_dir: Path, per_class: int = 4) -> str:
        """The first test sentences of each class of a text dataset, as a table and a figure."""
        names = ds.extra.get("label_words") or [str(c) for c in range(ds.num_classes)]
        texts, y = ds.extra["texts"]["test"], ds.test.y.tolist()
        rows = [(names[c], text) for c in range(ds.num_classes)
                for text in [t for t, label in zip(texts, y) if label == c][:per_class]]
        path = figures_dir / f"{self.name}_{spec['name']}.png"
        sample_texts(rows, f"{spec['title']} — {self.scale} scale", path)
        rel = Path(os.path.relpath(path, report_dir))
        return "\n".join([f"## {spec['title']}", "", f"![{spec['title']}]({rel.as_posix()})", "",
                          f"The first {per_class} test sentences of each class. Dataset: {ds.description}.", "",
                          _md_table(["class", "text"], [[c, t] for c, t in rows]), ""])

    def scale_section(self) -> str:
        out = ["## How this scale differs from the paper's setting", ""]
        out += [f"- {d}" for d in self.sc.get("deviations", [])] or ["- None: this is the paper's setting."]
        translate = self.sc.get("translate", {})
        if translate:
            out += ["", "Paper values and the values used at this scale (— means not run):", "",
                    _md_table(["setting", "paper → this scale"],
                              [[k, ", ".join(f"{a} → {'—' if b is None else b}" for a, b in m.items())]
                               for k, m in translate.items()])]
        return "\n".join(out)

    def provenance_section(self, elapsed_report: float) -> str:
        res = [self.results[r] for r in self.run_ids]
        res += [r for runs in self.confirmed.values() for r in runs if r.get("run_id")]
        walls = sum(r["wall_time_s"] for r in res)
        starts = [datetime.fromisoformat(r["started"]) for r in res]
        ends = [s.timestamp() + r["wall_time_s"] for s, r in zip(starts, res)]
        elapsed = max(ends) - min(s.timestamp() for s in starts) if starts else 0.0
        commits = sorted({r["provenance"]["commit"] for r in res})
        prov = res[0]["provenance"] if res else {}
        pk = prov.get("packages", {})
        leaks = sum(r["data"]["test_samples_in_train"] for r in res)
        kernels = f", {prov['cpu_set']} kernels" if prov.get("cpu_set") else ""  # absent in runs of older commits
        out = ["## Provenance", "",
               f"- Runs: {len(res)} ({sum(r['status'] == 'completed' for r in res)} completed, "
               f"{sum(r['status'] == 'diverged' for r in res)} diverged); seeds {self.seeds}.",
               f"- Wall time: {walls / 60:.1f} min of training summed over runs; {elapsed / 60:.1f} min from the "
               f"first run's start to the last run's end (spans earlier builds when runs were reused); report built in "
               f"{elapsed_report:.1f} s.",
               f"- Code: commit(s) {', '.join(commits)}; report built at commit {git_commit()}.",
               f"- Software: Python {prov.get('python')}, " + ", ".join(f"{k} {v}" for k, v in pk.items() if v) + ".",
               f"- Device: {prov.get('device')} ({prov.get('processor')}{kernels}, {prov.get('threads')} thread(s) "
               f"per run), {prov.get('platform')}.",
               f"- Data sanity: test samples also found in a training split, summed over runs: {leaks}; every "
               f"partition assigns each training sample to at most one client, and to exactly one unless it keeps "
               f"only a share of each domain (checked at run time).",
               "", "<details><summary>Runs used by this report (run id = hash of the resolved config)</summary>", "",
               _md_table(["run", "method", "data", "partition", "model", "C", "E", "rounds", "lr (client / server)", "seed",
                          "status",
                          "data fingerprint", "partition fingerprint", "wall (s)"],
                         [[f"`{r['run_id']}`", r["spec"]["method"]["name"], r["spec"]["dataset"]["name"],
                           f"{r['spec']['partition']['scheme']} α={r['spec']['partition'].get('alpha', '—')}",
                           f"{r['spec']['model']['name']}-{r['spec']['model'].get('norm', '')}",
                           str(r["spec"]["training"]["client_fraction"]), str(r["spec"]["training"]["local_epochs"]),
                           str(r["spec"]["training"]["rounds"]), _lrs(r["spec"]), str(r["spec"]["seed"]), r["status"],
                           f"`{r['data']['fingerprint']}`", f"`{r['data']['partition_fingerprint']}`",
                           f"{r['wall_time_s']:.1f}"] for r in sorted((self.results[i] for i in self.run_ids),
                                                                      key=lambda r: r["run_id"])]),
               "", "</details>"]
        confirmed = [r for runs in self.confirmed.values() for r in runs if r.get("run_id")]
        if confirmed:
            out += ["", "<details><summary>Best grid points re-run with the other seeds (the grid is tuned on seed "
                        f"{self.seeds[0]}; id = hash of the resolved config)</summary>", "",
                    _md_table(["run", "method", "data", "lr (client / server)", "seed", "status", "wall (s)"],
                              [[f"`{r['run_id']}`", r["spec"]["method"]["name"], r["spec"]["dataset"]["name"],
                                _lrs(r["spec"]), str(r["spec"]["seed"]), r["status"], f"{r['wall_time_s']:.1f}"]
                               for r in sorted(confirmed, key=lambda r: r["run_id"])]), "", "</details>"]
        if self.calibration_ids:
            cals = [self.results[c] for c in self.calibration_ids]
            out += ["", "<details><summary>Calibrations used by this report (post-hoc methods applied to a base "
                        "run's final model; id = hash of the base run's config and the calibration settings)"
                        "</summary>", "",
                    _md_table(["calibration", "method", "settings", "base run", "status", "accuracy before → after",
                               "wall (s)"],
                              [[f"`{c['run_id']}`", c["spec"]["calibration"]["name"],
                                ", ".join(f"{k}={_g(v)}" for k, v in sorted(c["spec"]["calibration"].items())
                                          if k != "name"),
                                f"`{c['base_run']}`", c["status"],
                                f"{100 * c['before']['test_accuracy']:.2f} → {100 * c['final']['test_accuracy']:.2f}"
                                if c["before"] else "—", f"{c['wall_time_s']:.1f}"] for c in cals]),
                    "", "</details>"]
        return "\n".join(out)

    def cite_section(self) -> str:
        p = self.paper
        when = datetime.now(timezone.utc).date().isoformat()
        return "\n".join([
            "## How to cite", "",
            "The paper:", "", "```bibtex", p["citation"].rstrip(), "```", "",
            "These reproduced numbers (give the commit, so the exact code and configuration can be recovered):" +
            ("" if self.scale == "paper" else f" they are **{self.scale}-scale analog numbers**, obtained on the "
             "offline data named in each table, and must not be quoted as results on the paper's datasets."), "",
            "```bibtex",
            f"@misc{{paperbench_{self.name}_{self.scale},",
            f"  title  = {{Reproduction of \"{p['title']}\" ({self.scale} scale)}},",
            f"  note   = {{paper-benchmarks suite, report reports/{self.name}.md, {self.scale} scale"
            + (" (analog data: its numbers are not results on the paper's datasets)" if self.scale != "paper" else "")
            + f", commit {git_commit()}}},",
            f"  year   = {{{when[:4]}}},",
            f"  urldate = {{{when}}}",
            "}", "```"])

    def twin(self, verdicts, build_seconds: float) -> dict:
        """The report as data (reports/<paper>.json): per cell the paper's value and source and our per-seed
        values; per claim the outcomes and statistics; provenance. Numbers can be read without parsing markdown."""
        def cell(v: CellValue) -> dict:
            return {"mean": v.mean if v.available else None, "std": v.std, "n": v.n, "diverged": v.diverged,
                    "censored": v.censored, "note": v.note,
                    "per_seed": {str(k): x for k, x in v.per_seed if k is not None}}
        tables = {}
        for name, t in self.paper["tables"].items():
            rows, cols = self.labels(name)
            our_rows, our_cols, analogs = self.analogs(name)
            ours, theirs = self.ours(name), self.theirs(name)
            tables[name] = {
                "title": t["title"], "metric": t["metric"], "source": t["source"], "analogs": analogs,
                "cells": [{"row": rows[i], "column": cols[j], "our_row": our_rows[i], "our_column": our_cols[j],
                           "paper": {"value": theirs[i][j].mean if theirs[i][j].available else theirs[i][j].note,
                                     "std": theirs[i][j].std, "source": t["source"]},
                           "ours": cell(ours[i][j])}
                          for i in range(len(rows)) for j in range(len(cols))],
                "ceilings": [{"analog": e["analog"], "ceiling": cell(e["ceiling"]),
                              "baseline": None if e["baseline"] is None else e["baseline"].mean, "of": e["of"],
                              "room": e["room"]} for e in self.headroom(name)]}
        res = [self.results[r] for r in self.run_ids]
        res += [r for runs in self.confirmed.values() for r in runs if r.get("run_id")]
        starts = [datetime.fromisoformat(r["started"]).timestamp() for r in res]
        span = max(s + r["wall_time_s"] for s, r in zip(starts, res)) - min(starts) if res else 0.0
        return {
            "paper": self.name, "title": self.paper["title"], "scale": self.scale, "seeds": self.seeds,
            "procedure": PROCEDURE, "tables": tables,
            "claims": [{"id": c["id"], "text": c["text"], "source": c["source"], "paper_outcome": p.outcome,
                        "outcome": o.outcome, "evidence": o.evidence, "comparisons": list(o.stats)}
                       for c, p, o in verdicts],
            "provenance": {"commit": git_commit(), "run_commits": sorted({r["provenance"]["commit"] for r in res}),
                           "runs": self.run_ids, "calibrations": self.calibration_ids,
                           "confirmations": sorted(r["run_id"] for runs in self.confirmed.values() for r in runs
                                                   if r.get("run_id")),
                           "training_minutes": sum(r["wall_time_s"] for r in res) / 60,
                           "span_minutes": span / 60, "report_seconds": build_seconds,
                           "built": datetime.now(timezone.utc).isoformat(timespec="seconds")}}

    def build(self, out: Path, figures_dir: Path) -> None:
        t0 = time.perf_counter()
        verdicts = self.verdicts()
        parts = [self.header(), *(self.table_section(t) for t in self.paper["tables"]), self.claims_section(verdicts),
                 self.plots_section(figures_dir, out.parent), self.samples_section(figures_dir, out.parent),
                 self.scale_section()]
        elapsed = time.perf_counter() - t0
        parts += [self.provenance_section(elapsed), self.cite_section()]
        write_json_atomic(out.with_suffix(".json"), self.twin(verdicts, elapsed))
        write_text_atomic(out, "\n\n".join(p for p in parts if p) + "\n")


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paper")
    ap.add_argument("--scale", default="mini")
    ap.add_argument("--seeds", type=int, nargs="*")
    ap.add_argument("--results", type=Path, default=Path("results/runs"))
    ap.add_argument("--calibrations", type=Path, help="calibration results (default: calibrations/ beside --results)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--figures", type=Path, default=Path("reports/figures"))
    ap.add_argument("--data-root", default="data", help="where paper-scale datasets live (for sample figures)")
    args = ap.parse_args(argv)
    ReportBuilder(args.paper, args.scale, args.results, args.seeds or None, args.data_root,
                  args.calibrations).build(args.out or Path("reports") / f"{args.paper}.md", args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
