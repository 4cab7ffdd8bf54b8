"""Re-run the best point of a table cell's learning-rate grid with another seed.

A grid (e.g. FedOpt's client x server learning rates) is tuned on the first seed; once its runs exist, the best
point of each cell is trained with every other seed, so the cell's value is a mean over seeds like any other.
Which point that is depends on the tuning runs, so the job is named by its cell and seed, not by a spec hash:

    python -m common.confirm fedopt table1 0 2 1 --scale mini --results results/runs --out results/confirmations/x.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import entry_point
from common.experiments import load_paper, table_cells
from common.report.metrics import best_grid_point
from common.results import read_result, write_json_atomic


def confirmation_spec(paper_name: str, table: str, row: int, col: int, seed: int, scale: str, seeds,
                      results_dir: Path) -> dict | None:
    """The spec of the cell's best grid point (by the tuning seed's value, as the report chooses it) with `seed`;
    None when every point of the grid diverged."""
    paper = load_paper(paper_name)
    t = paper["tables"][table]
    cell = table_cells(paper, table, scale, seeds)[row][col]
    results = {rid: read_result(results_dir / f"{rid}.json") for p in cell.points for rid in p.run_ids}
    best = best_grid_point(cell.points, results, t["metric"], cell.eval, t.get("lower_is_better", False))
    return None if best is None else {**cell.points[best].specs[0], "seed": seed}


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paper")
    ap.add_argument("table")
    ap.add_argument("row", type=int)
    ap.add_argument("col", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--scale", default="mini")
    ap.add_argument("--seeds", type=int, nargs="*")
    ap.add_argument("--results", type=Path, default=Path("results/runs"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, default=Path("results/checkpoints"))
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from common.results import run_id
    from common.train import execute
    spec = confirmation_spec(args.paper, args.table, args.row, args.col, args.seed, args.scale,
                             args.seeds or None, args.results)
    if spec is None:
        write_json_atomic(args.out, {"status": "diverged", "spec": None, "run_id": None,
                                     "note": "every grid point diverged on the tuning seed"})
        return 0
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    result = execute(spec, args.data_root, args.device, args.threads,
                     checkpoint=args.checkpoints / f"{run_id(spec)}.pt")
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
